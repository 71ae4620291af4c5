"""Decode attention: one new query per example against a KV cache (Pallas).

Decoding is memory-bound: per step every valid cache entry is read once and used for a few
FLOPs, so the kernel's job is to read the cache once. A grid step takes one (example, kv head,
split of the cache): the G query heads of the kv head's group are the rows of one `[G, H]`
query block (padded to the backend's smallest tile), so each K/V element is loaded once for
the whole group. The cache is read as `[B, S, K * H]` (the model's `[B, S, K, H]`, reshaped
for free), one H-wide column block per kv head.

Per-example valid ranges: the mask vectors (cache validity, block ids, positions) give each
example the range of cache blocks holding any visible key (`masking.block_visibility`);
blocks outside it are neither computed nor, on GPU, loaded (a cache allocated for 1000 new
tokens costs nothing until they exist), and with a sliding window the old blocks drop out.
Splits (flash-decoding) give the GPU parallelism when B * K is small and the TPU pipeline
steps to overlap DMA with compute; their partial results are combined by log-sum-exp.

Gradients (for completeness: decoding does not train) reuse `flash_backward` with the query
padded to one row block.

Axes: B batch, S cache slots, N query heads, K kv heads, G = N / K, H head dim.
"""

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as bk
from . import flash_backward
from .flash_attention import mask_vectors, pad_heads, reference, validate
from .masking import INVALID_KEY, TokenMask, block_visibility, kernel_ids, visible_range, window_scalar
from .tiles import (MASK_VALUE, KernelConfig, online_softmax_finish, online_softmax_init, online_softmax_step,
                    scores, tile_mask, zero_cotangent)


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """block_k: cache slots per tile; num_splits: cache splits (0: chosen from the shape);
    num_warps, num_stages: Triton's (GPU only)."""

    block_k: int = 512
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def default(cls, backend):
        """TPU: 512-slot tiles (few loop iterations; a bf16 [512, 256] tile is 256 KiB).
        GPU: 64-slot tiles with 4 warps (many small loads in flight per SM)."""
        return cls(block_k=64) if backend == "gpu" else cls()

    def splits(self, backend, programs, blocks):
        """The number of splits: as asked, else enough grid steps to fill a GPU (~256 programs)
        or to pipeline a TPU (~8 per example and kv head); always a divisor of `blocks`."""
        target = self.num_splits or (max(1, 256 // programs) if backend == "gpu" else 8)
        return max(d for d in range(1, blocks + 1) if blocks % d == 0 and d <= target)


def _decode_kernel(scalars_ref, q_ref, k_ref, v_ref, kid_ref, kpos_ref, o_ref, lse_ref, *, config: KernelConfig,
                   blocks_per_split):
    """Refs: scalars [1 + 4 B] (window; per example lo, hi, query id, query position);
    q [Gp, H]; k, v [S / splits, H]; kid, kpos [nk, bk]; o [Gp, H] f32; lse [Gp, 1]."""
    b, s = pl.program_id(0), pl.program_id(2)
    window = scalars_ref[0]
    first = s * blocks_per_split
    lo = jnp.maximum(scalars_ref[1 + 4 * b], first)
    hi = jnp.minimum(scalars_ref[2 + 4 * b], first + blocks_per_split)
    q_id, q_pos = scalars_ref[3 + 4 * b], scalars_ref[4 + 4 * b]
    bkk = config.block_k
    q = q_ref[...]  # [Gp, H]

    def body(j, carry):
        rows = pl.ds(pl.multiple_of((j - first) * bkk, bkk), bkk)
        s, _ = scores(q, k_ref[rows, :], config)  # [Gp, bk]
        kv_pos = kpos_ref[pl.ds(j, 1), :] if config.has_window else None  # [1, bk]
        visible = tile_mask(q_id, kid_ref[pl.ds(j, 1), :], q_pos if config.has_window else None, kv_pos, window)
        visible = jnp.broadcast_to(visible, s.shape)  # [Gp, bk]
        return online_softmax_step(carry, s, visible, v_ref[rows, :])

    Gp, H = q.shape
    # An empty split gets log-sum-exp MASK_VALUE: it weighs 0 when the splits are combined below.
    o_ref[...], lse_ref[...] = online_softmax_finish(*lax.fori_loop(lo, hi, body, online_softmax_init(Gp, H)),
                                                     empty_lse=MASK_VALUE)


def _forward(config: KernelConfig, splits, qg, k, v, scalars, kv_row, kv_pos_row):
    """qg [B, K, Gp, H], k, v [B, Sp, K*H] -> (out [B, K, Gp, H] in q's dtype, lse [B, K, Gp, 1])."""
    B, K, Gp, H = qg.shape
    Sp, nk = k.shape[1], kv_row.shape[1]
    chunk = Sp // splits
    q_spec = pl.BlockSpec((None, None, Gp, H), lambda b, g, s: (b, g, 0, 0))
    kv_spec = pl.BlockSpec((None, chunk, H), lambda b, g, s: (b, s, g))
    row_spec = pl.BlockSpec((None, nk, config.block_k), lambda b, g, s: (b, 0, 0))
    part = lambda last: pl.BlockSpec((None, None, None, Gp, last), lambda b, g, s: (b, g, s, 0, 0))  # noqa: E731
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, config=config, blocks_per_split=nk // splits),
        grid=(B, K, splits),
        in_specs=[bk.scalar_spec(config.backend), q_spec, kv_spec, kv_spec, row_spec, row_spec],
        out_specs=[part(H), part(1)],
        out_shape=[bk.out_struct((B, K, splits, Gp, H), jnp.float32, qg),
                   bk.out_struct((B, K, splits, Gp, 1), jnp.float32, qg)],
        name="decode_attention",
        **bk.call_kwargs(config.backend, 3, config.num_warps, config.num_stages, 2 * chunk * H * k.dtype.itemsize),
    )(scalars, qg, k, v, kv_row, kv_pos_row)
    top = lse.max(axis=2, keepdims=True)  # [B, K, 1, Gp, 1]
    weight = jnp.exp(lse - top)  # [B, K, splits, Gp, 1]
    total = weight.sum(axis=2)  # [B, K, Gp, 1]
    out = (weight * o).sum(axis=2) / total  # [B, K, Gp, H]
    return out.astype(qg.dtype), top[:, :, 0] + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode(config, splits, bwd_config, qg, k, v, aux):
    return _forward(config, splits, qg, k, v, *aux[:3])[0]


def _decode_fwd(config, splits, bwd_config, qg, k, v, aux):
    out, lse = _forward(config, splits, qg, k, v, *aux[:3])
    return out, (qg, k, v, aux, out, lse)


def _decode_bwd(config, splits, bwd_config, residuals, dout):
    """The flash backward on a one-row query block: [B, K, Gp, H] <-> [B, Tp, N * H] (row 0)."""
    qg, k, v, aux, out, lse = residuals
    B, K, Gp, H = qg.shape
    G, Tp = bwd_config.group, bwd_config.block_q
    N = K * G
    to_rows = lambda x: jnp.pad(x[:, :, :G].reshape(B, 1, N * x.shape[-1]), ((0, 0), (0, Tp - 1), (0, 0)))  # noqa: E731
    lse_flash = jnp.pad(lse[:, :, :G, 0].reshape(B, N, 1, 1), ((0, 0), (0, 0), (0, Tp - 1), (0, 0)))
    dq, dk, dv = flash_backward.backward(bwd_config, to_rows(qg), k, v, aux[3], to_rows(out), lse_flash,
                                         to_rows(dout))
    dqg = jnp.pad(dq[:, 0].reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    return dqg, dk, dv, zero_cotangent(aux)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(q, k, v, mask: Optional[TokenMask] = None, *, window=None, softcap=None, scale=1.0,
                     backend="interpret", block_sizes: Optional[DecodeBlockSizes] = None):
    """One query per example over a KV cache; the same rule and result as `flash_attention` with T = 1.

    Args:
      q: [B, 1, N, H]; k, v: [B, S, K, H] (the cache; float32 or bfloat16, one dtype).
      mask: a `TokenMask` with T = 1 (`kv_valid` marks written cache slots); None: all visible.
      window, softcap, scale, backend: as `flash_attention`.
      block_sizes: `DecodeBlockSizes` (default per backend). S should be a multiple of
        block_k (the model allocates its cache so); otherwise the cache is padded (a copy).
    Returns:
      [B, 1, N, H] in q's dtype.
    """
    bk.check_backend(backend)
    validate(q, k, v, mask)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if T != 1:
        raise ValueError(f"decode_attention: one query per example, got q of shape {q.shape} (use flash_attention)")
    mask = TokenMask.full(B, 1, S) if mask is None else mask
    sizes = block_sizes or DecodeBlockSizes.default(backend)
    bk.check_block("block_k", sizes.block_k, backend, q.dtype)
    bkk = bk.fit_block(S, sizes.block_k, backend, q.dtype)
    G, Hp, Sp = N // K, bk.padded_head_dim(H, backend), -(-S // bkk) * bkk
    align = bk.row_alignment(backend, q.dtype)
    Gp = -(-G // align) * align
    if backend == "gpu":
        Gp = 1 << (Gp - 1).bit_length()
    nk = Sp // bkk
    splits = sizes.splits(backend, B * K, nk)
    has_window = window is not None
    config = KernelConfig(backend, 1, bkk, G, Hp, float(scale), softcap or None, has_window, sizes.num_warps,
                          sizes.num_stages)

    q_ids, kv_ids = kernel_ids(mask)  # [B, 1], [B, S]
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, Sp - S)), constant_values=INVALID_KEY)
    kv_pos = jnp.pad(mask.kv_positions.astype(jnp.int32), ((0, 0), (0, Sp - S)))
    q_pos = mask.q_positions.astype(jnp.int32)
    visibility = block_visibility(q_ids, kv_ids, q_pos, kv_pos, window if has_window else None, 1, bkk)
    lo, hi = visible_range(visibility)  # [B, 1] each
    per_example = jnp.stack([lo[:, 0], hi[:, 0], q_ids[:, 0], q_pos[:, 0]], axis=-1).reshape(-1)
    scalars = jnp.concatenate([window_scalar(window)[None], per_example])

    kp = pad_heads(jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0))), Hp)  # [B, Sp, K * Hp]
    vp = pad_heads(jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0))), Hp)
    qg = jnp.pad(q[:, 0].reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, Hp - H)))  # [B, K, Gp, Hp]
    bwd_config = dataclasses.replace(config, block_q=align)
    bwd_vectors = mask_vectors(mask.pad_keys(Sp), window, bwd_config, align, Sp)
    aux = (scalars, kv_ids.reshape(B, nk, bkk), kv_pos.reshape(B, nk, bkk), bwd_vectors)
    out = _decode(config, splits, bwd_config, qg, kp, vp, aux)  # [B, K, Gp, Hp]
    return out[:, :, :G, :H].reshape(B, 1, N, H)


decode_reference = reference  # the same mathematics: `flash_attention.reference` with T = 1
