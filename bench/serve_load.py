"""`paligemma serve` under load: requests/s and tokens/s of concurrent streaming clients against
one-at-a-time, with every answer checked against the answer that request gets alone.

    python bench/serve_load.py                                  # starts the demo model's server
    python bench/serve_load.py --clients 1 8 32 64 --seconds 20 --slots 16
    python bench/serve_load.py --url http://127.0.0.1:8000      # a server already running here

The requests: `--scenes` drawn scenes of shapes x {caption, detect, count} x `--seeds` seeds, half
greedy and half at temperature 0.8, `--max-tokens` each, all through POST /v1/generate with
stream=true. First every distinct request runs alone, one after another: that pass is the
one-at-a-time baseline, and its answers are the reference. Then for each client count, that
many closed-loop clients (after 5 untimed seconds at the largest count: compilations) (each sends its next request when its answer is complete) run for
`--seconds`; a level's requests/s and tokens/s count the answers completed in that time.
"wrong" counts answers that differ from the reference (mixed or lost); it must be 0.

Bounded by design: at most 64 clients, at most 60 s per level, 127.0.0.1 only; a server it
started is stopped with SIGTERM at the end.
"""

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

MAX_CLIENTS, MAX_SECONDS = 64, 60


def scene_url(seed):
    from PIL import Image

    from paligemma.ref.tasks import shapes

    scene = shapes.random_scene(np.random.default_rng(seed), **shapes.DEMO_SCENE)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), scene.shapes[0].kind


def requests(args):
    out = []
    for s in range(args.scenes):
        url, kind = scene_url(s)
        for prompt in ("caption en", f"detect {kind}", f"count {kind}s"):
            for seed in range(args.seeds):
                out.append({"image": url, "prompt": prompt, "max_tokens": args.max_tokens, "seed": seed,
                            "temperature": 0.8 if seed % 2 else 0, "stream": True})
    return out


async def ask(client, body):
    """(text, completion tokens, seconds to first token, seconds in all) of one streamed request."""
    t0, first, final = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter() - t0
            event = json.loads(line[6:])
            if event.get("done"):
                final = event
    return final["text"], final["usage"]["completion_tokens"], first, time.perf_counter() - t0


async def level(url, bodies, reference, clients, seconds):
    """Closed-loop clients for `seconds`: a dict of the row's numbers."""
    done, wrong, errors, tokens, ttft, latency = 0, 0, 0, 0, [], []
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def loop(c):
            nonlocal done, wrong, errors, tokens
            rng = random.Random(c)
            while time.perf_counter() < stop_at:
                i = rng.randrange(len(bodies))
                try:
                    text, n, first, total = await ask(client, bodies[i])
                except Exception:  # counted; the benchmark goes on
                    errors += 1
                    continue
                if time.perf_counter() <= stop_at:
                    done, tokens = done + 1, tokens + n
                    wrong += text != reference[i]
                    ttft.append(first)
                    latency.append(total)
        t0 = time.perf_counter()
        await asyncio.gather(*[loop(c) for c in range(clients)])
        elapsed = min(time.perf_counter() - t0, seconds)
    return {"clients": clients, "requests": done, "req/s": done / elapsed, "tokens/s": tokens / elapsed,
            "p50 ttft ms": 1000 * float(np.median(ttft)) if ttft else float("nan"),
            "p50 latency ms": 1000 * float(np.median(latency)) if latency else float("nan"),
            "wrong": wrong, "errors": errors}


async def alone(url, bodies):
    """Each request by itself, one after another: (reference texts, the baseline row)."""
    texts, tokens = [], 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await ask(client, bodies[0])  # nothing timed runs a first shape
        t0 = time.perf_counter()
        for body in bodies:
            text, n, _, _ = await ask(client, body)
            texts.append(text)
            tokens += n
        elapsed = time.perf_counter() - t0
    return texts, {"clients": "alone", "requests": len(bodies), "req/s": len(bodies) / elapsed,
                   "tokens/s": tokens / elapsed, "p50 ttft ms": float("nan"), "p50 latency ms": 1000 * elapsed / len(bodies),
                   "wrong": 0, "errors": 0}


def start_server(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "paligemma.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--quiet",
           "--slots", str(args.slots), "--queue", "256"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint, "--tokenizer", args.tokenizer]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"paligemma serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("paligemma serve did not start in 300 s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server on 127.0.0.1 (default: start the demo model's)")
    p.add_argument("--checkpoint"), p.add_argument("--tokenizer")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    if max(args.clients) > MAX_CLIENTS or min(args.clients) < 1 or not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--clients 1..{MAX_CLIENTS} and --seconds up to {MAX_SECONDS}")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        p.error("--url: this benchmark talks to 127.0.0.1 only")
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        bodies = requests(args)
        reference, baseline = asyncio.run(alone(url, bodies))
        asyncio.run(level(url, bodies, reference, max(args.clients), 5))  # compiles what a burst needs, untimed
        rows = [baseline] + [asyncio.run(level(url, bodies, reference, c, args.seconds)) for c in args.clients]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"\npaligemma serve, {args.slots} slots, {len(bodies)} distinct requests of up to {args.max_tokens} "
          f"tokens, {os.cpu_count()} CPUs; speedup = tokens/s over one-at-a-time\n")
    head = ["clients", "requests", "req/s", "tokens/s", "speedup", "p50 ttft ms", "p50 latency ms", "wrong", "errors"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        r["speedup"] = r["tokens/s"] / baseline["tokens/s"]
        cells = [r[h] if isinstance(r[h], (int, str)) else f"{r[h]:.2f}" if h in ("req/s", "speedup") else f"{r[h]:.0f}"
                 for h in head]
        print("| " + " | ".join(map(str, cells)) + " |")
    return 1 if any(r["wrong"] or r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
