"""Gemma / Gemma 2 decoder in JAX (mirrors `paligemma.ref.gemma`, same names, same order).

Axes: B batch, T query tokens, S key tokens, N query heads, K kv heads, G = N / K, H head
dim, D width, F mlp width, V vocabulary, L layers. Layers run under `lax.scan` over the
stacked parameters (compile time does not grow with depth); the KV cache, when given, is
scanned alongside and returned updated. Norms, softmax and logits are computed in float32.

Two deviations from the reference's einsums, both for XLA:CPU, which runs every dot as
batched row-major matrix products and copies (transposes) an operand that is not already
one, on every call. Decoding reads each weight once per token, so such a copy triples its
memory traffic; see docs/performance.md for the measurements.
- A weight `[G, D, O]` contracted over its middle axis (q/kv heads, the gate/up pair) goes
  through `_per_group`, which makes G a batch dimension of the dot.
- `unstack_layers` gives the layers as per-layer buffers (an unrolled loop, read in place)
  instead of the stacked arrays `lax.scan` slices (XLA:CPU copies each slice first).
"""

import jax
import jax.numpy as jnp
import numpy as np

from paligemma import kernels
from paligemma.ref import capture
from paligemma.ref.capture import record
from paligemma.ref.config import GemmaConfig, uses_sliding_window

from . import quant, sharding
from .attention import attend
from .ops import cast as _cast  # the name every line below uses
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


def _per_group(x, w):
    """`einsum("BTD,GDO->GBTO", x, w)` with G as a batch dimension of the dot: [G, B, T, O].

    Broadcasting x over G costs G copies of x and lets XLA:CPU read w in place; the plain
    einsum costs one transposed copy of w. The first is cheaper while B * T < O (always in
    decoding, where w dominates the memory traffic).
    """
    B, T, D = x.shape
    G, _, O = w.shape
    if B * T >= O:
        return jnp.einsum("BTD,GDO->GBTO", x, w)  # [G, B, T, O]
    return jnp.einsum("GBTD,GDO->GBTO", jnp.broadcast_to(x, (G, B, T, D)), w)  # [G, B, T, O]


def _group_dot(x, w, tiles):
    """`_per_group` for a float or a quantized (`fast.quant`) weight [G, D, O]: [G, B, T, O]."""
    return quant.per_group(x, w, tiles) if quant.routed(w, x, tiles) else _per_group(x, _cast(w, x))


# The low-rank term of each LoRA-adapted weight (`fast.lora.attach`), as two einsums: x A, then
# (x A) B in the layout the site's base product comes out in. R is the rank, C the k/v or gate/up pair.
LORA_TERMS = {
    "q_einsum": ("BTD,DR->BTR", "BTR,RNH->NBTH"),  # [N, B, T, H], as `_group_dot`
    "kv_einsum": ("BTD,CDR->CBTR", "CBTR,CRKH->CKBTH"),  # [2, K, B, T, H]
    "attn_vec_einsum": ("BTNH,NHR->BTR", "BTR,RD->BTD"),
    "gating_einsum": ("BTD,CDR->CBTR", "CBTR,CRF->CBTF"),  # [2, B, T, F]
    "linear": ("BTF,FR->BTR", "BTR,RD->BTD"),
}


def _adapted(w):
    return isinstance(w, dict) and "lora_a" in w


def _base(w):
    """The frozen weight of a LoRA-adapted weight, or the weight itself."""
    return w["w"] if _adapted(w) else w


def _lora_term(x, w, site, shape=None):
    """`scale * (x A) B` of an adapted weight; 0 for a plain one. The adapters never meet W, so
    training them needs only the input gradient through W (a merged `W + scale A B` would make
    XLA compute the full [in, out] weight gradient as well, per layer and step)."""
    if not _adapted(w):
        return 0
    first, second = LORA_TERMS[site]
    xa = jnp.einsum(first, x, w["lora_a"].astype(x.dtype))  # [B, T, R] or [C, B, T, R]
    out = jnp.einsum(second, xa, w["lora_b"].astype(x.dtype)) * jnp.asarray(w["scale"], x.dtype)
    return out if shape is None else out.reshape(shape)


