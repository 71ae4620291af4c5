"""PaliGemma forward pass: image and text embedded, joined, run through Gemma, text logits out.

Axes: B batch, F frames (video or multi-image), P image tokens, T text tokens, D width,
V vocabulary. Images [B, F, R, R, 3] give F x P image tokens, frame after frame.

    images [B, R, R, 3] --siglip--> [B, P, D] --+
                                                 +--> x [B, P+T, D] --gemma--> logits [B, T, V]
    tokens [B, T] --embed x sqrt(D)--> [B, T, D] +      (prefix-LM mask from mask_ar, input_mask)
"""

import math

import numpy as np

from . import gemma, siglip
from .capture import record
from .config import PaliGemmaConfig
from .mask import make_attn_mask, positions_from_mask, same_block, sliding_window
from .ops import compute_dtype


def _fail(argument, expected, got):
    raise ValueError(f"{argument}: expected {expected}, got {got}")


def validate_inputs(config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None):
    """Check shapes, dtypes and ranges; returns `(images, tokens, mask_ar, input_mask)` as arrays.

    Raises ValueError naming the argument, what was expected and what was given.
    """
    R = config.vision.image_size
    images = np.asarray(images)
    if images.ndim not in (4, 5) or images.shape[-3:] != (R, R, 3) or 0 in images.shape[:-3]:
        one, several = f"[B, {R}, {R}, 3]", f"[B, F, {R}, {R}, 3] (F >= 1 frames or images per example)"
        expected = {4: one, 5: several}.get(images.ndim, f"{one} (one image per example) or {several}")
        _fail("images", f"shape {expected} for {config.name}", f"shape {list(images.shape)}")
    if not np.issubdtype(images.dtype, np.floating):
        _fail("images", "floats in [-1, 1]", f"dtype {images.dtype}")
    lo, hi = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0001 or hi > 1.0001:
        _fail("images", "values in [-1, 1] (pixels / 127.5 - 1)", f"range [{lo:g}, {hi:g}]")

    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        _fail("tokens", "shape [B, T]", f"shape {list(tokens.shape)}")
    if not np.issubdtype(tokens.dtype, np.integer):
        _fail("tokens", "integer ids", f"dtype {tokens.dtype}")
    if tokens.shape[0] != images.shape[0]:
        _fail("tokens", f"batch size {images.shape[0]} (as images)", f"batch size {tokens.shape[0]}")
    V = config.llm.vocab_size
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        _fail("tokens", f"ids in [0, {V})", f"ids in [{tokens.min()}, {tokens.max()}]")

    mask_ar = np.asarray(mask_ar)
    if mask_ar.shape != tokens.shape:
        _fail("mask_ar", f"shape {list(tokens.shape)} (as tokens)", f"shape {list(mask_ar.shape)}")
    if input_mask is None:
        input_mask = np.ones(tokens.shape, dtype=bool)
    input_mask = np.asarray(input_mask)
    if input_mask.shape != tokens.shape:
        _fail("input_mask", f"shape {list(tokens.shape)} (as tokens)", f"shape {list(input_mask.shape)}")
    return images, tokens.astype(np.int64), mask_ar.astype(np.int64), input_mask.astype(bool)


def legacy_image_scaling(zimg, param_dtype):
    """transformers 4.41-5.3: `(zimg / sqrt(D)) * sqrt(D)`, each result rounded to the parameter dtype.

    torch divides by the Python float sqrt(D) in float32, then multiplies by sqrt(D) already
    cast to the parameter dtype (45.25 in bfloat16 for D = 2048).
    """
    width = zimg.shape[-1]
    rounded = zimg.astype(param_dtype).astype(np.float32)  # [B, P, D]
    divided = (rounded / np.float32(math.sqrt(width))).astype(param_dtype)
    return (divided * np.asarray(math.sqrt(width), param_dtype)).astype(zimg.dtype)  # [B, P, D]


def num_image_tokens(config: PaliGemmaConfig, image_shape):
    """Image tokens in the prefix: P for [B, R, R, 3] images, F x P for [B, F, R, R, 3] frames."""
    frames = image_shape[1] if len(image_shape) == 5 else 1
    return frames * config.vision.num_patches


