"""Prefill latency, decode speed, peak memory and compile time: `ref` vs `fast` vs transformers.

    python bench/generate_speed.py                     # the table in docs/performance.md
    python bench/generate_speed.py --rounds 3 --batches 1 --impls fast hf

The model has PaliGemma 3B-224's widths and vocabulary (SigLIP So400m/14 at 224 px: 256 image
tokens of width 1152; Gemma 2B: width 2048, MLP 16384, 8 query heads / 1 kv head, vocabulary
257152) but only `--vision-depth` ViT blocks and `--text-depth` Gemma layers; float32, random
weights from `ref.init_params`, written once as an HF directory with `ref.save(format="hf")`.
`ref` and `fast` load that directory with `ref.load`, transformers'
`PaliGemmaForConditionalGeneration` with `from_pretrained`: the same weights everywhere.

Each implementation runs in its own worker process (so peak RSS does not mix), all started
by this script and kept alive for the whole run; the measurements are interleaved round by
round (one prefill + one generate per implementation and batch size per round, the order
rotating), so a noisy neighbour slows every implementation alike. A fourth worker measures the
machine's limits in every round: memory-copy bandwidth and float32 matmul throughput.

What is timed (greedy decoding, `--new-tokens` N tokens after a prompt of 256 image tokens
and `--text-tokens` T text tokens, all implementations computing logits only at the last
prompt position, as HF's `generate` does with `logits_to_keep=1`):

  prefill    image + prompt to the first next-token logits and the filled KV cache:
             `ref.prefill`; for `fast` a jit of `fast.decode.prefill` (the same code `generate`
             runs first); for HF a `model(...)` call with `use_cache=True, logits_to_keep=1`.
  generate   the public entry point end to end, `max_new_tokens=N`: `ref.generate`,
             `fast.generate`, `model.generate(do_sample=False)`. It runs prefill + N - 1
             single-token steps (the N-th token needs no further step) and is checked to have
             produced N tokens per example (no EOS).
  decode     B * (N - 1) / (generate - prefill) tokens per second, from the medians.
  compile    `fast`: first call minus the steady-state median (tracing + XLA compilation);
             for `ref` and HF the same difference is only first-call overhead.
  peak RSS   `ru_maxrss` of the worker at the end (loading included); "after load" resets the
             high-water mark (/proc/self/clear_refs) once the weights are in memory.

Limits (same run, same machine): decode floor = bytes of the language model's float32 weights
(layers, final norm and the tied embedding read for the logits) / memory-copy bandwidth
(bytes read + bytes written by a 1 GiB `np.copyto`, best of all samples), or the decode FLOPs
/ matmul throughput when that is larger (batch 8); prefill floor = prefill FLOPs (vision
tower, projection, Gemma over P + T tokens, logits at the last position) / matmul throughput
(best 4096^3 float32 matmul, NumPy or JAX). Elementwise work is not counted. Printed beside
them, the stricter read floor: the same bytes / the best read bandwidth of a float32
matrix-vector product over 1 GiB (`_machine.ReadFloor`), which bench/decode_rows.py uses.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
import traceback

import numpy as np
from _machine import MARK, ReadFloor, WorkerProcess, peak_rss as _rss, reset_peak as _reset_peak, wait_until_quiet



# --- The model, the inputs, the FLOP and byte counts ----------------------------------------


def bench_config(vision_depth, text_depth):
    from paligemma import ref
    base = ref.get_config("paligemma-3b-224")
    return base.replace(vision=dataclasses.replace(base.vision, depth=vision_depth),
                        llm=dataclasses.replace(base.llm, depth=text_depth),
                        name=f"paligemma-3b-224 ({vision_depth} vision / {text_depth} text layers)")


def make_inputs(config, batch, text_tokens, seed=1):
    """Images in [-1, 1] and `[BOS] random ids "\\n"` prompts, all prefix (mask_ar = 0)."""
    rng = np.random.default_rng(seed + batch)
    R = config.vision.image_size
    images = rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32)
    body = rng.integers(3, 256_000, (batch, text_tokens - 2))
    tokens = np.concatenate([np.full((batch, 1), config.bos_id), body, np.full((batch, 1), 108)], axis=1)
    return images, tokens.astype(np.int64), np.zeros_like(tokens), np.ones(tokens.shape, bool)


def prefill_flops(config, text_tokens, batch):
    """Multiply-adds x 2 of one prefill (matmuls and attention products only)."""
    v, g = config.vision, config.llm
    P, W, M = v.num_patches, v.width, v.mlp_dim
    N = P + text_tokens
    vision = (2 * P * v.patch_size**2 * 3 * W  # patch embedding
              + v.depth * (2 * P * (4 * W * W + 2 * W * M) + 2 * 2 * P * P * W)  # blocks
              + 2 * P * W * g.width)  # projection into the language model
    per_layer = (2 * N * g.width * g.head_dim * (2 * g.num_heads + 2 * g.num_kv_heads)  # q, k, v, out
                 + 2 * 2 * N * N * g.num_heads * g.head_dim  # q k^T and p v
                 + 2 * N * 3 * g.width * g.mlp_dim)  # gate, up, down
    logits = 2 * g.width * g.vocab_size  # last position only
    return batch * (vision + g.depth * per_layer + logits)


def decode_bytes(config):
    """Bytes of float32 weights one decoding step reads (every LLM weight, the tied embedding too)."""
    from paligemma.ref.config import count_llm_params
    return 4 * count_llm_params(config.llm)


def decode_flops(config, batch):
    from paligemma.ref.config import count_llm_params
    return 2 * batch * count_llm_params(config.llm)


# --- Workers: one per implementation, driven over stdin/stdout -----------------------------


class Impl:
    """Common driver: `setup` loads the weights, `warmup` makes first calls, `measure` times."""

    def __init__(self, args):
        self.args = args
        self.config = bench_config(args.vision_depth, args.text_depth)
        self.inputs = {}
        self.first = {}

    def setup(self):
        t0 = time.perf_counter()
        self.load()
        seconds = time.perf_counter() - t0
        load_peak = _rss()
        self.peak_reset = _reset_peak()
        return {"load_s": seconds, "load_peak": load_peak}

    def batch_inputs(self, batch):
        if batch not in self.inputs:
            self.inputs[batch] = make_inputs(self.config, batch, self.args.text_tokens)
        return self.inputs[batch]

    def warmup(self, batch):
        """First prefill and generate (compiles `fast`), plus the sanity outputs."""
        t0 = time.perf_counter()
        next_token, logits = self.prefill(batch)
        t1 = time.perf_counter()
        tokens = self.generate(batch)
        t2 = time.perf_counter()
        path = os.path.join(self.args.dir, f"logits-{self.args.worker}-b{batch}.npy")
        np.save(path, np.asarray(logits, np.float32))
        return {"prefill_first": t1 - t0, "generate_first": t2 - t1, "tokens": np.asarray(tokens).tolist(),
                "prefill_token": np.asarray(next_token).tolist(), "logits": path}

    def measure(self, batch):
        t0 = time.perf_counter()
        self.prefill(batch)
        t1 = time.perf_counter()
        tokens = np.asarray(self.generate(batch))
        t2 = time.perf_counter()
        full = bool(tokens.shape[1] == self.args.new_tokens and not (tokens == self.config.eos_id).any())
        return {"prefill": t1 - t0, "generate": t2 - t1, "full": full}

    def finish(self):
        return {"peak": _rss(), "peak_reset": self.peak_reset, "info": self.info()}

    def info(self):
        return {}


class RefImpl(Impl):
    def load(self):
        from paligemma import ref
        self.ref = ref
        config, self.params = ref.load(self.args.weights)
        assert config.vision == self.config.vision and config.llm == self.config.llm, (config, self.config)

    def prefill(self, batch):
        images, tokens, mask_ar, input_mask = self.batch_inputs(batch)
        _, logits = self.ref.prefill(self.params, self.config, images, tokens, mask_ar, input_mask,
                                     self.args.new_tokens)
        return logits.argmax(-1), logits[0]

    def generate(self, batch):
        out = self.ref.generate(self.params, self.config, *self.batch_inputs(batch),
                                max_new_tokens=self.args.new_tokens)
        return out.tokens

    def info(self):
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {"numpy": np.__version__, "blas": f"{blas.get('name')} {blas.get('version')}"}


class FastImpl(Impl):
    def load(self):
        import jax
        import jax.numpy as jnp
        from paligemma import fast, ref
        from paligemma.fast import decode, gemma
        self.jax, self.fast = jax, fast
        self.policy = fast.Policy(compute_dtype=self.args.fast_compute, cache_dtype=self.args.fast_compute)
        config, params = ref.load(self.args.weights)
        assert config.vision == self.config.vision and config.llm == self.config.llm, (config, self.config)
        # "fast": per-layer weight buffers, the layout `fast.PaliGemma` uses on CPU;
        # "fast-stacked": the stacked layers `ref.load` returns, run under `lax.scan` (the library's
        #   own layout choice switched off);
        # "fast-readme": the README's call, `fast.generate(params, ...)` on `ref.load`'s NumPy tree
        #   as it is: whatever the library does with it (`fast.layout.for_platform`) is timed.
        kind = self.args.worker.split("[")[0]
        self.layout = "stacked"
        if kind == "fast-stacked" and hasattr(fast, "layout") and hasattr(fast.layout, "AUTO"):
            fast.layout.AUTO = False
        if kind == "fast-readme":
            self.params, self.layout = params, "as ref.load returns them (NumPy, stacked)"
        else:
            if kind == "fast" and hasattr(fast, "unstack_layers"):
                params, self.layout = fast.unstack_layers(params), "per-layer"
            # Device arrays once, one tensor at a time: NumPy arguments would be copied on every call.
            leaves, treedef = jax.tree_util.tree_flatten(params)
            del params
            for i in range(len(leaves)):
                leaves[i] = jax.block_until_ready(jax.device_put(leaves[i]))
            self.params = jax.tree_util.tree_unflatten(treedef, leaves)
            del leaves
        P = config.vision.num_patches

        @functools.partial(jax.jit, static_argnames=("config", "policy", "max_new_tokens"))
        def prefill(params, images, tokens, mask_ar, input_mask, config, policy, max_new_tokens):
            # What `fast.decode._generate` runs before its loop.
            rope = gemma.rope_table(P + tokens.shape[1] + max_new_tokens, config.llm.head_dim, config.llm.rope_base)
            cache, logits = decode.prefill(params, config, images, tokens, mask_ar, input_mask, max_new_tokens,
                                           policy, rope)
            return cache, logits, jnp.argmax(logits, axis=-1)

        self._prefill = prefill

    def prefill(self, batch):
        images, tokens, mask_ar, input_mask = self.batch_inputs(batch)
        params = self.params
        if hasattr(self.fast, "layout") and hasattr(self.fast.layout, "for_platform"):
            params = self.fast.layout.for_platform(params)  # what `fast.generate` runs on these params
        _, logits, next_token = self.jax.block_until_ready(self._prefill(
            params, images, tokens.astype(np.int32), mask_ar.astype(np.int32), input_mask, config=self.config,
            policy=self.policy, max_new_tokens=self.args.new_tokens))
        return np.asarray(next_token), np.asarray(logits[0])

    def generate(self, batch):
        out = self.fast.generate(self.params, self.config, *self.batch_inputs(batch),
                                 max_new_tokens=self.args.new_tokens, policy=self.policy)
        return out.tokens

    def info(self):
        import jax
        import jaxlib
        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "devices": str(jax.devices()),
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "policy": str(self.policy), "layout": self.layout,
                "fast_from": os.path.dirname(self.fast.__file__)}


class HFImpl(Impl):
    def load(self):
        import torch
        import transformers
        transformers.logging.set_verbosity_error()
        self.torch = torch
        self.model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
            self.args.weights, attn_implementation=self.args.hf_attn[0], dtype=torch.float32).eval()
        self.image_id = self.model.config.image_token_id

    def hf_inputs(self, batch):
        key = ("hf", batch)
        if key not in self.inputs:
            torch = self.torch
            images, tokens, mask_ar, _ = self.batch_inputs(batch)
            P = self.config.vision.num_patches
            ids = np.concatenate([np.full((batch, P), self.image_id), tokens], axis=1)
            self.inputs[key] = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                    token_type_ids=torch.zeros(ids.shape, dtype=torch.long),  # all prefix
                                    pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
        return self.inputs[key]

    def prefill(self, batch):
        with self.torch.inference_mode():
            out = self.model(**self.hf_inputs(batch), use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].numpy()
        return logits.argmax(-1), logits[0]

    def generate(self, batch):
        inputs = self.hf_inputs(batch)
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.args.new_tokens, do_sample=False,
                                      eos_token_id=self.config.eos_id, pad_token_id=self.config.pad_id)
        return out[:, inputs["input_ids"].shape[1]:].numpy()

    def info(self):
        import transformers
        return {"torch": self.torch.__version__, "transformers": transformers.__version__,
                "torch_threads": self.torch.get_num_threads(), "torch_interop_threads": self.torch.get_num_interop_threads(),
                "attn_implementation": self.model.config._attn_implementation}


class FloorImpl:
    """The machine's limits: memory-copy bandwidth and float32 matmul throughput."""

    def __init__(self, args):
        self.args = args

    def setup(self):
        import jax
        import jax.numpy as jnp
        self.src = np.ones(1 << 28, np.float32)  # 1 GiB
        self.dst = np.zeros_like(self.src)
        rng = np.random.default_rng(0)
        self.a, self.b = (rng.standard_normal((4096, 4096), dtype=np.float32) for _ in range(2))
        self.ja, self.jb = jnp.asarray(self.a), jnp.asarray(self.b)
        self.jmm = jax.jit(jnp.matmul)
        self.jmm(self.ja, self.jb).block_until_ready()
        self.read = ReadFloor(matrix=self.src)  # reads the copy's source: no second 1 GiB in NumPy
        return {"load_s": 0.0, "load_peak": _rss()}

    def measure(self):
        def best(fn, n):
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)
        copy = best(lambda: np.copyto(self.dst, self.src), 3)
        flops = 2 * 4096**3
        np_mm = best(lambda: self.a @ self.b, 2)
        jax_mm = best(lambda: self.jmm(self.ja, self.jb).block_until_ready(), 2)
        read_bw, read_how = self.read.measure(2)
        return {"copy_bw": 2 * self.src.nbytes / copy, "numpy_matmul": flops / np_mm, "jax_matmul": flops / jax_mm,
                "read_bw": read_bw, "read_how": read_how}

    def finish(self):
        return {"peak": _rss(), "info": {}}


