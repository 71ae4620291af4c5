"""Gemma / Gemma 2 decoder in JAX (mirrors `paligemma.ref.gemma`, same names, same order).

Axes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G = N / K, H head
dim, D width, F mlp width, V vocabulary, L layers, C the k/v or gate/up pair. Norms, softmax and
logits are computed in float32. Every weight product goes through `linear.einsum`, which
takes the weight in whatever kind it is stored (float, int8/int4, LoRA-adapted) and picks the
product's form for the platform; the layers run over either weight layout (`layout.run_layers`:
a `lax.scan` over stacked weights, the KV cache scanned alongside and returned updated, or an
unrolled loop over per-layer buffers).
"""

import jax
import jax.numpy as jnp
import numpy as np

from paligemma import kernels
from paligemma.ref.capture import record
from paligemma.ref.config import GemmaConfig, uses_sliding_window

from . import layout, linear, sharding
from .attention import attend
from .policy import Policy


def round_to(x, dtype):
    """float32 `x` rounded to the precision of the float `dtype` (e.g. bfloat16), still float32.

    The bfloat16 cast points big_vision has (and the reference reproduces) must survive jit: XLA
    on CPU and GPU computes bfloat16 arithmetic in float32 and, with its default
    `xla_allow_excess_precision`, drops the rounding back to bfloat16 between fused operations,
    so `(1 + scale).astype(f32)` on a bfloat16 `scale` silently came out unrounded.
    `reduce_precision` is an explicit rounding XLA keeps. A no-op for float32 and wider.
    """
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    if jnp.finfo(dtype).bits >= 32:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def embed_tokens(params, tokens, dtype, width=None):
    """Token embeddings times sqrt(D), the scalar cast to the table's dtype first and the product
    rounded to the table's dtype (bf16 x bf16 is exact in float32): [B, T] -> [B, T, D].
    A quantized table computes in float32; `width` = D is needed for int4 (`linear.rows`)."""
    rows, table_dtype = linear.rows(params["input_embedding"], tokens, width)  # [B, T, D] float32
    scale = jnp.asarray(np.sqrt(rows.shape[-1]), dtype=table_dtype).astype(jnp.float32)
    return round_to(rows * scale, table_dtype).astype(dtype)  # [B, T, D]


