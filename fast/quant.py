"""Matmuls on quantized weights, in JAX (the formats are `paligemma.ref.quant`'s, same names).

A quantized weight is `{"q": ..., "scale": ...}` in place of the float array (`ref.quant.quantize_tree`);
int8 and int4 are told apart by q's dtype (int8 / uint8), as `ref.quant.dequantize_tree` does.
`fast.linear.einsum` (the seam of every weight product) calls these where a weight is such a dict; the numbers
are those of the float path on `ref.quant.dequantize_tree(qtree)` up to float32 reassociation
(tests/test_quant_fast.py).

int8: the dot runs on q converted to the compute dtype and the per-channel scale multiplies the
  output: sum_c x_c (q_co s_o) = (sum_c x_c q_co) s_o, exact in real arithmetic.
int4: q is unpacked (two sign-extended nibbles per byte) and scaled per group of G, the ref's
  dequantization, on one tile of output channels at a time, then dotted.

What XLA:CPU does with it (optimized HLO of one layer, jax 0.10): it never fuses a convert into a
dot. `x @ q.astype(f32)` compiles to a loop fusion writing a float32 copy of the whole weight,
then the dot (a `__ynn_fusion`) reading it: 9 bytes of traffic per int8 weight where float32
costs 4, so the plain form is *slower* than float32 (measured 155 ms vs 132 ms for a 2048 x 16384
matrix-vector product). Hence `tiled`: a `fori_loop` over blocks, each a dynamic-slice + convert
(+ unpack and group scale for int4) loop fusion writing a float32 block of at most `TILE_BYTES`
(it stays in the cache) and a plain dot reading it from there, so main memory sees only the
quantized bytes. No whole dequantized matrix ever exists. The blocks are chunks of whole rows
of the contracted axis (contiguous in memory, accumulated) when x has few rows (decoding), and
tiles of output channels otherwise (prefill: no accumulator traffic). With few rows (decoding),
even the tile loop writes every weight once as float32 (to the cache) and reads it back, which
is as much work as the float32 weight's own read: so on the CPU decoding calls
`paligemma.kernels.quant_cpu` instead (a C++ XLA custom call that converts in registers), when it
is built (`CPU_KERNEL`; `quant_cpu.available()`), and the tile loop otherwise. On a mesh, and on
GPU/TPU (whose XLA fuses the convert into the dot's operand), the plain form is used: it shards
like the float weight (`fast.sharding` rules for q and scale) and a loop of dynamic slices would
not.

Axes: G a batch of independent weights (heads, the gate/up pair), M rows of x (tokens), C the
contracted length (Cp padded to whole int4 groups), O output channels, V vocabulary.
"""

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.kernels import quant_cpu

from . import dense

TILE_BYTES = 1 << 22  # the float32 block one loop step dequantizes (L3-resident; 256 KiB, 1 MiB: slower)
FEW_ROWS = 16  # x with at most this many rows (decoding) loops over the contracted axis instead
CPU_KERNEL = True  # few rows on the CPU: `kernels.quant_cpu` where it is built (read while tracing)


def is_quantized(w):
    """True for a quantized weight `{"q": ..., "scale": ...}`."""
    return isinstance(w, dict) and "q" in w


def is_quantized_tree(params):
    """True if any weight of a parameter tree (nested dicts, per-layer tuples) is quantized."""
    if is_quantized(params):
        return True
    children = params.values() if isinstance(params, dict) else params if isinstance(params, (list, tuple)) else ()
    return any(is_quantized_tree(c) for c in children)


def routed(w, x, tiles=True, logits=False):
    """Whether `fast.linear.einsum` multiplies x by w here (`per_group`, `matmul`, `logits`: say so): a
    quantized w, or a float32 one with a few rows of x on the CPU (`fast.dense.applies`: batched decoding)."""
    return is_quantized(w) or dense.applies(w, x, tiles, logits)


def format_of(w):
    """"int8" or "int4" from q's dtype; ValueError for anything else."""
    dtype = jnp.dtype(w["q"].dtype)
    if dtype == jnp.int8:
        return "int8"
    if dtype == jnp.uint8:
        return "int4"
    raise ValueError(f"quantized weight: q has dtype {dtype}, expected int8 (int8) or uint8 (int4)")


