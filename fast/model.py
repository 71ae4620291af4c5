"""PaliGemma forward pass in JAX (mirrors `paligemma.ref.model`).

Axes: B batch, P image tokens, T text tokens, D width, V vocabulary.
"""

import functools
import math

import jax
import jax.numpy as jnp

from paligemma import kernels
from paligemma.ref.capture import record
from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.model import num_image_tokens, validate_inputs

from . import gemma, layout, quant, sharding, siglip
from .mask import make_attn_mask, positions_from_mask, same_block, sliding_window
from .policy import FLOAT32, Policy


def legacy_image_scaling(zimg, param_dtype):
    """transformers 4.41-5.3: `(zimg / sqrt(D)) * sqrt(D)`, each result rounded to the parameter dtype
    (explicitly, with `gemma.round_to`: XLA may otherwise drop roundings under jit)."""
    width = zimg.shape[-1]
    rounded = gemma.round_to(zimg, param_dtype)  # [B, P, D] float32
    divided = gemma.round_to(rounded / jnp.float32(math.sqrt(width)), param_dtype)
    scale = jnp.asarray(math.sqrt(width), param_dtype).astype(jnp.float32)  # 45.25 for bf16, D = 2048
    return gemma.round_to(divided * scale, param_dtype).astype(zimg.dtype)


def embed_images(params, config: PaliGemmaConfig, images, policy: Policy):
    """Image tokens [B, P, D] for [B, R, R, 3], or [B, F*P, D] for [B, F, R, R, 3]: frames folded
    into the batch for the vision tower, their tokens concatenated in frame order (big_vision)."""
    if images.ndim == 4:
        return siglip.embed_image(params, config.vision, images, policy)  # [B, P, D]
    B, F = images.shape[:2]
    zimg = siglip.embed_image(params, config.vision, images.reshape((B * F,) + images.shape[2:]), policy)
    return zimg.reshape(B, F * zimg.shape[1], zimg.shape[2])  # [B, F*P, D]


def embed_image_and_text(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask, policy: Policy):
    """[image ; text] embeddings and the masks extended over the image tokens (F x P of them
    for images [B, F, R, R, 3]).

    Returns:
      x [B, P+T, D], input_mask [B, P+T] bool, mask_ar [B, P+T] int32.
    """
    zimg = embed_images(params["img"], config, images, policy)  # [B, P, D]
    return join_image_and_text(params, config, zimg, tokens, mask_ar, input_mask, policy)


def join_image_and_text(params, config: PaliGemmaConfig, zimg, tokens, mask_ar, input_mask, policy: Policy):
    """`embed_image_and_text` from image tokens already computed by `embed_images` ([B, P, D]),
    e.g. cached by content (`fast.engine`). Same returns."""
    table = params["llm"]["embedder"]["input_embedding"]
    if config.legacy_image_scaling:
        zimg = legacy_image_scaling(zimg, quant.float_dtype(table))
    ztxt = gemma.embed_tokens(params["llm"]["embedder"], tokens, policy.dtype, config.llm.width)  # [B, T, D]
    x = record("llm/embed", jnp.concatenate([zimg.astype(policy.dtype), ztxt], axis=1))  # [B, P+T, D]
    B, P = zimg.shape[:2]
    input_mask = jnp.concatenate([jnp.ones((B, P), bool), input_mask.astype(bool)], axis=1)
    mask_ar = jnp.concatenate([jnp.zeros((B, P), jnp.int32), mask_ar.astype(jnp.int32)], axis=1)
    return x, input_mask, mask_ar


def prefix_lm_masks(config: PaliGemmaConfig, input_mask, mask_ar):
    """Global mask [B, T, T], sliding-window mask (or None) and positions [B, T]."""
    attn_mask = make_attn_mask(input_mask, mask_ar)
    positions = positions_from_mask(input_mask)
    local_mask = None
    if config.llm.sliding_window is not None:
        local_mask = sliding_window(attn_mask, positions, positions, config.llm.sliding_window,
                                    same_block(input_mask, mask_ar))
    return attn_mask, local_mask, positions