def rms_norm(x, scale, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * (1 + scale), statistics in float32; `1 + scale` rounded to the
    parameter dtype (bf16 stays bf16, as in big_vision)."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., 1]
    scale = jnp.asarray(scale)
    one_plus = round_to(1 + scale.astype(jnp.float32), scale.dtype)  # [D]
    return (x32 * inv_rms * one_plus).astype(x.dtype)


def rope_table(num_positions, head_dim, base=10_000.0):
    """sin and cos for positions 0..num_positions-1, computed in float64 on the host.

    Angles grow with the position; computing them in float32 would cost ~position * 6e-8 rad
    (2e-4 at 4096), which is visible against the float64 reference. Returns two
    [num_positions, H/2] float32 arrays.
    """
    timescale = base ** (2.0 * np.arange(head_dim // 2) / head_dim)  # [H/2]
    theta = np.arange(num_positions, dtype=np.float64)[:, None] / timescale  # [S, H/2]
    return np.sin(theta).astype(np.float32), np.cos(theta).astype(np.float32)


def apply_rope(x, positions, table):
    """Rotate-half RoPE: [x1 cos - x2 sin, x2 cos + x1 sin] with x1, x2 the halves of H.

    Args:
      x: [B, T, N, H]; positions: [B, T] int; table: `rope_table(...)` covering the positions.
    """
    H = x.shape[-1]
    sin = jnp.take(table[0], positions, axis=0)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    cos = jnp.take(table[1], positions, axis=0)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]  # [B, T, N, H/2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def write_rows(cache, new, slot):
    """`cache` [B, S, ...] with `new` [B, T, ...] written at rows slot..slot+T of axis 1.

    `slot` is one index for every example (`generate`: all prompts prefilled together) or one
    per example, [B] (`fast.engine`: each slot of the pool is at its own length).
    """
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, slot, axis=1)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(cache, new, slot)


def attention(params, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope, kv_cache=None,
              token_mask=None, window=None, outputs_from=0):
    """Self-attention of one layer.

    Args:
      params: one layer of `attn`; x: [B, T, D]; positions: [B, T]; attn_mask: [B, T, S] bool.
      rope: `rope_table(...)`.
      kv_cache: optional `(k_cache [B, S, K, H], v_cache [B, S, K, H], slot)`: the new keys and
        values are written at rows slot..slot+T (`slot` [] or [B], see `write_rows`) and
        attention reads the whole cache.
      token_mask, window: the mask as per-token vectors and this layer's window, for the Pallas
        kernels (`fast.attention.attend`).
      outputs_from: training only (see `transformer`): queries for rows >= this alone; keys and
        values still come from every row.
    Returns:
      ([B, T - outputs_from, D], updated (k_cache, v_cache) or None).
    """
    mesh = policy.mesh
    x_q, q_positions = x[:, outputs_from:], positions[:, outputs_from:]
    q = linear.einsum("BTD,NDH->BTNH", x_q, params["q_einsum"]["w"], mesh)  # [B, T', N, H]
    # k and v in one product: the pair axis C is a batch axis of the dot, which reads the [2, K, D, H]
    # weight in place (the reference's kv[0], kv[1] would be copies on XLA:CPU).
    k, v = linear.einsum("BSD,CKDH->CBSKH", x, params["kv_einsum"]["w"], mesh)  # [B, S, K, H] each
    q = apply_rope(q, q_positions, rope) * jnp.asarray(config.query_scale, x.dtype)
    k = apply_rope(k, positions, rope)
    updated = None
    if kv_cache is not None:
        k_cache, v_cache, slot = kv_cache
        k_cache = write_rows(k_cache, k.astype(k_cache.dtype), slot)  # [B, S, K, H]
        v_cache = write_rows(v_cache, v.astype(v_cache.dtype), slot)
        updated = (k_cache, v_cache)
        k, v = k_cache.astype(x.dtype), v_cache.astype(x.dtype)  # [B, S, K, H]
    enc = attend(q, k, v, attn_mask[:, outputs_from:], config.attn_logits_softcap, policy, token_mask,
                 window)  # [B, T', N, H]
    return linear.einsum("BTNH,NHD->BTD", enc, params["attn_vec_einsum"]["w"], mesh), updated  # [B, T', D]


def mlp(params, x, policy: Policy = None):
    """GeGLU: (gelu_tanh(x W_gate) * (x W_up)) W_down; gate and up in one product, as k and v."""
    mesh = None if policy is None else policy.mesh
    gate, up = linear.einsum("BTD,CDF->CBTF", x, params["gating_einsum"], mesh)  # [B, T, F] each
    gate = jax.nn.gelu(gate, approximate=True)
    return linear.einsum("BTF,FD->BTD", gate * up, params["linear"], mesh)  # [B, T, D]


def block(params, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope, kv_cache=None,
          token_mask=None, window=None, outputs_from=0):
    """One decoder layer; returns (x [B, T', D], updated cache or None), T' = T - outputs_from."""
    eps = config.norm_eps
    y = rms_norm(x, params["pre_attention_norm"]["scale"], eps)  # [B, T, D]
    h, updated = attention(params["attn"], y, positions, attn_mask, config, policy, rope, kv_cache, token_mask,
                           window, outputs_from)  # [B, T', D]
    record("attn_out", h)
    if config.post_norms:
        h = rms_norm(h, params["post_attention_norm"]["scale"], eps)
    x = x[:, outputs_from:] + h  # [B, T', D]
    h = record("mlp_out", mlp(params["mlp"], rms_norm(x, params["pre_ffw_norm"]["scale"], eps), policy))  # [B, T', D]
    if config.post_norms:
        h = rms_norm(h, params["post_ffw_norm"]["scale"], eps)
    return record("out", x + h), updated


def transformer(params, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope,
                local_mask=None, kv_cache=None, token_mask=None, outputs_from=0):
    """All layers and the final norm.

    Args:
      params: the `llm` subtree, layers in either layout (`fast.layout`); x: [B, T, D];
        positions: [B, T]; attn_mask, local_mask: [B, T, S] (local: the sliding-window layers);
        kv_cache: optional `(k [L, B, S, K, H], v [L, B, S, K, H], slot)`; token_mask: the same
        masks as per-token vectors (`kernels.TokenMask`) for the Pallas kernels, which apply the
        window themselves (a runtime scalar: `kernels.NO_WINDOW` on global layers).
      outputs_from: training only: return rows >= this alone (the text after the image). The last
        layer then computes queries, attention output and MLP for those rows (its keys and values
        still come from every row); the numbers are the same. The XLA path only (no kv_cache,
        no token_mask).
    Returns:
      (pre-logits [B, T - outputs_from, D], updated (k, v) or None).
    """
    if outputs_from and (kv_cache is not None or token_mask is not None):
        raise ValueError("transformer: outputs_from needs the XLA path (no kv_cache, no token_mask)")
    windowed = config.sliding_window is not None

    def layer_step(outputs_from):
        def step(x, layer):
            params_l, index, cache_l = layer
            local = uses_sliding_window(config, index)  # traced under scan: one body for both kinds
            mask = jnp.where(local, local_mask, attn_mask) if windowed else attn_mask
            window = jnp.where(local, config.sliding_window, kernels.NO_WINDOW) if windowed else None
            kv = None if cache_l is None else (*cache_l, kv_cache[2])
            x, updated = block(params_l, x, positions, mask, config, policy, rope, kv, token_mask, window,
                               outputs_from)
            # On a mesh: examples split, width whole (after the output projections' all-reduce).
            return sharding.constrain(x, policy.mesh, sharding.batch_spec(3)), updated  # [B, T', D]
        return jax.checkpoint(step) if policy.remat == "full" else step

    caches = None if kv_cache is None else kv_cache[:2]
    x, updated = layout.run_layers(params, x, layer_step, caches, outputs_from)
    return record("llm/final_norm", rms_norm(x, params["final_norm"]["scale"], config.norm_eps)), updated


def logits(params, pre_logits, config: GemmaConfig, mesh=None):
    """Tied projection `pre_logits @ E^T` in float32, then the optional final softcap: [B, T, V]."""
    out = linear.einsum("BTD,VD->BTV", pre_logits, params["embedder"]["input_embedding"], mesh)  # [B, T, V]
    cap = config.final_logits_softcap
    return cap * jnp.tanh(out / cap) if cap else out
