"""The one seam every weight product of `paligemma.fast` goes through: `einsum(spec, x, w)`.

`fast/gemma.py` and `fast/siglip.py` write the reference's einsum strings and hand the weight
over as it is stored; this module decides how to multiply it, the way google-deepmind/gemma
routes quantization and LoRA through its one `Einsum` layer. A weight is one of:

    float array                      [..]         the products below, cast to x's dtype
    {"q": ..., "scale": ...}         int8 / int4  `fast.quant` (`ref.quant`'s formats)
    LoRA(w, lora_a, lora_b, scale)   any of these  `x w + scale (x A) B` (`fast.lora.attach`)

A new kind of weight (another format, another adapter) is one more branch in `einsum` (and in
`rows` if an embedding table can be of that kind); the model files do not change.

The product's form follows where w's contracted axes sit, which the spec says (x's contracted
axes are its last ones). Axes: G groups (w's axes before the contracted ones, e.g. heads, the
k/v or gate/up pair), C contracted, O the rest of w, V vocabulary rows, R the LoRA rank.
- G C O, e.g. `q_einsum` [N, D, H]: XLA:CPU runs a dot as batched row-major matrix products and
  would copy (transpose) w on every call; with G as a batch axis of the dot it reads w in place
  (`_per_group`). Decoding reads every weight once per token, so the copy would triple its
  memory traffic (docs/performance.md section 2).
- C O, e.g. `linear` [F, D] or `attn_vec_einsum` [N, H, D]: one matrix product, several
  contracted axes merged into one.
- V C, the tied embedding: the logits, in vocabulary slabs on the CPU (`logits`).
On the CPU (no mesh) a quantized w, or a float32 w times 2-16 rows of x (batched decoding), runs
as `kernels.quant_cpu`'s custom call (`fast.quant.routed`, `fast.dense`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from . import quant
from .ops import cast


@jax.tree_util.register_pytree_node_class
class LoRA:
    """A frozen weight w with a low-rank update: used as `x w + scale (x A) B`, never `w + scale A B`.

    A holds w's contracted axes then R, B holds R then w's other axes; both may lead with w's
    pair axis (C: k/v, gate/up), one adapter per pair member (`fast.lora.TARGETS`). Training
    the adapters beside w needs only the input gradient through w; a merged `w + scale A B`
    would make XLA compute the full weight gradient too, per layer and step. `scale` is static
    (not a leaf), so a stacked [L, ...] tree of these scans and slices like plain weights.
    """

    def __init__(self, w, lora_a, lora_b, scale):
        self.w, self.lora_a, self.lora_b, self.scale = w, lora_a, lora_b, scale

    def tree_flatten(self):
        return (self.w, self.lora_a, self.lora_b), self.scale

    @classmethod
    def tree_unflatten(cls, scale, leaves):
        return cls(*leaves, scale)


def _axes(spec):
    """(x's axes, w's axes, the output's axes, the contracted axes in w's order) of "x,w->out"."""
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    contracted = "".join(a for a in ws if a in xs)
    if not xs.endswith(contracted) or contracted not in ws:
        raise ValueError(f"linear.einsum: {spec!r}: the contracted axes must end x and be adjacent in w")
    return xs, ws, out, contracted


def einsum(spec, x, w, mesh=None):
    """`jnp.einsum(spec, x, w)` for a weight of any kind (module doc), in x's dtype (logits: float32).

    mesh: the `jax.sharding.Mesh` the product runs on, or None: the CPU's own forms (the
    custom calls, the tile loops, the vocabulary slabs) are for one device only.
    """
    if isinstance(w, LoRA):
        return einsum(spec, x, w.w, mesh) + _low_rank(spec, x, w)
    xs, ws, out, contracted = _axes(spec)
    groups, rest = ws[: ws.index(contracted)], ws[ws.index(contracted) + len(contracted):]
    tiles = quant.tiled() and mesh is None
    if not rest:
        return _logits(x, w, tiles, mesh)
    if groups:
        if len(contracted) != 1 or len(rest) != 1:
            raise ValueError(f"linear.einsum: {spec!r}: a grouped weight is [G..., C, O] with one C and one O axis")
        y = _group_dot(x, w, tiles)  # [G, (x's other axes), O]
        free = xs[: len(xs) - len(contracted)]
        stored = w["q"].shape if quant.is_quantized(w) else w.shape  # int4: C differs, G and O do not
        sizes = {**dict(zip(groups, stored)), **dict(zip(xs, x.shape)), **dict(zip(rest, stored[-len(rest):]))}
        return _arrange(y, groups + free + rest, out, sizes)
    if quant.routed(w, x, tiles):
        lead = x.shape[: x.ndim - len(contracted)]
        return quant.matmul(x.reshape(lead + (-1,)), w, len(contracted), tiles)
    if len(contracted) == 1:
        return jnp.einsum(spec, x, cast(w, x))
    lead, out_shape = x.shape[: x.ndim - len(contracted)], w.shape[len(contracted):]
    C = int(np.prod(w.shape[: len(contracted)]))
    y = x.reshape(lead + (C,)) @ cast(w, x).reshape(C, -1)  # the contracted axes merged: one matrix product
    return y.reshape(lead + tuple(out_shape))


def _arrange(y, have, want, sizes):
    """y [G, ..., O] with its axes named by `have` (groups and rest split back out) in `want`'s order."""
    y = y.reshape([sizes[a] for a in have])
    order = [have.index(a) for a in want]
    return y if order == sorted(order) else jnp.transpose(y, order)