def float_dtype(w):
    """The dtype a weight computes as: its own for a float array, float32 for a quantized one
    (`ref.quant.dequantize_tree`'s default, which the parity tests compare against)."""
    return jnp.float32 if is_quantized(w) else jnp.asarray(w).dtype


def unpack_int4(packed, axis):
    """uint8 [..., n, ...] -> int8 [..., 2n, ...]: byte j's low nibble is element 2j, its high 2j + 1,
    each sign-extended (arithmetic shifts of the byte read as int8)."""
    byte = jnp.asarray(packed).astype(jnp.int8)
    axis = axis % byte.ndim
    low = jnp.left_shift(byte, 4) >> 4  # bits 0-3, sign-extended
    high = byte >> 4  # bits 4-7, sign-extended
    pairs = jnp.stack([low, high], axis=axis + 1)  # [..., n, 2, ...]
    shape = list(byte.shape)
    shape[axis] *= 2
    return pairs.reshape(shape)


def dequantize_int8(q, scale, dtype=jnp.float32):
    """`q * scale` in `dtype`: q int8 [..], scale broadcastable to it."""
    return q.astype(dtype) * scale.astype(dtype)


def dequantize_int4(q, scale, axis, dtype=jnp.float32):
    """int4 q uint8 [pre, Cp/2, post] with scale [pre, Cp/G, post] (`axis` = len(pre)) -> [pre, Cp, post].

    The padding to whole groups is kept (it is zeros); callers drop it where they know C.
    """
    values = unpack_int4(q, axis).astype(dtype)  # [pre, Cp, post]
    Cp, groups = values.shape[axis], scale.shape[axis]
    grouped = values.reshape(values.shape[:axis] + (groups, Cp // groups) + values.shape[axis + 1:])
    w = grouped * jnp.expand_dims(scale.astype(dtype), axis + 1)  # [pre, Cp/G, G, post]
    return w.reshape(values.shape)


def nibble_planes(q, scale, axis, dtype=jnp.float32):
    """int4 q uint8 [pre, Cp/2, post] with scale [pre, Cp/G, post] -> (even, odd) [pre, Cp/2, post]:
    the dequantized elements 2j and 2j + 1 as two arrays, so that `x @ w` becomes
    `x[..., 0::2] @ even + x[..., 1::2] @ odd` with no interleaving copy of the weight."""
    byte = jnp.asarray(q).astype(jnp.int8)
    axis = axis % byte.ndim
    half, groups = byte.shape[axis], scale.shape[axis]
    grouped = byte.shape[:axis] + (groups, half // groups) + byte.shape[axis + 1:]
    s = jnp.expand_dims(scale.astype(dtype), axis + 1)  # [pre, Cp/G, 1, post]
    planes = (jnp.left_shift(byte, 4) >> 4, byte >> 4)  # low, high nibbles, sign-extended
    return tuple((p.reshape(grouped).astype(dtype) * s).reshape(byte.shape) for p in planes)


def tiled(policy=None):
    """Whether matmuls run tile by tile (`TILE_BYTES`): on CPU without a mesh (see the module doc)."""
    return jax.default_backend() == "cpu" and (policy is None or policy.mesh is None)


def _cpu_kernel(tiles, M):
    """Whether a product with M rows of x runs as `kernels.quant_cpu`'s custom call."""
    return tiles and M <= FEW_ROWS and CPU_KERNEL and quant_cpu.available()


def _tile_width(C, O, itemsize=4):
    """The largest divisor of O whose [C, width] tile takes at most `TILE_BYTES` (at least 1)."""
    limit = max(1, TILE_BYTES // (itemsize * C))
    return max(d for d in range(1, min(O, limit) + 1) if O % d == 0)


def _padded(x, Cp):
    """x [..., C] with zeros appended to [..., Cp] (int4 pads the contracted axis to whole groups)."""
    extra = Cp - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _block_dot(x, q, scale):
    """x [M, Cp] against one block q [Cq, O'] with scale [1 or Cp/G, O'] -> [M, O'] in x's dtype."""
    if q.dtype == jnp.int8:
        return (x @ q.astype(x.dtype)) * scale.astype(x.dtype)  # the scale on the output: [M, O']
    even, odd = nibble_planes(q, scale, 0, x.dtype)  # [Cp/2, O'] each
    return x[:, 0::2] @ even + x[:, 1::2] @ odd  # [M, O']


def _buffer_after(x, shape):
    """A [shape] buffer in x's dtype for a loop that overwrites every element of it, made from x.

    A loop's output buffer usually starts as zeros; XLA shares one zeros constant between all
    layers' loops, gives each loop its own copy of it and schedules those copies early (they
    depend on nothing), so every layer's output buffer is live at once: 31 MB per layer at
    PaliGemma 2 10B-224's prefill, 1.3 GB over its 42 layers (an optimization barrier does not
    stop it: XLA:CPU expands barriers before scheduling). A buffer computed from x (x * 0, which
    XLA does not fold for floats) is allocated where x exists. Its values are never read."""
    return jnp.broadcast_to(x.reshape(-1)[0] * 0, shape) if x.size else jnp.zeros(shape, x.dtype)


def grouped_dot(x, q, scale, tiles=True):
    """`einsum("GMC,GCO->GMO")` with a quantized weight.

    Args:
      x: [G, M, C]; q: int8 [G, C, O] or uint8 [G, Cp/2, O]; scale: [G, 1, O] or [G, Cp/G, O].
      tiles: the CPU's forms (see the module doc): with at most FEW_ROWS rows, the
        `kernels.quant_cpu` custom call where it is built; else a loop over blocks of at most
        `TILE_BYTES` instead of one dot per group, also when each group alone would fit:
        converting all G groups at once (a vmap) writes the whole float32 weight, and XLA may
        schedule every layer's such copy early.
    Returns:
      [G, M, O] in x's dtype.
    """
    G, M, _ = x.shape
    Cq, O = q.shape[1:]
    x = _padded(x, Cq * 2 if q.dtype == jnp.uint8 else Cq)  # [G, M, Cp]
    if _cpu_kernel(tiles, M):
        return quant_cpu.columns(x, q, scale).astype(x.dtype)  # [G, M, O]
    if not tiles or G * x.shape[-1] * O * 4 <= TILE_BYTES:  # every group's float32 block at once
        return jax.vmap(_block_dot)(x, q, scale)  # [G, M, O]
    if M <= FEW_ROWS:
        return _chunked_dot(x, q, scale)
    width = _tile_width(x.shape[-1], O)
    n, S = O // width, scale.shape[1]

    def step(i, out):
        g, o = i // n, (i % n) * width
        q_tile = jax.lax.dynamic_slice(q, (g, 0, o), (1, Cq, width))[0]  # [Cq, width]
        s_tile = jax.lax.dynamic_slice(scale, (g, 0, o), (1, S, width))[0]  # [S, width]
        x_g = jax.lax.dynamic_index_in_dim(x, g, 0, keepdims=False)  # [M, Cp]
        return jax.lax.dynamic_update_slice(out, _block_dot(x_g, q_tile, s_tile)[None], (g, 0, o))

    return jax.lax.fori_loop(0, G * n, step, _buffer_after(x, (G, M, O)))  # [G, M, O]


def _chunk_length(Cp, O, group):
    """Rows of the contracted axis per chunk: the largest divisor of Cp (int4: of the group, so a
    chunk never spans two groups) whose [rows, O] float32 block takes at most `TILE_BYTES`, >= 2."""
    limit, whole = max(2, TILE_BYTES // (4 * O)), group or Cp
    return max(d for d in range(1, min(whole, limit) + 1) if whole % d == 0 and (group is None or d % 2 == 0))


def _chunked_dot(x, q, scale):
    """`grouped_dot` for few rows of x: a loop over chunks of the contracted axis, each a contiguous
    block of q (rows of [C, O] are contiguous) dequantized and dotted into a [G, M, O] accumulator.

    Decoding reads every weight once per token with M = B rows; a chunk of whole rows is one
    sequential read, where an output tile is C strided pieces. int4: a chunk lies in one group, so
    its group scale multiplies the chunk's partial dot (`(sum_c x_c v_co) s_go`), as int8's
    channel scale multiplies the whole dot.
    """
    G, M, Cp = x.shape
    O = q.shape[-1]
    int4 = q.dtype == jnp.uint8
    group = Cp // scale.shape[1] if int4 else None
    rows = _chunk_length(Cp, O, group)
    n = Cp // rows
    qrows = rows // 2 if int4 else rows  # bytes per chunk along the contracted axis

    def step(i, out):
        g, c = i // n, i % n
        x_c = jax.lax.dynamic_slice(x, (g, 0, c * rows), (1, M, rows))[0]  # [M, rows]
        q_c = jax.lax.dynamic_slice(q, (g, c * qrows, 0), (1, qrows, O))[0]  # [qrows, O]
        if int4:  # even values are the low nibbles, odd the high: two dots, no interleaving copy
            byte = q_c.astype(jnp.int8)
            low, high = jnp.left_shift(byte, 4) >> 4, byte >> 4  # [rows / 2, O] each, sign-extended
            part = x_c[:, 0::2] @ low.astype(x.dtype) + x_c[:, 1::2] @ high.astype(x.dtype)  # [M, O]
            s_c = jax.lax.dynamic_slice(scale, (g, c * rows // group, 0), (1, 1, O))[0]  # [1, O]
            part = part * s_c.astype(x.dtype)
        else:
            part = x_c @ q_c.astype(x.dtype)  # [M, O]
        acc = jax.lax.dynamic_slice(out, (g, 0, 0), (1, M, O))[0] + part  # [M, O]
        return jax.lax.dynamic_update_slice(out, acc[None], (g, 0, 0))

    out = jax.lax.fori_loop(0, G * n, step, jnp.zeros((G, M, O), x.dtype))  # [G, M, O]
    return out if int4 else out * scale.astype(x.dtype)  # int8: the channel scale once, on the sum


def per_group(x, w, tiles=True):
    """`einsum("BTD,...DO->...BTO")` for a quantized w [G..., D, O] (int4: [G..., Dp/2, O]),
    the leading axes merged into one G: returns [G, B, T, O] (`fast.linear._per_group`'s layout).
    A float w [G, D, O] (`routed`) goes to `fast.dense`."""
    if not is_quantized(w):
        return dense.group_dot(x, w)
    q, scale = w["q"], w["scale"]
    B, T, D = x.shape
    G = int(np.prod(q.shape[:-2]))
    q, scale = q.reshape((G,) + q.shape[-2:]), scale.reshape((G,) + scale.shape[-2:])
    xs = jnp.broadcast_to(x.reshape(1, B * T, D), (G, B * T, D))  # [G, M, D]
    return grouped_dot(xs, q, scale, tiles).reshape(G, B, T, q.shape[-1])  # [G, B, T, O]


def matmul(x, w, contracted=1, tiles=True):
    """x [..., C] times a quantized weight whose first `contracted` axes are the contracted ones
    (merged, C = their product), e.g. [N, H, D] with contracted=2; int4 stores them merged already.

    Returns:
      [..., out...] (the weight's remaining axes) in x's dtype; a float w (`routed`): `fast.dense`.
    """
    if not is_quantized(w):
        return dense.matmul(x, w, contracted)
    q, scale = w["q"], w["scale"]
    merged = 1 if q.dtype == jnp.uint8 else contracted  # int4 keeps the contracted axes as one
    out_shape = q.shape[merged:]
    O = int(np.prod(out_shape))
    q2 = q.reshape(1, int(np.prod(q.shape[:merged])), O)  # [1, C or Cp/2, O]
    s2 = scale.reshape(1, int(np.prod(scale.shape[:merged])), O)  # [1, 1 or Cp/G, O]
    lead = x.shape[:-1]
    out = grouped_dot(x.reshape(1, -1, x.shape[-1]), q2, s2, tiles)  # [1, M, O]
    return out.reshape(lead + tuple(out_shape))


def embed_rows(table, tokens, width):
    """Rows of a quantized embedding [V, D] (int4: [V, Dp/2] with scale [V, Dp/G]) for tokens [B, T],
    dequantized to float32: [B, T, width]."""
    q = jnp.take(table["q"], tokens, axis=0)  # [B, T, Dq]
    scale = jnp.take(table["scale"], tokens, axis=0)  # [B, T, 1 or Dp/G]
    if q.dtype == jnp.int8:
        return dequantize_int8(q, scale)  # [B, T, D]
    return dequantize_int4(q, scale, 2)[..., :width]  # [B, T, D]


def _rows_dot(x, q, scale):
    """x [M, Cp] against rows q [V', Cq] of the embedding with scale [V', 1 or Cp/G] -> [M, V'] float32."""
    if q.dtype == jnp.int8:
        out = jnp.einsum("MC,VC->MV", x, q.astype(x.dtype), preferred_element_type=jnp.float32)  # [M, V']
        return out * scale[:, 0].astype(jnp.float32)
    even, odd = nibble_planes(q, scale, 1, x.dtype)  # [V', Cp/2] each
    dot = lambda x, w: jnp.einsum("MC,VC->MV", x, w, preferred_element_type=jnp.float32)  # noqa: E731
    return dot(x[:, 0::2], even) + dot(x[:, 1::2], odd)  # [M, V']


def logits(x, table, tiles=True):
    """The tied output projection `x @ E^T` with a quantized embedding: x [B, T, D] -> [B, T, V] float32,
    when `tiles` by `kernels.quant_cpu.rows` for few rows (where it is built), else in slabs of
    vocabulary rows. A float table (`routed`) goes to `fast.dense`."""
    if not is_quantized(table):
        return dense.logits(x, table)
    q, scale = table["q"], table["scale"]
    V, Cq = q.shape
    B, T, _ = x.shape
    x = _padded(x.reshape(B * T, -1), Cq * 2 if q.dtype == jnp.uint8 else Cq)  # [M, Cp]
    if _cpu_kernel(tiles, B * T):
        return quant_cpu.rows(x, q, scale).reshape(B, T, V)  # float32
    rows = _tile_width(x.shape[-1], V) if tiles else V
    if rows == V:
        return _rows_dot(x, q, scale).reshape(B, T, V)
    def step(i, out):
        q_rows = jax.lax.dynamic_slice_in_dim(q, i * rows, rows, 0)  # [rows, Cq]
        s_rows = jax.lax.dynamic_slice_in_dim(scale, i * rows, rows, 0)  # [rows, S]
        return jax.lax.dynamic_update_slice_in_dim(out, _rows_dot(x, q_rows, s_rows), i * rows, 1)

    out = jax.lax.fori_loop(0, V // rows, step, jnp.zeros((B * T, V), jnp.float32))  # [M, V]
    return out.reshape(B, T, V)


def merge_leading(w, n):
    """A quantized weight with its first `n` axes (never contracted ones) merged into one, in q and scale."""
    return {k: v.reshape((-1,) + v.shape[n:]) for k, v in w.items()}


def check_tree(params, config):
    """Raises ValueError naming the key, expected vs got, unless `params` is a quantized tree of
    `config` (stacked layers, `ref.quant.quantize_tree`'s layout): the format from q's dtype, the
    kept weights and end layers from which keys hold q, int4's group size from its first scale."""
    from paligemma.ref import params as ref_params, quant as ref_quant  # fast may import ref

    flat = ref_params.flatten(params)
    q_keys = [k for k in flat if k.endswith("/q")]
    if not q_keys:
        raise ValueError("not a quantized tree: no weight has a 'q' (use `paligemma.ref.quant.quantize_tree`)")
    fmt = format_of({"q": flat[q_keys[0]]})
    first = next((k for k in flat if k.startswith("llm/layers_first/")), None)
    keep = ref_quant.Keep(vision=f"{ref_quant.VISION_ATT}/query/kernel" in flat,
                          embedding="llm/embedder/input_embedding" in flat,
                          end_layers=len(flat[first]) if first else 0)
    shapes, group = ref_params.flatten(ref_params.param_shapes(config)), ref_quant.GROUP_SIZE
    if fmt == "int4":  # G = Cp / (number of groups), from the first quantized weight
        entry = next(e for e in ref_quant.layout(config, fmt, keep) if e.fmt)
        pre = len(ref_quant.split_axes(shapes[entry.source], entry.axes)[0])
        group = 2 * flat[f"{entry.key}/q"].shape[pre] // max(1, flat[f"{entry.key}/scale"].shape[pre])
    for entry in ref_quant.layout(config, fmt, keep):
        stored = ref_quant.stored_shapes(entry, shapes[entry.source], group)
        for key, (shape, dtype) in stored.items():
            if key not in flat:
                raise ValueError(f"quantized tree ({fmt}, keep={keep.label()}): missing {key}")
            got = flat[key]
            if tuple(got.shape) != tuple(shape):
                raise ValueError(f"quantized tree ({fmt}, keep={keep.label()}): {key} has shape {list(got.shape)}, "
                                 f"expected {list(shape)} for {config.name}")
            if key.endswith("/q") and jnp.dtype(got.dtype) != jnp.dtype(dtype):
                raise ValueError(f"quantized tree: {key} has dtype {got.dtype}, expected {np.dtype(dtype)} ({fmt})")
