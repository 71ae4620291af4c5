"""Fine-tuning as one JAX process or several on this machine: wall time and steady step time.

    python bench/multiprocess.py                       # the table in docs/scaling.md
    python bench/multiprocess.py --steps 40 --layouts 1x8,2x4,4x2

The same `paligemma finetune --mesh data=2,fsdp=4` (tiny PaliGemma 2, 16 examples, batch 8,
float32, no export) as 1 process with 8 virtual CPU devices and through `paligemma launch` as P
processes x D devices (gloo collectives over 127.0.0.1). "step ms" is the median over the steps
after the first two of 1000 x batch / examples_per_s from metrics.jsonl (written by process 0);
"wall s" the whole command, start-up and compilation included. The 1-minute load average is
recorded: on a shared machine the numbers move with it. This measures the overhead of
cross-process collectives on one host's CPU cores, not a pod's interconnect.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from paligemma import ref

MESH, BATCH = "data=2,fsdp=4", 8


def build(folder):
    """Tokenizer, tiny base checkpoint and 16 image-caption lines in `folder`."""
    tok = ref.train_tiny_tokenizer(os.path.join(folder, "tok.model"))
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(os.path.join(folder, "base.npz"), config, ref.init_params(config, seed=0))
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"image": f"{i}.png", "prefix": "caption en", "suffix": f"a picture {i % 4}"}) + "\n")


def run(folder, processes, devices, steps):
    out = os.path.join(folder, f"run-{processes}x{devices}")
    args = ["finetune", "--checkpoint", os.path.join(folder, "base.npz"), "--tokenizer", os.path.join(folder, "tok.model"),
            "--train", os.path.join(folder, "train.jsonl"), "--out", out, "--mesh", MESH, "--steps", str(steps),
            "--batch-size", str(BATCH), "--text-len", "16", "--no-export", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PALIGEMMA_", "XLA_FLAGS"))}
    env["JAX_PLATFORMS"] = "cpu"
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        argv = [sys.executable, "-m", "paligemma.cli", *args]
    else:
        argv = [sys.executable, "-m", "paligemma.cli", "launch", "--processes", str(processes),
                "--devices-per-process", str(devices), "--", *args]
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [r["examples_per_s"] for r in map(json.loads, f) if "loss" in r and r["step"] > 2]
    return wall, 1000 * BATCH / float(np.median(rates)), os.getloadavg()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layouts", default="1x8,2x4", help="processes x devices each, comma-separated")
    args = parser.parse_args(argv)
    print("| processes x devices | mesh | steps | wall s | step ms | load avg |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        for layout in args.layouts.split(","):
            processes, devices = map(int, layout.split("x"))
            wall, step_ms, load = run(folder, processes, devices, args.steps)
            print(f"| {processes} x {devices} | {MESH} | {args.steps} | {wall:.1f} | {step_ms:.0f} | {load:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
