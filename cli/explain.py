"""`paligemma explain`: where each answer token looked, the attention mask, a page to explore them.

    paligemma explain --image scene.png --prompt "caption en"              # the embedded demo model
    paligemma explain --image scene.png --prompt "detect circle" --layer all --out explain-out
    paligemma explain --checkpoint pt-224.npz --tokenizer tok.model --image cat.jpg \\
                      --prompt "caption en" --layer 12 --head 3

The answer is generated greedily by the NumPy reference (float64 unless --dtype float32), which
records every attention probability; OUT gets mask.png, one token_NN.png per answer token, strip.png,
index.html (open it in a browser, no server needed) and the arrays behind them (.npz).
See paligemma/viz/explain.py for the list of files.
"""

import sys

from .common import check_file, model_files, positive_int


def add_parser(commands, usage_error):
    """Adds the `explain` subcommand to `commands` (argparse subparsers)."""
    e = commands.add_parser("explain", help="draw where each answer token looked, and the attention mask",
                            description=__doc__.splitlines()[0])
    e.add_argument("--checkpoint", metavar="PATH", help="default: the embedded demo model")
    e.add_argument("--tokenizer", metavar="PATH", help="default: the embedded demo tokenizer")
    e.add_argument("--vae", metavar="PATH", help="mask VQ-VAE for segment prompts; default with the demo model: its VAE")
    e.add_argument("--image", required=True, metavar="FILE")
    e.add_argument("--prompt", required=True, metavar="TEXT", help='e.g. "caption en", "detect circle"')
    e.add_argument("--out", default="explain-out", metavar="DIR", help="where the pictures and the page go")
    e.add_argument("--layer", default="-1", metavar="L|all", help="language-model layer to show (default -1: the last)")
    e.add_argument("--head", default="mean", metavar="N|mean", help="query head to show (default: the mean over heads)")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    e.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="the reference's dtype; float32 halves the memory for big checkpoints")
    e.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    e.set_defaults(run=lambda args: run_explain(args, usage_error))
    return e


def run_explain(args, usage_error):
    """The `explain` command. Returns the exit status."""
    checkpoint, tokenizer, vae = model_files(args)
    check_file(args.image, "--image")
    if args.layer != "all" and not args.layer.lstrip("-").isdigit():
        raise usage_error(f"--layer: expected a layer number or 'all', got {args.layer!r}")
    if args.head != "mean" and not args.head.isdigit():
        raise usage_error(f"--head: expected a head number or 'mean', got {args.head!r}")
    from paligemma.ref import load_image
    from paligemma.viz.attention import parse_head, parse_layer
    from paligemma.viz.explain import explain_image, load_model, token_text, write_explanation

    load_image(args.image)  # a bad image fails before the checkpoint is read
    model = load_model(checkpoint, tokenizer, vae, args.dtype)
    parse_layer(args.layer, model.config.llm.depth)  # range checks before the answer is generated
    parse_head(args.head, model.config.llm.num_heads)
    ex, rgb = explain_image(model, args.image, args.prompt, args.max_new_tokens)
    files = write_explanation(args.out, model, ex, rgb, args.prompt, args.layer, args.head)
    print(model.tokenizer.decode(ex.answer))
    pieces = " | ".join(token_text(model.tokenizer, i) for i in ex.answer)
    print(f"{len(ex.answer)} answer tokens: {pieces}", file=sys.stderr)
    print(f"{len(files)} files in {args.out}; open {files['index.html']}", file=sys.stderr)
    return 0
