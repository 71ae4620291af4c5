"""Video / multi-image input: images [B, F, R, R, 3] give F x P image tokens in the prefix.

The order of the tokens is checked against an independent construction (each frame through the
vision tower on its own, then concatenated: what big_vision's `embed_image` does by folding the
frames into the batch); the one-frame case against the image path; ref/fast parity over drawn
models, frame counts, image and patch sizes (`parity.strategies.video_prompts`).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import fast, ref
from paligemma.fast.pipeline import PaliGemma
from paligemma.parity.strategies import configs, video_prompts
from paligemma.parity.tolerances import FAST_FLOAT32, FLOAT32_REORDERED, assert_close, relative_error
from paligemma.ref import model as ref_model
from paligemma.ref import siglip


@pytest.fixture(scope="module")
def tiny():
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=3, dtype=np.float64, random_norms=True)
    rng = np.random.default_rng(0)
    R = config.vision.image_size
    frames = rng.uniform(-1, 1, (2, 3, R, R, 3))  # [B, F, R, R, 3]
    tokens = rng.integers(3, config.llm.vocab_size, (2, 6))
    mask_ar = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    input_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], bool)
    return config, params, frames, (tokens, mask_ar, input_mask)


def test_frame_tokens_are_each_frame_embedded_alone_then_concatenated_in_order(tiny):
    config, params, frames, (tokens, mask_ar, input_mask) = tiny
    x, full_mask, full_ar = ref_model.embed_image_and_text(params, config, frames, tokens, mask_ar, input_mask)
    P, F = config.vision.num_patches, frames.shape[1]
    for b in range(frames.shape[0]):
        for f in range(F):
            alone = siglip.embed_image(params["img"], config.vision, frames[b, f][None])[0]  # [P, D]
            np.testing.assert_allclose(x[b, f * P:(f + 1) * P], alone, rtol=1e-12, atol=1e-12)
    assert x.shape[1] == F * P + tokens.shape[1]
    # Every image token is in the bidirectional prefix and real.
    assert full_ar[:, :F * P].sum() == 0 and full_mask[:, :F * P].all()
    assert ref_model.num_image_tokens(config, frames.shape) == F * P


def test_one_frame_equals_the_image_path_in_ref_and_fast(tiny):
    config, params, frames, prompt = tiny
    one, image = frames[:, :1], frames[:, 0]  # [B, 1, R, R, 3] and [B, R, R, 3]
    np.testing.assert_array_equal(ref.forward(params, config, one, *prompt),
                                  ref.forward(params, config, image, *prompt))
    p32 = ref.cast_params(params, np.float32)
    got = np.asarray(fast.forward(p32, config, one.astype(np.float32), *prompt))
    want = np.asarray(fast.forward(p32, config, image.astype(np.float32), *prompt))
    assert_close(got, want, FLOAT32_REORDERED, "fast: [B, 1, R, R, 3] vs [B, R, R, 3]")
    g_one = ref.generate(params, config, one, *prompt, max_new_tokens=4)
    g_image = ref.generate(params, config, image, *prompt, max_new_tokens=4)
    np.testing.assert_array_equal(g_one.tokens, g_image.tokens)
    fast_one = fast.generate(p32, config, one.astype(np.float32), *prompt, max_new_tokens=4)
    fast_image = fast.generate(p32, config, image.astype(np.float32), *prompt, max_new_tokens=4)
    np.testing.assert_array_equal(fast_one.tokens, fast_image.tokens)


def test_frame_order_matters(tiny):
    config, params, frames, prompt = tiny
    logits = ref.forward(params, config, frames, *prompt)
    swapped = ref.forward(params, config, frames[:, ::-1], *prompt)
    # Different image tokens at each prefix position: the text sees a different sequence.
    assert relative_error(swapped, logits) > 1e-3
    p32 = ref.cast_params(params, np.float32)
    fast_swapped = np.asarray(fast.forward(p32, config, frames[:, ::-1].astype(np.float32), *prompt))
    assert_close(fast_swapped, swapped, FAST_FLOAT32, "fast vs ref, reversed frames")


def test_generate_on_frames_is_greedy_under_teacher_forcing_and_caches_every_frame(tiny):
    config, params, frames, (tokens, mask_ar, input_mask) = tiny
    prompt = (tokens[:1, :4], mask_ar[:1, :4] * 0, input_mask[:1, :4])  # one example, prefix only
    out = ref.generate(params, config, frames[:1], *prompt, max_new_tokens=5)
    gen = out.tokens[0, :out.lengths(config.eos_id)[0]]
    # Independent of the cache: the whole sequence in one forward pass, generated tokens causal.
    full = np.concatenate([prompt[0], gen[None, :-1]], axis=1)
    ar = np.concatenate([prompt[1], np.ones((1, len(gen) - 1), int)], axis=1)
    logits = ref.forward(params, config, frames[:1], full, ar)  # [1, 4 + n - 1, V]
    np.testing.assert_array_equal(np.argmax(logits[0, 3:], axis=-1), gen)
    F, P = frames.shape[1], config.vision.num_patches
    cache, _ = ref.prefill(params, config, frames[:1], *prompt, max_new_tokens=5)
    assert cache.k.shape[2] == F * P + 4 + 5  # a slot per image token of every frame
    fast_out = fast.generate(ref.cast_params(params, np.float32), config, frames[:1].astype(np.float32), *prompt,
                             max_new_tokens=5)
    np.testing.assert_array_equal(fast_out.tokens, out.tokens)


@pytest.mark.parametrize("shape, match", [
    ((2, 28, 3), r"images: expected shape \[B, 28, 28, 3\] \(one image per example\) or \[B, F, 28, 28, 3\]"
                 r".*got shape \[2, 28, 3\]"),
    ((1, 2, 2, 28, 28, 3), "got shape \\[1, 2, 2, 28, 28, 3\\]"),
    ((1, 0, 28, 28, 3), "F >= 1"),
    ((1, 2, 14, 14, 3), "got shape \\[1, 2, 14, 14, 3\\]"),
])
def test_bad_image_ranks_and_shapes_are_named(tiny, shape, match):
    config, params, _, (tokens, mask_ar, input_mask) = tiny
    assert config.vision.image_size == 28
    with pytest.raises(ValueError, match=match):
        ref.forward(params, config, np.zeros(shape), tokens[:shape[0]], mask_ar[:shape[0]])


def _bf16_sensitivity(params, config, prompt, gold):
    """How far ref's logits move when its weights are rounded to bfloat16 (parity/tolerances.py)."""
    import ml_dtypes

    rounded = ref.forward(ref.cast_params(params, ml_dtypes.bfloat16), config, *prompt)
    return relative_error(rounded[prompt[3]], gold[prompt[3]])


