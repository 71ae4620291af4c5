"""Lower and compile the full-size `generate` with no weights in memory; report time and memory.

    python bench/compile_full_size.py                      # 3B-224 and 10B-448, every dtype variant
    python bench/compile_full_size.py --presets paligemma2-28b-224 --dtypes bfloat16

`paligemma.fast.decode._generate` (the jitted prefill + decoding loop) is lowered from
`jax.ShapeDtypeStruct` stand-ins for every parameter (built from
`paligemma.ref.params.param_shapes`) and every input, so nothing of the model's size is ever
allocated: this checks that the real architectures trace, lower and compile, and shows what
XLA plans to allocate (`compiled.memory_analysis()`: arguments, outputs, temporaries, generated
code; `peak` is XLA's own estimate of the most live at once). Each (preset, dtype) runs in a
fresh process, so compile caches and peak RSS (`ru_maxrss`) do not mix.

dtype variants (parameters / `Policy`):
  bfloat16   bfloat16 parameters, BFLOAT16 policy (bfloat16 activations and KV cache)
  mixed      bfloat16 parameters, float32 activations, bfloat16 KV cache (big_vision's default)
  float32    float32 throughout

Reading the numbers on CPU: XLA's CPU backend has no bfloat16 dot and converts bfloat16
weights to float32 for every product. With its loop-invariant code motion those conversions
were hoisted out of the layer scans and the decoding loop, a float32 copy of every weight
(twice the parameter bytes of temporaries); `fast` compiles such programs without that pass
(`paligemma.fast.model.jit_model`), so each weight is converted where it is used.
"""

import argparse
import json
import subprocess
import sys

DEFAULT_PRESETS = ("paligemma-3b-224", "paligemma2-10b-448")
VARIANTS = {  # name -> (parameter dtype, Policy keyword arguments)
    "bfloat16": ("bfloat16", dict(compute_dtype="bfloat16", cache_dtype="bfloat16")),
    "mixed": ("bfloat16", dict(compute_dtype="float32", cache_dtype="bfloat16")),
    "float32": ("float32", dict(compute_dtype="float32", cache_dtype="float32")),
}


def abstract_params(config, dtype):
    """The parameter tree as `jax.ShapeDtypeStruct`s: shapes and dtype only, no buffers."""
    import jax

    from paligemma.ref.params import param_shapes

    def is_shape(x):
        return isinstance(x, tuple)

    shapes = param_shapes(config)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=is_shape)


def abstract_inputs(config, batch, text_len):
    """images [B, R, R, 3] f32, tokens / mask_ar [B, T] int32, input_mask [B, T] bool, PRNG key."""
    import jax
    import jax.numpy as jnp

    R = config.vision.image_size
    return (jax.ShapeDtypeStruct((batch, R, R, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
            jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
            jax.ShapeDtypeStruct((batch, text_len), jnp.bool_),
            jax.ShapeDtypeStruct((2,), jnp.uint32))  # jax.random.PRNGKey(seed)


def measure_one(preset, dtype, batch, text_len, max_new_tokens, sampler):
    """Lower and compile one (preset, dtype) in this process; returns a dict of measurements."""
    import resource
    import time

    import jax.numpy as jnp
    import numpy as np

    from paligemma.fast import decode
    from paligemma.fast.policy import Policy
    from paligemma.ref.config import count_params, get_config
    from paligemma.ref.decode import parse_sampler

    config = get_config(preset)
    param_dtype, policy = VARIANTS[dtype]
    policy = Policy(**policy)
    params = abstract_params(config, jnp.dtype(param_dtype))
    n = count_params(config)
    t0 = time.perf_counter()
    lowered = decode._generate.lower(params, *abstract_inputs(config, batch, text_len), config=config,
                                     policy=policy, max_new_tokens=max_new_tokens, sampler=parse_sampler(sampler))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    return dict(
        preset=preset, dtype=dtype, params=n, param_bytes=n * np.dtype(jnp.dtype(param_dtype)).itemsize,
        lower_s=t1 - t0, compile_s=t2 - t1,
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes, peak_bytes=getattr(mem, "peak_memory_in_bytes", -1),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def _gib(n):
    if n < 0:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size / 8:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def print_table(rows, batch, text_len, max_new_tokens, sampler):
    """A Markdown table of the measurements."""
    import jax

    print(f"generate: batch {batch}, text length {text_len}, max_new_tokens {max_new_tokens}, sampler {sampler}; "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    head = ["preset", "dtype", "params", "param bytes", "lower s", "compile s", "arguments", "outputs",
            "temp", "generated code", "XLA peak", "process peak RSS"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["preset"], r["dtype"], f"{r['params'] / 1e9:.3f}B", _gib(r["param_bytes"]), f"{r['lower_s']:.1f}",
                 f"{r['compile_s']:.1f}", _gib(r["argument_bytes"]), _gib(r["output_bytes"]), _gib(r["temp_bytes"]),
                 _gib(r["code_bytes"]), _gib(r["peak_bytes"]), _gib(r["peak_rss_bytes"])]
        print("| " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    parser.add_argument("--dtypes", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sampler", default="greedy")
    parser.add_argument("--one", action="store_true", help="measure the single (preset, dtype) given, print JSON")
    args = parser.parse_args()
    settings = (args.batch, args.text_len, args.max_new_tokens, args.sampler)
    if args.one:
        print(json.dumps(measure_one(args.presets[0], args.dtypes[0], *settings)))
        return
    rows = []
    for preset in args.presets:
        for dtype in args.dtypes:
            cmd = [sys.executable, __file__, "--one", "--presets", preset, "--dtypes", dtype,
                   "--batch", str(args.batch), "--text-len", str(args.text_len),
                   "--max-new-tokens", str(args.max_new_tokens), "--sampler", args.sampler]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"# {preset} {dtype}: lower {rows[-1]['lower_s']:.1f} s, compile {rows[-1]['compile_s']:.1f} s",
                  file=sys.stderr, flush=True)
    print_table(rows, *settings)


if __name__ == "__main__":
    main()
