"""One decoding step of a full-size quantized model, timed on its own (no prefill around it).

    python bench/decode_step.py paligemma2-28b-224 int4 --reps 5

`quant_speed.py --full` takes decode time as (generate 16 tokens - generate 1) / 15, which is lost
in the prefill's run-to-run spread when the prefill is minutes long (28B-224: ~260 s, spread of
a few seconds). This times `fast.decode.extend` (what `fast.generate`'s loop runs per token) on
`quant_speed.random_quantized_tree` weights, with a KV cache of 320 slots, 280 of them filled
(256 image + 24 text tokens), batch 1, float32 compute, the cache donated. Prints the median and
best step and the language model's weight bytes over the best step.
"""

import argparse
import functools
import time

import numpy as np
from quant_speed import random_quantized_tree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a config name, e.g. paligemma2-10b-224")
    parser.add_argument("format", choices=("int8", "int4"))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from paligemma import ref
    from paligemma.fast import decode, gemma
    from paligemma.fast.policy import FLOAT32
    from paligemma.kernels import quant_cpu

    config = ref.get_config(args.model)
    params = random_quantized_tree(config, args.format)
    g, B, S, filled = config.llm, 1, 320, 280
    kv = (g.depth, B, S, g.num_kv_heads, g.head_dim)

    def fresh(cache=None):
        """The cache with its next slot at `filled` again (the step writes one slot)."""
        if cache is None:
            cache = decode.KVCache(jnp.zeros(kv), jnp.zeros(kv), jnp.arange(S)[None] < filled,
                                   jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)), None, None)
        return cache._replace(lengths=jnp.full((B,), filled, jnp.int32), next_slot=jnp.int32(filled))

    rope = gemma.rope_table(S, g.head_dim, g.rope_base)
    step = jax.jit(functools.partial(decode.extend, config=config, policy=FLOAT32, rope=rope),
                   donate_argnames=("cache",))
    token, cache, times = jnp.array([5], jnp.int32), fresh(), []
    for i in range(2 + args.reps):  # two untimed: compilation, first touch
        t0 = time.perf_counter()
        cache, logits = step(params, cache=cache, tokens=token)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
        cache = fresh(cache)
    times = times[2:]
    weights = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params["llm"]))
    print(f"{args.model} {args.format}: decode step {1e3 * np.median(times):.0f} ms (best {1e3 * min(times):.0f}, "
          f"{args.reps} steps); language model weights {weights / 1e9:.2f} GB = {weights / min(times) / 1e9:.1f} GB/s; "
          f"CPU kernel: {quant_cpu.available() or quant_cpu.unavailable_reason()}")


if __name__ == "__main__":
    main()
