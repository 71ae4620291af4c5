"""Compile sharded prefill and decode for hardware this machine does not have; print per-device memory.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python bench/compile_sharded.py tpu          # TPU v5e 2x4 (8 chips)
    .venv/bin/python bench/compile_sharded.py cpu                                 # 8 virtual CPU devices
    python bench/compile_sharded.py all                                           # both, then one table

`paligemma.fast.decode.prefill` (the prompt, filling the KV cache) and `extend` (one decoding
step, the cache donated so it is updated in place) are lowered from `jax.ShapeDtypeStruct`
stand-ins that carry the `NamedSharding`s of `paligemma.fast.sharding` (parameters by the rule
table, the cache and inputs by their specs) and compiled by XLA for each device of the mesh, so
no weight is ever allocated. The numbers are XLA's own plan for one device
(`compiled.memory_analysis()`): arguments (this device's shards of the weights, the cache and
the inputs), outputs, temporaries, and the sum less what outputs alias arguments.

"tpu": a compile-only TPU v5e 2x4 topology (`jax.experimental.topologies`, libtpu from
`.venv-tpu`; 16 GB of HBM per chip), attention by the Pallas kernels under `shard_map`.
"cpu": 8 virtual CPU devices standing in for one host of 8 GPUs (XLA:CPU's plan, XLA attention;
a GPU plan would differ in its temporaries, not in the shards). Each (target, preset) runs in a
fresh process (the device count is fixed when jax starts; compile caches and RSS do not mix).
"""

import argparse
import json
import os
import subprocess
import sys

PRESETS = ("paligemma2-10b-448", "paligemma2-28b-224")
HBM = {"tpu": 16e9, "cpu": 80e9}  # v5e chip; an 80 GB GPU for the CPU stand-in
SETTINGS = dict(text_len=64, max_new_tokens=128)


def target_mesh(target, spec):
    """A (data, fsdp, model) `Mesh` over the TPU v5e 2x4 topology's chips or 8 virtual CPU devices."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from paligemma.fast import sharding

    sizes = sharding.parse_mesh(spec, sharding.INFERENCE_AXES)
    if target == "tpu":
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4", chip_config_name="default",
                                            chips_per_host_bounds=(2, 4, 1), wrap=(False, False, False))
        devices = topo.devices
    else:
        devices = jax.devices()
    shape = tuple(sizes[a] for a in sharding.AXES)
    return Mesh(np.array(devices[: int(np.prod(shape))]).reshape(shape), sharding.AXES)


def abstract(tree, shardings):
    """`ShapeDtypeStruct`s with shardings, for a tree of `ShapeDtypeStruct`s."""
    import jax

    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan(config, mesh, batch, text_len, max_new_tokens, attention, dtype="bfloat16"):
    """Lowers and compiles prefill and one decoding step on `mesh`; returns {stage: memory dict}.

    Args:
      config: a `PaliGemmaConfig`; mesh: from `target_mesh`; batch: examples (a multiple of the
      data x fsdp size); attention: `Policy.attention_impl`; dtype: parameters, activations, cache.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from paligemma.fast import decode, gemma, sharding
    from paligemma.fast.model import NO_WEIGHT_HOISTING
    from paligemma.fast.policy import Policy
    from paligemma.ref.params import param_shapes

    policy = Policy(compute_dtype=dtype, cache_dtype=dtype, attention_impl=attention, mesh=mesh)
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), param_shapes(config),
                                    is_leaf=lambda x: isinstance(x, tuple))
    params = abstract(shapes, sharding.tree_shardings(mesh, shapes))
    on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    R = config.vision.image_size
    inputs = [jax.ShapeDtypeStruct((batch, R, R, 3), jnp.float32, sharding=on(sharding.batch_spec(4)))]
    inputs += [jax.ShapeDtypeStruct((batch, text_len), d, sharding=on(sharding.batch_spec(2)))
               for d in (jnp.int32, jnp.int32, jnp.bool_)]
    rope = gemma.rope_table(config.vision.num_patches + text_len + max_new_tokens, config.llm.head_dim,
                            config.llm.rope_base)
    # XLA:CPU converts bfloat16 weights to float32 per dot; see `paligemma.fast.model.NO_WEIGHT_HOISTING`.
    options = NO_WEIGHT_HOISTING if mesh.devices.flat[0].platform == "cpu" else None

    def prefill(params, *inputs):
        return decode.prefill(params, config, *inputs, max_new_tokens, policy, rope)

    def extend(params, cache, token):
        return decode.extend(params, config, cache, token, policy, rope)

    cache_shapes, _ = jax.eval_shape(prefill, params, *inputs)
    rows = on(sharding.batch_spec(2))
    kv = on(sharding.kv_cache_spec(mesh, config.llm.num_kv_heads))
    cache = abstract(cache_shapes, decode.KVCache(kv, kv, rows, rows, on(sharding.batch_spec(1)), on(PartitionSpec())))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on(sharding.batch_spec(1)))
    out = {}
    for stage, fn, args, donate in (("prefill", prefill, (params, *inputs), ()),
                                    ("decode", extend, (params, cache, token), (1,))):
        compiled = jax.jit(fn, donate_argnums=donate, compiler_options=options).lower(*args).compile()
        m = compiled.memory_analysis()
        out[stage] = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                          alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
                          total=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                          + m.temp_size_in_bytes)
    out["cache_bytes"] = sum(a.size * a.dtype.itemsize for a in (cache_shapes.k, cache_shapes.v))
    out["param_bytes"] = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))
    return out


