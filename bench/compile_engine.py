"""Compile the engine's programs (`fast.engine`) for a TPU topology this machine does not have; print
per-chip memory.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python bench/compile_engine.py                      # 3B-224, 32 slots
    JAX_PLATFORMS=cpu .venv-tpu/bin/python bench/compile_engine.py --mesh data=2,model=4 --slots 32

The decode step (one token for every slot, per-slot sampling included, the pool's cache donated)
and one admission (a prefill of `--prefill` requests written into the pool) are lowered from
`jax.ShapeDtypeStruct` stand-ins carrying `fast.sharding`'s shardings and compiled by XLA for a
TPU v5e topology (`bench/compile_sharded.py`'s `target_mesh`; libtpu from `.venv-tpu`; 16 GB of
HBM per chip), attention by the Pallas kernels. No weight is ever allocated. The numbers are
XLA's own plan for one chip (`compiled.memory_analysis()`).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HBM = 16e9  # TPU v5e


def plan(preset, mesh_spec, slots, max_seq, prefill, dtype="bfloat16"):
    """{"decode": memory, "admit": memory, ...} for one chip of the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from compile_sharded import abstract, target_mesh
    from paligemma.fast import pool, sharding
    from paligemma.fast.decode import KVCache
    from paligemma.fast.policy import Policy
    from paligemma.ref.config import get_config
    from paligemma.ref.params import param_shapes

    config = get_config(preset)
    mesh = target_mesh("tpu", mesh_spec)
    policy = Policy(compute_dtype=dtype, cache_dtype=dtype, attention_impl="pallas", mesh=mesh)
    max_seq = -(-max_seq // 128) * 128  # whole kernel tiles, as the Engine rounds it
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(config),
                                    is_leaf=lambda x: isinstance(x, tuple))
    params = abstract(shapes, sharding.tree_shardings(mesh, shapes))
    on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    g, B, S = config.llm, slots, max_seq
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on(sharding.batch_spec(len(shape))))  # noqa: E731
    kv = jax.ShapeDtypeStruct((g.depth, B, S, g.num_kv_heads, g.head_dim), jnp.dtype(dtype),
                              sharding=on(sharding.kv_cache_spec(mesh, g.num_kv_heads)))
    cache = KVCache(kv, kv, row((B, S), jnp.bool_), row((B, S), jnp.int32), row((B,), jnp.int32),
                    row((B,), jnp.int32))
    samplers = lambda n: (row((n,), jnp.int32), row((n,), jnp.float32), row((n,), jnp.int32),  # noqa: E731
                          row((n,), jnp.float32))
    P, T = config.vision.num_patches, 64
    statics = dict(config=config, policy=policy)
    stages = {
        "decode": (pool.decode.__wrapped__, (params, cache, row((B,), jnp.int32), row((B,), jnp.bool_), samplers(B),
                                                row((B, 2), jnp.uint32))),
        "admit": (pool.admit.__wrapped__, (params, cache, row((prefill,), jnp.int32),
                                              row((prefill, P, g.width), jnp.dtype(dtype)),
                                              row((prefill, T), jnp.int32), row((prefill, T), jnp.int32),
                                              row((prefill, T), jnp.bool_), samplers(prefill),
                                              row((prefill, 2), jnp.uint32))),
    }
    out = dict(preset=preset, mesh=mesh_spec, slots=slots, max_seq=max_seq, prefill=prefill,
               cache_bytes=2 * kv.size * kv.dtype.itemsize,
               param_bytes=sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes)))
    for stage, (fn, args) in stages.items():
        compiled = jax.jit(fn, static_argnames=("config", "policy"), donate_argnames=("cache",)).lower(
            *args, **statics).compile()
        m = compiled.memory_analysis()
        out[stage] = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                          alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                          total=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                          + m.temp_size_in_bytes)
    return out


def _gb(n):
    return f"{n / 1e9:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paligemma-3b-224")
    parser.add_argument("--mesh", nargs="+", default=["data=1,model=1", "data=2,model=4"])
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max-seq", type=int, default=512, help="cache columns per slot (rounded up to 128)")
    parser.add_argument("--prefill", type=int, default=8, help="requests in one admission")
    args = parser.parse_args()
    print(f"{args.preset}, bfloat16 weights / activations / KV cache, {args.slots} slots x max_seq {args.max_seq}; "
          "TPU v5e (16 GB HBM per chip), Pallas attention. Per chip, from XLA's memory analysis:")
    print("| mesh | program | arguments | outputs | temp | total | of HBM |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.mesh:
        r = plan(args.preset, spec, args.slots, args.max_seq, args.prefill)
        for stage in ("decode", "admit"):
            m = r[stage]
            print(f"| {spec} | {stage} | {_gb(m['arguments'])} | {_gb(m['outputs'])} | {_gb(m['temp'])} | "
                  f"{_gb(m['total'])} | {m['total'] / HBM:.0%} |")
        print(f"# {spec}: weights {_gb(r['param_bytes'])} in all, KV cache {_gb(r['cache_bytes'])} in all",
              file=sys.stderr)
        print("@@" + json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
