"""Gemma (PaliGemma) and Gemma 2 (PaliGemma 2) decoder.

Axes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G query heads per
kv head (N = K * G), H head dim, D width, F mlp width, V vocabulary.
Parameters are the `llm/...` subtree of big_vision; per-layer tensors carry a leading L axis.

    x [B, T, D]  (image tokens from the projection, text tokens from `embed_tokens`)
      -> L x block       Gemma 1: x + Attn(RMS(x));          x + MLP(RMS(x))
                         Gemma 2: x + RMS(Attn(RMS(x)));     x + RMS(MLP(RMS(x)))
      -> final RMSNorm   [B, T, D]   (pre-logits)
      -> x @ E^T         [B, T, V]   (tied embedding; Gemma 2 may softcap)
"""

import numpy as np

from .capture import block_name, record, scope
from .config import GemmaConfig, uses_sliding_window
from .ops import BIG_NEG, cast, einsum, gelu_tanh, softcap, softmax
from .params import layer_slice


def embed_tokens(params, tokens, dtype):
    """Token embeddings times sqrt(D).

    The scalar sqrt(D) is cast to the table's dtype before multiplying, as big_vision and HF
    do: with a bfloat16 table sqrt(2048) = 45.2548 becomes 45.25 and the product is bf16.

    Args:
      params: `llm/embedder` with `input_embedding` [V, D].
      tokens: [B, T] int.
      dtype: activation dtype of the result.
    Returns:
      [B, T, D].
    """
    table = params["input_embedding"]  # [V, D]
    scale = np.asarray(np.sqrt(table.shape[-1]), dtype=table.dtype)
    return (table[tokens] * scale).astype(dtype)  # [B, T, D]


