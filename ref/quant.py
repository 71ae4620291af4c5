"""Quantized weights: int8 per output channel and int4 in groups, as exact NumPy functions.

Every quantized weight is a matmul kernel. Its *contracted* axes (summed over when the weight is
applied) are listed in `CONTRACTED_AXES`; every other axis indexes an output channel (the leading
layer axis L included, so no scale ever spans two layers).

int8, per output channel:   s = max|w| / 127 over the contracted axes,  q = round(w / s) in [-127, 127]
    q int8 in w's shape; scale in w's rank with the contracted axes of length 1: w ~ q * scale.
int4, per group of G = 128: the contracted axes (always adjacent) merged into one axis of length C,
    padded with zeros to Cp = G * ceil(C / G) (tiny models have C = 48: one group, 80 zeros); each run
    of G values along it gets s = max|w| / 7, q = round(w / s) in [-7, 7]. Packed two per byte along
    that axis: element 2j in the low nibble (bits 0-3) of byte j, element 2j + 1 in the high nibble,
    each a 4-bit two's complement number. For w [pre..., contracted..., post...]:
    q uint8 [pre..., Cp / 2, post...], scale [pre..., Cp / G, post...].

Both are symmetric (no zero point: zero stays exactly zero, w ~ q * s). int4 uses -7..7, not -8..7:
with s = max|w| / 7 the largest |w| lands exactly on +-7 whichever its sign, so every element is
within half a step; -8 would only be reachable from a negative maximum, and s = max|w| / 8 would
clip a positive maximum by a whole step. The unused code costs log2(16/15) = 0.09 bits per value.
Rounding is half to even (`np.rint`); a channel or group of zeros gets s = 0 and q = 0. The scale is
rounded to its stored dtype (float32 or bfloat16) *before* q is computed, so `q * scale` is within
half a step of w for every element, measured with the stored scale.

Axes: L layers, N heads, K kv heads, D width, F mlp, H head dim, V vocabulary, W vision width,
M vision mlp; Cp the padded contracted length, G the group size.
"""

import dataclasses

import ml_dtypes
import numpy as np

from paligemma.options import QUANT_FORMATS

from .params import flatten, param_shapes, unflatten

FORMATS = QUANT_FORMATS
GROUP_SIZE = 128
SCALE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}  # keys: options'
QMAX = {"int8": 127, "int4": 7}

_ENC = "img/Transformer/encoderblock"
VISION_ATT = f"{_ENC}/MultiHeadDotProductAttention_0"  # SigLIP attention: its query kernel marks Keep.vision
# Every weight that may be quantized -> its contracted axes (negative, so they hold for one layer too).
CONTRACTED_AXES = {
    f"{VISION_ATT}/query/kernel": (-3,),  # [L, W, N, H]
    f"{VISION_ATT}/key/kernel": (-3,),  # [L, W, N, H]
    f"{VISION_ATT}/value/kernel": (-3,),  # [L, W, N, H]
    f"{VISION_ATT}/out/kernel": (-3, -2),  # [L, N, H, W]
    f"{_ENC}/MlpBlock_0/Dense_0/kernel": (-2,),  # [L, W, M]
    f"{_ENC}/MlpBlock_0/Dense_1/kernel": (-2,),  # [L, M, W]
    "img/head/kernel": (-2,),  # [W, D]
    "llm/embedder/input_embedding": (-1,),  # [V, D]: per row, as the tied output projection reads it
    "llm/layers/attn/q_einsum/w": (-2,),  # [L, N, D, H]
    "llm/layers/attn/kv_einsum/w": (-2,),  # [L, 2, K, D, H]
    "llm/layers/attn/attn_vec_einsum/w": (-3, -2),  # [L, N, H, D]
    "llm/layers/mlp/gating_einsum": (-2,),  # [L, 2, D, F]
    "llm/layers/mlp/linear": (-2,),  # [L, F, D]
}
# Never quantized: img/embedding/kernel (the patch embedding, 0.02% of the weights, reads raw
# pixels and is where quantized ports first drift), position embeddings, norms, biases.


def split_axes(shape, axes):
    """`(pre, C, post)`: the shape before, the merged length of, and the shape after the contracted axes."""
    first, last = len(shape) + min(axes), len(shape) + max(axes)
    if sorted(len(shape) + a for a in axes) != list(range(first, last + 1)):
        raise ValueError(f"contracted axes {axes} of shape {list(shape)} are not adjacent")
    return tuple(shape[:first]), int(np.prod(shape[first:last + 1])), tuple(shape[last + 1:])