IMPLS = {"ref": RefImpl, "fast": FastImpl, "fast-stacked": FastImpl, "fast-readme": FastImpl, "hf": HFImpl,
         "floor": FloorImpl}


def worker_main(args):
    impl = IMPLS[args.worker.split("[")[0]](args)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            result = getattr(impl, command["op"])(**command.get("kw", {}))
        except Exception:  # reported to the parent, which stops the run
            result = {"error": traceback.format_exc()}
        print(MARK + json.dumps(result), flush=True)
        if command["op"] == "finish":
            return


# --- The parent: weights, workers, rounds, the table ----------------------------------------


class Worker(WorkerProcess):
    def __init__(self, name, kind, args, extra_env=None, extra_argv=()):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--weights", args.weights,
                "--dir", args.dir, "--vision-depth", str(args.vision_depth), "--text-depth", str(args.text_depth),
                "--text-tokens", str(args.text_tokens), "--new-tokens", str(args.new_tokens),
                "--fast-compute", args.fast_compute, *extra_argv]
        super().__init__(name, argv, os.path.join(args.dir, f"worker-{name}.log"),
                         dict(os.environ, **(extra_env or {})))


def ensure_weights(args, config):
    """Random float32 weights as an HF directory, reused while config and seed are unchanged."""
    from paligemma import ref
    stamp_path = os.path.join(args.weights, "bench-stamp.json")
    stamp = {"config": repr(config), "seed": args.seed, "dtype": "float32"}
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return "reused"
    t0 = time.perf_counter()
    params = ref.init_params(config, seed=args.seed, dtype=np.float32)
    ref.save(args.weights, config, params, format="hf", overwrite=True)
    del params
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return f"written in {time.perf_counter() - t0:.0f} s"


