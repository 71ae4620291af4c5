"""Checkpoint files: how a model's weights reach the reference from disk and go back.

    checkpoint    load / save: big_vision `.npz`, safetensors, Hugging Face folders (re-exported
                  as `paligemma.ref.load` and `paligemma.ref.save`)
    inferconfig   the config a file's tensor shapes describe, for files that come without one
    hf_layout     Hugging Face transformers' tensor names, transposes and config.json
    tensorfiles   lazy `.npz` / `.safetensors` readers, atomic writes, `CheckpointError`
    quantread     reading quantized files (the `paligemma_quant` header, checked)
    quantfile     writing them: `quantize_file`, tensor by tensor

The formats themselves are the model's business (`paligemma.ref.quant` holds the int8/int4 math);
this package only moves tensors between files and the parameter tree of `paligemma.ref.params`.
"""