# XLA:CPU has no bfloat16 dot: it converts both operands to float32, and its while-loop-
# invariant code motion then hoists the conversion of every (loop-invariant) weight out of the
# layer scans and the decoding loop, so a float32 copy of the whole model lives through the
# program: 11.8 GB of temporaries for PaliGemma 3B with bfloat16 weights instead of 0.4 GB.
# Without that pass each weight is converted where it is used, one layer at a time.
NO_WEIGHT_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def converts_weights(params):
    """True on CPU when some parameter is not float32 (XLA:CPU converts it for every dot)."""
    return jax.default_backend() == "cpu" and any(
        jnp.dtype(leaf.dtype) != jnp.float32 for leaf in jax.tree_util.tree_leaves(params) if hasattr(leaf, "dtype"))


def jit_model(fn, static_argnames, donate_argnames=()):
    """`jax.jit(fn)` for a function whose first argument is the parameters; compiled without
    weight hoisting (`NO_WEIGHT_HOISTING`) where `converts_weights(params)`."""
    plain = jax.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames)
    no_hoisting = jax.jit(fn, static_argnames=static_argnames, donate_argnames=donate_argnames,
                          compiler_options=NO_WEIGHT_HOISTING)
    pick = lambda params: no_hoisting if converts_weights(params) else plain  # noqa: E731

    @functools.wraps(fn)
    def run(params, *args, **kwargs):
        return pick(params)(params, *args, **kwargs)

    run.lower = lambda params, *args, **kwargs: pick(params).lower(params, *args, **kwargs)
    return run


def forward_body(params, images, tokens, mask_ar, input_mask, config, policy):
    """`forward`'s traced body, not compiled: `capture.forward` runs it inside its own jit."""
    x, full_mask, full_ar = embed_image_and_text(params, config, images, tokens, mask_ar, input_mask, policy)
    x = sharding.constrain(x, policy.mesh, sharding.batch_spec(3))  # [B, P+T, D]
    attn_mask, local_mask, positions = prefix_lm_masks(config, full_mask, full_ar)
    token_mask = kernels.TokenMask.prefix_lm(full_mask, full_ar) if policy.uses_kernels else None
    rope = gemma.rope_table(x.shape[1], config.llm.head_dim, config.llm.rope_base)
    pre_logits, _ = gemma.transformer(params["llm"], x, positions, attn_mask, config.llm, policy, rope, local_mask,
                                      token_mask=token_mask)
    text = pre_logits[:, num_image_tokens(config, images.shape) :]  # [B, T, D]
    logits = gemma.logits(params["llm"], text, config.llm, policy.mesh)  # [B, T, V]
    logits = sharding.constrain(logits, policy.mesh, sharding.logits_spec(policy.mesh, config.llm.vocab_size, 3))
    return record("logits", logits)  # [B, T, V]


_forward = jit_model(forward_body, ("config", "policy"))


def forward(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None, policy: Policy = FLOAT32,
            mesh=None):
    """Text logits [B, T, V] (float32), jit-compiled; the reference's signature and semantics.

    Args:
      params: `{"img": ..., "llm": ...}` (NumPy or JAX arrays, float32 or bfloat16; `llm/layers`
        stacked or per-layer: they run in this platform's layout, `layout.for_platform`).
      images: [B, R, R, 3] or [B, F, R, R, 3] in [-1, 1]; tokens, mask_ar, input_mask: [B, T] as in
        `ref.forward`.
      policy: compute / cache dtypes, attention implementation, remat.
      mesh: None, a `jax.sharding.Mesh` or a description ("data=2,model=4"), as in
        `fast.generate`; the logits then come back split over the mesh (examples over data and
        fsdp, V over model).
    """
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    inputs = [images, tokens.astype("int32"), mask_ar.astype("int32"), input_mask]
    params, inputs, policy = sharding.on_mesh(params, inputs, policy, mesh)
    params = layout.for_platform(params, policy.mesh)
    logits = _forward(params, *inputs, config, policy)  # [B', T, V]
    return logits if len(logits) == len(tokens) else logits[: len(tokens)]
