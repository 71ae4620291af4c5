"""A whole fine-tuning run: data, mesh, training loop, checkpoints, evaluation, log and export.

    from paligemma.fast.finetune import finetune, resume
    from paligemma.fast.train import TrainConfig
    summary = finetune("pt-224.npz", "tok.model", "train.jsonl", "out/", TrainConfig(steps=500),
                       val="val.jsonl")
    summary = resume("out/")             # after an interruption: same losses as without one

What lands in OUT: `run.json` (the arguments, for `resume`), `metrics.jsonl` (one JSON object per
logged step, `{"step", "loss", "grad_norm", "lr", "examples_per_s", "data_position"}`, and per
evaluation `{"step", "val_loss", "exact_match", "val_examples"}`, or the `eval_task`'s metrics with
"count" and "invalid" in place of "exact_match"), `checkpoints/` (see
`paligemma.fast.train_state`), and at the end `model.npz` and `model_hf/`: the trained weights
(LoRA merged) in float32, written by `paligemma.ref.save`.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from paligemma import ref
from paligemma.ref.params import flatten, tree_map

from . import data, sharding, train_state, vqvae
from .decode import generate
from .evaluate import score_answers, task_truths
from .pipeline import fit_vocab
from .train import TrainConfig, make_eval_step, make_optimizer, make_train_step, merged_params, schedule, split_params

@dataclasses.dataclass(frozen=True)
class Summary:
    """What a run did. losses: (step, loss) of every logged step of this process; evals: the
    evaluation records; files: what was written."""

    first_step: int
    last_step: int
    seconds: float
    compile_seconds: float
    examples_per_s: float
    losses: tuple
    evals: tuple
    skipped: dict
    files: dict


def _np_dtype(name):
    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[name]


def _write_run(out, record):
    path = os.path.join(out, "run.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def _trim_log(path, step):
    """Drops log records after `step` (written by an interrupted run after its last checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class _Log:
    def __init__(self, path):
        self.path = path

    def write(self, record):
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def evaluate(model_config, config, tokenizer, examples, trainable, frozen, eval_step, mesh, pool=None, root=None):
    """Validation loss (mean over examples) and the metric of the greedy answers: exact match
    (decoded text == suffix) by default, or `config.eval_task`'s (`paligemma.fast.evaluate`, the
    functions `paligemma evaluate` scores with; ground truths from the validation lines, "mask"
    paths relative to `root`).

    Returns:
      {"val_loss", "exact_match", "val_examples"}, or for a task {"val_loss", its metrics,
      "count", "invalid", "val_examples"}.
    """
    B = config.batch_size
    R = model_config.vision.image_size
    batch_sh = data.Batch(*(sharding.batch_sharding(mesh),) * 5)
    params = merged_params(trainable, frozen, config)
    policy = dataclasses.replace(config.policy, remat="none")
    prompt_len = max(len(tokenizer.prompt(p).tokens) for p in examples.prefixes)
    decode_len = int(examples.mask_loss.sum(axis=1).max())  # the longest target with its EOS
    truths = None if config.eval_task == "exact_match" else task_truths(examples, config.eval_task, root)
    losses, answers = [], []
    for indices, weight in data.eval_batches(examples, B):
        batch = data.make_batch(examples, indices, R, 1, weight, pool, config.video_frames, config.video_stride)
        per_example = sharding.to_host(eval_step(trainable, frozen, sharding.put_tree(batch, batch_sh)))[0]
        real = weight > 0
        losses += list(per_example[real])
        prompts = tokenizer.batch_prompts([examples.prefixes[i] for i in indices], text_len=prompt_len)
        out = generate(params, model_config, batch.images[0], *prompts, max_new_tokens=decode_len, policy=policy)
        texts = tokenizer.decode_generations(out.tokens)
        answers += [t for t, r in zip(texts, real) if r]
    if truths is None:
        metric = {"exact_match": sum(a == s for a, s in zip(answers, examples.suffixes)) / len(examples)}
    else:
        metric = score_answers(config.eval_task, answers, examples, truths, _vae_decoder(config.eval_vae))
    return {"val_loss": float(np.mean(losses)), **metric, "val_examples": len(examples)}


def _vae_decoder(path):
    """codes [n, 16] -> [n, 64, 64] with the VQ-VAE at `path` (None without one)."""
    if path is None:
        return None
    params = vqvae.load_vae(path)
    return lambda codes: vqvae.decode(params, codes)


def metric_text(record):
    """The evaluation's metric for a progress line: "exact match 50.0%" or "cider 0.8123 (1 invalid)"."""
    if "exact_match" in record and "invalid" not in record:
        return f"exact match {record['exact_match']:.1%}"
    skip = ("step", "val_loss", "val_examples", "count", "invalid")
    values = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in skip)
    return f"{values} ({record['invalid']} invalid)"