def embed_tokens(params, tokens, dtype, width=None):
    """Token embeddings times sqrt(D), the scalar cast to the table's dtype first and the product
    rounded to the table's dtype (bf16 x bf16 is exact in float32): [B, T] -> [B, T, D].
    A quantized table (`fast.quant`) is float32 after dequantization; `width` = D is needed for int4,
    whose rows are padded to whole groups."""
    table = params["input_embedding"]  # [V, D]
    if quant.is_quantized(table):
        rows = quant.embed_rows(table, tokens, width)  # [B, T, D] float32
        return (rows * jnp.float32(np.sqrt(rows.shape[-1]))).astype(dtype)
    scale = jnp.asarray(np.sqrt(table.shape[-1]), dtype=table.dtype).astype(jnp.float32)
    rows = jnp.take(table, tokens, axis=0).astype(jnp.float32)  # [B, T, D]
    return round_to(rows * scale, table.dtype).astype(dtype)  # [B, T, D]


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
              token_mask=None, window=None, queries_from=0):
    """Self-attention of one layer.

    Args:
      params: one layer of `attn`; x: [B, T, D]; positions: [B, T]; attn_mask: [B, T, S] bool.
      rope: `rope_table(...)`.
      kv_cache: optional `(k_cache [B, S, K, H], v_cache [B, S, K, H], slot)`: the new keys and
        values are written at rows slot..slot+T (`slot` [] or [B], see `write_rows`) and
        attention reads the whole cache.
      token_mask, window: the mask as per-token vectors and this layer's window, for the Pallas
        kernels (`fast.attention.attend`).
      queries_from: only positions >= this ask queries (keys and values come from all of x), so
        the output has T - queries_from rows; the XLA attention only (no kv_cache, token_mask).
    Returns:
      ([B, T - queries_from, D], updated (k_cache, v_cache) or None).
    """
    if queries_from and (kv_cache is not None or token_mask is not None):
        raise ValueError("attention: queries_from needs the XLA path (no kv_cache, no token_mask)")
    x_kv, kv_positions = x, positions
    x, positions, attn_mask = x[:, queries_from:], positions[:, queries_from:], attn_mask[:, queries_from:]
    B, T, D = x.shape
    K, H, tiles = config.num_kv_heads, config.head_dim, quant.tiled(policy)
    w_q, w_kv = params["q_einsum"]["w"], params["kv_einsum"]["w"]  # [N, D, H], [2, K, D, H]
    kv_base = _base(w_kv)
    kv_base = quant.merge_leading(kv_base, 2) if quant.is_quantized(kv_base) else _cast(kv_base, x).reshape(2 * K, D, H)
    # einsum("BTD,NDH->BTNH") and einsum("BSD,KDH->BSKH") for k and v, as `_per_group`s.
    q = _group_dot(x, _base(w_q), tiles) + _lora_term(x, w_q, "q_einsum")  # [N, B, T, H]
    q = jnp.moveaxis(q, 0, 2)  # [B, T, N, H]
    S = x_kv.shape[1]
    kv = _group_dot(x_kv, kv_base, tiles) + _lora_term(x_kv, w_kv, "kv_einsum", (2 * K, B, S, H))  # [2K, B, S, H]
    k, v = jnp.moveaxis(kv[:K], 0, 2), jnp.moveaxis(kv[K:], 0, 2)  # [B, S, K, H] each
    q = apply_rope(q, positions, rope) * jnp.asarray(config.query_scale, x.dtype)
    k = apply_rope(k, kv_positions, rope)
    updated = None
    if kv_cache is not None:
        k_cache, v_cache, slot = kv_cache
        k_cache = write_rows(k_cache, k.astype(k_cache.dtype), slot)  # [B, S, K, H]
        v_cache = write_rows(v_cache, v.astype(v_cache.dtype), slot)
        updated = (k_cache, v_cache)
        k, v = k_cache.astype(x.dtype), v_cache.astype(x.dtype)  # [B, S, K, H]
    enc = attend(q, k, v, attn_mask, config.attn_logits_softcap, policy, token_mask, window)  # [B, T, N, H]
    N, w_out = enc.shape[2], params["attn_vec_einsum"]["w"]
    extra = _lora_term(enc, w_out, "attn_vec_einsum")  # [B, T, D] or 0
    w_out = _base(w_out)  # [N, H, D]
    if quant.routed(w_out, enc, tiles):
        return quant.matmul(enc.reshape(B, T, N * H), w_out, 2, tiles) + extra, updated  # [B, T, D]
    w_out = _cast(w_out, x).reshape(N * H, D)  # [N, H, D] as [N*H, D]
    return (enc.reshape(B, T, N * H) @ w_out) + extra, updated  # einsum("BTNH,NHD->BTD"): [B, T, D]


def mlp(params, x, policy: Policy = None):
    """GeGLU: (gelu_tanh(x W_gate) * (x W_up)) W_down."""
    tiles = quant.tiled(policy)
    w_gate, w_down = params["gating_einsum"], params["linear"]  # [2, D, F], [F, D]
    gate_up = _group_dot(x, _base(w_gate), tiles) + _lora_term(x, w_gate, "gating_einsum")  # [2, B, T, F]
    gate = jax.nn.gelu(gate_up[0], approximate=True)  # [B, T, F]
    up = gate_up[1]  # [B, T, F]
    extra = _lora_term(gate * up, w_down, "linear")  # [B, T, D] or 0
    if quant.routed(_base(w_down), gate * up, tiles):
        return quant.matmul(gate * up, _base(w_down), 1, tiles) + extra  # [B, T, D]
    return jnp.einsum("BTF,FD->BTD", gate * up, _cast(_base(w_down), x)) + extra  # [B, T, D]


