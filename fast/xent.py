"""big_vision's token cross-entropy straight from the pre-logits, one vocabulary slab at a time.

    nll = token_nll(pre_logits, table, targets, label_smoothing, softcap)   # [N], float32

equals `-token` of `paligemma.fast.train.big_vision_loss` on `logits = softcap(pre_logits @ table^T)`
(float32 logits, `paligemma.fast.gemma.logits`' arithmetic), without ever holding the [N, V] logits:
the forward pass runs over vocabulary slabs with an online log-sum-exp, and the backward pass
(a `jax.custom_vjp`) recomputes each slab's logits and writes that slab's rows of the table's
gradient directly. Two ways around that recomputation (the logits product is ~1 TFLOP of a
3B-shaped training step at 8 x 128 tokens): a frozen table's forward pass accumulates the
gradient of the pre-logits alongside the loss, and `keep_logits` holds the slabs for a trained
one. With PaliGemma's vocabulary (257152) and a batch of 8 x 128 tokens the plain
loss holds the logits, their log-softmax, exponentials and gradient, ~1 GB each (4-5 GB of
temporaries in a training step); here one slab of 8036 rows is 33 MB.

Gradient (per token, z the logits after the softcap, p = softmax(z), y the target, e the label
smoothing, V the vocabulary): nll = -[(1 - e) log p_y + e / (V - 1) sum_{v != y} log p_v], so
d nll / d z_v = p_v - c1 [v = y] - c2 with c2 = e / (V - 1), c1 = 1 - e - c2 (c1 + V c2 = 1).
Through the softcap z = c tanh(r / c): dz / dr = 1 - (z / c)^2.

Axes: N tokens, D width, V vocabulary, S slab rows, C slabs.
"""

import functools

import jax
import jax.numpy as jnp

from . import linear

SLAB = 8192