@settings(max_examples=6)
@given(st.data())
def test_fast_float32_matches_the_float64_reference_on_frames(data):
    config = data.draw(configs(max_depth=2))
    prompt = data.draw(video_prompts(config, max_frames=3))
    params = ref.init_params(config, seed=data.draw(st.integers(0, 100)), dtype=np.float64, random_norms=True)
    gold = ref.forward(params, config, *prompt)
    got = np.asarray(fast.forward(ref.cast_params(params, np.float32), config, *prompt))
    assert got.shape == gold.shape == prompt[1].shape + (config.llm.vocab_size,)
    assert_close(got[prompt[3]], gold[prompt[3]], FAST_FLOAT32, "fast float32 vs ref float64, [B, F, R, R, 3]",
                 _bf16_sensitivity(params, config, prompt, gold))


def test_pipeline_takes_image_lists_and_frames(tmp_path, tiny):
    from PIL import Image

    config, params, _, _ = tiny
    tok = ref.train_tiny_tokenizer(tmp_path / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    params = ref.init_params(config, seed=1)
    paths = []
    for i, colour in enumerate([(200, 10, 10), (10, 200, 10)]):
        a = np.zeros((20, 30, 3), np.uint8)
        a[:] = colour
        a[:, i * 5:(i + 1) * 5] = 255
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(a).save(paths[-1])
    model = PaliGemma(config, params, tok, impl="ref")
    got = model.generate([paths], "caption en", max_new_tokens=4)  # ONE example with two images
    pixels = ref.preprocess(paths, config.vision.image_size)[None]  # [1, 2, R, R, 3]
    want = ref.generate(model.params, model.config, pixels, *tok.batch_prompts(["caption en"]), max_new_tokens=4)
    assert len(got) == 1
    n = len(got[0].tokens)
    np.testing.assert_array_equal(got[0].tokens, want.tokens[0, :n])
    np.testing.assert_allclose(got[0].logprobs, want.logprobs[0, :n], rtol=1e-6)
    # Not the first image alone (log-probabilities tell apart inputs a random model answers alike).
    alone = model.generate(paths[0], "caption en", max_new_tokens=4)
    assert not np.allclose(alone.logprobs[:1], got[0].logprobs[:1], rtol=1e-4)
    # Prepared frames (as from load_video) give the same; mixed frame counts are refused by name.
    again = model.generate(pixels[0], "caption en", max_new_tokens=4)
    np.testing.assert_array_equal(again.tokens, got[0].tokens)
    np.testing.assert_allclose(again.logprobs, got[0].logprobs, rtol=1e-6)
    with pytest.raises(ValueError, match="example 1 has shape"):
        model.generate([paths, paths[:1]], "caption en", max_new_tokens=4)


def test_pallas_kernels_take_the_frame_count_of_image_tokens(tiny):
    # F x P image tokens (not P) decide the kernels' blocks and the cache's tile rounding.
    from paligemma.fast.policy import Policy
    from paligemma.parity.tolerances import SAME_ROUNDING_FLOAT32

    config, params, frames, prompt = tiny
    p32, x32 = ref.cast_params(params, np.float32), frames.astype(np.float32)
    kernels = Policy(attention_impl="pallas_interpret")
    with_kernels = np.asarray(fast.forward(p32, config, x32, *prompt, policy=kernels))
    with_xla = np.asarray(fast.forward(p32, config, x32, *prompt))
    real = prompt[2]
    assert_close(with_kernels[real], with_xla[real], SAME_ROUNDING_FLOAT32, "frames: pallas_interpret vs xla")
    got = fast.generate(p32, config, x32, *prompt, max_new_tokens=3, policy=kernels)
    np.testing.assert_array_equal(got.tokens, fast.generate(p32, config, x32, *prompt, max_new_tokens=3).tokens)