def block(params, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope, kv_cache=None,
          token_mask=None, window=None, queries_from=0):
    """One decoder layer; returns (x [B, T', D], updated cache or None): T' = T - queries_from,
    the positions `attention(queries_from=...)` computes (keys and values from all T)."""
    eps = config.norm_eps
    h, updated = attention(params["attn"], rms_norm(x, params["pre_attention_norm"]["scale"], eps),
                           positions, attn_mask, config, policy, rope, kv_cache, token_mask, window,
                           queries_from)  # [B, T', D]
    record("attn_out", h)
    if config.post_norms:
        h = rms_norm(h, params["post_attention_norm"]["scale"], eps)
    x = x[:, queries_from:] + h  # [B, T', D]
    h = record("mlp_out", mlp(params["mlp"], rms_norm(x, params["pre_ffw_norm"]["scale"], eps), policy))  # [B, T', D]
    if config.post_norms:
        h = rms_norm(h, params["post_ffw_norm"]["scale"], eps)
    return record("out", x + h), updated


def transformer(params, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope,
                local_mask=None, kv_cache=None, token_mask=None, outputs_from=0):
    """All layers (scanned) and the final norm.

    Args:
      params: the `llm` subtree; x: [B, T, D]; positions: [B, T]; attn_mask, local_mask: [B, T, S]
        (local: sliding-window layers, HF's even layers); kv_cache: optional
        `(k [L, B, S, K, H], v [L, B, S, K, H], slot)`; token_mask: the same masks as per-token
        vectors (`kernels.TokenMask`) for the Pallas kernels, which apply the window themselves
        (a runtime scalar: `kernels.NO_WINDOW` on global layers).
      outputs_from: return only positions >= this (training: the text after the image). The
        last layer then computes queries, attention output and MLP for those rows alone (its
        keys and values still come from every position); the numbers are the same.
    Returns:
      (pre-logits [B, T - outputs_from, D], updated (k, v) or None).
    """
    windowed = config.sliding_window is not None

    def layer_step(queries_from):
        def step(x, layer):
            params_l, index, cache_l = layer
            local = uses_sliding_window(config, index)  # traced: one scanned body for both kinds
            mask = jnp.where(local, local_mask, attn_mask) if windowed else attn_mask
            window = jnp.where(local, config.sliding_window, kernels.NO_WINDOW) if windowed else None
            kv = None if cache_l is None else (*cache_l, kv_cache[2])
            x, updated = block(params_l, x, positions, mask, config, policy, rope, kv, token_mask, window,
                               queries_from)
            # On a mesh: examples split, width whole (after the output projections' all-reduce).
            return sharding.constrain(x, policy.mesh, sharding.batch_spec(3)), updated  # [B, T', D]
        return jax.checkpoint(step) if policy.remat == "full" else step

    if outputs_from and (kv_cache is not None or token_mask is not None):
        raise ValueError("transformer: outputs_from needs the XLA path (no kv_cache, no token_mask)")
    step = layer_step(0)
    caches = None if kv_cache is None else (kv_cache[0], kv_cache[1])
    segments = layer_segments(params)
    if outputs_from:  # the last layer apart, asking queries from `outputs_from` on
        *segments, (layers, start) = segments
        depth = start + _count(layers)
        if isinstance(layers, (list, tuple)):
            head, last = layers[:-1], layers[-1]
        else:
            head = jax.tree_util.tree_map(lambda w: w[:-1], layers)
            last = jax.tree_util.tree_map(lambda w: w[-1], layers)
        if depth - 1 > start:
            segments.append((head, start))
    parts = []  # each segment's updated (k, v)
    for layers, start in segments:
        if isinstance(layers, (list, tuple)):  # per-layer buffers (`unstack_layers`), unrolled
            updates = []
            for index, params_l in enumerate(layers, start):
                cache_l = None if caches is None else (caches[0][index], caches[1][index])
                with capture.scope(capture.block_name("llm", index)):  # names for fast/capture.py
                    x, update = step(x, (params_l, jnp.int32(index), cache_l))
                updates.append(update)
            parts.append(None if caches is None else tuple(jnp.stack(u) for u in zip(*updates)))
        else:
            n = _count(layers)
            seg_caches = caches if caches is None or len(segments) == 1 else (
                caches[0][start:start + n], caches[1][start:start + n])
            x, update = jax.lax.scan(step, x, (layers, jnp.arange(start, start + n), seg_caches))
            parts.append(update)
    if outputs_from:
        with capture.scope(capture.block_name("llm", depth - 1)):
            x, _ = layer_step(outputs_from)(x, (last, jnp.int32(depth - 1), None))  # [B, T - outputs_from, D]
    updated = None if caches is None else (
        parts[0] if len(parts) == 1 else tuple(jnp.concatenate(u) for u in zip(*parts)))  # [L, B, S, K, H] each
    return record("llm/final_norm", rms_norm(x, params["final_norm"]["scale"], config.norm_eps)), updated


