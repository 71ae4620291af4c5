import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paligemma import ref
from paligemma.parity.strategies import configs, prompts

TOL = dict(rtol=1e-10, atol=1e-10)


def _params(config, seed=0, dtype=np.float64):
    return ref.init_params(config, seed=seed, dtype=dtype, random_norms=True)


@st.composite
def model_and_prompt(draw):
    config = draw(configs())
    return config, _params(config, draw(st.integers(0, 1000))), draw(prompts(config))


@given(model_and_prompt(), st.integers(0, 2**31 - 1))
def test_prefix_never_sees_the_suffix(case, seed):
    config, params, (images, tokens, mask_ar, input_mask) = case
    logits = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    changed = tokens.copy()
    suffix = mask_ar == 1
    changed[suffix] = np.random.default_rng(seed).integers(0, config.llm.vocab_size, suffix.sum())
    other = ref.forward(params, config, images, changed, mask_ar, input_mask)
    prefix = (mask_ar == 0) & input_mask
    np.testing.assert_allclose(other[prefix], logits[prefix], **TOL)


@given(model_and_prompt(), st.data())
def test_suffix_is_causal(case, data):
    config, params, (images, tokens, mask_ar, input_mask) = case
    T = tokens.shape[1]
    cut = data.draw(st.integers(0, T - 1))
    changed = tokens.copy()
    changed[:, cut:] = np.where(mask_ar[:, cut:] == 1, (tokens[:, cut:] + 1) % config.llm.vocab_size,
                                tokens[:, cut:])
    a = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    b = ref.forward(params, config, images, changed, mask_ar, input_mask)
    earlier = np.zeros_like(input_mask)
    earlier[:, :cut] = True
    np.testing.assert_allclose(b[earlier & input_mask], a[earlier & input_mask], **TOL)


@given(model_and_prompt())
def test_batched_prompts_equal_each_prompt_alone(case):
    config, params, (images, tokens, mask_ar, input_mask) = case
    batched = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    for b in range(len(tokens)):
        n = int(input_mask[b].sum())
        alone = ref.forward(params, config, images[b:b + 1], tokens[b:b + 1, :n], mask_ar[b:b + 1, :n])
        np.testing.assert_allclose(batched[b, :n], alone[0], **TOL)


@given(model_and_prompt(), st.integers(1, 4))
def test_left_padding_changes_nothing(case, pads):
    config, params, (images, tokens, mask_ar, input_mask) = case
    images, tokens, mask_ar = images[:1], tokens[:1], mask_ar[:1]
    n = int(input_mask[0].sum())
    alone = ref.forward(params, config, images, tokens[:, :n], mask_ar[:, :n])
    padded = ref.forward(params, config, images,
                         np.pad(tokens[:, :n], ((0, 0), (pads, 0))),
                         np.pad(mask_ar[:, :n], ((0, 0), (pads, 0)), constant_values=1),
                         np.pad(np.ones((1, n), bool), ((0, 0), (pads, 0))))
    np.testing.assert_allclose(padded[:, pads:], alone, **TOL)


def test_image_content_reaches_every_text_position():
    config = ref.get_config("tiny-paligemma2")
    params = _params(config)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 28, 28, 3))
    tokens = np.tile(rng.integers(3, 300, (1, 5)), (2, 1))
    mask_ar = np.array([[0, 0, 0, 1, 1]] * 2)
    logits = ref.forward(params, config, images, tokens, mask_ar)
    assert np.all(np.abs(logits[0] - logits[1]).max(axis=-1) > 1e-6)


@pytest.mark.parametrize("name", ["tiny-paligemma", "tiny-paligemma2", "tiny-paligemma2-28b"])
def test_float32_and_bfloat16_track_float64(name):
    config = ref.get_config(name)
    params = _params(config)
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 28, 28, 3))
    tokens = rng.integers(0, 300, (2, 6))
    mask_ar = np.array([[0, 0, 0, 1, 1, 1]] * 2)
    gold = ref.forward(params, config, images, tokens, mask_ar)
    f32 = ref.forward(ref.cast_params(params, np.float32), config, images, tokens, mask_ar)
    bf16 = ref.forward(ref.cast_params(params, ml_dtypes.bfloat16), config, images, tokens, mask_ar)
    assert gold.dtype == np.float64 and f32.dtype == np.float32 and bf16.dtype == np.float32
    scale = np.abs(gold).max()
    assert np.abs(f32 - gold).max() < 1e-5 * scale
    # bf16 weights carry 8 mantissa bits: errors of a few 1e-3 relative, never more.
    assert np.abs(bf16 - gold).max() < 5e-2 * scale
    assert np.abs(bf16 - gold).max() > 1e-6 * scale  # the rounding really happened


def test_batch_permutation_permutes_outputs():
    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (3, 28, 28, 3))
    tokens = rng.integers(0, 300, (3, 4))
    mask_ar = np.array([[0, 0, 1, 1]] * 3)
    perm = np.array([2, 0, 1])
    a = ref.forward(params, config, images, tokens, mask_ar)
    b = ref.forward(params, config, images[perm], tokens[perm], mask_ar[perm])
    np.testing.assert_allclose(b, a[perm], **TOL)


