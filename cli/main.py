"""`paligemma generate`: load a checkpoint and a tokenizer, print the text for each (image, prompt).
(`paligemma finetune`: see cli/finetune.py; `paligemma launch`, several JAX processes: cli/launch.py.)

    paligemma generate --checkpoint model.npz --tokenizer tok.model --image cat.jpg --prompt "caption en"
    paligemma generate ... --image a.jpg --image b.jpg --prompt "caption en"      # one prompt, two images
    paligemma generate ... --impl ref --dtype float64 --top-k 40 --temperature 0.8 --show-tokens
    paligemma generate ... --dtype bfloat16 --mesh data=2,model=4                 # split over 8 devices
    paligemma generate ... --video clip.mp4 --frames 16 --stride 9 --prompt "caption en"   # cli/media.py
    paligemma generate ... --images a.jpg,b.jpg --prompt "caption en"             # two images, ONE prompt

Progress ("loading tokenizer", "loading checkpoint", "preparing parameters", "compiling",
"generating") goes to stderr: on a terminal as a live line completed with its time, otherwise
one line per finished stage; `--quiet` turns it off. User errors (bad arguments, missing or
unreadable files, a tokenizer that does not fit the checkpoint) exit with status 2 and one line
on stderr; `--debug` adds the traceback.
"""

import json
import sys
import traceback

from paligemma.options import QUANT_FORMATS

from .common import DTYPES, IMPLS, PREPROCESS, Parser, StatusLines, UsageError, check_file, positive_int
from .common import join_processes
from .tasks import add_arguments as add_task_arguments
from .tasks import check_arguments as check_task_arguments
from .tasks import task_outputs
from .media import add_arguments as add_media_arguments
from .media import check_arguments as check_media_arguments


def build_parser():
    """The argument parser of the `paligemma` command. Returns `argparse.ArgumentParser`."""
    parser = Parser(prog="paligemma", description="PaliGemma and PaliGemma 2 from the command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = commands.add_parser("generate", help="generate text for images and prompts",
                            description="Generate text for each (image, prompt) pair: equal numbers of "
                                        "--image and --prompt pair up in order; one of either goes with "
                                        "every one of the other.")
    g.add_argument("--checkpoint", required=True, metavar="PATH", help="big_vision .npz, .safetensors or HF dir")
    g.add_argument("--tokenizer", required=True, metavar="PATH", help="SentencePiece .model file")
    g.add_argument("--image", action="append", metavar="FILE", help="repeat for several (or --images, --video)")
    g.add_argument("--prompt", required=True, action="append", metavar="TEXT", help='e.g. "caption en"; repeatable')
    g.add_argument("--impl", choices=IMPLS, default="fast", help="JAX (compiled) or the NumPy reference")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="float64: --impl ref only")
    g.add_argument("--preprocess", choices=PREPROCESS, default="big_vision", help="image resize convention")
    g.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    g.add_argument("--seed", type=int, default=0, metavar="N")
    g.add_argument("--mesh", metavar="SPEC", help="split the model over devices, e.g. data=2,model=4 "
                                                   "(axes data, fsdp, model; docs/scaling.md)")
    s = g.add_argument_group("sampling (default greedy; --sampler or the convenience flags)")
    s.add_argument("--sampler", metavar="SPEC", help="greedy, temperature(t), top_k(k[, t]), nucleus(p[, t]), beam(n)")
    s.add_argument("--temperature", type=float, metavar="T")
    s.add_argument("--top-k", type=int, metavar="K")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling")
    s.add_argument("--beam", type=int, metavar="N", help="beam search with N beams")
    g.add_argument("--quantize", choices=QUANT_FORMATS, help="quantize the weights on load (a quick try; "
                   "`paligemma quantize` saves a file); docs/quantization.md")
    g.add_argument("--keep", default="", metavar="SPEC", help="with --quantize: vision,embedding,ends[=K] stay float")
    g.add_argument("--no-final-softcap", action="store_true", help="load with final_logits_softcap=None")
    g.add_argument("--show-tokens", action="store_true", help="also print generated ids and log-probabilities")
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_task_arguments(g)
    add_media_arguments(g)
    g.set_defaults(run=run_generate)
    from .finetune import add_parser as add_finetune

    add_finetune(commands, UsageError)
    from .parity import add_parser as add_parity
    add_parity(commands, UsageError)
    from .demo import add_parser as add_demo
    add_demo(commands, UsageError)
    from .quantize import add_parser as add_quantize
    add_quantize(commands, UsageError)
    from .evaluate import add_parser as add_evaluate
    add_evaluate(commands, UsageError)
    from .explain import add_parser as add_explain
    add_explain(commands, UsageError)
    from .plot import add_parser as add_plot
    add_plot(commands, UsageError)
    from .serve import add_parser as add_serve
    add_serve(commands, UsageError)
    from .launch import add_parser as add_launch
    add_launch(commands, UsageError)
    return parser