def measure_one(target, preset, mesh_spec, batch):
    """One (target, preset) in this process; a dict for the table."""
    import resource
    import time

    from paligemma.ref.config import count_params, get_config

    config = get_config(preset)
    mesh = target_mesh(target, mesh_spec)
    start = time.perf_counter()
    result = plan(config, mesh, batch, attention="pallas" if target == "tpu" else "xla", **SETTINGS)
    return dict(target=target, preset=preset, mesh=mesh_spec, batch=batch, params=count_params(config),
                seconds=round(time.perf_counter() - start, 1),
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **result)


def _size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_table(rows):
    print(f"bfloat16 weights, activations and KV cache; prompt {SETTINGS['text_len']} text tokens + the image's, "
          f"cache for {SETTINGS['max_new_tokens']} new tokens. Per device, from XLA's memory analysis:")
    head = ["target", "preset", "mesh", "batch", "stage", "arguments", "outputs", "temp", "total", "of HBM",
            "compile s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        for stage in ("prefill", "decode"):
            m = r[stage]
            cells = [r["target"], r["preset"], r["mesh"], str(r["batch"]), stage] + [
                _size(m[k]) for k in ("arguments", "outputs", "temp", "total")] + [
                f"{m['total'] / HBM[r['target']]:.0%} of {HBM[r['target']] / 1e9:.0f} GB", f"{r['seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |")


def _python(target):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, ".venv-tpu" if target == "tpu" else ".venv", "bin", "python")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("tpu", "cpu", "all"))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--mesh", default="data=1,model=8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--one", action="store_true", help="measure target and the first preset here, print JSON")
    args = parser.parse_args()
    if args.one:
        print("@@" + json.dumps(measure_one(args.target, args.presets[0], args.mesh, args.batch)))
        return
    rows = []
    for target in ("tpu", "cpu") if args.target == "all" else (args.target,):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if target == "cpu":
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        for preset in args.presets if target == "tpu" else args.presets[-1:]:
            cmd = [_python(target), os.path.abspath(__file__), target, "--one", "--presets", preset,
                   "--mesh", args.mesh, "--batch", str(args.batch)]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in run.stdout.splitlines() if x.startswith("@@")), None)
            if line is None:
                sys.exit(f"{target} {preset} failed:\n{run.stderr[-4000:]}")
            rows.append(json.loads(line[2:]))
            print(f"# {target} {preset}: {rows[-1]['seconds']} s, peak RSS {rows[-1]['peak_rss'] / 1e9:.1f} GB",
                  file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
