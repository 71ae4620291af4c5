"""Continuous batching under load: `fast.engine` against one-at-a-time and static batches.

    python bench/engine_speed.py                     # the table in docs/serving.md
    python bench/engine_speed.py --requests 16 --slots 1 8

The model is `bench/generate_speed.py`'s reduced-depth 3B-224 harness (PaliGemma 3B-224's
widths and 257152-token vocabulary, `--vision-depth` ViT blocks, `--text-depth` Gemma layers,
float32, the same random weights, written once as an HF directory). `--requests` requests, each
an image of its own, a prompt of `--text-tokens` tokens and an answer length drawn from
4..64 (seeded; `max_new_tokens`, so every answer has exactly its length), greedy, are served by:

  engine S    `fast.engine.Engine` with S slots, (a) all offered at once, (b) offered at a
              steady rate (half of (a)'s request rate at 8 slots) from a client thread;
  sequential  `fast.generate`, one request at a time;
  static 8    `fast.generate` on batches of 8 in arrival order, each run to its longest answer;
  hf static 8 transformers' `generate` on the same batches (another process).

Reported: throughput (the requests' own tokens per second of wall time), time to first token
and time per output token (p50, p95; only a streaming server has them: for the others the
whole answer arrives at once), the engine's decode step with 8 active slots against the read
floor (the language model's float32 weights read once at the best bandwidth of a matrix-vector
product over 1 GiB, measured in the same run), and peak RSS against weights + KV cache: while
serving (after every program has compiled and run once) and while warming up.
Each system runs in its own process, one after another; the machine should be otherwise idle.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import ReadFloor, peak_rss, reset_peak, weights_read_seconds  # noqa: E402
from generate_speed import bench_config, ensure_weights  # noqa: E402

MARK = "@@engine@@ "


def make_requests(config, n, text_tokens, seed):
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    out = []
    for i in range(n):
        body = rng.integers(3, 256_000, text_tokens - 2)
        tokens = np.concatenate([[config.bos_id], body, [108]]).astype(np.int32)
        out.append((rng.uniform(-1, 1, (R, R, 3)).astype(np.float32), tokens, int(rng.integers(4, 65))))
    return out


def percentiles(values):
    return (float(np.percentile(values, 50)), float(np.percentile(values, 95))) if values else (None, None)


# --- The fast process: engine, sequential, static batches -----------------------------------


def fast_worker(args):
    import jax
    from paligemma import fast, ref
    from paligemma.fast import layout
    from paligemma.fast.engine import Engine, Request

    config = bench_config(args.vision_depth, args.text_depth)
    _, loaded = ref.load(args.weights)
    params = layout.for_platform(loaded)  # per-layer device buffers of their own, as fast.PaliGemma.load places them
    del loaded
    reset_peak()  # peak RSS from here on: the served model, not the loading
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    requests = make_requests(config, args.requests, args.text_tokens, args.seed)
    useful = sum(n for _, _, n in requests)
    results = {"weights_bytes": weights, "useful_tokens": useful, "rows": []}
    max_seq = config.vision.num_patches + args.text_tokens + 64

    # Time the decode steps: wrap the engine's step to record (active slots, seconds).
    steps = []
    original = Engine._decode_step

    def timed_step(self):
        active = sum(s is not None for s in self._active)
        t0 = time.perf_counter()
        original(self)
        steps.append((active, time.perf_counter() - t0))

    Engine._decode_step = timed_step
    admissions = []  # (requests admitted together, seconds)
    original_admit = Engine._admit_group

    def timed_admit(self, group):
        t0 = time.perf_counter()
        original_admit(self, group)
        admissions.append((len(group), time.perf_counter() - t0))

    Engine._admit_group = timed_admit

    def serve(slots, rate=None):
        engine = Engine(params, config, slots=slots, max_seq=max_seq).start()
        warm = engine.submit(Request(*requests[0][:2], None, 3))  # compiles decode and one admission shape
        warm.result()
        for size in engine.prefill_sizes:  # every admission size the run may use, compiled before timing
            streams = [engine.submit(Request(*requests[i % len(requests)][:2], None, 2)) for i in range(size)]
            [s.result() for s in streams]
        idle = engine.submit(Request(*requests[1][:2], None, 2))
        idle.result()
        idle_ttft = idle.first_token_at - idle.submitted
        warm_rss = peak_rss()  # so far: loading's end, compiling, the programs' first runs
        reset_peak()
        steps.clear()
        admissions.clear()
        t0 = time.perf_counter()
        streams = []
        for i, (image, tokens, n) in enumerate(requests):
            if rate is not None:
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            streams.append(engine.submit(Request(image, tokens, None, n)))
        done = [s.result() for s in streams]
        wall = time.perf_counter() - t0
        engine.stop()
        assert [len(c.tokens) for c in done] == [n for _, _, n in requests]
        ttft = [s.first_token_at - s.submitted for s in streams]
        tpot = [(s.finished_at - s.first_token_at) / (len(c.tokens) - 1) for s, c in zip(streams, done)
                if len(c.tokens) > 1]
        full = [t for a, t in steps if a == min(8, slots)]
        return dict(system=f"engine {slots}" + (" (b)" if rate else ""), wall=wall, tokens_per_s=useful / wall,
                    ttft=percentiles(ttft), tpot=percentiles(tpot), idle_ttft=idle_ttft,
                    step_full=float(np.median(full)) if full else None, rss=peak_rss(), warm_rss=warm_rss,
                    cache_bytes=2 * engine._cache.k.nbytes, programs=len(engine.prefill_sizes) + 1,
                    admit_s=sum(t for _, t in admissions), decode_s=sum(t for _, t in steps), steps=len(steps),
                    mean_active=float(np.mean([a for a, _ in steps])) if steps else None,
                    # the cheapest prefill per request this run saw (the largest admissions)
                    prefill_per_request=min(t / n for n, t in admissions) if admissions else None)

    rate = None
    for slots in args.slots:
        row = serve(slots)
        results["rows"].append(row)
        print(f"# {row['system']}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        if slots == 8:
            rate = 0.5 * len(requests) / row["wall"]
    if rate:
        row = serve(8, rate)
        row["rate"] = rate
        results["rows"].append(row)
    Engine._decode_step, Engine._admit_group = original, original_admit

    def run_generate(batch):
        images = np.stack([r[0] for r in batch])
        tokens = np.stack([r[1] for r in batch])
        return fast.generate(params, config, images, tokens, np.zeros_like(tokens), None,
                             max_new_tokens=max(r[2] for r in batch))

    for size, name in ((1, "sequential"), (8, "static 8")):
        batches = [requests[i:i + size] for i in range(0, len(requests), size)]
        # `fast.generate` compiles one program per (batch size, max_new_tokens): all of them before timing.
        for n in sorted({max(r[2] for r in batch) for batch in batches}):
            run_generate([(image, tokens, n) for image, tokens, _ in batches[0]])
        reset_peak()
        t0 = time.perf_counter()
        for batch in batches:
            run_generate(batch)
        wall = time.perf_counter() - t0
        results["rows"].append(dict(system=name, wall=wall, tokens_per_s=useful / wall, rss=peak_rss()))
        print(f"# {name}: {useful / wall:.1f} tokens/s", file=sys.stderr, flush=True)
    floor = ReadFloor()
    results["read_bw"], results["read_how"] = floor.measure(repeats=5)
    results["floor"] = weights_read_seconds(params, results["read_bw"])
    print(MARK + json.dumps(results))


def hf_worker(args):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    config = bench_config(args.vision_depth, args.text_depth)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(args.weights, dtype=torch.float32).eval()
    requests = make_requests(config, args.requests, args.text_tokens, args.seed)
    useful = sum(n for _, _, n in requests)
    P = config.vision.num_patches

    def run(batch):
        ids = np.stack([np.concatenate([np.full(P, model.config.image_token_id), r[1]]) for r in batch])
        inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                      token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                      pixel_values=torch.tensor(np.stack([r[0] for r in batch]).transpose(0, 3, 1, 2)))
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max(r[2] for r in batch), min_new_tokens=max(r[2] for r in batch),
                           do_sample=False, pad_token_id=config.pad_id)

    batches = [requests[i:i + 8] for i in range(0, len(requests), 8)]
    run(batches[0][:1])
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    wall = time.perf_counter() - t0
    print(MARK + json.dumps({"rows": [dict(system="hf static 8", wall=wall, tokens_per_s=useful / wall,
                                           rss=peak_rss())]}))


# --- The parent -----------------------------------------------------------------------------


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.2f}"


def _ms(x):
    return "-" if x is None else f"{1000 * x:.0f}"


def report(fast, hf, args):
    rows = fast["rows"] + hf.get("rows", [])
    by = {r["system"]: r for r in rows}
    seq, gb = by["sequential"]["tokens_per_s"], 1e9
    print(f"{args.requests} requests, answers 4-64 tokens ({fast['useful_tokens']} in all), prompt "
          f"{args.text_tokens} text tokens + 256 image tokens, greedy, float32; read floor "
          f"{1000 * fast['floor']:.0f} ms per step ({fast['read_bw'] / gb:.1f} GB/s, {fast['read_how']}); weights "
          f"{fast['weights_bytes'] / gb:.2f} GB")
    print("| system | wall s | tokens/s | x sequential | TTFT p50 / p95 ms | TPOT p50 / p95 ms | "
          "8-slot step / floor | peak RSS GB serving (weights + cache + 1) | peak RSS GB warming up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ttft = "-" if "ttft" not in r else f"{_ms(r['ttft'][0])} / {_ms(r['ttft'][1])} (idle {_ms(r['idle_ttft'])})"
        tpot = "-" if "tpot" not in r else f"{_ms(r['tpot'][0])} / {_ms(r['tpot'][1])}"
        step = "-" if not r.get("step_full") else f"{_ms(r['step_full'])} ms = {r['step_full'] / fast['floor']:.2f}x"
        budget = "" if "cache_bytes" not in r else f" ({(fast['weights_bytes'] + r['cache_bytes']) / gb + 1:.2f})"
        print(f"| {r['system']} | {r['wall']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / seq:.2f} | {ttft} | "
              f"{tpot} | {step} | {r['rss'] / gb:.2f}{budget} | {_gb(r.get('warm_rss'))} |")
    print("\n| engine | admitting s | decoding s | steps | mean active slots |\n|---|---|---|---|---|")
    for r in rows:
        if r.get("steps"):
            print(f"| {r['system']} | {r['admit_s']:.1f} | {r['decode_s']:.1f} | {r['steps']} | {r['mean_active']:.2f} |")
    if "engine 8" in by and by["engine 8"].get("step_full"):
        # What 8 slots could reach on this mix if every prefill cost its cheapest per-request time
        # and every step ran 8 rows at this run's 8-row cost: the engine's ceiling here.
        e, n = by["engine 8"], args.requests
        full_steps = -(-(fast["useful_tokens"] - n) // 8)  # each request's first token comes from its prefill
        bound = e["prefill_per_request"] * n + full_steps * e["step_full"]
        print(f"\nengine 8 ceiling on this mix: {n} x {e['prefill_per_request']:.3f} s prefill + "
              f"{full_steps} full steps x {_ms(e['step_full'])} ms = {bound:.1f} s = "
              f"{fast['useful_tokens'] / bound / seq:.2f}x sequential")
    if "hf static 8" in by and "engine 8" in by:
        print(f"engine 8 / hf static 8: {by['engine 8']['tokens_per_s'] / by['hf static 8']['tokens_per_s']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-depth", type=int, default=3)
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/paligemma-speed")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.weights = args.weights or os.path.join(args.dir, "weights-hf")
    if args.worker:
        return (fast_worker if args.worker == "fast" else hf_worker)(args)
    os.makedirs(args.dir, exist_ok=True)
    print(f"# weights: {ensure_weights(args, bench_config(args.vision_depth, args.text_depth))}", file=sys.stderr)
    out = {}
    for kind in ("fast",) + (() if args.no_hf else ("hf",)):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", kind] + [
            a for a in sys.argv[1:] if a != "--no-hf"] + ["--weights", args.weights]
        run = subprocess.run(argv, capture_output=True, text=True)
        line = next((x for x in run.stdout.splitlines() if x.startswith(MARK)), None)
        if line is None:
            sys.exit(f"{kind} worker failed:\n{run.stderr[-4000:]}")
        sys.stderr.write("".join(x + "\n" for x in run.stderr.splitlines() if x.startswith("#")))
        out[kind] = json.loads(line[len(MARK):])
    report(out["fast"], out.get("hf", {}), args)


if __name__ == "__main__":
    main()