def sampler_spec(args):
    """The sampler spec string from `--sampler` or the convenience flags.

    Raises:
      UsageError for conflicting flags; ValueError (from `parse_sampler`) for bad values.
    """
    from paligemma.ref import parse_sampler

    given = {flag: value for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                             ("--top-p", args.top_p), ("--beam", args.beam)) if value is not None}
    if args.sampler is not None and given:
        raise UsageError(f"--sampler cannot be combined with {', '.join(given)}")
    if "--beam" in given and len(given) > 1:
        raise UsageError(f"--beam cannot be combined with {', '.join(f for f in given if f != '--beam')}")
    if "--top-k" in given and "--top-p" in given:
        raise UsageError("--top-k and --top-p cannot be combined; pick one")
    t = "" if args.temperature is None else f", {args.temperature!r}"
    if args.sampler is not None:
        spec = args.sampler
    elif args.top_k is not None:
        spec = f"top_k({args.top_k}{t})"
    elif args.top_p is not None:
        spec = f"nucleus({args.top_p!r}{t})"
    elif args.beam is not None:
        spec = f"beam({args.beam})"
    elif args.temperature is not None:
        spec = f"temperature({args.temperature!r})"
    else:
        spec = "greedy"
    parse_sampler(spec)  # reject bad values now, before the checkpoint is read
    return spec


def _check_inputs(args):
    """Checks counts and files before anything slow runs."""
    check_media_arguments(args, UsageError, check_file)
    n_images, n_prompts = len(args.image), len(args.prompt)
    if n_images > 1 and n_prompts > 1 and n_images != n_prompts:
        raise UsageError(f"{n_images} --image and {n_prompts} --prompt: give equal numbers, or one of either")
    if args.impl == "fast" and args.dtype == "float64":
        raise UsageError("--dtype float64 needs --impl ref (the JAX implementation runs float32 or bfloat16)")
    if args.mesh is not None:
        if args.impl != "fast":
            raise UsageError("--mesh needs --impl fast (the NumPy reference runs on the host)")
        from paligemma.fast import sharding

        sharding.parse_mesh(args.mesh, sharding.INFERENCE_AXES)  # a bad spec fails before the checkpoint is read
    check_file(args.checkpoint, "--checkpoint", directory_ok=True)
    check_file(args.tokenizer, "--tokenizer")
    check_task_arguments(args, UsageError, check_file)
    from paligemma.ref import load_image

    for path in [] if args.media else args.image:
        check_file(path, "--image")
        load_image(path)  # decode now (ImageError) rather than after a long checkpoint load


def _escape(text):
    """Text on one line: backslashes, newlines and tabs written as escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def print_results(pairs, results, show_tokens, as_json, out, extras=None):
    """Writes one entry per (image, prompt) pair.

    Args:
      pairs: [(image path, prompt)].
      results: the `Result`s, in the same order.
      show_tokens: add the generated ids and log-probabilities.
      as_json: one JSON object per line instead of text.
      out: the stream (stdout).
      extras: None, or per pair None or a dict (detect / segment objects, cli/tasks.py): merged
        into the JSON record, or printed as one JSON line after the text.
    """
    for (image, prompt), r, extra in zip(pairs, results, extras or [None] * len(pairs)):
        if as_json:
            record = {"image": image, "prompt": prompt, "text": r.text, "finished": r.finished}
            if show_tokens:
                record.update(tokens=r.tokens.tolist(), logprobs=[round(float(x), 6) for x in r.logprobs])
            out.write(json.dumps({**record, **(extra or {})}, ensure_ascii=False) + "\n")
            continue
        # One pair: the bare text. Several: image <TAB> prompt <TAB> text, one line each.
        out.write((r.text if len(pairs) == 1 else "\t".join(map(_escape, (image, prompt, r.text)))) + "\n")
        if show_tokens:
            out.write("  tokens: " + " ".join(str(int(i)) for i in r.tokens) + "\n")
            out.write("  logprobs: " + " ".join(f"{x:.4f}" for x in r.logprobs) + "\n")
        if extra is not None:
            out.write(json.dumps(extra, ensure_ascii=False) + "\n")


def run_generate(args):
    """The `generate` command. Returns the exit status."""
    spec = sampler_spec(args)
    _check_inputs(args)
    from paligemma.fast.pipeline import PaliGemma

    overrides = {"final_logits_softcap": None} if args.no_final_softcap else {}
    status = StatusLines(sys.stderr, enabled=not args.quiet)
    model = PaliGemma.load(args.checkpoint, args.tokenizer, impl=args.impl, dtype=args.dtype,
                           preprocess=args.preprocess, progress=status, mesh=args.mesh,
                           quantize=args.quantize, keep=args.keep, **overrides)
    images = args.image if len(args.image) > 1 else args.image[0]
    if args.media:  # --images / --video (cli/media.py)
        from .media import inputs
        images = inputs(args, model, sys.stderr)
    prompts = args.prompt if len(args.prompt) > 1 else args.prompt[0]
    results = model.generate(images, prompts, max_new_tokens=args.max_new_tokens, sampler=spec, seed=args.seed)
    results = results if isinstance(results, list) else [results]
    n = len(results)
    pairs = list(zip(args.image * n if len(args.image) == 1 else args.image,
                     args.prompt * n if len(args.prompt) == 1 else args.prompt))
    extras = task_outputs(pairs, results, args, sys.stderr)
    print_results(pairs, results, args.show_tokens, args.json, sys.stdout, extras)
    return 0


def main(argv=None):
    """Runs the command line `argv` (default `sys.argv[1:]`). Returns the exit status.

    0 success, 2 a user error (one line on stderr; the traceback too with `--debug`),
    130 interrupted. Unexpected failures propagate with their traceback.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its one line (or --help)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command != "launch":
            join_processes(args)  # several JAX processes: join before any device is touched
        return args.run(args)
    except (ValueError, OSError) as e:  # bad files, mismatched inputs, bad values: the user's to fix
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"paligemma {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"paligemma {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
