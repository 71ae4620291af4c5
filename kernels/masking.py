"""The lazy prefix-LM mask: per-token integer vectors instead of a dense `[B, T, S]` mask.

PaliGemma's rule (big_vision's `mask_ar` / `input_mask`, see `paligemma.ref.mask`): tokens
carry a block id `cumsum(mask_ar * input_mask)` (padding never starts a block), and

    query i sees key j  <=>  kv_blocks[j] <= q_blocks[i]  and  q_valid[i] and kv_valid[j]
                             [and (q_pos[i] - kv_pos[j] < window  or  kv_blocks[j] == q_blocks[i])]

the bracket only on sliding-window layers (Gemma 2's local layers: keys fewer than `window`
positions behind the query, pairs inside one bidirectional block exempt). A `TokenMask`
holds those vectors; the kernels evaluate the rule on each `[block_q, block_k]` tile they
compute, so neither the score matrix nor a dense mask ever exists.

Inside the kernels validity is folded into the block ids (an invalid query gets -1, an
invalid key `INVALID_KEY`), which keeps one comparison for the whole prefix-LM rule.

Axes: B batch, T queries, S keys; nq, nk query / key blocks.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

INVALID_KEY = 2**30  # block id of an invalid key: larger than any query's block id
NO_WINDOW = 2**30  # "window" of a global layer: no position difference reaches it


class TokenMask(NamedTuple):
    """Per-token mask vectors (a pytree; every field an array).

    q_blocks: [B, T] int32 block id of each query (`cumsum(mask_ar * input_mask)`).
    kv_blocks: [B, S] int32 block id of each key.
    q_valid: [B, T] bool, False for padding queries.
    kv_valid: [B, S] bool, False for padding keys (and unwritten cache slots).
    q_positions: [B, T] int32 token positions (used only with a window).
    kv_positions: [B, S] int32.
    """

    q_blocks: jax.Array
    kv_blocks: jax.Array
    q_valid: jax.Array
    kv_valid: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array

    @classmethod
    def prefix_lm(cls, input_mask, mask_ar):
        """Self-attention of one sequence ([B, T] each): the model's prompt / training mask."""
        input_mask = jnp.asarray(input_mask, bool)
        blocks = jnp.cumsum(jnp.asarray(mask_ar, jnp.int32) * input_mask, axis=1, dtype=jnp.int32)  # [B, T]
        positions = jnp.maximum(jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
        return cls(blocks, blocks, input_mask, input_mask, positions, positions)

    @classmethod
    def full(cls, batch, q_len, kv_len=None):
        """Every query sees every key (SigLIP's image tokens)."""
        kv_len = q_len if kv_len is None else kv_len
        zq, zk = jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
        return cls(zq, zk, zq == 0, zk == 0, zq, zk)

    def pad_keys(self, kv_len):
        """The same mask over `kv_len >= S` keys, the extra keys invalid (a KV cache's empty slots)."""
        extra = kv_len - self.kv_blocks.shape[1]
        pad = lambda x, value: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)  # noqa: E731
        return self._replace(kv_blocks=pad(self.kv_blocks, 0), kv_valid=pad(self.kv_valid, False),
                             kv_positions=pad(self.kv_positions, 0))


def dense(mask: TokenMask, window=None):
    """The `[B, T, S]` bool mask the vectors stand for (references and tests only).

    Args:
      mask: a `TokenMask`; window: None, or an int (possibly traced) for a sliding-window layer.
    Returns:
      [B, T, S] bool, True where query i may attend to key j.
    """
    qb, kb = mask.q_blocks[:, :, None], mask.kv_blocks[:, None, :]  # [B, T, 1], [B, 1, S]
    visible = (kb <= qb) & mask.q_valid[:, :, None] & mask.kv_valid[:, None, :]  # [B, T, S]
    if window is not None:
        near = (mask.q_positions[:, :, None] - mask.kv_positions[:, None, :]) < window  # [B, T, S]
        visible = visible & (near | (kb == qb))
    return visible


def kernel_ids(mask: TokenMask):
    """Block ids with validity folded in: (q_ids [B, T], kv_ids [B, S]) int32."""
    q_ids = jnp.where(mask.q_valid, mask.q_blocks, -1)  # [B, T]
    kv_ids = jnp.where(mask.kv_valid, mask.kv_blocks, INVALID_KEY)  # [B, S]
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def window_scalar(window):
    """int32 scalar for the kernels: the window, or `NO_WINDOW` for None."""
    return jnp.asarray(NO_WINDOW if window is None else window, jnp.int32)


def _block_stats(ids, positions, block):
    """Per-block summaries over valid tokens: min/max id and min/max position, each [B, n]."""
    B, L = ids.shape
    ids = ids.reshape(B, L // block, block)  # [B, n, block]
    positions = positions.reshape(B, L // block, block)
    valid = (ids >= 0) & (ids < INVALID_KEY)
    big = jnp.int32(INVALID_KEY)
    lo_id = jnp.where(valid, ids, big).min(-1)
    hi_id = jnp.where(valid, ids, -1).max(-1)
    lo_pos = jnp.where(valid, positions, big).min(-1)
    hi_pos = jnp.where(valid, positions, -big).max(-1)
    return lo_id, hi_id, lo_pos, hi_pos


def block_visibility(q_ids, kv_ids, q_positions, kv_positions, window, block_q, block_k):
    """[B, nq, nk] bool: False only where a `[block_q, block_k]` tile is certainly fully masked.

    A tile may hold a visible pair only if some key's id is <= some query's id (the prefix-LM
    rule) and, with a window, unless every pair is too far apart and no id is shared by a query
    and a key (the same-block exemption). Conservative: a True tile may still be all masked.
    """
    q_lo, q_hi, qp_lo, _ = _block_stats(q_ids, q_positions, block_q)  # [B, nq] each
    k_lo, k_hi, _, kp_hi = _block_stats(kv_ids, kv_positions, block_k)  # [B, nk] each
    visible = k_lo[:, None, :] <= q_hi[:, :, None]  # [B, nq, nk]
    if window is not None:
        far = (qp_lo[:, :, None] - kp_hi[:, None, :]) >= window  # every pair out of the window
        overlap = (k_lo[:, None, :] <= q_hi[:, :, None]) & (q_lo[:, :, None] <= k_hi[:, None, :])
        visible = visible & ~(far & ~overlap)
    return visible


def visible_range(visibility):
    """First and one-past-last visible block along the last axis: int32 (lo, hi), each [B, n].

    Rows with no visible block get lo = hi = 0 (the kernel's loop then does not run).
    """
    n = visibility.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    any_visible = visibility.any(-1)
    lo = jnp.where(visibility, index, n).min(-1)
    hi = jnp.where(visibility, index + 1, 0).max(-1)
    return jnp.where(any_visible, lo, 0).astype(jnp.int32), jnp.where(any_visible, hi, 0).astype(jnp.int32)
