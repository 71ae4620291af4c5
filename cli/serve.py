"""`paligemma serve`: an HTTP server with an OpenAI-compatible API and a page to try it (docs/serving.md).

    paligemma serve                                   # the embedded demo model on http://127.0.0.1:8000/
    paligemma serve --checkpoint pt-224.npz --tokenizer tok.model --vae vae-oid.npz --dtype bfloat16 \\
                    --slots 16 --port 8080

With no --checkpoint it serves the embedded demo model (and its mask VAE), so it works on a fresh
machine. The model compiles (warm-up requests) before the port opens, so the first clients do
not wait for compilation. SIGTERM (or Ctrl-C) stops accepting connections, finishes
the requests in flight and exits 0.
"""

import signal
import sys

from .common import StatusLines, model_files, positive_int

DEMO_ID = "paligemma-demo"


def add_parser(commands, usage_error):
    """Adds the `serve` subcommand to `commands` (argparse subparsers)."""
    s = commands.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API and a web page)",
                            description=__doc__.splitlines()[0])
    s.add_argument("--checkpoint", metavar="PATH", help="default: the embedded demo model")
    s.add_argument("--tokenizer", metavar="PATH", help="default: the embedded demo tokenizer")
    s.add_argument("--vae", metavar="PATH", help="mask VQ-VAE for segment masks; default with the demo model: its VAE")
    s.add_argument("--model-name", metavar="NAME", help="the id clients name (default: the checkpoint's file name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=positive_int, default=8, metavar="N", help="requests decoded together")
    s.add_argument("--max-seq", type=positive_int, metavar="N", help="tokens per slot (image + prompt + answer)")
    s.add_argument("--queue", type=positive_int, default=64, metavar="N",
                   help="requests that may wait for a slot; more get 429 with Retry-After")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--quantize", choices=("int8", "int4"), help="quantize the weights on load")
    s.add_argument("--mesh", metavar="SPEC", help="split the model over devices, e.g. data=2,model=4")
    s.add_argument("--max-image-bytes", type=positive_int, default=10 * 2**20, metavar="N",
                   help="largest encoded image accepted (default 10 MiB)")
    s.add_argument("--max-image-pixels", type=positive_int, default=50_000_000, metavar="N",
                   help="images with more pixels are refused from their header (decompression bombs)")
    s.add_argument("--max-images", type=positive_int, default=8, metavar="N", help="images per request")
    s.add_argument("--max-tokens", type=positive_int, default=1024, metavar="N", help="largest max_tokens accepted")
    s.add_argument("--warm-up", choices=("all", "first", "none"), default="all",
                   help="compile before listening: every prefill batch size (all), one request (first), none")
    s.add_argument("--quiet", action="store_true", help="no progress or request log on stderr")
    s.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    s.set_defaults(run=lambda args: run_serve(args, usage_error))


def _files(args):
    """(checkpoint, tokenizer, vae, model id) with the embedded demo model's files as defaults."""
    import os

    checkpoint, tokenizer, vae = model_files(args)
    name = args.model_name or (os.path.splitext(os.path.basename(os.path.normpath(checkpoint)))[0]
                               if args.checkpoint else DEMO_ID)
    return checkpoint, tokenizer, vae, name


def _warm_up(model, engine, which):
    """Compiles before clients come: "all" runs one burst per prefill batch size the engine pads
    arrivals to (`engine.prefill_sizes`), each answer long enough that the whole burst decodes
    together (so every decode size up to it compiles too, even where a burst is admitted over
    several steps), "first" one request; stepped here on the calling thread (the engine is not
    started yet)."""
    import dataclasses

    import numpy as np

    size = model.config.vision.image_size
    blank = model.request(np.zeros((size, size, 3), np.uint8), "caption en", max_new_tokens=1)
    room = engine.max_seq - len(blank.tokens) - model.config.vision.num_patches
    bursts = engine.prefill_sizes + (engine.slots,) if which == "all" else engine.prefill_sizes[:1]
    for burst in sorted(set(bursts)):
        request = dataclasses.replace(blank, max_new_tokens=max(1, min(burst + 1, room)))
        streams = [engine.submit(request) for _ in range(burst)]
        engine.run_until_idle()
        for stream in streams:
            stream.result(timeout=0)


def run_serve(args, usage_error):
    """The `serve` command. Returns the exit status (0 after a SIGTERM or Ctrl-C)."""
    if not 0 <= args.port <= 65535:
        raise usage_error(f"--port {args.port}: expected 0..65535")
    try:
        import uvicorn
    except ImportError:
        raise usage_error("paligemma serve needs the serve extra: pip install 'paligemma[serve]'") from None
    checkpoint, tokenizer, vae_path, model_id = _files(args)
    if args.mesh is not None:
        from paligemma.fast import sharding

        sharding.parse_mesh(args.mesh, sharding.INFERENCE_AXES)
    from paligemma.fast.pipeline import PaliGemma
    from paligemma.serve.app import build_app
    from paligemma.serve.inputs import Limits

    status = StatusLines(sys.stderr, enabled=not args.quiet)
    model = PaliGemma.load(checkpoint, tokenizer, dtype=args.dtype, progress=status, mesh=args.mesh,
                           quantize=args.quantize)
    vae = None
    if vae_path is not None:
        from paligemma.fast.vqvae import load_vae

        with status("loading mask VAE"):
            vae = load_vae(vae_path)
    engine = model.engine(slots=args.slots, max_seq=args.max_seq, max_queue=args.queue)
    if not engine.leader:  # several JAX processes: process 0 serves HTTP, the others run its steps
        for signum in (signal.SIGTERM, signal.SIGINT):  # process 0 drains, then releases this one
            signal.signal(signum, lambda signum, frame: None)
        engine.follow()
        return 0
    limits = Limits(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    max_images=args.max_images, max_tokens=args.max_tokens,
                    default_max_tokens=min(64, args.max_tokens))
    app = build_app(model, engine, model_id, limits, vae, start_engine=False)
    if args.warm_up != "none":
        with status(f"compiling (warm-up: {args.warm_up})"):
            _warm_up(model, engine, args.warm_up)
    engine.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                            access_log=not args.quiet, timeout_graceful_shutdown=120)
    if not args.quiet:
        print(f"paligemma: serving {model_id} on http://{args.host}:{args.port}/ ({args.slots} slots)",
              file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM and SIGINT (stop accepting, finish in-flight requests, then the app's
    # shutdown drains the engine) and afterwards re-raises the signal: no-op handlers make that exit 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0
