"""Decoding with quantized weights: float32, bfloat16, int8 and int4 side by side; full-size models.

    python bench/quant_speed.py                           # the table in docs/performance.md, section 6
    python bench/quant_speed.py --full 10b-int8 28b-int4  # full PaliGemma 2 models, random weights

Harness (bench/generate_speed.py's, imported from it): PaliGemma 3B-224's widths and vocabulary
with `--vision-depth` ViT blocks and `--text-depth` Gemma layers, the same random float32 weights
(an HF directory written once), one worker process per format, measurements interleaved round by
round, a fourth worker measuring the machine's limits in every round. Each worker loads the
float32 weights with `ref.load` and then holds them as:
  float32    per-layer buffers (`fast.unstack_layers`), float32 policy: generate_speed's "fast";
  bfloat16   bfloat16 weights, stacked, the bfloat16 policy (what `PaliGemma(dtype="bfloat16")` runs);
  int8/int4  `ref.quant.quantize_tree` (nothing kept in float), per-layer buffers, float32 policy;
             decoding's matmuls run as `kernels.quant_cpu`'s custom calls (the worker fails if
             they are not built);
  int8-xla / int4-xla  the same without those kernels (`fast.quant.CPU_KERNEL = False`): the
             XLA tile loop, as on a machine with no C++ compiler.
Timed: prefill (a jit of `fast.decode.prefill`) and `fast.generate` with `--new-tokens` N; decode
time per step = (generate - prefill) / (N - 1), from the medians. Float32 decode floor: the
language model's float32 weight bytes (embedding included: the logits read it) over the measured
memory-copy bandwidth, or the decode FLOPs over the matmul throughput when larger (batch 8).

`--full`: PaliGemma 2 10B-224 (int8) and 28B-224 (int4) with random weights generated directly in
quantized form, one layer at a time (never a float32 tree: 28B is 110 GB as float32), placed as
per-layer buffers; prefill of 256 image + `--text-tokens` tokens and `--full-new-tokens` greedy
tokens at batch 1, each model in its own worker; peak RSS is the worker's VmHWM.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from _machine import MARK, WorkerProcess, peak_rss, wait_until_quiet
from generate_speed import (FastImpl, FloorImpl, bench_config, decode_bytes, decode_flops, ensure_weights,
                            machine_info)

FORMATS = ("float32", "bfloat16", "int8", "int4", "int8-xla", "int4-xla")
FULL = {"10b-int8": ("paligemma2-10b-224", "int8"), "28b-int4": ("paligemma2-28b-224", "int4")}


# --- Workers --------------------------------------------------------------------------------


class QuantImpl(FastImpl):
    """generate_speed's fast worker, its weights converted to `--format` after loading."""

    def load(self):
        import jax
        from paligemma import fast
        from paligemma.fast.policy import BFLOAT16
        from paligemma.ref import quant
        super().load()  # float32 per-layer device buffers, float32 policy
        from paligemma.fast import quant as fast_quant
        from paligemma.kernels import quant_cpu
        fmt = self.args.format.removesuffix("-xla")
        fast_quant.CPU_KERNEL = not self.args.format.endswith("-xla")
        if fmt in quant.FORMATS and fast_quant.CPU_KERNEL and not quant_cpu.available():
            raise RuntimeError(f"{self.args.format}: kernels.quant_cpu unavailable: {quant_cpu.unavailable_reason()}")
        if fmt == "bfloat16":
            import ml_dtypes
            stacked = fast.stack_layers(self.params)
            self.params = jax.tree_util.tree_map(lambda w: w.astype(ml_dtypes.bfloat16), stacked)
            self.policy, self.layout = BFLOAT16, "stacked"
        elif fmt in quant.FORMATS:
            host = jax.tree_util.tree_map(np.asarray, fast.stack_layers(self.params))
            self.params = None
            qtree = quant.quantize_tree(host, self.config, fmt)
            del host
            self.params = fast.unstack_layers(jax.tree_util.tree_map(jax.device_put, qtree))
        self.weight_bytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self.params))

    def info(self):
        return {**super().info(), "format": self.args.format, "weight_bytes": self.weight_bytes}

    def measure(self, batch):
        return {**super().measure(batch), "steps": self.steps(batch)}

    def steps(self, batch):
        """Seconds of each of `--steps` decoding steps timed one by one: `fast.decode.extend` (what
        `fast.generate`'s loop runs per token) on the prefill's cache, greedy, the cache donated."""
        import functools
        import jax
        import jax.numpy as jnp
        from paligemma.fast import decode, gemma
        from paligemma.fast.model import NO_WEIGHT_HOISTING, converts_weights
        images, tokens, mask_ar, input_mask = self.batch_inputs(batch)
        cache, _, token = self._prefill(self.params, images, tokens.astype(np.int32), mask_ar.astype(np.int32),
                                        input_mask, config=self.config, policy=self.policy,
                                        max_new_tokens=self.args.new_tokens)
        if not hasattr(self, "_extend"):
            g = self.config.llm
            rope = gemma.rope_table(self.config.vision.num_patches + tokens.shape[1] + self.args.new_tokens,
                                    g.head_dim, g.rope_base)
            # compiled as `fast.generate` compiles it (bfloat16's layer scan would otherwise convert
            # every layer's weights before the first, each step)
            options = NO_WEIGHT_HOISTING if converts_weights(self.params) else None
            self._extend = jax.jit(functools.partial(decode.extend, config=self.config, policy=self.policy,
                                                     rope=rope), donate_argnames=("cache",), compiler_options=options)
        times = []
        for _ in range(min(self.args.steps + 1, self.args.new_tokens - 1)):  # the first: compilation / warm-up
            t0 = time.perf_counter()
            cache, logits = self._extend(self.params, cache=cache, tokens=token.astype(jnp.int32))
            token = jnp.argmax(logits, axis=-1)
            token.block_until_ready()
            times.append(time.perf_counter() - t0)
        return times[1:]