SEGMENTS = ("layers_first", "layers", "layers_last")  # `ref.quant.Keep(end_layers=k)` stores three


def layer_segments(llm):
    """`[(layers, index of its first layer)]`: `llm/layers` alone, or the three segments a quantized
    tree with kept end layers has (`ref.quant.Keep`), in order; each stacked or per-layer."""
    out, start = [], 0
    for name in SEGMENTS:
        if name in llm:
            layers = llm[name]
            out.append((layers, start))
            start += _count(layers)
    return out


def _count(layers):
    """Number of layers in a segment (per-layer tuple or stacked tree)."""
    return len(layers) if isinstance(layers, (list, tuple)) else len(jax.tree_util.tree_leaves(layers)[0])


def unstack_layers(params):
    """`params` with `llm/layers` as a tuple of L per-layer trees, each weight its own buffer.

    The layout for decoding on CPU: XLA:CPU copies each layer's slice out of a stacked weight
    before the dot reads it, so `lax.scan` over stacked weights moves every weight three times
    per token; per-layer buffers are read in place. The price: the layer loop is unrolled, so
    compile time grows with depth. Every function of `paligemma.fast` takes either layout and
    computes the same numbers. NumPy input (e.g. from `ref.load`) is copied to the device one
    layer at a time; for JAX input the stacked arrays can be dropped afterwards.
    """
    llm = dict(params["llm"])
    take = lambda w, i: jax.device_put(w[i]) if isinstance(w, np.ndarray) else w[i]  # noqa: E731
    for name in SEGMENTS:  # quantized trees may keep end layers apart (`layer_segments`)
        if name not in llm or isinstance(llm[name], (list, tuple)):
            continue
        depth = len(jax.tree_util.tree_leaves(llm[name])[0])
        llm[name] = tuple(jax.tree_util.tree_map(lambda w: take(w, i), llm[name]) for i in range(depth))  # noqa: B023
    return {**params, "llm": llm}


def stack_layers(params):
    """The inverse of `unstack_layers`: `llm/layers` as stacked [L, ...] arrays (the reference's layout)."""
    llm = dict(params["llm"])
    for name in SEGMENTS:
        if isinstance(llm.get(name), (list, tuple)):
            llm[name] = jax.tree_util.tree_map(lambda *ws: jnp.stack(ws), *llm[name])
    return {**params, "llm": llm}


def vocab_slab(V, target=8192):
    """The largest divisor of V that is at most `target` (PaliGemma's 257152 rows: 32 slabs of 8036)."""
    return max(d for d in range(1, min(V, target) + 1) if V % d == 0)


def logits(params, pre_logits, config: GemmaConfig, mesh=None):
    """Tied projection `pre_logits @ E^T` in float32, then the optional final softcap: [B, T, V].

    On CPU a table that is not float32 goes through the dot in vocabulary slabs: XLA:CPU has
    no bfloat16 dot and converts both operands to float32 first, and one slab at a time that
    copy is ~50 MB instead of the whole table (2.1 GB for PaliGemma's 257152 x 2048). Not on a
    mesh with a model axis, whose devices each convert only their rows of the table (and a
    `lax.map` over row slabs split across devices would gather them).
    """
    table = params["embedder"]["input_embedding"]  # [V, D]
    cap = config.final_logits_softcap
    if quant.routed(table, pre_logits, quant.tiled() and mesh is None, logits=True):
        out = quant.logits(pre_logits, table, quant.tiled() and mesh is None)  # [B, T, V]
        return cap * jnp.tanh(out / cap) if cap else out
    V, D = table.shape
    slab = vocab_slab(V)

    def project(rows):  # [V', D] -> [B, T, V']
        return jnp.einsum("BTD,VD->BTV", pre_logits, rows.astype(pre_logits.dtype), preferred_element_type=jnp.float32)

    split = mesh is not None and mesh.shape["model"] > 1
    if table.dtype == jnp.float32 or jax.default_backend() != "cpu" or slab < 1024 or split:
        out = project(table)  # [B, T, V]
    else:
        out = jax.lax.map(project, table.reshape(V // slab, slab, D))  # [V / slab, B, T, slab]
        out = jnp.moveaxis(out, 0, 2).reshape(pre_logits.shape[:2] + (V,))  # [B, T, V]
    return cap * jnp.tanh(out / cap) if cap else out
