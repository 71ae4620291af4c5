"""`paligemma quantize`: write an int8 or int4 copy of a checkpoint as one safetensors file.

    paligemma quantize --checkpoint pt-224.npz --out pt-224-int8.safetensors --format int8
    paligemma quantize --checkpoint paligemma2-28b-pt-224/ --out 28b-int4.safetensors --format int4 \\
        --keep vision,embedding --scale-dtype bfloat16

The formats and the file are described in docs/quantization.md. Tensors are read, quantized
and written one slice at a time, so a bfloat16 checkpoint never needs its float32 size in memory.
"""

import os
import sys

from paligemma.options import QUANT_FORMATS, SCALE_DTYPES

from .common import StatusLines, check_file


def add_parser(commands, usage_error):
    """Adds the `quantize` subcommand to `commands` (argparse subparsers)."""
    q = commands.add_parser("quantize", help="write an int8 / int4 copy of a checkpoint (safetensors)",
                            description="Quantize a checkpoint's matmul weights: int8 per output channel or "
                                        "int4 in groups along the contracted axis (docs/quantization.md).")
    q.add_argument("--checkpoint", required=True, metavar="PATH", help="big_vision .npz, .safetensors or HF dir")
    q.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write")
    q.add_argument("--format", required=True, choices=QUANT_FORMATS)
    q.add_argument("--keep", default="none", metavar="SPEC",
                   help="weights left in their stored float dtype: none, or a comma list of vision, embedding, "
                        "ends (first and last LLM layer) or ends=K")
    q.add_argument("--group-size", type=int, default=128, metavar="G", help="int4 group size (even)")
    q.add_argument("--scale-dtype", choices=SCALE_DTYPES, default="float32")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--quiet", action="store_true", help="no summary on stderr")
    q.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    q.set_defaults(run=lambda args: run_quantize(args, usage_error))
    return q


def run_quantize(args, usage_error):
    """The `quantize` command. Returns the exit status."""
    from paligemma.ref.checkpoints.quantfile import quantize_file
    from paligemma.ref.quant import Keep

    check_file(args.checkpoint, "--checkpoint", directory_ok=True)
    if not args.out.endswith(".safetensors"):
        raise usage_error(f"--out {args.out}: expected a file name ending in .safetensors")
    if args.group_size < 2 or args.group_size % 2:
        raise usage_error(f"--group-size: expected an even integer >= 2, got {args.group_size}")
    try:
        keep = Keep.parse(args.keep)
    except ValueError as e:
        raise usage_error(f"--keep {args.keep}: {e}") from None
    status = StatusLines(sys.stderr, enabled=not args.quiet)
    with status(f"quantizing to {args.format}"):
        header = quantize_file(args.checkpoint, args.out, args.format, keep, args.group_size, args.scale_dtype,
                               overwrite=args.overwrite)
    if not args.quiet:
        print(f"paligemma quantize: wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, "
              f"{header.config.name}, {args.format}, keep {keep.label()})", file=sys.stderr)
    return 0
