"""`paligemma parity`: golden activation files, stage-by-stage checks of a port, and the self check.

    paligemma parity golden --checkpoint pt-224.npz --tokenizer tok.model --image cat.jpg --prompt "caption en" \\
        --out golden.npz
    paligemma parity golden --random --config tiny-paligemma2 --out golden.npz       # seeded weights and inputs
    paligemma parity golden --random --checkpoint pt-224.npz --out golden.npz        # real weights, seeded inputs
    paligemma parity check golden.npz theirs.npz [--dtype float32|bfloat16|float16|float64] [--json]
    paligemma parity self [--config tiny-paligemma2 ...] [--json]

`check` and `self` exit 0 when every stage is within tolerance, 1 when one is not (the table
marks the first), 2 for a usage error or an unreadable file. docs/porting.md walks through it.
"""

import json
import sys

from paligemma.options import CHECK_DTYPES

from .common import PREPROCESS, check_file


def add_parser(commands, usage_error):
    """Adds the `parity` subcommand (with `golden`, `check` and `self` under it) to `commands`."""
    p = commands.add_parser("parity", help="validate a port: golden activations, stage-by-stage checks",
                            description="Golden activation files from the float64 reference, stage-by-stage "
                                        "comparison of a port's activations with them, and the project's own "
                                        "ref-vs-fast check.")
    sub = p.add_subparsers(dest="parity_command", required=True, metavar="COMMAND")

    g = sub.add_parser("golden", help="write a golden .npz: inputs and every named activation in float64")
    g.add_argument("--checkpoint", metavar="PATH", help="big_vision .npz, .safetensors or HF dir")
    g.add_argument("--tokenizer", metavar="PATH", help="SentencePiece .model (with --image/--prompt)")
    g.add_argument("--image", metavar="FILE", help="the image (with --prompt)")
    g.add_argument("--prompt", metavar="TEXT", help='the prefix, e.g. "caption en"')
    g.add_argument("--suffix", metavar="TEXT", default="", help="a forced suffix (causal tokens)")
    g.add_argument("--preprocess", choices=PREPROCESS, default="big_vision", help="image resize convention")
    g.add_argument("--random", action="store_true", help="seeded random inputs (and weights, with --config)")
    g.add_argument("--config", metavar="NAME", help="a preset, for --random without --checkpoint")
    g.add_argument("--seed", type=int, default=0, metavar="N")
    g.add_argument("--batch", type=int, default=2, metavar="N", help="--random: examples")
    g.add_argument("--text-len", type=int, default=8, metavar="N", help="--random: text tokens per example")
    g.add_argument("--probs", action="store_true", help="also store every layer's attention probabilities")
    g.add_argument("--out", required=True, metavar="FILE", help="the .npz to write")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.set_defaults(run=lambda args: run_golden(args, usage_error))

    c = sub.add_parser("check", help="compare a port's activations with a golden, stage by stage")
    c.add_argument("golden", metavar="GOLDEN.npz")
    c.add_argument("theirs", metavar="THEIRS.npz", help="arrays under the stage names (any subset)")
    c.add_argument("--dtype", choices=CHECK_DTYPES, default="float32", help="what the port computes in")
    c.add_argument("--json", action="store_true", help="the report as one JSON object")
    c.set_defaults(run=run_check)

    s = sub.add_parser("self", help="paligemma.ref (float64) vs paligemma.fast (float32, XLA and Pallas interpret)")
    s.add_argument("--config", action="append", metavar="NAME", help="a preset; repeatable (default: every tiny one)")
    s.add_argument("--seed", type=int, default=0, metavar="N")
    s.add_argument("--json", action="store_true", help="the reports as one JSON object")
    s.set_defaults(run=lambda args: run_self(args, usage_error))
    for q in (g, c, s):
        q.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def run_golden(args, usage_error):
    """`parity golden`. Returns the exit status."""
    from paligemma.parity import golden

    named = [f"--{n}" for n in ("tokenizer", "image", "prompt") if getattr(args, n) is not None]
    if args.random:
        if named:
            raise usage_error(f"--random makes its own inputs; drop {', '.join(named)}")
        if (args.config is None) == (args.checkpoint is None):
            raise usage_error("--random needs exactly one of --config NAME (random weights) or --checkpoint PATH")
        if min(args.batch, args.text_len) < 1:
            raise usage_error(f"--batch and --text-len must be >= 1, got {args.batch} and {args.text_len}")
        if args.checkpoint:
            check_file(args.checkpoint, "--checkpoint", directory_ok=True)
        acts = golden.from_random(args.config, args.checkpoint, args.seed, args.batch, args.text_len, args.probs)
    else:
        missing = [f"--{n}" for n in ("checkpoint", "tokenizer", "image", "prompt") if getattr(args, n) is None]
        if missing:
            raise usage_error(f"missing {', '.join(missing)} (or --random)")
        if args.config:
            raise usage_error("--config goes with --random; a checkpoint brings its own config")
        check_file(args.checkpoint, "--checkpoint", directory_ok=True)
        check_file(args.tokenizer, "--tokenizer")
        check_file(args.image, "--image")
        acts = golden.from_checkpoint(args.checkpoint, args.tokenizer, args.image, args.prompt, args.suffix,
                                      args.preprocess, args.probs)
    golden.write(args.out, acts, overwrite=args.overwrite)
    names = acts.manifest["names"]
    print(f"wrote {args.out}: {len(names)} stages ({names[0]} ... {names[-1]}) and the inputs, "
          f"config {acts.manifest['config']['name']}")
    return 0


def run_check(args):
    """`parity check`. Returns 0 (pass), 1 (a stage out of tolerance) or raises for exit 2."""
    from paligemma.parity.compare import check

    report = check(args.golden, args.theirs, dtype=args.dtype)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.format_table())
    return 0 if report.ok else 1


def run_self(args, usage_error):
    """`parity self`. Returns 0 when every config passes with every attention implementation, else 1."""
    from paligemma.parity.self_check import TINY, self_check
    from paligemma.ref.config import PRESETS

    names = args.config or list(TINY)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise usage_error(f"--config: unknown preset {unknown[0]!r}; expected one of {sorted(PRESETS)}")
    results = []
    for name in names:
        for label, report in self_check(name, seed=args.seed):
            results.append((name, label, report))
            if not args.json:
                print(f"== {name}: {label}\n{report.format_table()}\n")
                sys.stdout.flush()
    ok = all(r.ok for _, _, r in results)
    if args.json:
        print(json.dumps({"ok": ok, "reports": [{"config": n, "run": label, **r.to_json()}
                                                for n, label, r in results]}, indent=1))
    else:
        print(f"parity self: {'PASS' if ok else 'FAIL'} ({sum(r.ok for _, _, r in results)} of {len(results)} runs)")
    return 0 if ok else 1