def random_quantized_tree(config, fmt, seed=0):
    """Random weights of `config` stored as `quant.quantize_tree` stores them (nothing kept), made
    directly in that form one language-model layer at a time and placed on the device as they
    are made (per-layer buffers): the host never holds a float copy of a quantized weight.

    q is uniform over the format's codes; scales are chosen so that q * scale has the standard
    deviation `ref.init_params` gives a weight (1 / sqrt(fan-in)); norms are identities.
    """
    import jax
    from paligemma.ref import quant
    from paligemma.ref.params import flatten, param_shapes, unflatten
    rng = np.random.default_rng(seed)
    shapes = flatten(param_shapes(config))
    code_std = {"int8": np.sqrt((2 * 127 + 1) ** 2 / 12), "int4": np.sqrt(16**2 / 12)}[fmt]

    def make(entry, shape):
        """{stored key: device array} of one entry (a single layer's slice for `llm/layers`)."""
        out = {}
        for key, (s, dtype) in quant.stored_shapes(entry, shape).items():
            if entry.fmt and key.endswith("/q"):
                lo, hi = (-127, 128) if fmt == "int8" else (0, 256)
                value = rng.integers(lo, hi, s, dtype=np.int16).astype(dtype)
            elif entry.fmt and key.endswith("/scale"):
                fan_in = int(np.prod([shape[a] for a in entry.axes]))
                value = np.full(s, 1 / (np.sqrt(fan_in) * code_std), np.float32)
            elif "norm" in key and key.endswith("scale") and key.startswith("llm/"):
                value = np.zeros(s, np.float32)  # RMSNorm: (1 + scale)
            elif key.endswith("scale"):
                value = np.ones(s, np.float32)  # LayerNorm
            elif key.endswith("bias"):
                value = np.zeros(s, np.float32)
            else:
                value = (rng.standard_normal(s, np.float32) * np.float32(s[-1] ** -0.5))
            out[key] = jax.block_until_ready(jax.device_put(value))
            del value
        return out

    flat, layers = {}, [dict() for _ in range(config.llm.depth)]
    for entry in quant.layout(config, fmt):
        shape = shapes[entry.source]
        if entry.source.startswith("llm/layers/"):
            for layer in layers:
                for key, value in make(entry, shape[1:]).items():
                    layer[key[len("llm/layers/"):]] = value
        else:
            flat.update(make(entry, shape))
    tree = unflatten(flat)
    tree["llm"]["layers"] = tuple(unflatten(layer) for layer in layers)
    return tree


