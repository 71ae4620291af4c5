"""Prefill / training attention: tiled online softmax with a lazy prefix-LM mask (Pallas).

One grid step computes one `[block_q, H]` block of one query head and loops over the key
blocks that the mask can reach (`masking.block_visibility`, computed outside the kernel from
per-block summaries of the mask vectors, O(T + S)); tiles outside that range are skipped, and
inside it each `[block_q, block_k]` tile of scores is masked by the rule computed from the
per-token vectors. Neither the `[T, S]` scores nor a dense mask ever exist.

Layout: q is read as `[B, T, N * H]` and k, v as `[B, S, K * H]` (free reshapes of the model's
`[B, T, N, H]` / `[B, S, K, H]`), a head being an H-wide column block, so nothing is
transposed. The grid is (B, N, T / block_q) with the query blocks innermost: K and V of one
(example, kv head) are one block that stays resident in VMEM (TPU) while every query block of
all G heads of its group runs, so each KV head is read from HBM once per example and never
repeated for GQA / MQA. On GPU (Triton) the refs are global memory and each step loads its
tiles. The cost on TPU is VMEM for one head's whole K and V (`docs/kernels.md`).

Rows with no visible key (padding queries) give 0 (the XLA path, with big_vision's finite
mask value, gives the mean of all values there; no real token depends on either).

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.
"""

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as bk
from . import flash_backward
from .masking import (INVALID_KEY, TokenMask, block_visibility, dense, kernel_ids, visible_range,
                      window_scalar)
from .tiles import (KernelConfig, online_softmax_finish, online_softmax_init, online_softmax_step, scores,
                    tile_mask, zero_cotangent)

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (forward and backward). Sequences shorter than a block use one block; longer
    ones use the largest of block, block / 2, ... that divides them (else they are padded).
    num_warps and num_stages are Triton's (GPU only)."""

    block_q: int = 256
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend, head_dim):
        """TPU: 256 x 512 tiles (MXU-shaped, few loop iterations, a 512 KiB f32 score tile).
        GPU: 64 x 64 tiles with 4 warps (the f32 accumulator of a 64 x 256 block fits the
        registers of 128 threads); 128-row query blocks for head dims up to 128."""
        if backend == "gpu":
            return cls(block_q=128 if head_dim <= 128 else 64, block_k=64, num_warps=4, num_stages=2)
        return cls()


class Vectors(NamedTuple):
    """Mask vectors in the layouts the kernels read (a pytree of int32 arrays).

    fwd_scalars: [1 + 2 B nq] window, then (lo, hi) key-block range per (example, query block).
    bwd_scalars: [1 + 2 B nk] window, then (lo, hi) query-block range per key block.
    q_col, q_pos_col: [B, Tp, 1]; q_row, q_pos_row: [B, nq, block_q].
    kv_col, kv_pos_col: [B, Sp, 1]; kv_row, kv_pos_row: [B, nk, block_k].
    """

    fwd_scalars: jax.Array
    bwd_scalars: jax.Array
    q_col: jax.Array
    q_row: jax.Array
    kv_col: jax.Array
    kv_row: jax.Array
    q_pos_col: jax.Array
    q_pos_row: jax.Array
    kv_pos_col: jax.Array
    kv_pos_row: jax.Array


def mask_vectors(mask: TokenMask, window, config: KernelConfig, Tp, Sp):
    """`Vectors` for a padded problem (padding queries / keys invalid)."""
    bq, bkk = config.block_q, config.block_k
    q_ids, kv_ids = kernel_ids(mask)  # [B, T], [B, S]
    T, S = q_ids.shape[1], kv_ids.shape[1]
    pad = lambda x, n, value: jnp.pad(x, ((0, 0), (0, n)), constant_values=value)  # noqa: E731
    q_ids, kv_ids = pad(q_ids, Tp - T, -1), pad(kv_ids, Sp - S, INVALID_KEY)
    q_pos = pad(mask.q_positions.astype(jnp.int32), Tp - T, 0)
    kv_pos = pad(mask.kv_positions.astype(jnp.int32), Sp - S, 0)
    visibility = block_visibility(q_ids, kv_ids, q_pos, kv_pos, window if config.has_window else None, bq, bkk)
    w = window_scalar(window)[None]
    ranges = lambda vis: jnp.concatenate([w, jnp.stack(visible_range(vis), -1).reshape(-1)])  # noqa: E731
    B = q_ids.shape[0]
    col, row = (lambda x: x[:, :, None]), (lambda x, blk: x.reshape(B, -1, blk))
    return Vectors(ranges(visibility), ranges(visibility.transpose(0, 2, 1)), col(q_ids), row(q_ids, bq),
                   col(kv_ids), row(kv_ids, bkk), col(q_pos), row(q_pos, bq), col(kv_pos), row(kv_pos, bkk))


