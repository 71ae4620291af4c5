"""The attention kernels at PaliGemma's shapes: work per call, roofline times, and (with an accelerator) timings.

    python bench/attention_kernels.py [--batch 1] [--dtype bfloat16] [--repeat 20]

Everywhere: for each shape (SigLIP at 224 / 448 / 896 px, the language models' prefill over
the image tokens plus 128 text tokens, and decoding against a cache 128 slots longer) the FLOPs
the kernel executes (whole tiles in its loop ranges, the head dim as padded; the forward pass),
the FLOPs the mask makes useful, the HBM bytes (each input read once, as on TPU where a kv head
stays resident in VMEM for all its query blocks; GPU relies on L2 for that reuse), and the
roofline time max(FLOPs / peak, bytes / bandwidth) from datasheet figures (stated below, not
measured here). With a GPU or TPU: the measured time of the kernel, of the XLA path
(`paligemma.fast.attention.attend_xla`) and of `jax.nn.dot_product_attention`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from paligemma import kernels
from paligemma.fast.attention import attend_xla
from paligemma.kernels import backend as kb
from paligemma.kernels import compile_check, masking
from paligemma.kernels.decode_attention import DecodeBlockSizes
from paligemma.kernels.flash_attention import BlockSizes

# Datasheet figures (dense bfloat16 matmul peak, HBM bandwidth), not measurements.
CHIPS = {"H100 SXM": (989e12, 3.35e12),  # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3
         "TPU v5e": (197e12, 819e9)}  # Google Cloud TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM2e


def problem(case, batch):
    """(q_len, kv_len, TokenMask) of a compile_check case: a prompt ending in 112 suffix tokens,
    or the next token against a cache holding all but its last 64 slots."""
    B, T, S = batch, case.T, case.S
    if case.kind == "decode":
        valid = np.arange(S)[None].repeat(B, 0) < S - 64
        positions = np.maximum(np.cumsum(valid, 1) - 1, 0)
        return kernels.TokenMask(jnp.ones((B, 1), jnp.int32), jnp.zeros((B, S), jnp.int32), jnp.ones((B, 1), bool),
                                 jnp.asarray(valid), jnp.asarray(valid.sum(1, keepdims=True), jnp.int32),
                                 jnp.asarray(positions, jnp.int32))
    if not case.prefix_lm:
        return kernels.TokenMask.full(B, T)
    return kernels.TokenMask.prefix_lm(np.ones((B, T), bool), (np.arange(T) >= T - 112)[None].repeat(B, 0))


def work(case, mask, backend, itemsize):
    """(executed FLOPs, useful FLOPs, HBM bytes) of one forward call."""
    B, N, K, H = mask.q_blocks.shape[0], case.N, case.K, case.H
    Hp = kb.padded_head_dim(H, backend)
    dtype = jnp.bfloat16 if itemsize == 2 else jnp.float32
    useful = float(np.asarray(masking.dense(mask, case.window)).sum()) * N * 4 * H
    q_ids, kv_ids = masking.kernel_ids(mask)
    if case.kind == "decode":
        bk = kb.fit_block(case.S, DecodeBlockSizes.default(backend).block_k, backend, dtype)
        bq, rows = 1, -(-(N // K) // 8) * 8  # the group's query rows, padded
    else:
        sizes = BlockSizes.default(backend, H)
        bq, bk = kb.fit_block(case.T, sizes.block_q, backend, dtype), kb.fit_block(case.S, sizes.block_k, backend, dtype)
        rows = bq
    Tp, Sp = -(-case.T // bq) * bq, -(-case.S // bk) * bk
    pad = lambda x, n, v: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=v)  # noqa: E731
    tiles = masking.block_visibility(pad(q_ids, Tp, -1), pad(kv_ids, Sp, masking.INVALID_KEY),
                                     pad(mask.q_positions, Tp, 0), pad(mask.kv_positions, Sp, 0),
                                     case.window, bq, bk)
    lo, hi = masking.visible_range(tiles)
    visited = float(np.asarray(hi - lo).sum())  # key tiles per (example, query block)
    heads = K if case.kind == "decode" else N  # decode: one grid row per kv head (its group as rows)
    executed = visited * heads * 4 * rows * bk * Hp
    read_kv = float(np.asarray(hi - lo).max(axis=1).sum()) * bk * K * 2 * Hp if case.kind == "decode" else B * Sp * K * 2 * Hp
    bytes_ = itemsize * (read_kv + 2 * B * case.T * N * Hp) + 4 * B * (case.T + case.S) * 2
    return executed, useful, bytes_


def timed(fn, *args, repeat):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeat


def measure(case, mask, batch, dtype, repeat):
    """(kernel, XLA, jax.nn.dot_product_attention) seconds per call on the default device."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, case.T, case.N, case.H)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, case.S, case.K, case.H)), dtype) for _ in range(2))
    window = None if case.window is None else jnp.int32(case.window)
    dense = kernels.dense(mask, window)  # [B, T, S]
    kernel = jax.jit(lambda q, k, v, m: kernels.attention(q, k, v, m, window=window, softcap=case.softcap))
    xla = jax.jit(lambda q, k, v, d: attend_xla(q, k, v, d, case.softcap))
    if case.softcap:  # jax.nn.dot_product_attention has no logit softcap: timed without it
        nn = None
    else:
        nn = jax.jit(lambda q, k, v, d: jax.nn.dot_product_attention(q, k, v, mask=d[:, None]))
    return (timed(kernel, q, k, v, mask, repeat=repeat), timed(xla, q, k, v, dense, repeat=repeat),
            timed(nn, q, k, v, dense, repeat=repeat) if nn else float("nan"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = kb.platform_backend()
    print(f"batch {args.batch}, {dtype.name}; roofline = max(FLOPs / peak, bytes / bandwidth) from datasheets: "
          + "; ".join(f"{c} {p / 1e12:.0f} TFLOP/s, {b / 1e12:.2f} TB/s" for c, (p, b) in CHIPS.items()))
    print("executed: whole tiles the kernel computes (skipped tiles excluded, head dim padded); useful: visible pairs")
    head = f"{'case':<24} {'GFLOP exec':>10} {'GFLOP useful':>12} {'MB HBM':>8}"
    head += "".join(f" {c + ' us':>13}" for c in CHIPS)
    if device:
        head += f" {'kernel us':>10} {'XLA us':>9} {'jax.nn us':>10}"
    print(head)
    for case in compile_check.cases(resolutions=(224, 448, 896)):
        mask = problem(case, args.batch)
        executed, useful, bytes_ = work(case, mask, device or "tpu", dtype.itemsize)
        line = f"{case.name:<24} {executed / 1e9:>10.2f} {useful / 1e9:>12.2f} {bytes_ / 1e6:>8.1f}"
        line += "".join(f" {max(executed / p, bytes_ / b) * 1e6:>13.1f}" for p, b in CHIPS.values())
        if device:
            times = measure(case, mask, args.batch, dtype, args.repeat)
            line += "".join(f" {t * 1e6:>{w}.1f}" for t, w in zip(times, (10, 9, 10)))
        print(line, flush=True)
    if not device:
        print("\nNo GPU or TPU here: timings need one (the kernels run on CPU only in Pallas' interpreter).")


if __name__ == "__main__":
    main()