class FullImpl:
    """A full-size model with random quantized weights: setup builds it, run times prefill + N tokens."""

    def __init__(self, args):
        self.args = args

    def setup(self):
        from paligemma import ref
        from paligemma.ref import quant
        name, self.fmt = FULL[self.args.full_model]
        self.config = ref.get_config(name)
        t0 = time.perf_counter()
        self.params = random_quantized_tree(self.config, self.fmt)
        import jax
        self.weight_bytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self.params))
        return {"load_s": time.perf_counter() - t0, "load_peak": peak_rss(), "weight_bytes": self.weight_bytes,
                "file_bytes": quant.entries_bytes(self.config, self.fmt, float_dtype=np.float32)}

    def run(self):
        from paligemma import fast
        config, T, N = self.config, self.args.text_tokens, self.args.full_new_tokens
        rng = np.random.default_rng(1)
        R = config.vision.image_size
        images = rng.uniform(-1, 1, (1, R, R, 3)).astype(np.float32)
        tokens = np.concatenate([[[config.bos_id]], rng.integers(3, 256_000, (1, T - 1))], axis=1)
        prompt = (images, tokens, np.zeros_like(tokens), np.ones(tokens.shape, bool))
        times = {}
        for n in (1, N):  # max_new_tokens=1 is prefill + the first token: the rest is decoding
            t0 = time.perf_counter()
            out = fast.generate(self.params, config, *prompt, max_new_tokens=n)
            times[f"first_{n}"] = time.perf_counter() - t0  # compiles: prefill + n tokens + compilation
            t0 = time.perf_counter()
            out = fast.generate(self.params, config, *prompt, max_new_tokens=n)
            times[f"run_{n}"] = time.perf_counter() - t0
        finished = bool((out.tokens == config.eos_id).any())
        return {**times, "tokens": out.tokens.tolist(), "eos": finished, "peak": peak_rss(),
                "per_token": (times[f"run_{N}"] - times["run_1"]) / (N - 1)}

    def finish(self):
        return {"peak": peak_rss()}


def worker_main(args):
    impl = (FullImpl if args.full_model else FloorImpl if args.format == "floor" else QuantImpl)(args)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            result = getattr(impl, command["op"])(**command.get("kw", {}))
        except Exception:  # reported to the parent, which stops the run
            import traceback
            result = {"error": traceback.format_exc()}
        print(MARK + json.dumps(result), flush=True)
        if command["op"] == "finish":
            return


class Worker(WorkerProcess):
    def __init__(self, name, args, *extra):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--weights", args.weights or "",
                "--dir", args.dir, "--vision-depth", str(args.vision_depth), "--text-depth", str(args.text_depth),
                "--text-tokens", str(args.text_tokens), "--new-tokens", str(args.new_tokens),
                "--steps", str(args.steps), *extra]
        super().__init__(name, argv, os.path.join(args.dir, f"quant-worker-{name}.log"))


# --- The parent -----------------------------------------------------------------------------