def _scale_and_q(w, reduce_axes, qmax, scale_dtype):
    """Scale over `reduce_axes` (kept, length 1) rounded to `scale_dtype`, and q = round(w / scale)."""
    if not np.all(np.isfinite(w)):
        raise ValueError(f"cannot quantize a weight holding NaN or infinity (shape {list(w.shape)})")
    scale = (np.max(np.abs(w), axis=reduce_axes, keepdims=True) / qmax).astype(scale_dtype)
    s = scale.astype(w.dtype)
    safe = np.where(s > 0, s, 1)  # a zero channel: q = 0 whatever we divide by
    q = np.clip(np.rint(w / safe), -qmax, qmax).astype(np.int8)
    return scale, q


def _compute_dtype(w):
    """float64 stays float64 (the reference's exact mode); everything else is computed in float32."""
    return np.float64 if np.asarray(w).dtype == np.float64 else np.float32


def quantize_int8(w, axes, scale_dtype=np.float32):
    """int8, one scale per output channel.

    Args:
      w: a weight, e.g. q_einsum [L, N, D, H].
      axes: its contracted axes, e.g. (-2,).
      scale_dtype: float32 or bfloat16.
    Returns:
      q int8 [w's shape], scale [w's shape with the contracted axes 1], e.g. [L, N, 1, H].
    """
    w = np.asarray(w).astype(_compute_dtype(w))
    return _scale_and_q(w, tuple(axes), QMAX["int8"], scale_dtype)[::-1]


def dequantize_int8(q, scale, dtype=np.float32):
    """`q * scale` in `dtype`: q int8 [..], scale broadcastable to it. Returns [q's shape]."""
    return q.astype(dtype) * scale.astype(dtype)


def pack_int4(q, axis):
    """Two 4-bit values per byte along `axis` (even length): 2j in the low nibble, 2j + 1 in the high.

    Args:
      q: int8 values in [-8, 7], [..., 2n, ...].
    Returns:
      uint8 [..., n, ...].
    """
    q = np.moveaxis(np.asarray(q, np.int8), axis, -1)  # [..., 2n]
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: axis {axis} has odd length {q.shape[-1]}")
    nibbles = q.astype(np.uint8) & 0x0F  # two's complement: -1 -> 0xF
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., n]
    return np.moveaxis(packed, -1, axis)


def unpack_int4(packed, axis):
    """Inverse of `pack_int4`: uint8 [..., n, ...] -> int8 [..., 2n, ...] in [-8, 7]."""
    packed = np.moveaxis(np.asarray(packed, np.uint8), axis, -1)  # [..., n]
    low = (packed & 0x0F).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    pairs = np.stack([low, high], axis=-1)  # [..., n, 2]
    values = ((pairs ^ 8) - 8).reshape(*packed.shape[:-1], 2 * packed.shape[-1])  # sign-extended; [..., 2n]
    return np.moveaxis(values, -1, axis)


