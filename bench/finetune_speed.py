"""Fine-tuning step throughput and peak memory: `paligemma.fast` vs transformers (+ PEFT LoRA), CPU.

    python bench/finetune_speed.py                                  # the table in docs/finetuning.md
    python bench/finetune_speed.py --modes lora --steps 3 --impls fast
    python bench/finetune_speed.py --weights /tmp/paligemma-speed/weights-hf   # reuse generate_speed's

The model has PaliGemma 3B-224's widths and vocabulary (SigLIP So400m/14 at 224 px, Gemma 2B,
vocabulary 257152) with `--vision-depth` ViT blocks and `--text-depth` Gemma layers; float32
random weights written once as an HF directory by `ref.save(format="hf")` (bench/generate_speed.py's
`ensure_weights`), loaded by `ref.load` for fast and `from_pretrained` for transformers: the same
weights on both sides.

One training step: batch 8 examples, an image each and 128 text tokens (`[BOS]` + 15 prefix ids +
"\\n" + 110 suffix ids + EOS, loss on the suffix and EOS), forward, backward and an AdamW update
(lr 1e-5, no warm-up, no weight decay) of the trainable parameters in float32. Modes: all,
no-vision (the vision tower and projection frozen), attention (only the language model's
attention weights), lora (rank 8, alpha 8, on the language model's q/k/v/o and gate/up/down projections), each with
and without remat (fast: `jax.checkpoint` per layer; transformers: `gradient_checkpointing_enable`).
The peer computes logits for the 128 text positions only (`logits_to_keep`) and big_vision's loss
in torch, as fast does, so both do the same arithmetic.

fast's loss never forms the [8, 128, 257152] logits (`paligemma.fast.xent`: vocabulary slabs,
custom VJP); the peer's does (transformers' forward returns them; 1.05 GB each for the logits,
their log-softmax and gradient).

Each (implementation, mode, remat) runs in its own process, one at a time (peak RSS = VmHWM of
that process, weights loading included): fast compiles ahead of time (timed apart), then
`--warmup` steps, then `--steps` timed steps; examples/s = 8 / median step time. The parent
records the 1-minute load average while each worker runs and stops a worker (by its pid) when the
machine's MemAvailable falls below `--min-available-gb`, so a mode that does not fit shows as
"stopped" instead of pushing a shared machine into the OOM killer.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from _machine import peak_rss as _rss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
MARK = "@@finetune-bench@@ "
MODES = ("all", "no-vision", "attention", "lora")
BATCH, TEXT_LEN, PREFIX, RANK = 8, 128, 16, 8


def make_batch(config, seed=0):
    """images [B, R, R, 3], text / mask_ar / mask_loss [B, TEXT_LEN + 1] in big_vision's layout."""
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    images = rng.uniform(-1, 1, (BATCH, R, R, 3)).astype(np.float32)
    n_suffix = TEXT_LEN + 1 - PREFIX - 1  # suffix ids + EOS fill the sequence
    text = np.concatenate([np.full((BATCH, 1), config.bos_id), rng.integers(3, 256_000, (BATCH, PREFIX - 1)),
                           np.full((BATCH, 1), 108), rng.integers(3, 256_000, (BATCH, n_suffix - 1)),
                           np.full((BATCH, 1), config.eos_id)], axis=1).astype(np.int32)
    mask = np.r_[np.zeros(PREFIX + 1), np.ones(n_suffix)].astype(np.int32)[None].repeat(BATCH, 0)  # +1: "\n"
    return images, text, mask, mask.copy()


def timed(step, warmup, steps):
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(float(step()))
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "step_s": float(np.median(times[warmup:])), "times": times, "losses": losses,
            "loss": losses[-1]}