def run_small(args):
    config = bench_config(args.vision_depth, args.text_depth)
    os.makedirs(args.dir, exist_ok=True)
    args.weights = args.weights or os.path.join(args.dir, "weights-hf")
    args.seed, args.worker = 0, None
    print(f"{config.name}: weights {ensure_weights(args, config)}", file=sys.stderr, flush=True)
    workers, results = {}, {"machine": machine_info(), "args": vars(args), "formats": {}, "floor": []}
    try:
        for name in ("floor",) + tuple(args.formats):
            workers[name] = Worker(name, args, "--format", name)
            setup = workers[name].call("setup")
            results["formats"].setdefault(name, {"setup": setup, "runs": {}})
            print(f"  {name}: loaded in {setup['load_s']:.0f} s", file=sys.stderr, flush=True)
        for batch in args.batches:
            for name in args.formats:
                workers[name].call("warmup", batch=batch)
        for r in range(args.rounds):
            wait_until_quiet(args.quiet, args.max_wait)
            results["floor"].append(workers["floor"].call("measure"))
            for batch in args.batches:
                order = args.formats[r % len(args.formats):] + args.formats[:r % len(args.formats)]
                for name in order:
                    wait_until_quiet(args.quiet, args.max_wait)
                    results["formats"][name]["runs"].setdefault(str(batch), []).append(
                        workers[name].call("measure", batch=batch))
            print(f"  round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        for name in list(workers):
            results["formats"][name].update(workers.pop(name).call("finish"))
    finally:
        for w in workers.values():
            w.proc.kill()
    return report_small(args, config, results)


def report_small(args, config, results):
    bw = max(f["copy_bw"] for f in results["floor"])
    mm = max(max(f["numpy_matmul"], f["jax_matmul"]) for f in results["floor"])
    floor = {b: max(decode_bytes(config) / bw, decode_flops(config, b) / mm) for b in args.batches}
    lines = [f"{config.name}; {args.new_tokens} new tokens after {config.vision.num_patches} image + "
             f"{args.text_tokens} text tokens; {args.rounds} rounds, medians.",
             f"Memory copy {bw / 1e9:.1f} GB/s; float32 decode floor "
             + ", ".join(f"B={b}: {1e3 * floor[b]:.0f} ms per step" for b in args.batches) + ".", "",
             "| format | weights (GB) | "
             + " | ".join(f"decode B={b} (ms/step) | x float32 floor | step B={b} (ms) | x float32 floor"
                          for b in args.batches)
             + " | prefill B=1 (s) | peak RSS (GB) |",
             "|---|---|" + "---|---|---|---|" * len(args.batches) + "---|---|"]
    ratios = {}
    for name in args.formats:
        res = results["formats"][name]
        cells = []
        for b in args.batches:
            runs = res["runs"][str(b)]
            pre, gen = np.median([m["prefill"] for m in runs]), np.median([m["generate"] for m in runs])
            step = (gen - pre) / (args.new_tokens - 1)
            timed = np.median([t for m in runs for t in m["steps"]])
            ratios[(name, b)] = (step / floor[b], timed / floor[b])
            cells += [f"{1e3 * step:.0f}", f"{step / floor[b]:.2f}", f"{1e3 * timed:.0f}", f"{timed / floor[b]:.2f}"]
        pre1 = np.median([m["prefill"] for m in res["runs"][str(args.batches[0])]])
        lines.append(f"| {name} | {res['info']['weight_bytes'] / 1e9:.2f} | " + " | ".join(cells)
                     + f" | {pre1:.2f} | {res['peak'] / 1e9:.2f} |")
    lines.append("")
    for name, target in (("int8", 0.35), ("int4", 0.25)):
        if (name, 1) in ratios:
            for label, ratio in zip(("(generate - prefill) / (N - 1)", "timed steps"), ratios[(name, 1)]):
                met = "met" if ratio <= target else "NOT met"
                lines.append(f"- {name} decode B=1, {label}: {ratio:.2f}x the float32 floor (target <= {target}: {met})")
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "table": text}, f, indent=1, default=str)
    return text


def run_full(args):
    rows = []
    for label in args.full:
        worker = Worker(label, args, "--full-model", label, "--full-new-tokens", str(args.full_new_tokens))
        try:
            setup = worker.call("setup")
            print(f"  {label}: built in {setup['load_s']:.0f} s, {setup['weight_bytes'] / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)
            out = worker.call("run")
            rows.append({"model": label, **setup, **out})
            worker.call("finish")
        finally:
            worker.proc.kill()
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| model | weights (GB) | prefill + 1 token (s) | decode (s/token) | peak RSS (GB) | x weights |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weight_bytes'] / 1e9:.2f} | {r['run_1']:.1f} | {r['per_token']:.2f} | "
                     f"{r['peak'] / 1e9:.2f} | {r['peak'] / r['weight_bytes']:.2f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-depth", type=int, default=3)
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps timed one by one per round")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--full", nargs="*", choices=sorted(FULL), help="full-size models instead of the harness")
    parser.add_argument("--full-new-tokens", type=int, default=16)
    parser.add_argument("--quiet", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=60.0)
    parser.add_argument("--dir", default="/tmp/paligemma-speed")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--full-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.fast_compute = "float32"
    if args.worker:
        args.worker = "fast"  # generate_speed's FastImpl reads its worker name
        worker_main(args)
    elif args.full:
        os.makedirs(args.dir, exist_ok=True)
        run_full(args)
    else:
        run_small(args)


if __name__ == "__main__":
    main()
