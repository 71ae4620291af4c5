"""`paligemma finetune`: fine-tune a checkpoint on JSON Lines data, or resume such a run.

    paligemma finetune --checkpoint pt-224.npz --tokenizer tok.model --train train.jsonl --val val.jsonl \\
        --out run/ --steps 500 --batch-size 32 --lr 1e-5 --trainable no-vision [--mesh data=2,fsdp=4]
    paligemma finetune --resume run/ [--steps 800]

Training flags left out take `paligemma.fast.train.TrainConfig`'s defaults. `--resume DIR`
continues from DIR's newest checkpoint with the settings DIR/run.json recorded (only `--steps`
may be raised). A tqdm bar shows step, loss, learning rate and examples/s on stderr, a summary
follows at the end; `--quiet` turns both off. `loss.png`, the training curves (`paligemma plot`),
is drawn into the run folder at each checkpoint and at the end. Bad data lines stop the run before
training with their `file:line` (exit 2) unless `--skip-bad-lines`.
"""

import json
import os
import sys

from paligemma.options import EVAL_TASKS, FAST_DTYPES, OPTIMIZERS, TRAINABLE
from paligemma.viz.curves import draw_quietly

from .common import check_file

# (flag, TrainConfig field, type, help); every one defaults to None = TrainConfig's default.
_FLAGS = [
    ("--steps", "steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "examples per step"),
    ("--text-len", "text_len", int, "text tokens the model reads (big_vision's text_len)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--optimizer", "optimizer", str, "adamw or sgd"),
    ("--momentum", "momentum", float, "sgd momentum"),
    ("--weight-decay", "weight_decay", float, "AdamW decoupled weight decay"),
    ("--warmup", "warmup", float, "fraction of the steps spent warming up"),
    ("--clip-norm", "clip_norm", float, "global gradient-norm clip"),
    ("--label-smoothing", "label_smoothing", float, "big_vision's label smoothing epsilon"),
    ("--trainable", "trainable", str, "all, no-vision, attention or lora"),
    ("--lora-rank", "lora_rank", int, "LoRA rank"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (scale alpha / rank; default the rank)"),
    ("--remat", "remat", bool, "recompute layers in the backward pass"),
    ("--keep-logits", "keep_logits", bool, "with a trained embedding, hold the loss's logits (tokens x vocabulary "
                                           "x 4 bytes) for the backward pass instead of recomputing them"),
    ("--dtype", "compute_dtype", str, "compute dtype: float32 or bfloat16"),
    ("--frozen-dtype", "frozen_dtype", str, "dtype frozen parameters are kept in"),
    ("--accum-steps", "accum_steps", int, "gradient accumulation: micro-batches per step"),
    ("--mesh", "mesh", str, "device mesh, e.g. data=2,fsdp=4"),
    ("--seed", "seed", int, "data order and adapter initialisation"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between training checkpoints (0: at the end)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "training checkpoints kept"),
    ("--eval-every", "eval_every", int, "steps between evaluations (0: at the end)"),
    ("--log-every", "log_every", int, "steps between logged losses"),
    ("--video-frames", "video_frames", int, "frames sampled from each \"video\" line (default 16)"),
    ("--video-stride", "video_stride", int, "stride between sampled video frames (default 9)"),
    ("--eval-task", "eval_task", str, "validation metric: exact_match (default) or a `paligemma evaluate` task"),
    ("--eval-vae", "eval_vae", str, "mask VQ-VAE .npz for --eval-task segment"),
]
# From paligemma.options (as paligemma.fast.train's are), so that `--help` needs no jax import.
_CHOICES = {"--optimizer": OPTIMIZERS, "--trainable": TRAINABLE, "--dtype": FAST_DTYPES, "--frozen-dtype": FAST_DTYPES,
            "--eval-task": EVAL_TASKS}


def add_parser(commands, usage_error):
    """Adds the `finetune` subcommand to `commands` (argparse subparsers)."""
    f = commands.add_parser("finetune", help="fine-tune on JSON Lines data (or --resume a run)",
                            description="Fine-tune a checkpoint on JSON Lines data: one "
                                        '{"image": ..., "prefix": ..., "suffix": ...} per line, image paths '
                                        "relative to the file (or --image-root).")
    f.add_argument("--checkpoint", metavar="PATH", help="base weights: big_vision .npz, .safetensors or HF dir")
    f.add_argument("--tokenizer", metavar="PATH", help="SentencePiece .model file")
    f.add_argument("--train", metavar="JSONL", help="training data")
    f.add_argument("--val", metavar="JSONL", help="validation data (loss and greedy exact match)")
    f.add_argument("--out", metavar="DIR", help="run folder: log, checkpoints, final weights")
    f.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    f.add_argument("--image-root", metavar="DIR", help="folder image paths are relative to")
    f.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad data lines instead of stopping")
    for flag, _, kind, text in _FLAGS:
        if kind is bool:  # a switch: None (the config's default) unless given
            f.add_argument(flag, action="store_true", default=None, help=text)
        elif flag in _CHOICES:
            f.add_argument(flag, choices=_CHOICES[flag], help=text)
        else:
            f.add_argument(flag, type=kind, metavar=kind.__name__.upper(), help=text)
    f.add_argument("--no-export", action="store_true", help="skip writing model.npz and model_hf/ at the end")
    f.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    f.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    f.set_defaults(run=lambda args: run_finetune(args, usage_error))
    return f


def _given(args):
    fields = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in _FLAGS}
    return {k: v for k, v in fields.items() if v is not None}


def run_finetune(args, usage_error):
    """The `finetune` command. Returns the exit status."""

    given = _given(args)
    export = () if args.no_export else ("npz", "hf")
    if args.resume:
        named = [f"--{n}" for n in ("checkpoint", "tokenizer", "train", "val", "out", "image_root")
                 if getattr(args, n) is not None]
        flags = {field: flag for flag, field, _, _ in _FLAGS}
        others = sorted(flags[k] for k in set(given) - {"steps"})
        if named or others or args.skip_bad_lines:
            raise usage_error(f"--resume takes the run's recorded settings; only --steps may be given "
                              f"(got {', '.join(named + others) or '--skip-bad-lines'})")
        from paligemma.fast.finetune import resume

        resume(args.resume, progress=not args.quiet, export=export, **given,
               on_step=_draw_at_checkpoints(args.resume, _recorded_checkpoint_every(args.resume)))
        _draw(args.resume)  # loss.png at the end
        return 0
    missing = [f"--{n}" for n in ("checkpoint", "tokenizer", "train", "out") if getattr(args, n) is None]
    if missing:
        raise usage_error(f"missing {', '.join(missing)} (or --resume DIR)")
    check_file(args.checkpoint, "--checkpoint", directory_ok=True)
    check_file(args.tokenizer, "--tokenizer")
    check_file(args.train, "--train")
    if args.val:
        check_file(args.val, "--val")
    from paligemma.fast.finetune import finetune
    from paligemma.fast.train import TrainConfig

    config = TrainConfig(**given)
    finetune(args.checkpoint, args.tokenizer, args.train, args.out, config, val=args.val, image_root=args.image_root,
             skip_bad=args.skip_bad_lines, progress=not args.quiet, export=export, stream=sys.stderr,
             on_step=_draw_at_checkpoints(args.out, config.checkpoint_every))
    _draw(args.out)  # loss.png at the end
    return 0


def _draw(out):
    """OUT/loss.png, drawn by the process that writes files (process 0 of several)."""
    from paligemma.fast.distributed import is_writer

    if is_writer():
        draw_quietly(out, sys.stderr)


def _draw_at_checkpoints(out, every):
    """An `on_step` that draws OUT/loss.png (paligemma/viz/curves.py) at each checkpoint step; a
    failure to draw only warns, it never stops training."""

    def on_step(step, metrics):
        if every and step % every == 0:
            _draw(out)

    return on_step


def _recorded_checkpoint_every(run):
    """The checkpoint interval run/run.json recorded (0 if unreadable: `resume` reports that)."""
    try:
        with open(os.path.join(run, "run.json")) as f:
            return int(json.load(f)["config"]["checkpoint_every"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
