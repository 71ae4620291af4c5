"""The full PaliGemma 3B-224 with random bfloat16 weights: prefill + 32 tokens with `fast`.

    python bench/full_preset.py                                  # both policies, the table in docs/performance.md
    python bench/full_preset.py --compute bfloat16 --repeats 1   # one policy, one timed run

Random bfloat16 weights of the preset's exact shapes are built directly on the JAX device, one
slab of at most `--chunk-mb` float32 at a time written into a donated buffer, so no float32
copy of a whole tensor (let alone of the model) ever exists. Each policy runs in its own
process; both keep the parameters in bfloat16 and the KV cache in bfloat16:

  bfloat16   fast.Policy(compute_dtype="bfloat16", cache_dtype="bfloat16")
  float32    fast.Policy(compute_dtype="float32", cache_dtype="bfloat16"): float32 activations,
             weights converted to float32 as they are used

Per policy: the first `fast.generate` call (compile + run), then `--repeats` timed rounds of
a jitted `fast.decode.prefill` (what `generate` runs before its loop) and `fast.generate`;
time per token = (generate - prefill) / (N - 1) from the medians. Peak RSS is the process's
high-water mark (VmHWM) over everything, building the weights included; "after build" resets
it (/proc/self/clear_refs) once the weights exist, so it is the peak of compiling and running
alone. Greedy decoding is checked to produce all N tokens.

The language model's layers are stacked (`lax.scan`), the layout `fast.PaliGemma` uses for
bfloat16 weights on CPU; `--layout per-layer` builds them as per-layer buffers instead
(`fast.unstack_layers`, the float32 choice; with bfloat16 weights XLA:CPU then schedules the
float32 conversions of all layers early, see docs/performance.md). `--fast-variant
LABEL=PATH` also runs a patched copy of the package.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
from _machine import peak_rss as _rss, reset_peak as _reset_peak, wait_until_quiet

MARK = "@@full@@ "


def random_params(config, dtype, seed=0, chunk_bytes=64 << 20, per_layer=False):
    """Random parameters of `config`'s shapes in `dtype`, built on the device slab by slab.

    Scales follow `ref.init_params` (weights N(0, 1/fan_in), embeddings N(0, 1/D), biases
    N(0, 0.02^2), norms at identity); values differ (jax.random, not NumPy). `per_layer`:
    `llm/layers` as a tuple of per-layer trees (the layout of `fast.unstack_layers`), each
    layer built directly, so no stacked copy ever exists.
    """
    import jax
    import jax.numpy as jnp
    from paligemma import ref
    from paligemma.ref.params import fan_in

    @functools.partial(jax.jit, donate_argnums=0, static_argnames=("rows", "scale", "offset"))
    def fill(buf, start, key, rows, scale, offset):
        slab = jax.random.normal(key, (rows,) + buf.shape[1:], jnp.float32) * scale + offset
        return jax.lax.dynamic_update_slice_in_dim(buf, slab.astype(buf.dtype), start, axis=0)

    def build(shape, key, scale, offset):
        """One tensor, filled `rows` of its trailing dimension at a time (<= chunk_bytes of float32)."""
        cols = shape[-1] if len(shape) > 1 else shape[0]
        rows_total = int(np.prod(shape)) // cols
        rows = max(1, min(rows_total, chunk_bytes // (4 * cols)))
        while rows_total % rows:
            rows -= 1
        buf = jnp.zeros((rows_total, cols), dtype)
        for j, start in enumerate(range(0, rows_total, rows)):
            buf = fill(buf, start, jax.random.fold_in(key, j), rows=rows, scale=float(scale), offset=float(offset))
        return jax.block_until_ready(buf.reshape(shape))

    flat, layers = {}, None
    root = jax.random.PRNGKey(seed)
    for i, (path, shape) in enumerate(ref.flatten(ref.param_shapes(config)).items()):
        if path.endswith(("input_embedding", "pos_embedding")):
            scale, offset = shape[-1] ** -0.5, 0.0
        elif "LayerNorm" in path or "encoder_norm" in path:
            scale, offset = 0.0, (1.0 if path.endswith("scale") else 0.0)
        elif path.endswith("norm/scale"):
            scale, offset = 0.0, 0.0
        elif path.endswith("bias"):
            scale, offset = 0.02, 0.0
        else:
            scale, offset = fan_in(path, shape) ** -0.5, 0.0
        key = jax.random.fold_in(root, i)
        if per_layer and path.startswith("llm/layers/"):
            layers = layers or [{} for _ in range(shape[0])]
            for layer in range(shape[0]):
                layers[layer][path.removeprefix("llm/layers/")] = build(shape[1:], jax.random.fold_in(key, 10_000 + layer),
                                                                         scale, offset)
        else:
            flat[path] = build(tuple(shape), key, scale, offset)
    params = ref.unflatten(flat)
    if layers is not None:
        params["llm"]["layers"] = tuple(ref.unflatten(layer) for layer in layers)
    return params


def worker(args):
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    from paligemma import fast, ref
    from paligemma.fast import decode, gemma
    from paligemma.fast.model import jit_model

    config = ref.get_config(args.preset)
    policy = fast.Policy(compute_dtype=args.compute, cache_dtype="bfloat16")
    per_layer = args.layout == "per-layer"
    t0 = time.perf_counter()
    params = random_params(config, jnp.bfloat16, chunk_bytes=args.chunk_mb << 20, per_layer=per_layer)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    build_peak = _rss()
    reset = _reset_peak()

    rng = np.random.default_rng(1)
    B, T, N, R = args.batch, args.text_tokens, args.new_tokens, config.vision.image_size
    images = rng.uniform(-1, 1, (B, R, R, 3)).astype(np.float32)
    tokens = np.concatenate([np.full((B, 1), config.bos_id), rng.integers(3, 256_000, (B, T - 2)),
                             np.full((B, 1), 108)], axis=1).astype(np.int32)
    mask_ar, input_mask = np.zeros_like(tokens), np.ones(tokens.shape, bool)
    P = config.vision.num_patches

    # Compiled as `generate` is (`jit_model`: no weight hoisting for bfloat16 weights on CPU).
    @functools.partial(jit_model, static_argnames=("config", "policy", "max_new_tokens"))
    def prefill(params, images, tokens, mask_ar, input_mask, config, policy, max_new_tokens):
        rope = gemma.rope_table(P + tokens.shape[1] + max_new_tokens, config.llm.head_dim, config.llm.rope_base)
        cache, logits = decode.prefill(params, config, images, tokens, mask_ar, input_mask, max_new_tokens, policy,
                                       rope)
        return cache, jnp.argmax(logits, axis=-1)

    def run_prefill():
        t = time.perf_counter()
        jax.block_until_ready(prefill(params, images, tokens, mask_ar, input_mask, config=config, policy=policy,
                                      max_new_tokens=N))
        return time.perf_counter() - t

    def run_generate():
        t = time.perf_counter()
        out = fast.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=N, policy=policy)
        return time.perf_counter() - t, out.tokens

    first_generate, tokens_out = run_generate()
    first_prefill = run_prefill()
    pre, gen, full = [], [], True
    busy = []
    for _ in range(args.repeats):
        busy.append(wait_until_quiet(0.25, 90.0))
        pre.append(run_prefill())
        busy.append(wait_until_quiet(0.25, 90.0))
        g, toks = run_generate()
        gen.append(g)
        full &= toks.shape[1] == N and not (toks == config.eos_id).any()
    p, g = float(np.median(pre)), float(np.median(gen))
    peak = _rss()
    result = {
        "label": args.label, "compute": args.compute, "policy": str(policy),
        "layout": "per-layer" if per_layer else "stacked", "fast_from": os.path.dirname(fast.__file__), "weight_bytes": weight_bytes, "build_s": build_s,
        "build_peak": build_peak, "peak_after_build": peak if reset else None,
        "peak": max(peak, build_peak) if reset else peak,
        "first_generate": first_generate, "first_prefill": first_prefill, "prefill": pre, "generate": gen,
        "prefill_median": p, "generate_median": g, "per_token": (g - p) / (N - 1), "full": bool(full),
        "tokens": np.asarray(tokens_out)[0, :8].tolist(), "jax": jax.__version__, "busy_before": busy,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "ml_dtypes": ml_dtypes.__version__,
    }
    print(MARK + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paligemma-3b-224")
    parser.add_argument("--compute", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-mb", type=int, default=64, help="float32 MB per random slab while building")
    parser.add_argument("--layout", default="stacked", choices=["stacked", "per-layer"],
                        help="language-model layer weights: stacked (lax.scan) or per-layer buffers")
    parser.add_argument("--fast-variant", action="append", default=[], metavar="LABEL=PATH",
                        help="also run `fast` importing the `paligemma` package found in PATH (a patched copy)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", default="fast", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.compute = args.compute[0]
        return worker(args)

    from paligemma import ref
    config = ref.get_config(args.preset)
    n = ref.count_params(config)
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    print(f"{ref.describe(config)}\n{n:,} params = {2 * n / 1e9:.2f} GB in bfloat16; machine: {os.cpu_count()} cores, "
          f"{mem / 1e9:.1f} GB RAM; batch {args.batch}, {config.vision.num_patches} image + {args.text_tokens} text "
          f"tokens, {args.new_tokens} new tokens, greedy; load average {os.getloadavg()[0]:.1f}\n", flush=True)
    results = []
    variants = [("fast", None)] + [tuple(v.split("=", 1)) for v in args.fast_variant]
    for compute in args.compute:
        for label, path in variants:
            label = label if path is None else f"fast[{label}]"
            env = dict(os.environ) if path is None else dict(os.environ, PYTHONPATH=os.path.abspath(path))
            argv = [sys.executable, os.path.abspath(__file__), "--worker", "--compute", compute, "--preset",
                    args.preset, "--batch", str(args.batch), "--text-tokens", str(args.text_tokens), "--new-tokens",
                    str(args.new_tokens), "--repeats", str(args.repeats), "--chunk-mb", str(args.chunk_mb),
                    "--layout", args.layout, "--label", label]
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
            if proc.returncode or not lines:
                print(f"{label} compute={compute}: worker failed (exit {proc.returncode})\n{proc.stderr[-3000:]}",
                      flush=True)
                continue
            r = json.loads(lines[-1][len(MARK):])
            results.append(r)
            print(f"  {label} compute={compute}: built in {r['build_s']:.0f} s, first generate "
                  f"{r['first_generate']:.0f} s", file=sys.stderr, flush=True)
    if not results:
        return 1
    wb = results[0]["weight_bytes"]
    print(f"| implementation | policy (params bf16, KV cache bf16) | layer weights | prefill (s) | time per token (s) | prefill + {args.new_tokens} "
          f"tokens (s) | first call incl. compile (s) | peak RSS (GB) | peak RSS / weights | peak after build (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        after = r["peak_after_build"]
        print(f"| {r['label']} | compute {r['compute']} | {r['layout']} | {r['prefill_median']:.1f} | {r['per_token']:.2f} | {r['generate_median']:.1f} | "
              f"{r['first_generate']:.0f} | {r['peak'] / 1e9:.2f} | {r['peak'] / wb:.2f} | "
              f"{'-' if after is None else f'{after / 1e9:.2f}'} |")
    print(f"\nWeights: {wb / 1e9:.2f} GB (bfloat16), target peak RSS < 1.5x = {1.5 * wb / 1e9:.2f} GB. "
          f"Medians of {args.repeats} timed runs after the first; jax {results[0]['jax']}, "
          f"XLA_FLAGS={results[0]['XLA_FLAGS']!r}; load average {os.getloadavg()[0]:.1f} at the end.")
    for r in results:
        print(f"{r['label']} compute={r['compute']} ({r['fast_from']}): prefill {[round(x, 1) for x in r['prefill']]} s, generate "
              f"{[round(x, 1) for x in r['generate']]} s, all tokens produced: {r['full']}, first tokens {r['tokens']}, "
              f"CPU used by others just before each timed run: {[f'{b:.0%}' for b in r['busy_before']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