# --- Forward kernel -------------------------------------------------------------------------


def _forward_kernel(scalars_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, qpos_ref, kpos_ref, o_ref, lse_ref, *,
                    config: KernelConfig, nq):
    """One query block of one head against its visible key blocks.

    Refs: scalars [1 + 2 B nq]; q [bq, H]; k, v [Sp, H]; qid, qpos [bq, 1]; kid, kpos [nk, bk];
    o [bq, H]; lse [bq, 1] (log-sum-exp of the scores, for the backward pass).
    """
    b, i = pl.program_id(0), pl.program_id(2)
    window, lo, hi = scalars_ref[0], scalars_ref[1 + 2 * (b * nq + i)], scalars_ref[2 + 2 * (b * nq + i)]
    bkk = config.block_k
    q = q_ref[...]  # [bq, H]
    q_ids = qid_ref[...]  # [bq, 1]
    q_pos = qpos_ref[...] if config.has_window else None

    def body(j, carry):
        rows = pl.ds(pl.multiple_of(j * bkk, bkk), bkk)
        s, _ = scores(q, k_ref[rows, :], config)  # [bq, bk]
        kv_pos = kpos_ref[pl.ds(j, 1), :] if config.has_window else None  # [1, bk]
        visible = tile_mask(q_ids, kid_ref[pl.ds(j, 1), :], q_pos, kv_pos, window)  # [bq, bk]
        return online_softmax_step(carry, s, visible, v_ref[rows, :])

    bq, H = q.shape
    out, lse = online_softmax_finish(*lax.fori_loop(lo, hi, body, online_softmax_init(bq, H)), empty_lse=0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(config: KernelConfig, q, k, v, vec: Vectors):
    """The forward pallas_call: q [B, Tp, N*H], k, v [B, Sp, K*H] -> (o [B, Tp, N*H], lse [B, N, Tp, 1])."""
    B, Tp, NH = q.shape
    Sp, H, bq, bkk, G = k.shape[1], config.head_dim, config.block_q, config.block_k, config.group
    N, nq, nk = NH // H, Tp // config.block_q, Sp // config.block_k
    q_block = pl.BlockSpec((None, bq, H), lambda b, n, i: (b, i, n))
    kv_block = pl.BlockSpec((None, Sp, H), lambda b, n, i: (b, 0, n // G))
    col = pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0))
    row = pl.BlockSpec((None, nk, bkk), lambda b, n, i: (b, 0, 0))
    kernel = functools.partial(_forward_kernel, config=config, nq=nq)
    return pl.pallas_call(
        kernel,
        grid=(B, N, nq),
        in_specs=[bk.scalar_spec(config.backend), q_block, kv_block, kv_block, col, row, col, row],
        out_specs=[q_block, pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))],
        out_shape=[bk.out_struct(q.shape, q.dtype, q), bk.out_struct((B, N, Tp, 1), jnp.float32, q)],
        name="flash_attention_fwd",
        **bk.call_kwargs(config.backend, 3, config.num_warps, config.num_stages,
                         (2 * Sp + 2 * bq) * H * q.dtype.itemsize),
    )(vec.fwd_scalars, q, k, v, vec.q_col, vec.kv_row, vec.q_pos_col, vec.kv_pos_row)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, vec):
    return forward(config, q, k, v, vec)[0]


def _attention_fwd(config, q, k, v, vec):
    o, lse = forward(config, q, k, v, vec)
    return o, (q, k, v, vec, o, lse)


def _attention_bwd(config, residuals, do):
    q, k, v, vec, o, lse = residuals
    dq, dk, dv = flash_backward.backward(config, q, k, v, vec, o, lse, do)
    return dq, dk, dv, zero_cotangent(vec)