_COMPILED = {}  # the jitted step functions of runs in this process (a resumed run compiles nothing new)


def _compiled(model_config, config, mesh, trainable, frozen):
    """(optimizer, train step, eval step, shardings (trainable, opt state, frozen, batch)), cached."""
    signature = lambda tree: tuple((k, np.shape(v), str(np.asarray(v).dtype)) for k, v in flatten(tree).items())  # noqa: E731
    key = (model_config, config, mesh.devices.shape, tuple(d.id for d in mesh.devices.flat),
           signature(trainable), signature(frozen))
    if key not in _COMPILED:
        optimizer = make_optimizer(config)
        t_sh, f_sh = sharding.tree_shardings(mesh, trainable), sharding.tree_shardings(mesh, frozen)
        o_sh = sharding.tree_shardings(mesh, jax.eval_shape(optimizer.init, trainable))
        batch_sh = data.Batch(*(sharding.batch_sharding(mesh),) * 5)
        shardings = (t_sh, o_sh, f_sh, batch_sh)
        step_fn = make_train_step(model_config, config, optimizer, shardings, frozen)
        eval_fn = make_eval_step(model_config, config, (t_sh, f_sh, batch_sh))
        _COMPILED[key] = optimizer, step_fn, eval_fn, shardings
    return _COMPILED[key]


def _prepare(params, config):
    """Trainable (float32) and frozen (`frozen_dtype`) halves, as NumPy trees."""
    trainable, frozen = split_params(params, config)
    f32 = lambda x: np.asarray(x).astype(np.float32, copy=False)  # noqa: E731
    frozen_dtype = _np_dtype(config.frozen_dtype)
    return tree_map(f32, trainable), tree_map(lambda x: np.asarray(x).astype(frozen_dtype, copy=False), frozen)


