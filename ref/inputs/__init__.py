"""What the model is given: text to token ids, images and video to pixels.

    tokenizer   Gemma's SentencePiece tokenizer with the `<locNNNN>` / `<segNNN>` pieces, and the
                prompt layouts big_vision feeds the model (`paligemma.ref.Tokenizer`)
    image       any image to float32 [R, R, 3] in [-1, 1] (`paligemma.ref.preprocess`, `load_image`)
    video       video files to [F, R, R, 3] (`paligemma.ref.load_video`)
    media       one example's visual input: an image, several images or a video
"""