_attention.defvjp(_attention_fwd, _attention_bwd)


# --- Public entry point ---------------------------------------------------------------------


def validate(q, k, v, mask: Optional[TokenMask]):
    """Raises ValueError with the offending shapes / dtypes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q must be [B, T, N, H] and k, v [B, S, K, H], got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} disagree on B, S, K or H")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"attention: q, k, v must share one dtype of {DTYPES}, got {sorted(dtypes)}")
    if mask is not None:
        B, T, S = q.shape[0], q.shape[1], k.shape[1]
        for name, x, shape in (("q_blocks", mask.q_blocks, (B, T)), ("q_valid", mask.q_valid, (B, T)),
                               ("q_positions", mask.q_positions, (B, T)), ("kv_blocks", mask.kv_blocks, (B, S)),
                               ("kv_valid", mask.kv_valid, (B, S)), ("kv_positions", mask.kv_positions, (B, S))):
            if tuple(x.shape) != shape:
                raise ValueError(f"attention: mask.{name} has shape {tuple(x.shape)}, expected {shape} [B, T or S]")


def pad_heads(x, H):
    """[B, L, heads, h] -> [B, L, heads * H], head dim zero-padded to H."""
    B, L, heads, h = x.shape
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, H - h))).reshape(B, L, heads * H)


def flash_attention(q, k, v, mask: Optional[TokenMask] = None, *, window=None, softcap=None, scale=1.0,
                    backend="interpret", block_sizes: Optional[BlockSizes] = None):
    """Attention of T queries over S keys with the lazy prefix-LM mask; differentiable.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (N a multiple of K; float32 or bfloat16, one dtype).
      mask: a `TokenMask` ([B, T] / [B, S] vectors); None: every query sees every key.
      window: None, or a sliding window (an int or an int32 scalar, possibly traced).
      softcap: None or the attention-logit cap; scale: multiplies q k^T (1.0 for pre-scaled q).
      backend: "tpu", "gpu" or "interpret"; block_sizes: `BlockSizes` (default per backend).
    Returns:
      [B, T, N, H] in q's dtype; rows with no visible key are 0.
    """
    bk.check_backend(backend)
    validate(q, k, v, mask)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    mask = TokenMask.full(B, T, S) if mask is None else mask
    sizes = block_sizes or BlockSizes.default(backend, H)
    bk.check_block("block_q", sizes.block_q, backend, q.dtype)
    bk.check_block("block_k", sizes.block_k, backend, q.dtype)
    bq = bk.fit_block(T, sizes.block_q, backend, q.dtype)
    bkk = bk.fit_block(S, sizes.block_k, backend, q.dtype)
    Hp = bk.padded_head_dim(H, backend)
    Tp, Sp = -(-T // bq) * bq, -(-S // bkk) * bkk
    config = KernelConfig(backend, bq, bkk, N // K, Hp, float(scale), softcap or None, window is not None,
                          sizes.num_warps, sizes.num_stages)
    vec = mask_vectors(mask, window, config, Tp, Sp)
    pad_len = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out = _attention(config, pad_heads(pad_len(q, Tp), Hp), pad_heads(pad_len(k, Sp), Hp),
                     pad_heads(pad_len(v, Sp), Hp), vec)  # [B, Tp, N * Hp]
    return out.reshape(B, Tp, N, Hp)[:, :T, :, :H]


# --- Pure-JAX reference ---------------------------------------------------------------------


def reference(q, k, v, mask: Optional[TokenMask] = None, *, window=None, softcap=None, scale=1.0):
    """What `flash_attention` computes, in plain jnp (materialises [B, K, G, T, S]; f32 softmax).

    Same arguments and result, including 0 for rows with no visible key.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    mask = TokenMask.full(B, T, S) if mask is None else mask
    visible = dense(mask, window)[:, None, None]  # [B, 1, 1, T, S]
    qg = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible, s, -jnp.inf)
    m = lax.stop_gradient(s.max(axis=-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # [B, K, G, T, S]
    l = p.sum(axis=-1, keepdims=True)
    probs = (p / jnp.where(l > 0, l, 1.0)).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return out.reshape(B, T, N, H).astype(q.dtype)