def finetune(checkpoint, tokenizer, train, out, config: TrainConfig = TrainConfig(), val=None, image_root=None,
             skip_bad=False, resume=False, progress=True, on_step=None, export=("npz", "hf"), stream=None):
    """Fine-tunes a checkpoint on a JSONL file; see the module docstring for what is written.

    Args:
      checkpoint: base weights for `paligemma.ref.load`; tokenizer: SentencePiece path.
      train, val: JSONL files (`paligemma.fast.data`); image_root: folder image paths are relative to.
      out: the run's folder. config: `TrainConfig`. skip_bad: skip and count bad lines instead of
        stopping. resume: continue from the newest checkpoint in `out` (see `resume`).
      progress: tqdm bar and summary on `stream` (default stderr). on_step: `on_step(step, metrics)`
        after each step (tests interrupt a run with it). export: formats of the final weights.
    Returns:
      `Summary`.
    Raises:
      ValueError (incl. `data.DataError`) for bad inputs, before any training step.
    """
    stream = stream or sys.stderr
    out = os.path.abspath(out)
    ckpt_dir = os.path.join(out, "checkpoints")
    if not resume and train_state.latest(ckpt_dir):
        raise ValueError(f"{out}: already holds a run's checkpoints; resume it (--resume {out}) or pick another --out")
    tok = tokenizer if isinstance(tokenizer, ref.Tokenizer) else ref.Tokenizer(tokenizer)
    model_config, params = fit_vocab(*ref.load(checkpoint), tok)
    examples = data.load_examples(train, tok, config.text_len, image_root, skip_bad, video_frames=config.video_frames)
    val_examples = data.load_examples(val, tok, config.text_len, image_root, skip_bad,
                                      video_frames=config.video_frames) if val else None
    val_root = image_root or (val and os.path.dirname(os.path.abspath(val)))
    if val_examples and val_examples.frames != examples.frames:
        raise ValueError(f"{val}: its examples have {val_examples.frames} frames/images each but the training data's "
                         f"have {examples.frames} (None: one image); the model reads one layout")
    if val_examples and config.eval_task != "exact_match":
        task_truths(val_examples, config.eval_task, val_root)  # fail before training, not at the first evaluation
    skipped = {"train": len(examples.bad), "val": len(val_examples.bad) if val_examples else 0}
    for bad in examples.bad + (val_examples.bad if val_examples else ()):
        print(f"paligemma finetune: skipped {bad}", file=stream)
    mesh = sharding.make_mesh(sharding.parse_mesh(config.mesh))
    sharding.check_batch_size(mesh, config.batch_size, config.accum_steps)
    os.makedirs(out, exist_ok=True)
    writer = jax.process_index() == 0  # several processes: process 0 writes run.json, the log, checkpoints
    progress = progress and writer
    if not resume and writer:
        _write_run(out, {"checkpoint": os.path.abspath(checkpoint), "tokenizer": os.path.abspath(tok.name),
                         "train": os.path.abspath(train), "val": val and os.path.abspath(val),
                         "image_root": image_root and os.path.abspath(image_root), "skip_bad": skip_bad,
                         "config": dataclasses.asdict(config)})

    trainable, frozen = _prepare(params, config)
    del params
    optimizer, step_fn, eval_fn, (t_sh, o_sh, f_sh, batch_sh) = _compiled(model_config, config, mesh, trainable, frozen)
    start, log_path = 0, os.path.join(out, "metrics.jsonl")
    found = train_state.latest(ckpt_dir) if resume else None
    if found:
        opt_like = jax.eval_shape(optimizer.init, trainable)
        trainable, opt_state, state = train_state.load(found, trainable, opt_like)
        start = state["step"]
        opt_state = sharding.put_tree(opt_state, o_sh)
        if writer:
            _trim_log(log_path, start)
    trainable, frozen = sharding.put_tree(trainable, t_sh), sharding.put_tree(frozen, f_sh)
    if not found:
        opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(trainable)
        if os.path.exists(log_path) and writer:
            os.remove(log_path)
    lr_of = schedule(config)
    log = _Log(log_path)
    losses, evals, files = [], [], {"log": log_path}
    A, R = config.accum_steps, model_config.vision.image_size
    B = config.batch_size // A
    rows = sharding.process_rows(batch_sh.text, (A, B))  # the examples this process's devices take

    def run_eval(step):
        record = dict(step=step, **evaluate(model_config, config, tok, val_examples, trainable, frozen, eval_fn, mesh,
                                            root=val_root))
        log.write(record)
        evals.append(record)
        bar.write(f"step {step}: val_loss {record['val_loss']:.4f}, {metric_text(record)}")

    def save(step):
        files["checkpoint"] = train_state.save(ckpt_dir, step, trainable, opt_state, step * config.batch_size,
                                               {"mesh": config.mesh}, config.keep_checkpoints)

    t0 = time.perf_counter()
    compile_s, last, prev, timed = 0.0, t0, start, []
    bar = tqdm(total=config.steps, initial=start, disable=not progress, file=stream, unit="step", dynamic_ncols=True)
    prefetch = data.Prefetcher(examples, R, config.batch_size, A, config.seed, start, config.steps,
                               video_frames=config.video_frames, video_stride=config.video_stride, rows=rows)
    try:
        with prefetch:
            for step, batch in prefetch:
                batch = data.Batch(*(sharding.put_rows(x, rows, (A, B) + x.shape[2:], sh)
                                     for x, sh in zip(batch, batch_sh)))
                trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch)
                done = step + 1
                if done % config.log_every == 0 or done == config.steps or step == start:
                    metrics = {k: float(v) for k, v in metrics.items()}
                    now = time.perf_counter()
                    if step == start:
                        compile_s = now - last
                    else:
                        timed.append((now - last, done - prev))
                    last, prev = now, done
                    rate = config.batch_size * timed[-1][1] / timed[-1][0] if timed else 0.0
                    record = dict(step=done, **metrics, lr=float(lr_of(step)), examples_per_s=rate,
                                  data_position=done * config.batch_size)
                    log.write(record)
                    losses.append((done, metrics["loss"]))
                    bar.set_postfix_str(f"loss {metrics['loss']:.4f} lr {record['lr']:.2e} {rate:.1f} ex/s")
                bar.update(1)
                if on_step is not None:
                    on_step(done, metrics)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    save(done)
                if val_examples and config.eval_every and done % config.eval_every == 0:
                    run_eval(done)
        last_step = max(start, config.steps)
        if files.get("checkpoint") is None or not files["checkpoint"].endswith(f"{last_step:08d}"):
            save(last_step)
        if val_examples and not (evals and evals[-1]["step"] == last_step):
            run_eval(last_step)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    files.update(_export(out, model_config, merged_params(trainable, frozen, config), export))
    steady = sum(t for t, _ in timed)
    summary = Summary(start, config.steps, seconds, compile_s,
                      config.batch_size * sum(n for _, n in timed) / steady if steady else 0.0,
                      tuple(losses), tuple(evals), skipped, files)
    if progress:
        print(format_summary(summary), file=stream)
    return summary