def quantize_int4(w, axes, group_size=GROUP_SIZE, scale_dtype=np.float32):
    """int4 in groups of `group_size` along the (merged, zero-padded) contracted axes.

    Args:
      w: a weight [pre..., contracted..., post...], e.g. attn_vec_einsum [L, N, H, D].
      axes: its contracted axes, e.g. (-3, -2).
      group_size: G, even.
      scale_dtype: float32 or bfloat16.
    Returns:
      q uint8 [pre..., Cp / 2, post...], scale [pre..., Cp / G, post...], e.g. [L, Cp / 2, D], [L, Cp / G, D].
    """
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be even and >= 2, got {group_size}")
    w = np.asarray(w).astype(_compute_dtype(w))
    pre, C, post = split_axes(w.shape, axes)
    groups = -(-C // group_size)
    merged = w.reshape(*pre, C, *post)  # [pre, C, post]
    pad = [(0, 0)] * len(pre) + [(0, groups * group_size - C)] + [(0, 0)] * len(post)
    grouped = np.pad(merged, pad).reshape(*pre, groups, group_size, *post)  # [pre, Cp/G, G, post]
    scale, q = _scale_and_q(grouped, (len(pre) + 1,), QMAX["int4"], scale_dtype)
    q = q.reshape(*pre, groups * group_size, *post)  # [pre, Cp, post]
    return pack_int4(q, len(pre)), np.squeeze(scale, axis=len(pre) + 1)


def dequantize_int4(q, scale, shape, axes, dtype=np.float32):
    """Inverse of `quantize_int4` up to rounding.

    Args:
      q: uint8 [pre..., Cp / 2, post...]; scale [pre..., Cp / G, post...].
      shape: the weight's shape; axes: its contracted axes.
    Returns:
      [shape] in `dtype` (the zero padding dropped).
    """
    pre, C, post = split_axes(shape, axes)
    values = unpack_int4(q, len(pre)).astype(dtype)  # [pre, Cp, post]
    Cp, groups = values.shape[len(pre)], scale.shape[len(pre)]
    grouped = values.reshape(*pre, groups, Cp // groups, *post)  # [pre, Cp/G, G, post]
    w = grouped * np.expand_dims(scale.astype(dtype), len(pre) + 1)  # [pre, Cp/G, G, post]
    w = w.reshape(*pre, Cp, *post)[(slice(None),) * len(pre) + (slice(0, C),)]  # [pre, C, post]
    return w.reshape(shape)


def quantized_shapes(shape, axes, fmt, group_size=GROUP_SIZE):
    """`(q shape, q dtype, scale shape)` a weight of `shape` is stored as in format `fmt`."""
    if fmt == "int8":
        return tuple(shape), np.dtype(np.int8), tuple(1 if i - len(shape) in axes else n for i, n in enumerate(shape))
    if fmt == "int4":
        pre, C, post = split_axes(shape, axes)
        groups = -(-C // group_size)
        return pre + (groups * group_size // 2,) + post, np.dtype(np.uint8), pre + (groups,) + post
    raise ValueError(f"unknown quantization format {fmt!r}; expected one of {list(FORMATS)}")


# --- What stays in higher precision --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keep:
    """Which quantizable weights stay in their stored float dtype.

    vision: the whole vision tower and projection (`img/...`).
    embedding: the token embedding (also the output projection: every logit reads it).
    end_layers: this many LLM layers at each end. Layers are stacked on one axis L, so the kept
      ones are stored apart as whole layers: `llm/layers_first` (layers 0..k-1, float),
      `llm/layers` (layers k..L-k-1, quantized) and `llm/layers_last` (the last k, float), each
      stacked on its own leading axis; joined in order they are the model's L layers.
    """

    vision: bool = False
    embedding: bool = False
    end_layers: int = 0

    @classmethod
    def parse(cls, spec):
        """`"vision,embedding,ends"` (`ends` = `ends=1`, or `ends=K`); "" or "none" keeps nothing."""
        fields = {}
        for part in [p.strip() for p in (spec or "").split(",") if p.strip() and p.strip() != "none"]:
            name, _, value = part.partition("=")
            if name in ("vision", "embedding") and not value:
                fields[name] = True
            elif name == "ends" and (not value or value.isdigit()):
                fields["end_layers"] = int(value or 1)
            else:
                raise ValueError(f"keep: unknown part {part!r}; expected vision, embedding, ends or ends=K")
        return cls(**fields)

    def label(self):
        parts = [n for n in ("vision", "embedding") if getattr(self, n)]
        parts += [f"ends={self.end_layers}"] if self.end_layers else []
        return ",".join(parts) or "none"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored tensor group: rows `rows` (of axis 0, None = all) of `source` stored under `key`.

    `fmt` is "int8" / "int4" (stored as `key/q` and `key/scale`) or None (stored as is).
    """

    source: str
    key: str
    fmt: str | None
    rows: tuple | None = None

    @property
    def axes(self):
        return CONTRACTED_AXES.get(self.source)


def layout(config, fmt, keep=Keep()):
    """The `Entry`s of a quantized tree of `config`, in the order they are written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {list(FORMATS)}")
    L, k = config.llm.depth, keep.end_layers
    if k < 0 or 2 * k > L:
        raise ValueError(f"keep ends={k}: the model has {L} layers, so at most {L // 2} can be kept at each end")
    entries = []
    for key in flatten(param_shapes(config)):
        kept = (keep.vision and key.startswith("img/")) or (keep.embedding and key == "llm/embedder/input_embedding")
        q = None if kept or key not in CONTRACTED_AXES else fmt
        if key.startswith("llm/layers/") and k:
            rest = key[len("llm/layers/"):]
            entries.append(Entry(key, f"llm/layers_first/{rest}", None, (0, k)))
            entries.append(Entry(key, key, q, (k, L - k)))
            entries.append(Entry(key, f"llm/layers_last/{rest}", None, (L - k, L)))
        else:
            entries.append(Entry(key, key, q))
    return entries


def stored_shapes(entry, shape, group_size=GROUP_SIZE, scale_dtype=np.float32, float_dtype=None):
    """`{stored key: (shape, dtype)}` for an entry whose source has `shape`.

    Float entries get `float_dtype` (None: whatever float dtype the source has).
    """
    if entry.rows is not None:
        shape = (entry.rows[1] - entry.rows[0],) + tuple(shape[1:])
    if entry.fmt is None:
        return {entry.key: (tuple(shape), float_dtype)}
    q_shape, q_dtype, s_shape = quantized_shapes(shape, entry.axes, entry.fmt, group_size)
    return {f"{entry.key}/q": (q_shape, q_dtype), f"{entry.key}/scale": (s_shape, np.dtype(scale_dtype))}


def quantize_array(w, entry, group_size=GROUP_SIZE, scale_dtype=np.float32):
    """`{stored key: array}` for one entry's slice `w` of its source."""
    if entry.fmt is None:
        return {entry.key: w}
    try:
        if entry.fmt == "int8":
            q, scale = quantize_int8(w, entry.axes, scale_dtype)
        else:
            q, scale = quantize_int4(w, entry.axes, group_size, scale_dtype)
    except ValueError as e:
        raise ValueError(f"{entry.source}: {e}") from None
    return {f"{entry.key}/q": q, f"{entry.key}/scale": scale}


def quantize_tree(params, config, fmt="int8", keep=Keep(), group_size=GROUP_SIZE, scale_dtype=np.float32):
    """A parameter tree where each quantized weight is `{"q": ..., "scale": ...}`.

    Norms, biases, position and patch embeddings and the `keep`-ed weights stay as given.
    Returns the nested dict; `dequantize_tree` turns it back into `param_shapes(config)` layout.
    """
    flat, out = flatten(params), {}
    for entry in layout(config, fmt, keep):
        w = flat[entry.source]
        w = w if entry.rows is None else w[entry.rows[0]:entry.rows[1]]
        out.update(quantize_array(w, entry, group_size, scale_dtype))
    return unflatten(out)


def _pieces(key):
    """The stored keys one source key is split into (first, middle, last layers when end layers are kept)."""
    if not key.startswith("llm/layers/"):
        return [key]
    rest = key[len("llm/layers/"):]
    return [f"llm/layers_first/{rest}", key, f"llm/layers_last/{rest}"]


def dequantize_tree(qtree, config, dtype=np.float32):
    """The float tree (`param_shapes(config)` layout, in `dtype`) a quantized tree stands for.

    int8 and int4 are told apart by q's dtype (int8 / uint8).
    """
    flat, out = flatten(qtree), {}
    for key, shape in flatten(param_shapes(config)).items():
        pieces = []
        for part in _pieces(key):
            if part in flat:
                pieces.append(np.asarray(flat[part]).astype(dtype))
            elif f"{part}/q" in flat:
                q, scale = flat[f"{part}/q"], flat[f"{part}/scale"]
                if q.dtype == np.int8:
                    pieces.append(dequantize_int8(q, scale, dtype))
                else:  # a layer segment has its own number of layers on axis 0 (never the packed axis)
                    piece_shape = (q.shape[0],) + tuple(shape[1:]) if key.startswith("llm/layers/") else tuple(shape)
                    pieces.append(dequantize_int4(q, scale, piece_shape, CONTRACTED_AXES[key], dtype))
        out[key] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return unflatten(out)


def entries_bytes(config, fmt, keep=Keep(), group_size=GROUP_SIZE, scale_dtype=np.float32, float_dtype=np.float32):
    """Bytes a quantized checkpoint of `config` takes (kept weights and norms in `float_dtype`)."""
    shapes, total = flatten(param_shapes(config)), 0
    for entry in layout(config, fmt, keep):
        stored = stored_shapes(entry, shapes[entry.source], group_size, scale_dtype, float_dtype)
        total += sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in stored.values())
    return total


def tree_bytes(tree):
    """Bytes held by the arrays of a (quantized or float) parameter tree."""
    return sum(int(np.asarray(x).nbytes) for x in flatten(tree).values())


def keep_costs(config, fmt, group_size=GROUP_SIZE, scale_dtype=np.float32, float_dtype=ml_dtypes.bfloat16):
    """`{keep label: bytes}` for the documented keep options (the cost of each choice)."""
    options = [Keep(), Keep(vision=True), Keep(embedding=True), Keep(end_layers=1),
               Keep(vision=True, embedding=True, end_layers=1)]
    return {k.label(): entries_bytes(config, fmt, k, group_size, scale_dtype, float_dtype) for k in options}
