"""What every attention kernel here computes on one `[rows, block_k]` tile, shared by the
forward, backward and decode kernels so that they cannot disagree.

Axes (per tile): rows query rows (or, transposed, key rows), cols the other side, H head dim.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Masked scores: finite, so a fully masked tile gives exp(MASK - MASK) = 1, never NaN; masked
# probabilities are set to exactly 0 separately, so this value never reaches a sum.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one attention call (hashable: a `custom_vjp` nondiff argument).

    backend: "tpu" | "gpu" | "interpret"; block_q, block_k: tile sizes; group: G = N / K;
    head_dim: H as the kernel sees it (padded); scale: applied to q k^T; softcap: None or the
    attention-logit cap; has_window: whether positions are compared (the window itself is a
    runtime scalar, so Gemma 2's alternating layers share one kernel); num_warps, num_stages:
    Triton's.
    """

    backend: str
    block_q: int
    block_k: int
    group: int
    head_dim: int
    scale: float = 1.0
    softcap: Optional[float] = None
    has_window: bool = False
    num_warps: int = 4
    num_stages: int = 2


def scores(a, b, config: KernelConfig):
    """`scale * a b^T`, then the softcap: ([m, H], [n, H]) -> (s [m, n] f32, tanh or None).

    The tanh is returned for the backward pass: d(cap tanh(x / cap))/dx = 1 - tanh^2.
    """
    s = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [m, n]
    if config.scale != 1.0:
        s = s * config.scale
    if not config.softcap:
        return s, None
    t = jnp.tanh(s / config.softcap)
    return config.softcap * t, t


def matmul(a, b):
    """[m, k] x [k, n] -> [m, n] float32 (inputs in their own dtype, f32 accumulation)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def tile_mask(q_ids, kv_ids, q_pos, kv_pos, window):
    """The prefix-LM rule on a tile (see `masking`); ids carry validity. Query vectors are
    columns and key vectors rows, or the other way round (transposed tile): both broadcast.

    Returns bool [rows, cols]: kv_id <= q_id, and with positions, within the window or same block.
    """
    visible = kv_ids <= q_ids
    if q_pos is not None:
        visible = visible & (((q_pos - kv_pos) < window) | (kv_ids == q_ids))
    return visible


def zero_cotangent(tree):
    """float0 cotangents for integer inputs of a `custom_vjp` (ids, positions, loop bounds)."""
    return jax.tree.map(lambda x: np.zeros(np.shape(x), jax.dtypes.float0), tree)


def online_softmax_init(rows, H):
    """The (running max [rows, 1], running sum [rows, 1], accumulator [rows, H]) before any tile."""
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, H), jnp.float32))


def online_softmax_step(carry, s, visible, v):
    """Folds one tile of scores s [rows, bk] (visible [rows, bk]) and its values v [bk, H] into
    the running (max, sum, accumulator); masked keys weigh exactly 0."""
    m, l, acc = carry  # [rows, 1], [rows, 1], [rows, H]
    s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)  # [rows, bk]
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * l + p.sum(axis=1, keepdims=True), alpha * acc + matmul(p.astype(v.dtype), v)


def online_softmax_finish(m, l, acc, empty_lse):
    """(output [rows, H] f32, log-sum-exp [rows, 1]); rows that saw no visible key give output 0
    and log-sum-exp `empty_lse`."""
    seen = l > 0.0  # rows with at least one visible key
    safe_l = jnp.where(seen, l, 1.0)
    return jnp.where(seen, acc / safe_l, 0.0), jnp.where(seen, m + jnp.log(safe_l), empty_lse)