def _export(out, model_config, params, formats):
    """The trained weights in float32 as `model.npz` / `model_hf/` (process 0 writes)."""
    params = tree_map(lambda x: x.astype(np.float32, copy=False), sharding.to_host(params))
    written = {}
    if jax.process_index() != 0:
        return written
    if "npz" in formats:
        written["npz"] = os.path.join(out, "model.npz")
        ref.save(written["npz"], model_config, params, overwrite=True)
    if "hf" in formats:
        written["hf"] = os.path.join(out, "model_hf")
        ref.save(written["hf"], model_config, params, format="hf", overwrite=True)
    return written


def format_summary(s: Summary):
    """The end-of-run summary, a few lines of text."""
    lines = [f"paligemma finetune: steps {s.first_step} -> {s.last_step} in {s.seconds:.1f} s "
             f"(first step incl. compilation {s.compile_seconds:.1f} s), {s.examples_per_s:.2f} examples/s"]
    if s.losses:
        tail = [loss for _, loss in s.losses[-10:]]
        lines.append(f"  training loss {s.losses[0][1]:.4f} (step {s.losses[0][0]}) -> {s.losses[-1][1]:.4f} "
                     f"(step {s.losses[-1][0]}); mean of the last {len(tail)} logged: {np.mean(tail):.4f}")
    for e in s.evals[-1:]:
        lines.append(f"  validation at step {e['step']}: loss {e['val_loss']:.4f}, {metric_text(e)} "
                     f"of {e['val_examples']}")
    if any(s.skipped.values()):
        lines.append(f"  skipped bad lines: train {s.skipped['train']}, val {s.skipped['val']}")
    lines += [f"  {name}: {path}" for name, path in s.files.items()]
    return "\n".join(lines)


def resume(out, progress=True, on_step=None, export=("npz", "hf"), stream=None, **changes):
    """Continues the run in folder `out` from its newest checkpoint, with the arguments it was
    started with (`run.json`); `changes` may raise `steps` (other settings must stay)."""
    path = os.path.join(os.path.abspath(out), "run.json")
    if not os.path.isfile(path):
        raise ValueError(f"{out}: no run.json, not a fine-tuning run folder")
    with open(path) as f:
        run = json.load(f)
    allowed = {"steps"}
    if set(changes) - allowed:
        raise ValueError(f"resume: only {sorted(allowed)} may change, got {sorted(changes)}")
    config = TrainConfig(**{**run["config"], **changes})
    if changes and jax.process_index() == 0:
        _write_run(out, dict(run, config=dataclasses.asdict(config)))
    return finetune(run["checkpoint"], run["tokenizer"], run["train"], out, config, val=run["val"],
                    image_root=run["image_root"], skip_bad=run["skip_bad"], resume=True, progress=progress,
                    on_step=on_step, export=export, stream=stream)


__all__ = ["finetune", "resume", "evaluate", "format_summary", "Summary"]