def _group_dot(x, w, tiles):
    """`einsum("...C,GCO->G...O")` for w [G..., C, O] (several leading axes merged into G): [G, B, T, O]."""
    if not quant.is_quantized(w):
        w = w.reshape((-1,) + w.shape[-2:])  # [G, C, O]
    if quant.routed(w, x, tiles):
        return quant.per_group(x, w, tiles)
    return _per_group(x, cast(w, x))


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


def _low_rank(spec, x, w: LoRA):
    """`scale (x A) B` in the layout of `einsum(spec, x, w.w)`: two einsums through rank R."""
    xs, ws, out, contracted = _axes(spec)
    if "R" in spec:
        raise ValueError(f"linear.einsum: {spec!r} uses R, the LoRA rank's axis")
    pair = ws[: w.lora_a.ndim - len(contracted) - 1]  # A's leading axes: one adapter per pair member
    free = xs[: len(xs) - len(contracted)]
    a_axes, b_axes = pair + contracted + "R", pair + "R" + "".join(a for a in ws if a not in pair + contracted)
    xa = jnp.einsum(f"{xs},{a_axes}->{pair}{free}R", x, w.lora_a.astype(x.dtype))  # [C.., B, T, R]
    return jnp.einsum(f"{pair}{free}R,{b_axes}->{out}", xa, w.lora_b.astype(x.dtype)) * jnp.asarray(w.scale, x.dtype)


def vocab_slab(V, target=8192):
    """The largest divisor of V that is at most `target` (PaliGemma's 257152 rows: 32 slabs of 8036)."""
    return max(d for d in range(1, min(V, target) + 1) if V % d == 0)


def _logits(x, table, tiles, mesh):
    """`einsum("BTD,VD->BTV")` against the tied embedding, float32.

    On CPU a table that is not float32 goes through the dot in vocabulary slabs: XLA:CPU has
    no bfloat16 dot and converts both operands to float32 first, and one slab at a time that
    copy is ~50 MB instead of the whole table (2.1 GB for PaliGemma's 257152 x 2048). Not on a
    mesh with a model axis, whose devices each convert only their rows of the table (and a
    `lax.map` over row slabs split across devices would gather them).
    """
    if quant.routed(table, x, tiles, logits=True):
        return quant.logits(x, table, tiles)  # [B, T, V]
    V, D = table.shape
    slab = vocab_slab(V)

    def project(rows):  # [V', D] -> [B, T, V']
        return jnp.einsum("BTD,VD->BTV", x, rows.astype(x.dtype), preferred_element_type=jnp.float32)

    split = mesh is not None and mesh.shape["model"] > 1
    if table.dtype == jnp.float32 or jax.default_backend() != "cpu" or slab < 1024 or split:
        return project(table)  # [B, T, V]
    out = jax.lax.map(project, table.reshape(V // slab, slab, D))  # [V / slab, B, T, slab]
    return jnp.moveaxis(out, 0, 2).reshape(x.shape[:2] + (V,))  # [B, T, V]


def rows(table, tokens, width=None):
    """Rows of an embedding table of any kind for tokens [B, T], as float32 [B, T, D], and the
    dtype the table computes in (its own; float32 for a quantized one). `width` = D is needed
    for int4, whose rows are padded to whole groups."""
    if quant.is_quantized(table):
        return quant.embed_rows(table, tokens, width), jnp.dtype(jnp.float32)
    return jnp.take(table, tokens, axis=0).astype(jnp.float32), jnp.dtype(table.dtype)