def rms_norm(x, scale, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * (1 + scale).

    `(1 + scale)` is formed in the parameter's dtype (bf16 stays bf16, as in big_vision), then
    multiplies activations in their own dtype.
    """
    one_plus = 1 + np.asarray(scale)  # [D]
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    return x * inv_rms * cast(one_plus, x)


def apply_rope(x, positions, base=10_000.0):
    """Rotary position embedding, rotate-half layout (first half / second half, not interleaved).

    For frequency i < H/2: theta = position / base^(2i/H),
    out = [x1 cos - x2 sin, x2 cos + x1 sin] with x1 = x[..., :H/2], x2 = x[..., H/2:].

    Args:
      x: [B, T, N, H].
      positions: [B, T] int.
    Returns:
      [B, T, N, H].
    """
    H = x.shape[-1]
    timescale = base ** (2.0 * np.arange(H // 2) / H)  # [H/2]
    theta = positions[..., None].astype(np.float64) / timescale  # [B, T, H/2]
    sin = np.sin(theta)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    cos = np.cos(theta)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]  # [B, T, N, H/2]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend(q, k, v, attn_mask, config: GemmaConfig):
    """Scaled-dot-product attention with GQA, logit softcap and a boolean mask.

    Query head n reads kv head n // G (consecutive query heads share a kv head); K/V are never
    repeated. Logits and softmax run in at least float32.

    Args:
      q: [B, T, N, H], already rotated and scaled.
      k, v: [B, S, K, H].
      attn_mask: [B, T, S] bool.
    Returns:
      [B, T, N, H].
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    logits = einsum("BTKGH,BSKH->BKGTS", q, k)  # [B, K, G, T, S]
    logits = softcap(logits, config.attn_logits_softcap)
    logits = np.where(attn_mask[:, None, None, :, :], logits, BIG_NEG)  # [B, K, G, T, S]
    probs = softmax(logits, axis=-1)  # [B, K, G, T, S]
    record("attn_probs", probs.reshape(B, N, T, -1))  # [B, N, T, S]: head n = k * G + g
    enc = einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return enc.reshape(B, T, N, H)


def attention(params, x, positions, attn_mask, config: GemmaConfig, kv_cache=None):
    """Self-attention of one layer.

    Args:
      params: one layer of `attn`: q_einsum/w [N, D, H], kv_einsum/w [2, K, D, H],
        attn_vec_einsum/w [N, H, D].
      x: [B, T, D].
      positions: [B, T] int.
      attn_mask: [B, T, S] bool; S = T without a cache, the cache length with one.
      kv_cache: optional `(k_cache, v_cache, slot)` with caches [B, S, K, H]: the new keys and
        values are written at rows slot..slot+T and attention reads the whole cache back (in
        the cache's dtype: big_vision stores it in bfloat16 by default).
    Returns:
      [B, T, D].
    """
    q = einsum("BTD,NDH->BTNH", x, cast(params["q_einsum"]["w"], x))  # [B, T, N, H]
    kv = cast(params["kv_einsum"]["w"], x)  # [2, K, D, H]
    k = einsum("BSD,KDH->BSKH", x, kv[0])  # [B, T, K, H]
    v = einsum("BSD,KDH->BSKH", x, kv[1])  # [B, T, K, H]
    q = apply_rope(q, positions, config.rope_base) * np.asarray(config.query_scale, x.dtype)
    k = apply_rope(k, positions, config.rope_base)
    if kv_cache is not None:
        k_cache, v_cache, slot = kv_cache
        T = x.shape[1]
        k_cache[:, slot : slot + T] = k  # [B, S, K, H]
        v_cache[:, slot : slot + T] = v
        k, v = k_cache.astype(x.dtype), v_cache.astype(x.dtype)  # [B, S, K, H]
    enc = attend(q, k, v, attn_mask, config)  # [B, T, N, H]
    return einsum("BTNH,NHD->BTD", enc, cast(params["attn_vec_einsum"]["w"], x))  # [B, T, D]


def mlp(params, x):
    """GeGLU: (gelu_tanh(x W_gate) * (x W_up)) W_down, no biases."""
    w = cast(params["gating_einsum"], x)  # [2, D, F]
    gate = gelu_tanh(einsum("BTD,DF->BTF", x, w[0]))  # [B, T, F]
    up = einsum("BTD,DF->BTF", x, w[1])  # [B, T, F]
    return einsum("BTF,FD->BTD", gate * up, cast(params["linear"], x))  # [B, T, D]


def block(params, x, positions, attn_mask, config: GemmaConfig, kv_cache=None):
    """One decoder layer; Gemma 2 (`post_norms`) also normalises each branch's output."""
    eps = config.norm_eps
    y = rms_norm(x, params["pre_attention_norm"]["scale"], eps)  # [B, T, D]
    h = record("attn_out", attention(params["attn"], y, positions, attn_mask, config, kv_cache))  # [B, T, D]
    if config.post_norms:
        h = rms_norm(h, params["post_attention_norm"]["scale"], eps)
    x = x + h  # [B, T, D]
    h = record("mlp_out", mlp(params["mlp"], rms_norm(x, params["pre_ffw_norm"]["scale"], eps)))  # [B, T, D]
    if config.post_norms:
        h = rms_norm(h, params["post_ffw_norm"]["scale"], eps)
    return record("out", x + h)  # [B, T, D]


def transformer(params, x, positions, attn_mask, config: GemmaConfig, local_mask=None, kv_cache=None):
    """All layers and the final norm.

    Args:
      params: the `llm` subtree.
      x: [B, T, D] input embeddings (image and text already joined).
      positions: [B, T] int.
      attn_mask: [B, T, S] bool for global layers.
      local_mask: [B, T, S] bool for sliding-window layers (required when the config has one).
      kv_cache: optional `(k [L, B, S, K, H], v [L, B, S, K, H], slot)`.
    Returns:
      [B, T, D] pre-logits (after the final RMSNorm).
    """
    for i in range(config.depth):
        mask = local_mask if uses_sliding_window(config, i) else attn_mask
        layer_cache = None if kv_cache is None else (kv_cache[0][i], kv_cache[1][i], kv_cache[2])
        with scope(block_name("llm", i)):
            x = block(layer_slice(params["layers"], i), x, positions, mask, config, layer_cache)
    return record("llm/final_norm", rms_norm(x, params["final_norm"]["scale"], config.norm_eps))  # [B, T, D]


def logits(params, pre_logits, config: GemmaConfig):
    """Tied output projection `pre_logits @ E^T`, then the optional final softcap.

    big_vision skips this softcap in its training loss and first decoded token (see
    docs/architecture.md); here it is applied wherever logits are produced, as HF >= 5.17 does.

    Returns:
      [B, T, V].
    """
    table = cast(params["embedder"]["input_embedding"], pre_logits)  # [V, D]
    out = einsum("BTD,VD->BTV", pre_logits, table)  # [B, T, V]
    return softcap(out, config.final_logits_softcap)
