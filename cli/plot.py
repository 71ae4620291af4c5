"""`paligemma plot`: redraw a fine-tuning run's loss.png from its metrics.jsonl.

    paligemma plot run/                      # -> run/loss.png
    paligemma plot run/ --out curves.png

Training loss, validation loss and metric, and learning rate against step (paligemma/viz/curves.py).
`paligemma finetune` draws the same picture at each checkpoint and at the end. Needs the `viz`
extra (matplotlib).
"""

import os


def add_parser(commands, usage_error):
    """Adds the `plot` subcommand to `commands` (argparse subparsers)."""
    p = commands.add_parser("plot", help="draw a fine-tuning run's curves (loss.png) from metrics.jsonl",
                            description=__doc__.splitlines()[0])
    p.add_argument("run_folder", metavar="RUN", help="the run folder (`paligemma finetune --out`)")
    p.add_argument("--out", metavar="FILE", help="where the PNG goes (default RUN/loss.png)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.set_defaults(run=lambda args: run_plot(args, usage_error))
    return p


def run_plot(args, usage_error):
    """The `plot` command. Returns the exit status."""
    if not os.path.isdir(args.run_folder):
        raise usage_error(f"RUN {args.run_folder}: no such folder")
    from paligemma.viz.curves import INSTALL_HINT, plot_run

    try:
        path = plot_run(args.run_folder, args.out)
    except ImportError:
        raise usage_error(f"matplotlib is not installed; {INSTALL_HINT}") from None
    print(path)
    return 0