def embed_images(params, config: PaliGemmaConfig, images):
    """Image tokens for one image [B, R, R, 3] or several [B, F, R, R, 3] per example.

    Frames are folded into the batch for the vision tower and their tokens concatenated in frame
    order, as big_vision's `embed_image`: frame 0's P tokens, then frame 1's, ...

    Returns:
      [B, P, D] or [B, F*P, D].
    """
    if images.ndim == 4:
        return siglip.embed_image(params, config.vision, images)  # [B, P, D]
    B, F = images.shape[:2]
    zimg = siglip.embed_image(params, config.vision, images.reshape((B * F,) + images.shape[2:]))  # [B*F, P, D]
    return zimg.reshape(B, F * zimg.shape[1], zimg.shape[2])  # [B, F*P, D]


def embed_image_and_text(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask):
    """Joins image and text embeddings and extends the masks over the image tokens.

    Image tokens get `mask_ar = 0` (they belong to the bidirectional prefix) and
    `input_mask = True`. Image embeddings are NOT multiplied by sqrt(D); text embeddings are.
    Images [B, F, R, R, 3] give F x P image tokens (see `embed_images`); P below is that count.

    Returns:
      x [B, P+T, D], input_mask [B, P+T] bool, mask_ar [B, P+T] int.
    """
    table = params["llm"]["embedder"]["input_embedding"]
    dtype = compute_dtype(table)
    zimg = embed_images(params["img"], config, images.astype(dtype))  # [B, P, D]
    if config.legacy_image_scaling:
        zimg = legacy_image_scaling(zimg, table.dtype)
    ztxt = gemma.embed_tokens(params["llm"]["embedder"], tokens, dtype)  # [B, T, D]
    x = record("llm/embed", np.concatenate([zimg, ztxt], axis=1))  # [B, P+T, D]
    B, P = zimg.shape[:2]
    input_mask = np.concatenate([np.ones((B, P), dtype=bool), input_mask], axis=1)  # [B, P+T]
    mask_ar = np.concatenate([np.zeros((B, P), dtype=np.int64), mask_ar], axis=1)  # [B, P+T]
    return x, input_mask, mask_ar


def prefix_lm_masks(config: PaliGemmaConfig, input_mask, mask_ar):
    """Global mask, sliding-window mask (None without a window) and positions for a sequence.

    Returns:
      attn_mask [B, T, T], local_mask [B, T, T] or None, positions [B, T].
    """
    attn_mask = make_attn_mask(input_mask, mask_ar)  # [B, T, T]
    positions = positions_from_mask(input_mask)  # [B, T]
    local_mask = None
    if config.llm.sliding_window is not None:
        local_mask = sliding_window(attn_mask, positions, positions, config.llm.sliding_window,
                                    same_block(input_mask, mask_ar))
    return attn_mask, local_mask, positions


def forward(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None):
    """Text logits for images and text.

    The compute dtype follows the parameters: float64 parameters run in float64 (the gold
    standard), float32 in float32, and bfloat16/float16 parameters in float32 activations with
    big_vision's cast points (bf16 embedding scale and `1 + scale`).

    Args:
      params: `{"img": ..., "llm": ...}` in big_vision's layout.
      config: a `PaliGemmaConfig`.
      images: [B, R, R, 3] float in [-1, 1], or [B, F, R, R, 3]: F frames (a video) or F images
        per example, all F x P image tokens in the bidirectional prefix.
      tokens: [B, T] int ids.
      mask_ar: [B, T] int, 0 for prefix tokens, 1 for suffix (causal) tokens and padding.
      input_mask: [B, T] bool, True for real tokens (default: all True).
    Returns:
      [B, T, V] logits for the text positions.
    """
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    x, full_input_mask, full_mask_ar = embed_image_and_text(params, config, images, tokens, mask_ar, input_mask)
    attn_mask, local_mask, positions = prefix_lm_masks(config, full_input_mask, full_mask_ar)
    pre_logits = gemma.transformer(params["llm"], x, positions, attn_mask, config.llm, local_mask)
    text = pre_logits[:, num_image_tokens(config, images.shape) :]  # [B, T, D]
    return record("logits", gemma.logits(params["llm"], text, config.llm))  # [B, T, V]