def machine_info():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": model, "cores": os.cpu_count(), "mem_gb": mem / 1e9, "python": platform.python_version(),
            "kernel": platform.release()}


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def run(args):
    from paligemma import ref
    config = bench_config(args.vision_depth, args.text_depth)
    os.makedirs(args.dir, exist_ok=True)
    args.weights = args.weights or os.path.join(args.dir, "weights-hf")
    how = ensure_weights(args, config)
    N, T = args.new_tokens, args.text_tokens
    weight_bytes = 4 * ref.count_params(config)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = os.getloadavg()
    print(f"{config.name}: {ref.count_params(config):,} params, {weight_bytes / 1e9:.2f} GB float32 ({how}); "
          f"prompt {config.vision.num_patches} image + {T} text tokens, {N} new tokens, greedy\n", flush=True)

    specs = [("floor", "floor", {}, ())]
    for name in args.impls:
        if name == "hf":
            for attn in args.hf_attn:
                label = "hf" if len(args.hf_attn) == 1 else f"hf[{attn}]"
                specs.append((f"{label}", "hf", {}, ("--hf-attn", attn)))
        else:
            specs.append((name, name, {}, ()))
    for variant in args.fast_variant:  # label=PATH: a `paligemma` package to import instead
        label, path = variant.split("=", 1)
        for kind in args.variant_impls:
            specs.append((f"{kind}[{label}]", f"{kind}[{label}]", {"PYTHONPATH": os.path.abspath(path)}, ()))
    impl_names = [s[0] for s in specs if s[0] != "floor"]

    results = {"config": config.name, "started": started, "machine": machine_info(), "args": vars(args),
               "impls": {}, "floor": {}}
    workers = {}
    try:
        for name, kind, env, argv in specs:  # one at a time: loading is not what we measure
            workers[name] = Worker(name, kind, args, env, argv)
            setup = workers[name].call("setup")
            results["impls" if name != "floor" else "floor"][name] = {"setup": setup, "runs": {}, "first": {}}
            print(f"  {name}: loaded in {setup['load_s']:.0f} s", file=sys.stderr, flush=True)
        for batch in args.batches:
            for name in impl_names:
                first = workers[name].call("warmup", batch=batch)
                results["impls"][name]["first"][batch] = first
                print(f"  {name} B={batch}: first prefill {first['prefill_first']:.1f} s, "
                      f"first generate {first['generate_first']:.1f} s", file=sys.stderr, flush=True)
        floor_runs = results["floor"]["floor"]["runs"] = []
        for r in range(args.rounds):
            wait_until_quiet(args.quiet, args.max_wait)
            floor_runs.append(workers["floor"].call("measure"))
            for batch in args.batches:
                if batch > 1 and r >= args.rounds_large:
                    continue
                order = impl_names[r % len(impl_names):] + impl_names[:r % len(impl_names)]
                for name in order:
                    busy = wait_until_quiet(args.quiet, args.max_wait)
                    m = workers[name].call("measure", batch=batch)
                    m["busy_before"] = busy
                    results["impls"][name]["runs"].setdefault(batch, []).append(m)
            print(f"  round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr,
                  flush=True)
        for name in list(workers):
            fin = workers.pop(name).call("finish")
            (results["impls"][name] if name != "floor" else results["floor"]["floor"]).update(fin)
    finally:
        for w in workers.values():
            w.proc.kill()
    results["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    report(args, config, results, weight_bytes)


def report(args, config, results, weight_bytes):
    N, T = args.new_tokens, args.text_tokens
    floors = results["floor"]["floor"]["runs"]
    bw = max(f["copy_bw"] for f in floors)
    mm_np, mm_jax = max(f["numpy_matmul"] for f in floors), max(f["jax_matmul"] for f in floors)
    mm = max(mm_np, mm_jax)
    pf = {b: prefill_flops(config, T, b) for b in args.batches}
    dbytes = decode_bytes(config)

    def decode_floor(b):  # seconds per step
        return max(dbytes / bw, decode_flops(config, b) / mm)

    # Sanity (not timed): same greedy tokens, same first-token logits as ref (or the first impl).
    names = list(results["impls"])
    base = "ref" if "ref" in names else names[0]
    sanity = []
    for b in args.batches:
        base_first = results["impls"][base]["first"][b]
        base_logits = np.load(base_first["logits"])
        for name in names:
            first = results["impls"][name]["first"][b]
            same = first["tokens"] == base_first["tokens"]
            err = rel_err(np.load(first["logits"]), base_logits)
            sanity.append(f"B={b} {name}: greedy tokens {'==' if same else '!='} {base}'s, first-step logits "
                          f"max rel. diff {err:.1e}")

    stats = {}
    for name, res in results["impls"].items():
        s = stats[name] = {"rss": res["peak"], "rss_after_load": None, "full": True}
        if res.get("peak_reset"):
            s["rss_after_load"] = res["peak"]  # high-water mark since the reset
            s["rss"] = max(res["peak"], res["setup"]["load_peak"])
        for b, runs in res["runs"].items():
            b = int(b)
            pre = np.array([m["prefill"] for m in runs])
            gen = np.array([m["generate"] for m in runs])
            s["full"] &= all(m["full"] for m in runs)
            for how, agg in (("median", np.median), ("best", np.min)):
                p, g = float(agg(pre)), float(agg(gen))
                s[(how, b)] = {"prefill": p, "generate": g, "tps": b * (N - 1) / (g - p)}
            first = res["first"][b]
            s[("compile", b)] = first["generate_first"] - float(np.median(gen))
            s[("compile_prefill", b)] = first["prefill_first"] - float(np.median(pre))

    lines = []
    out = lines.append
    m = results["machine"]
    fast_info = next((results["impls"][n]["info"] for n in names if n.startswith("fast")), {})
    hf_info = next((results["impls"][n]["info"] for n in names if n.startswith("hf")), {})
    ref_info = results["impls"].get("ref", {}).get("info", {})
    out(f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']:.1f} GB RAM, Python {m['python']}; "
        f"load average {results['loadavg']['start'][0]:.1f} at start, {results['loadavg']['end'][0]:.1f} at end.")
    if fast_info:
        out(f"fast: jax {fast_info['jax']} on {fast_info['devices']}, XLA_FLAGS={fast_info['XLA_FLAGS']!r} "
            f"(XLA's CPU thread pool: one thread per core), {fast_info['policy']}.")
        for n in names:
            if n.startswith("fast"):
                i = results["impls"][n]["info"]
                out(f"{n}: `paligemma.fast` from {i['fast_from']}, layer weights {i['layout']}.")
    if hf_info:
        out(f"transformers {hf_info['transformers']}, torch {hf_info['torch']}: {hf_info['torch_threads']} intra-op "
            f"threads, attn_implementation={hf_info['attn_implementation']!r}, float32, inference_mode.")
    if ref_info:
        out(f"ref: NumPy {ref_info['numpy']} with {ref_info['blas']}.")
    out(f"Limits (best of {len(floors)} rounds): memory copy {bw / 1e9:.1f} GB/s (read + write); float32 matmul "
        f"{mm_np / 1e9:.0f} GFLOP/s NumPy, {mm_jax / 1e9:.0f} GFLOP/s JAX (floor uses {mm / 1e9:.0f}).")
    out(f"Decode floor: {dbytes / 1e9:.2f} GB of float32 LLM weights per step / {bw / 1e9:.1f} GB/s = "
        f"{dbytes / bw * 1e3:.0f} ms per step; prefill floor: {pf[args.batches[0]] / 1e9:.0f} GFLOP (B={args.batches[0]}) "
        f"/ {mm / 1e9:.0f} GFLOP/s = {pf[args.batches[0]] / mm:.2f} s.")
    if all("read_bw" in f for f in floors):  # the stricter floor, beside the copy floor the table uses
        read = max(floors, key=lambda f: f["read_bw"])
        out(f"Read floor: the same {dbytes / 1e9:.2f} GB / {read['read_bw'] / 1e9:.1f} GB/s (best float32 matrix-vector "
            f"read over 1 GiB, {read['read_how']}) = {dbytes / read['read_bw'] * 1e3:.0f} ms per step "
            f"(bench/decode_rows.py uses it; the table's 'x decode floor' is the copy floor).")
    busy = [m["busy_before"] for res in results["impls"].values() for runs in res["runs"].values() for m in runs]
    out(f"Weights: {weight_bytes / 1e9:.2f} GB float32 in total. Medians of {args.rounds} interleaved rounds "
        f"(batch sizes > 1: {min(args.rounds, args.rounds_large)}); each measurement waited (<= {args.max_wait:.0f} s) "
        f"for other processes to use < {args.quiet:.0%} of the CPU: they used {np.median(busy):.0%} (median), "
        f"{max(busy):.0%} (max) of it just before.")
    out("")
    b1 = args.batches[0]
    head = f"| implementation | prefill B={b1} (s) | x prefill floor |"
    for b in args.batches:
        head += f" decode B={b} (tok/s) | x decode floor |"
    head += " peak RSS (GB) | peak after load (GB) | compile / first-call overhead (s) |"
    out(head)
    out("|" + "---|" * (head.count("|") - 1))
    for name in names:
        s = stats[name]
        row = f"| {name} | {s[('median', b1)]['prefill']:.2f} | {s[('median', b1)]['prefill'] / (pf[b1] / mm):.2f} |"
        for b in args.batches:
            tps = s[("median", b)]["tps"]
            row += f" {tps:.2f} | {(b / tps) / decode_floor(b):.2f} |"
        comp = ", ".join(f"B={b}: {s[('compile', b)]:.1f}" for b in args.batches)
        row += (f" {s['rss'] / 1e9:.2f} | {fmt(s['rss_after_load'] and s['rss_after_load'] / 1e9)} | {comp} |")
        out(row)
    row = f"| floor | {pf[b1] / mm:.2f} | 1.00 |"
    for b in args.batches:
        row += f" {b / decode_floor(b):.2f} | 1.00 |"
    row += f" {weight_bytes / 1e9:.2f} (weights) | | |"
    out(row)
    out("")
    out("Spread over rounds: prefill and generate times (min / median / max, s) and the decode rate of each "
        "round's own pair, B * (N - 1) / (generate - prefill) (min / median / max, tok/s):")
    out("")
    head = "| implementation |" + "".join(f" prefill B={b} | generate B={b} | decode B={b} per round |"
                                         for b in args.batches)
    out(head)
    out("|" + "---|" * (head.count("|") - 1))
    for name in names:
        row = f"| {name} |"
        for b in args.batches:
            runs = results["impls"][name]["runs"][b]
            pre = [m["prefill"] for m in runs]
            gen = [m["generate"] for m in runs]
            rates = [b * (N - 1) / (g - p) for p, g in zip(pre, gen) if g > p]
            spread = lambda v, d: f"{min(v):.{d}f} / {np.median(v):.{d}f} / {max(v):.{d}f}" if v else "-"  # noqa: E731
            row += f" {spread(pre, 2)} | {spread(gen, 2)} | {spread(rates, 2)} |"
        out(row)
    out("")
    out("Sanity (first calls, not timed): " + "; ".join(sanity) + ".")
    incomplete = [n for n in names if not stats[n]["full"]]
    out("Every timed generate produced all tokens (no EOS)." if not incomplete else
        f"WARNING: EOS ended some generations early in {incomplete}; decode rates are not comparable.")
    hf = next((n for n in names if n.startswith("hf")), None)
    if hf:
        out("")
        out("Targets:")
        for name in [n for n in names if n.startswith("fast")]:
            s, h = stats[name], stats[hf]
            speed = s[("median", b1)]["tps"] / h[("median", b1)]["tps"]
            floor_x = (1 / s[("median", b1)]["tps"]) / decode_floor(1)
            pre = h[("median", b1)]["prefill"] / s[("median", b1)]["prefill"]
            out(f"- {name} decode B={b1} vs {hf}: {speed:.2f}x (target >= 1.3: {'met' if speed >= 1.3 else 'NOT met'})")
            out(f"- {name} decode B={b1} vs decode floor: {floor_x:.2f}x the floor's time per token "
                f"(target <= 1.4: {'met' if floor_x <= 1.4 else 'NOT met'})")
            out(f"- {name} prefill B={b1} vs {hf}: {pre:.2f}x (target >= 1.2: {'met' if pre >= 1.2 else 'NOT met'})")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.json:
        serial = {k: v for k, v in results.items()}
        with open(args.json, "w") as f:
            json.dump(serial, f, indent=1, default=str)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-depth", type=int, default=3)
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16, help="prompt text tokens (BOS ... '\\n')")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rounds-large", type=int, default=3, help="rounds that also time batch sizes > 1")
    parser.add_argument("--impls", nargs="+", default=["ref", "fast", "fast-stacked", "fast-readme", "hf"],
                        choices=["ref", "fast", "fast-stacked", "fast-readme", "hf"])
    parser.add_argument("--hf-attn", nargs="+", default=["sdpa"], choices=["sdpa", "eager"],
                        help="transformers attention implementation(s); several run as separate workers")
    parser.add_argument("--fast-compute", default="float32", choices=["float32", "bfloat16"],
                        help="fast.Policy compute and cache dtype")
    parser.add_argument("--fast-variant", action="append", default=[], metavar="LABEL=PATH",
                        help="also run `fast` importing the `paligemma` package found in PATH (a patched copy)")
    parser.add_argument("--variant-impls", nargs="+", default=["fast"], choices=["fast", "fast-stacked", "fast-readme"],
                        help="the fast workers each --fast-variant runs")
    parser.add_argument("--quiet", type=float, default=0.25,
                        help="before each measurement, wait until other processes use less than this share of the CPU")
    parser.add_argument("--max-wait", type=float, default=90.0, help="longest wait for --quiet, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/paligemma-speed")
    parser.add_argument("--weights", default=None, help="HF directory (default: DIR/weights-hf, written if missing)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
