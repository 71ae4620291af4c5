"""One decoding step at B = 1, 2, 4, 8, 16 rows, against the weight-reading floor (float32, CPU).

    python bench/decode_rows.py                 # the table in docs/performance.md
    python bench/decode_rows.py --rounds 3 --batches 1 8

The model: bench/generate_speed.py's reduced-depth PaliGemma 3B-224 (full widths and vocabulary,
`--text-depth` Gemma layers; only the language model is built, random float32 weights), per-layer
weight buffers (`fast.unstack_layers`). Timed: `fast.decode.extend`, the step `fast.generate`'s
loop and `fast.engine`'s slot pool run for one token per row, jit-compiled with the KV cache
donated, a cache of 320 slots with 280 filled. Two builds of the same step side by side:

  xla     `fast.dense.CPU_KERNEL = False`: every float32 product is XLA's dot (the path before
          `fast.dense`; at B >= 2 XLA:CPU runs a GEMM that packs the weight panels).
  kernel  the default: 2..16 rows through `kernels.quant_cpu`'s dense products (B = 1 is XLA's
          matrix-vector product in both builds).

Rounds interleave the builds and batch sizes (a noisy neighbour slows all alike); each round
times one step per (build, B). Floors, measured in every round, best over the run: read floor =
the language model's weight bytes / the best float32 matrix-vector read bandwidth over 1 GiB
(`_machine.ReadFloor`), copy floor = the same bytes / `np.copyto` bandwidth (read + write).
"""

import argparse
import functools
import time

import numpy as np
from _machine import ReadFloor, busy_fraction, copy_bandwidth, llm_weight_bytes
from generate_speed import bench_config


def random_llm(config, seed=0):
    """`{"llm": ...}` with float32 N(0, 0.02) weights of `config.llm` (norm scales 0), per-layer buffers."""
    import jax
    from paligemma.fast import layout
    from paligemma.ref import params as ref_params

    rng = np.random.default_rng(seed)
    shapes = ref_params.flatten(ref_params.param_shapes(config))
    flat = {}
    for key, shape in shapes.items():
        if not key.startswith("llm/"):
            continue
        w = np.zeros(shape, np.float32) if "norm" in key else rng.standard_normal(shape, np.float32) * 0.02
        flat[key] = jax.device_put(w)
        del w
    return layout.unstack_layers(ref_params.unflatten(flat))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from paligemma.fast import decode, dense, gemma
    from paligemma.fast.policy import FLOAT32
    from paligemma.kernels import quant_cpu

    config = bench_config(1, args.text_depth)
    g, S, filled = config.llm, 320, 280
    params = random_llm(config)
    rope = gemma.rope_table(S, g.head_dim, g.rope_base)

    def fresh(B, cache=None):
        """A cache whose next slot is `filled` again (a step writes one slot)."""
        if cache is None:
            kv = jnp.zeros((g.depth, B, S, g.num_kv_heads, g.head_dim))
            cache = decode.KVCache(kv, kv + 0, jnp.broadcast_to(jnp.arange(S) < filled, (B, S)),
                                   jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)), None, None)
        return cache._replace(lengths=jnp.full((B,), filled, jnp.int32), next_slot=jnp.int32(filled))

    builds, caches = {}, {}
    for name, kernel in (("xla", False), ("kernel", True)):
        for B in args.batches:
            dense.CPU_KERNEL = kernel  # read while tracing: this build keeps it
            step = jax.jit(functools.partial(decode.extend, config=config, policy=FLOAT32, rope=rope),
                           donate_argnames=("cache",))
            tokens = jnp.arange(5, 5 + B, dtype=jnp.int32)
            cache, logits = step(params, cache=fresh(B), tokens=tokens)  # compiles
            logits.block_until_ready()
            builds[name, B], caches[name, B] = (step, tokens), fresh(B, cache)
    dense.CPU_KERNEL = True

    floor, reads, copies, busy = ReadFloor(), [], [], []
    times = {key: [] for key in builds}
    for r in range(args.rounds):
        busy.append(busy_fraction(0.5))
        reads.append(floor.measure(2))
        copies.append(copy_bandwidth(repeats=2))
        keys = list(builds)
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotate the order
            step, tokens = builds[key]
            t0 = time.perf_counter()
            cache, logits = step(params, cache=caches[key], tokens=tokens)
            logits.block_until_ready()
            times[key].append(time.perf_counter() - t0)
            caches[key] = fresh(key[1], cache)
    floor.close()

    weights = llm_weight_bytes(params)
    read_bw, how = max(reads)
    copy_bw = max(copies)
    read_floor, copy_floor = weights / read_bw, weights / copy_bw
    print(f"{config.name}: language model weights {weights / 1e9:.2f} GB float32, per-layer buffers; "
          f"CPU kernel: {quant_cpu.built_isa() if quant_cpu.available() else quant_cpu.unavailable_reason()}")
    print(f"read floor: {read_bw / 1e9:.1f} GB/s ({how} matrix-vector product over 1 GiB) -> {read_floor * 1e3:.0f} ms "
          f"per step; copy floor: {copy_bw / 1e9:.1f} GB/s (read + write) -> {copy_floor * 1e3:.0f} ms; "
          f"read bandwidth over rounds {min(b for b, _ in reads) / 1e9:.1f}-{read_bw / 1e9:.1f} GB/s; "
          f"CPU busy before rounds {min(busy):.0%}-{max(busy):.0%}")
    print(f"step time: median (best-worst) of {args.rounds} rounds, ms; x floor = median / read floor\n")
    print("| B | xla step (ms) | xla x floor | kernel step (ms) | kernel x floor | kernel speed-up | tokens/s (kernel) |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        cells = []
        for name in ("xla", "kernel"):
            t = np.array(times[name, B]) * 1e3
            cells += [f"{np.median(t):.0f} ({t.min():.0f}-{t.max():.0f})", f"{np.median(t) / 1e3 / read_floor:.2f}"]
        up = np.median(times["xla", B]) / np.median(times["kernel", B])
        print(f"| {B} | {' | '.join(cells)} | {up:.2f}x | {B / np.median(times['kernel', B]):.1f} |")


if __name__ == "__main__":
    main()
