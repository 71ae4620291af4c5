"""`paligemma evaluate`: score a checkpoint on an eval JSONL the way the papers do.

    paligemma evaluate --checkpoint out/model.npz --tokenizer tok.model --data val.jsonl \\
        --task vqav2 --out eval/ [--batch-size 8] [--max-new-tokens 32]
    paligemma evaluate ... --task segment --vae vae-oid.npz           # masks need the VQ-VAE
    paligemma evaluate ... --mesh data=2,model=4                      # split over 8 devices (docs/scaling.md)

Greedy decoding in batches (a progress bar on stderr), then OUT/predictions.jsonl (one line
per example with its id) and OUT/metrics.json (the task's metric, "count" and "invalid": the
unparseable answers, scored 0). The JSONL layout per task is in docs/transfer.md and
`paligemma.ref.tasks.scoring`; the engine is `paligemma.fast.evaluate`. The metrics are printed as
one JSON line on stdout.
"""

import json
import os
import sys

from paligemma.options import CONVENTIONS, TASKS

from .common import DTYPES, IMPLS, PREPROCESS, StatusLines, check_file, positive_int


def add_parser(commands, usage_error):
    """Registers `evaluate` on the `paligemma` subcommands; `usage_error` is the CLI's UsageError."""
    from .media import DEFAULT_FRAMES, DEFAULT_STRIDE

    e = commands.add_parser("evaluate", help="score a checkpoint on an eval JSONL (caption, VQA, detect, segment)",
                            description="Batched greedy decoding of every line of --data, scored with the task's "
                                        "metric; writes OUT/predictions.jsonl and OUT/metrics.json.")
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="big_vision .npz, .safetensors or HF dir")
    e.add_argument("--tokenizer", required=True, metavar="PATH", help="SentencePiece .model file")
    e.add_argument("--data", required=True, metavar="JSONL", help="eval lines (docs/transfer.md)")
    e.add_argument("--task", required=True, choices=TASKS, help="which metric and ground-truth keys")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for predictions.jsonl and metrics.json")
    e.add_argument("--vae", metavar="PATH", help="mask VQ-VAE (.npz, vae-oid.npz layout): needed for --task segment")
    e.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    e.add_argument("--image-root", metavar="DIR", help="folder the JSONL's paths are relative to (default: its own)")
    e.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, metavar="F", help="frames per video line")
    e.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE, metavar="N", help="video frame stride")
    e.add_argument("--convention", choices=CONVENTIONS, default="big_vision", help="loc de-quantisation")
    e.add_argument("--impl", choices=IMPLS, default="fast")
    e.add_argument("--dtype", choices=DTYPES, default="float32", help="float64: --impl ref only")
    e.add_argument("--preprocess", choices=PREPROCESS, default="big_vision")
    e.add_argument("--mesh", metavar="SPEC", help="split the model and the batch over devices, e.g. data=2,model=4 "
                                                   "(docs/scaling.md)")
    e.add_argument("--quiet", action="store_true", help="no progress on stderr")
    e.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    e.set_defaults(run=lambda args: run_evaluate(args, usage_error))


def _vae_decoder(args):
    """codes [n, 16] -> [n, 64, 64] with the --vae decoder in the chosen implementation, or None."""
    if args.vae is None:
        return None
    if args.impl == "ref":
        from paligemma.ref import vqvae
        params = vqvae.load_vae(args.vae)
        return lambda codes: vqvae.decode(params, codes)
    from paligemma.fast import vqvae as fast_vqvae
    params = fast_vqvae.load_vae(args.vae)
    return lambda codes: fast_vqvae.decode(params, codes)


def run_evaluate(args, usage_error):
    """The `evaluate` command. Returns the exit status."""

    if args.impl == "fast" and args.dtype == "float64":
        raise usage_error("--dtype float64 needs --impl ref (the JAX implementation runs float32 or bfloat16)")
    if args.task == "segment" and args.vae is None:
        raise usage_error("--task segment needs --vae PATH (the mask VQ-VAE, e.g. big_vision's vae-oid.npz)")
    check_file(args.checkpoint, "--checkpoint", directory_ok=True)
    check_file(args.tokenizer, "--tokenizer")
    check_file(args.data, "--data")
    if args.vae is not None:
        check_file(args.vae, "--vae")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise usage_error(f"--out {args.out}: exists and is not a directory")
    if args.mesh is not None:
        if args.impl != "fast":
            raise usage_error("--mesh needs --impl fast (the NumPy reference runs on the host)")
        from paligemma.fast import sharding

        sharding.parse_mesh(args.mesh, sharding.INFERENCE_AXES)  # a bad spec fails before the checkpoint is read

    from paligemma.fast.evaluate import evaluate_file, read_eval
    from paligemma.fast.pipeline import PaliGemma

    read_eval(args.data, args.task, args.image_root, args.frames)  # bad lines fail before the checkpoint loads
    decode = _vae_decoder(args)
    status = StatusLines(sys.stderr, enabled=not args.quiet)
    model = PaliGemma.load(args.checkpoint, args.tokenizer, impl=args.impl, dtype=args.dtype,
                           preprocess=args.preprocess, progress=status, mesh=args.mesh)
    result = evaluate_file(model, args.data, args.task, args.out, args.batch_size, args.max_new_tokens, decode,
                           args.image_root, args.frames, args.stride, args.convention, progress=not args.quiet)
    sys.stdout.write(json.dumps({"task": args.task, **result.report.as_dict()}) + "\n")
    if not args.quiet:
        sys.stderr.write(f"paligemma evaluate: wrote {result.files['predictions']} and {result.files['metrics']}\n")
    return 0