def run_fast(args):
    import jax

    from paligemma import ref
    from paligemma.fast import data, train

    config, params = ref.load(args.weights)
    tc = train.TrainConfig(steps=1000, batch_size=BATCH, text_len=TEXT_LEN, lr=1e-5, warmup=0.0,
                           trainable=args.mode, lora_rank=RANK, lora_alpha=float(RANK), remat=args.remat,
                           clip_norm=None, keep_logits=args.keep_logits)
    trainable, frozen = train.split_params(params, tc)
    put = lambda tree: jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x, np.float32)), tree)  # noqa: E731
    trainable, frozen = put(trainable), put(frozen)
    del params
    _trim()
    optimizer = train.make_optimizer(tc)
    images, text, mask_ar, mask_loss = make_batch(config)
    batch = jax.device_put(data.Batch(images[None], text[None], mask_ar[None], mask_loss[None],
                                      np.ones((1, BATCH), np.float32)))
    # Compiled before the optimizer state exists, and the compiler's freed heap handed back to the
    # system: otherwise glibc keeps it (~1 GB) and it adds to every later step's resident memory.
    t0 = time.perf_counter()
    step_fn = train.make_train_step(config, tc, optimizer, frozen=frozen).lower(
        trainable, jax.eval_shape(optimizer.init, trainable), frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    _trim()
    state = {"t": trainable, "o": optimizer.init(trainable)}
    del trainable

    def step():
        state["t"], state["o"], metrics = step_fn(state["t"], state["o"], frozen, batch)
        return jax.block_until_ready(metrics["loss"])

    out = timed(step, args.warmup, args.steps)
    n = sum(x.size for x in jax.tree_util.tree_leaves(state["t"]))
    return dict(out, compile_s=compile_s, trainable_params=int(n), versions={"jax": jax.__version__})


def _trim():
    """glibc's malloc_trim(0): return freed heap pages to the system."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_hf(args):
    import torch
    import transformers

    from paligemma import ref

    transformers.logging.set_verbosity_error()
    config = ref.load(args.weights)[0]
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(args.weights, dtype=torch.float32)
    model.train()
    if args.remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        import peft
        lora = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, bias="none",
                               target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        model = peft.get_peft_model(model, lora)
    else:
        frozen = {"all": (), "no-vision": ("vision_tower", "multi_modal_projector")}.get(args.mode)
        for name, p in model.named_parameters():
            if frozen is not None:
                p.requires_grad_(not any(part in name for part in frozen))
            else:  # attention: only the language model's attention weights
                p.requires_grad_("language_model" in name and "self_attn" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    images, text, mask_ar, mask_loss = make_batch(config)
    P = config.vision.num_patches
    image_id = model.config.image_token_id
    ids = np.concatenate([np.full((BATCH, P), image_id), text[:, :-1]], axis=1)
    types = np.concatenate([np.zeros((BATCH, P)), mask_ar[:, :-1]], axis=1)
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                  token_type_ids=torch.tensor(types, dtype=torch.long),
                  pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)), logits_to_keep=TEXT_LEN)
    targets, weights = torch.tensor(text[:, 1:], dtype=torch.long), torch.tensor(mask_loss[:, 1:], dtype=torch.float32)

    def step():
        logits = model(**inputs).logits[..., :config.llm.vocab_size]  # [B, T, V]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        loss = (-(logp * weights).sum(-1) / weights.sum(-1).clamp(min=1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out = timed(step, args.warmup, args.steps)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    return dict(out, trainable_params=int(sum(p.numel() for p in trainable)), versions=versions)


def _meminfo():
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def run_worker(argv, min_available):
    """Runs one worker; stops it (its own process, by pid) if the machine's MemAvailable falls
    below `min_available` bytes, so a mode that does not fit cannot push a shared machine into
    swapping or the OOM killer. Returns (stdout, stderr, returncode, note, load averages seen)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err, note, loads = [], [], None, []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        avail = _meminfo()["MemAvailable"]
        loads.append(os.getloadavg()[0])
        if avail < min_available:
            note = f"stopped: machine MemAvailable {avail / 2**30:.1f} GiB < {min_available / 2**30:.1f} GiB"
            proc.kill()
            proc.wait()
            break
        time.sleep(0.5)
    for r in readers:
        r.join()
    return "".join(out), "".join(err), proc.returncode, note, loads


def worker(args):
    try:
        result = (run_fast if args.worker == "fast" else run_hf)(args)
        result["peak_rss"] = _rss()
    except BaseException as e:  # reported in the table, not fatal to the run
        result = {"error": f"{type(e).__name__}: {e}"}
    print(MARK + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", default=["fast", "hf"], choices=["fast", "hf"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--keep-logits", action="store_true",
                   help="fast: TrainConfig.keep_logits (matters where the embedding is trained: all, no-vision)")
    p.add_argument("--vision-depth", type=int, default=3)
    p.add_argument("--text-depth", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dir", default="/tmp/paligemma-finetune-speed")
    p.add_argument("--weights", help="HF directory of the bench model (default: written under --dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-available-gb", type=float, default=1.5,
                   help="stop a worker when the machine's MemAvailable falls below this")
    p.add_argument("--table-from", metavar="FILE",
                   help="only print the table of the JSON rows in FILE (results.json, or a run's stderr)")
    p.add_argument("--worker", choices=["fast", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--remat-on", dest="remat_flag", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.remat = args.remat_flag
        return worker(args)
    if args.table_from:
        with open(args.table_from) as f:
            text = f.read()
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return print(table(rows))

    from generate_speed import bench_config, ensure_weights, machine_info

    config = bench_config(args.vision_depth, args.text_depth)
    os.makedirs(args.dir, exist_ok=True)
    args.weights = args.weights or os.path.join(args.dir, "weights-hf")
    how = ensure_weights(args, config)
    print(f"{config.name}; weights {args.weights} ({how}); batch {BATCH}, text {TEXT_LEN}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; fast keep_logits={args.keep_logits}; "
          f"{machine_info()}", flush=True)
    rows = []
    for mode in args.modes:
        for remat in args.remat:
            for impl in args.impls:
                argv = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--mode", mode, "--weights",
                        args.weights, "--warmup", str(args.warmup), "--steps", str(args.steps)]
                argv += ["--remat-on"] if remat == "on" else []
                argv += ["--keep-logits"] if args.keep_logits else []
                t0 = time.perf_counter()
                used0 = _meminfo()
                stdout, stderr, rc, note, loads = run_worker(argv, args.min_available_gb * 2**30)
                line = next((x for x in stdout.splitlines() if x.startswith(MARK)), None)
                result = json.loads(line[len(MARK):]) if line else {"error": note or f"exit {rc}: {stderr[-300:]}"}
                result.update(impl=impl, mode=mode, remat=remat, wall_s=time.perf_counter() - t0,
                              load_avg_1m={"min": min(loads, default=None), "max": max(loads, default=None),
                                           "mean": float(np.mean(loads)) if loads else None},
                              others_used_gb=(used0["MemTotal"] - used0["MemAvailable"]) / 2**30)
                rows.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    with open(os.path.join(args.dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))


def table(rows):
    """Markdown: one line per (mode, remat), fast and the peer side by side."""
    by = {(r["impl"], r["mode"], r["remat"]): r for r in rows}
    lines = ["| mode | remat | trainable params | fast ex/s | peer ex/s | speed-up | fast peak RSS GiB | "
             "peer peak RSS GiB | peak ratio fast/peer | first-step loss fast / peer | fast compile s | load 1m |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rate = lambda r: BATCH / r["step_s"] if "step_s" in r else None  # noqa: E731
    gb = lambda r: r["peak_rss"] / 2**30 if "peak_rss" in r else None  # noqa: E731
    fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    first = lambda r: fmt(r["losses"][0], 4) if "losses" in r else "-"  # noqa: E731
    for mode, remat in dict.fromkeys((r["mode"], r["remat"]) for r in rows):
        f, h = by.get(("fast", mode, remat), {}), by.get(("hf", mode, remat), {})
        counts = sorted({r["trainable_params"] for r in (f, h) if "trainable_params" in r})
        params = " / ".join(f"{n:,}" for n in counts) or "-"
        loads = [r["load_avg_1m"]["mean"] for r in (f, h) if r.get("load_avg_1m", {}).get("mean") is not None]
        errors = " ".join(f"{name}: {r['error']}" for name, r in (("fast", f), ("peer", h)) if "error" in r)
        lines.append(f"| {mode} | {remat} | {params} | {fmt(rate(f), 3)} | {fmt(rate(h), 3)} | "
                     f"{fmt(ratio(rate(f), rate(h)))}x | {fmt(gb(f))} | {fmt(gb(h))} | {fmt(ratio(gb(f), gb(h)))} | "
                     f"{first(f)} / {first(h)} | {fmt(f.get('compile_s'), 1)} | "
                     f"{fmt(min(loads, default=None), 1)}-{fmt(max(loads, default=None), 1)} |"
                     + (f" {errors}" if errors else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