def slabs(V, target=SLAB):
    """(rows per slab S, padding rows): the largest divisor of V in [target / 4, target], else
    ceil(V / ceil(V / target)) rows and the table padded with zero rows to a multiple of it."""
    if V <= target:
        return V, 0
    divisor = linear.vocab_slab(V, target)
    if divisor >= target // 4:
        return divisor, 0
    n = -(-V // target)
    S = -(-V // n)
    return S, n * S - V


def _slab_logits(pre, rows, offset, V, softcap):
    """Float32 logits [N, S] of one slab (padding columns -inf)."""
    z = jnp.einsum("ND,SD->NS", pre, rows.astype(pre.dtype), preferred_element_type=jnp.float32)  # [N, S]
    if softcap:
        z = softcap * jnp.tanh(z / softcap)
    real = _real(offset, rows.shape[0], V)  # [S]
    return jnp.where(real, z, -jnp.inf), real


def _real(offset, S, V):
    """[S] which of a slab's rows are vocabulary rows (the rest is padding)."""
    return offset + jnp.arange(S) < V


def _split(table, S, pad):
    V, D = table.shape
    if pad:
        table = jnp.pad(table, ((0, pad), (0, 0)))
    return table.reshape((V + pad) // S, S, D)  # [C, S, D]


def _constants(label_smoothing, V):
    c2 = label_smoothing / (V - 1)
    return 1.0 - label_smoothing - c2, c2  # c1, c2


def _cap_slope(z, softcap):
    """dz / dr of the softcap at the capped logits z (1 without one)."""
    return 1.0 - jnp.square(z / softcap) if softcap else 1.0


def _forward(pre, table, targets, label_smoothing, softcap, target, d_pre=False, keep=False):
    """(nll [N], log-sum-exp [N], extra) over the slabs. extra: with `d_pre`, d nll / d pre [N, D]
    accumulated in the same pass (the softmax-weighted rows under a running max, as flash
    attention accumulates its output); with `keep`, the slabs' logits [C, N, S]; else None."""
    V = table.shape[0]
    S, pad = slabs(V, target)
    N, D = pre.shape
    c1, c2 = _constants(label_smoothing, V)

    def body(carry, slab):
        m, s, total, label, acc = carry
        rows, index = slab
        z, real = _slab_logits(pre, rows, index * S, V, softcap)  # [N, S]
        m_new = jnp.maximum(m, z.max(axis=-1))  # [N]
        alpha = jnp.exp(m - m_new)  # [N]
        e = jnp.exp(z - m_new[:, None])  # [N, S] (padding columns 0)
        s = s * alpha + e.sum(axis=-1)
        total = total + jnp.where(real, z, 0.0).sum(axis=-1)  # sum of the real logits
        local = targets - index * S
        hit = (local >= 0) & (local < S)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, S - 1)[:, None], axis=-1)[:, 0]
        if d_pre:
            w = jnp.where(real, e * _cap_slope(z, softcap), 0.0)  # [N, S]
            acc = acc * alpha[:, None] + jnp.einsum("NS,SD->ND", w, rows.astype(jnp.float32))
        return (m_new, s, total, label + jnp.where(hit, picked, 0.0), acc), (z if keep else None)

    zeros = jnp.zeros((N,), jnp.float32)
    acc = jnp.zeros((N, D) if d_pre else (), jnp.float32)
    init = (jnp.full((N,), -jnp.inf, jnp.float32), zeros, zeros, zeros, acc)
    chunks = _split(table, S, pad)
    (m, s, total, label, acc), kept = jax.lax.scan(body, init, (chunks, jnp.arange(chunks.shape[0])))
    lse = m + jnp.log(s)  # [N]
    nll = -(c1 * (label - lse) + c2 * (total - V * lse))  # [N]
    if not d_pre:
        return nll, lse, kept
    # d nll / d pre = sum_v (p_v - c1 [v = y] - c2) slope_v table_v; the last term's sum is the
    # table's row sum without a softcap (slope 1), and `token_nll` only asks for it then.
    rows_y = jnp.take(table, jnp.clip(targets, 0, V - 1), axis=0).astype(jnp.float32)  # [N, D]
    slope_y = jnp.broadcast_to(_cap_slope(label, softcap), label.shape)  # [N]
    grad = acc / s[:, None] - (c1 * slope_y)[:, None] * rows_y  # [N, D]
    if c2:
        grad = grad - c2 * table.astype(jnp.float32).sum(axis=0)  # [N, D]
    return nll, lse, grad


def _online(table_grad, label_smoothing, softcap):
    """Whether the forward pass builds d nll / d pre itself: only for a frozen table (its
    gradient needs the final log-sum-exp) and without both smoothing and a softcap (then the
    smoothing term would cost a second [N, S] x [S, D] product per slab)."""
    return not table_grad and not (label_smoothing and softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _nll(pre, table, targets, label_smoothing, softcap, target, table_grad, keep_logits):
    return _forward(pre, table, targets, label_smoothing, softcap, target)[0]


def _nll_fwd(pre, table, targets, label_smoothing, softcap, target, table_grad, keep_logits):
    online = _online(table_grad, label_smoothing, softcap)
    keep = keep_logits and not online
    nll, lse, extra = _forward(pre, table, targets, label_smoothing, softcap, target, d_pre=online, keep=keep)
    return nll, (pre, table, targets, lse, extra)


def _nll_bwd(label_smoothing, softcap, target, table_grad, keep_logits, residuals, g):
    pre, table, targets, lse, extra = residuals
    g = g.astype(jnp.float32)
    if _online(table_grad, label_smoothing, softcap):  # the forward pass did the work
        return (extra * g[:, None]).astype(pre.dtype), jnp.zeros_like(table), None
    V, D = table.shape
    S, pad = slabs(V, target)
    c1, c2 = _constants(label_smoothing, V)

    def body(d_pre, slab):
        rows, index, z = slab  # z: the kept [N, S] logits, or None
        if keep_logits:
            real = _real(index * S, S, V)  # [S]
        else:  # recompute the slab's logits rather than hold all of them
            z, real = _slab_logits(pre, rows, index * S, V, softcap)  # [N, S]
        local = targets - index * S
        onehot = jnp.arange(S)[None, :] == local[:, None]  # [N, S]
        dz = jnp.exp(z - lse[:, None]) - c1 * onehot - jnp.where(real, c2, 0.0)  # d nll / d z
        dz = jnp.where(real, dz * _cap_slope(z, softcap) * g[:, None], 0.0)  # [N, S]
        d_pre = d_pre + jnp.einsum("NS,SD->ND", dz, rows.astype(jnp.float32))
        if not table_grad:
            return d_pre, None
        d_rows = jnp.einsum("NS,ND->SD", dz, pre.astype(jnp.float32))  # [S, D]
        return d_pre, d_rows.astype(table.dtype)

    chunks = _split(table, S, pad)
    xs = (chunks, jnp.arange(chunks.shape[0]), extra)  # extra: the kept logits [C, N, S], or None
    d_pre, d_table = jax.lax.scan(body, jnp.zeros(pre.shape, jnp.float32), xs)
    d_table = d_table.reshape(-1, D)[:V] if table_grad else jnp.zeros_like(table)  # [V, D] (zeros: dropped)
    return d_pre.astype(pre.dtype), d_table, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def token_nll(pre_logits, table, targets, label_smoothing=0.0, softcap=None, target=SLAB, table_grad=True,
              keep_logits=False):
    """Per-token negative log-likelihood with big_vision's label smoothing, float32.

    Args:
      pre_logits: [..., D] (any float dtype: the dot runs in it, accumulating in float32, as
        `gemma.logits`); table: the tied embedding [V, D]; targets: [...] ids.
      label_smoothing: e (the target puts 1 - e on the label, e / (V - 1) elsewhere).
      softcap: the final logit softcap c (`c tanh(x / c)`), or None.
      target: rows per slab to aim for (`slabs`).
      table_grad: False when the table is frozen: no table gradient (zeros, which the caller
        drops), and the forward pass of a gradient computation builds d nll / d pre_logits in
        the same sweep over the slabs (one [N, S] x [S, D] product per slab), so the backward
        pass has nothing left to recompute.
      keep_logits: with a trained table, hold the slabs' float32 logits (N x V x 4 bytes) from
        the forward pass for the backward pass instead of recomputing them: one [N, D] x [D, V]
        product fewer per step, for that much memory.
    Returns:
      [...] float32; differentiable in `pre_logits` and (with `table_grad`) `table`.
    """
    shape = targets.shape
    pre = pre_logits.reshape(-1, pre_logits.shape[-1])  # [N, D]
    nll = _nll(pre, table, targets.reshape(-1).astype(jnp.int32), float(label_smoothing),
               float(softcap) if softcap else None, int(target), bool(table_grad), bool(keep_logits))
    return nll.reshape(shape)
