"""The backward pass of `flash_attention` (FlashAttention-2's recomputation): two Pallas kernels.

Both recompute the probabilities of each tile from q, k and the forward's log-sum-exp,
`p = exp(s - lse)` (0 where masked), with `delta = rowsum(do * o)`:

    dv = p^T do        dp = do v^T        ds = p * (dp - delta) [* (1 - tanh^2) under a softcap]
    dq = scale * ds k  dk = scale * ds^T q

dq: grid (B, N, T / block_q), K and V resident as in the forward, looping over the key blocks
  the query block can see.
dk, dv: grid (B, N, S / block_k), the query head's whole q and do resident, looping over the
  query blocks that can see the key block, computed transposed (`s^T = k q^T`) so that no tile
  is transposed. One result per query head; a GQA group's G results are summed afterwards
  (in float32) rather than looping over the group inside the kernel, which would keep G heads
  of q and do in VMEM at once.

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as bk
from .tiles import KernelConfig, matmul, scores, tile_mask


def _dq_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, qpos_ref, kpos_ref,
               dq_ref, *, config: KernelConfig, nq):
    """Refs: q, do, dq [bq, H]; k, v [Sp, H]; lse, delta, qid, qpos [bq, 1]; kid, kpos [nk, bk]."""
    b, i = pl.program_id(0), pl.program_id(2)
    window, lo, hi = scalars_ref[0], scalars_ref[1 + 2 * (b * nq + i)], scalars_ref[2 + 2 * (b * nq + i)]
    bkk = config.block_k
    q, do = q_ref[...], do_ref[...]  # [bq, H]
    lse, delta, q_ids = lse_ref[...], delta_ref[...], qid_ref[...]  # [bq, 1]
    q_pos = qpos_ref[...] if config.has_window else None

    def body(j, dq):
        rows = pl.ds(pl.multiple_of(j * bkk, bkk), bkk)
        k, v = k_ref[rows, :], v_ref[rows, :]  # [bk, H]
        s, t = scores(q, k, config)  # [bq, bk]
        kv_pos = kpos_ref[pl.ds(j, 1), :] if config.has_window else None
        visible = tile_mask(q_ids, kid_ref[pl.ds(j, 1), :], q_pos, kv_pos, window)
        p = jnp.where(visible, jnp.exp(s - lse), 0.0)  # [bq, bk]
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [bq, bk]
        ds = p * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + matmul(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * config.scale).astype(dq_ref.dtype)


def _dkv_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qid_ref, kid_ref, qpos_ref, kpos_ref,
                dk_ref, dv_ref, *, config: KernelConfig, nk):
    """Refs: q, do [Tp, H]; k, v, dk, dv [bk, H]; lse, delta, qid, qpos [nq, bq]; kid, kpos [bk, 1]."""
    b, j = pl.program_id(0), pl.program_id(2)
    window, lo, hi = scalars_ref[0], scalars_ref[1 + 2 * (b * nk + j)], scalars_ref[2 + 2 * (b * nk + j)]
    bq = config.block_q
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    kv_ids = kid_ref[...]  # [bk, 1]
    kv_pos = kpos_ref[...] if config.has_window else None

    def body(i, carry):
        dk, dv = carry  # [bk, H] each
        rows, one = pl.ds(pl.multiple_of(i * bq, bq), bq), pl.ds(i, 1)
        q, do = q_ref[rows, :], do_ref[rows, :]  # [bq, H]
        s_t, t_t = scores(k, q, config)  # [bk, bq]
        q_pos = qpos_ref[one, :] if config.has_window else None  # [1, bq]
        visible = tile_mask(qid_ref[one, :], kv_ids, q_pos, kv_pos, window)  # [bk, bq]
        p_t = jnp.where(visible, jnp.exp(s_t - lse_ref[one, :]), 0.0)  # [bk, bq]
        dv = dv + matmul(p_t.astype(do.dtype), do)
        dp_t = lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [bk, bq]
        ds_t = p_t * (dp_t - delta_ref[one, :])
        if t_t is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        return dk + matmul(ds_t.astype(q.dtype), q), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(config: KernelConfig, q, k, v, vec, o, lse, do):
    """Gradients of `flash_attention.forward`'s output in its kernel layout.

    Args:
      q, o, do: [B, Tp, N*H]; k, v: [B, Sp, K*H]; vec: `flash_attention.Vectors`;
      lse: [B, N, Tp, 1] float32 from the forward.
    Returns:
      (dq [B, Tp, N*H], dk [B, Sp, K*H], dv [B, Sp, K*H]) in the inputs' dtypes.
    """
    B, Tp, NH = q.shape
    Sp, H, bq, bkk, G = k.shape[1], config.head_dim, config.block_q, config.block_k, config.group
    N, nq, nk = NH // H, Tp // bq, Sp // bkk
    heads = lambda x, n: x.reshape(B, x.shape[1], n, H)  # noqa: E731
    delta = jnp.einsum("BTNH,BTNH->BNT", heads(o, N).astype(jnp.float32), heads(do, N).astype(jnp.float32))
    delta_col, lse_row, delta_row = delta[..., None], lse.reshape(B, N, nq, bq), delta.reshape(B, N, nq, bq)
    scalar = bk.scalar_spec(config.backend)

    q_block = pl.BlockSpec((None, bq, H), lambda b, n, i: (b, i, n))
    kv_all = pl.BlockSpec((None, Sp, H), lambda b, n, i: (b, 0, n // G))
    q_col = pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))
    id_col = pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0))
    id_rows = pl.BlockSpec((None, nk, bkk), lambda b, n, i: (b, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config, nq=nq),
        grid=(B, N, nq),
        in_specs=[scalar, q_block, kv_all, kv_all, q_block, q_col, q_col, id_col, id_rows, id_col, id_rows],
        out_specs=q_block,
        out_shape=bk.out_struct(q.shape, q.dtype, q),
        name="flash_attention_dq",
        **bk.call_kwargs(config.backend, 3, config.num_warps, config.num_stages, (2 * Sp + 3 * bq) * H * q.dtype.itemsize),
    )(vec.fwd_scalars, q, k, v, do, lse, delta_col, vec.q_col, vec.kv_row, vec.q_pos_col, vec.kv_pos_row)

    q_all = pl.BlockSpec((None, Tp, H), lambda b, n, j: (b, 0, n))
    kv_block = pl.BlockSpec((None, bkk, H), lambda b, n, j: (b, j, n // G))
    q_rows = pl.BlockSpec((None, None, nq, bq), lambda b, n, j: (b, n, 0, 0))
    id_rows = pl.BlockSpec((None, nq, bq), lambda b, n, j: (b, 0, 0))
    id_col = pl.BlockSpec((None, bkk, 1), lambda b, n, j: (b, j, 0))
    out_block = pl.BlockSpec((None, bkk, H), lambda b, n, j: (b, j, n))
    out_dtype = k.dtype if G == 1 else jnp.float32  # a group's G partial results are summed below
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config, nk=nk),
        grid=(B, N, nk),
        in_specs=[scalar, q_all, kv_block, kv_block, q_all, q_rows, q_rows, id_rows, id_col, id_rows, id_col],
        out_specs=[out_block, out_block],
        out_shape=[bk.out_struct((B, Sp, NH), out_dtype, q)] * 2,
        name="flash_attention_dkv",
        **bk.call_kwargs(config.backend, 3, config.num_warps, config.num_stages,
                         2 * Tp * H * q.dtype.itemsize + 4 * bkk * H * 4),
    )(vec.bwd_scalars, q, k, v, do, lse_row, delta_row, vec.q_row, vec.kv_col, vec.q_pos_row, vec.kv_pos_col)
    if G > 1:
        group_sum = lambda x: x.reshape(B, Sp, N // G, G, H).sum(axis=3).reshape(B, Sp, -1).astype(k.dtype)  # noqa: E731
        dk, dv = group_sum(dk), group_sum(dv)
    return dq, dk, dv