CONFIG = ref.get_config("tiny-paligemma")
GOOD = dict(images=np.zeros((1, 28, 28, 3)), tokens=np.array([[2, 5, 108]]), mask_ar=np.array([[0, 0, 0]]))


@pytest.mark.parametrize("change, match", [
    (dict(images=np.zeros((1, 32, 32, 3))), r"images: expected shape \[B, 28, 28, 3\] for tiny-paligemma, got shape \[1, 32, 32, 3\]"),
    (dict(images=np.zeros((28, 28, 3))), r"images: expected shape .* got shape \[28, 28, 3\]"),
    (dict(images=np.full((1, 28, 28, 3), 255.0)), r"images: expected values in \[-1, 1\].*got range \[255, 255\]"),
    (dict(images=np.zeros((1, 28, 28, 3), np.uint8)), r"images: expected floats in \[-1, 1\], got dtype uint8"),
    (dict(tokens=np.array([[2, 300, 108]])), r"tokens: expected ids in \[0, 300\), got ids in \[2, 300\]"),
    (dict(tokens=np.array([[2, -1, 108]])), r"tokens: expected ids in \[0, 300\), got ids in \[-1, 108\]"),
    (dict(tokens=np.array([2, 5, 108])), r"tokens: expected shape \[B, T\], got shape \[3\]"),
    (dict(tokens=np.array([[2.0, 5.0, 108.0]])), r"tokens: expected integer ids, got dtype float64"),
    (dict(tokens=np.array([[2, 5, 108]] * 2), mask_ar=np.zeros((2, 3))), r"tokens: expected batch size 1"),
    (dict(mask_ar=np.array([[0, 0]])), r"mask_ar: expected shape \[1, 3\] \(as tokens\), got shape \[1, 2\]"),
    (dict(input_mask=np.ones((1, 4), bool)), r"input_mask: expected shape \[1, 3\] \(as tokens\), got shape \[1, 4\]"),
])
def test_bad_input_is_named(change, match):
    params = _params(CONFIG)
    with pytest.raises(ValueError, match=match):
        ref.forward(params, CONFIG, **{**GOOD, **change})


def test_joined_sequence_is_unscaled_image_tokens_then_scaled_text_tokens():
    from paligemma.ref import siglip
    from paligemma.ref.model import embed_image_and_text

    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    images = np.random.default_rng(4).uniform(-1, 1, (1, 28, 28, 3))
    tokens = np.array([[2, 9, 108]])
    x, input_mask, mask_ar = embed_image_and_text(params, config, images, tokens, np.array([[0, 0, 1]]),
                                                  np.array([[True, True, False]]))
    P, D = config.vision.num_patches, config.llm.width
    np.testing.assert_array_equal(x[:, :P], siglip.head(params["img"]["head"], siglip.encode(params["img"], config.vision, images)))
    np.testing.assert_allclose(x[0, P:], params["llm"]["embedder"]["input_embedding"][tokens[0]] * np.sqrt(D), rtol=1e-15)
    np.testing.assert_array_equal(input_mask[0], [True] * P + [True, True, False])
    np.testing.assert_array_equal(mask_ar[0], [0] * P + [0, 0, 1])


def test_legacy_image_scaling_rounds_only_in_low_precision():
    import math

    from paligemma.ref.model import legacy_image_scaling

    z = np.random.default_rng(0).normal(size=(1, 64, 2048)).astype(np.float32)
    f32 = legacy_image_scaling(z, np.dtype(np.float32))
    assert np.abs(f32 - z).max() < 1e-6 * np.abs(z).max()
    bf16 = legacy_image_scaling(z, np.dtype(ml_dtypes.bfloat16))
    # Independent: round z, divide by the float32 sqrt, round, times bf16(sqrt(2048)) = 45.25, round.
    step = (z.astype(ml_dtypes.bfloat16).astype(np.float64) / np.float32(math.sqrt(2048))).astype(np.float32)
    expected = (step.astype(ml_dtypes.bfloat16).astype(np.float64) * 45.25).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bf16, expected.astype(np.float32))
    rel = np.abs(bf16 - z) / np.abs(z)
    assert 1e-4 < rel.mean() < 3e-3  # HF notes: mean ~7e-4 relative at D = 2048


def test_legacy_image_scaling_switch_reaches_forward():
    config = ref.get_config("tiny-paligemma")
    params = ref.cast_params(_params(config), ml_dtypes.bfloat16)
    rng = np.random.default_rng(1)
    args = (rng.uniform(-1, 1, (1, 28, 28, 3)), rng.integers(0, 300, (1, 4)), np.zeros((1, 4), np.int64))
    plain = ref.forward(params, config, *args)
    legacy = ref.forward(params, config.replace(legacy_image_scaling=True), *args)
    assert 0 < np.abs(plain - legacy).max() < 0.05 * np.abs(plain).max()
