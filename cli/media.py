"""`paligemma generate` with a video or several images in one prompt.

    paligemma generate ... --video clip.mp4 --frames 16 --stride 9 --prompt "caption en"
    paligemma generate ... --images a.jpg,b.jpg --prompt "answer en which image is brighter?"

--image, repeated, stays what it was: a batch of (image, prompt) pairs, one image each. --images
gives ONE example made of several images (comma-separated; repeat --images for a batch of such
examples), --video one example made of a video's frames (repeat for a batch). Each such
example has F frames or images and costs F x P image tokens, printed on stderr (e.g.
"16 frames x 256 = 4096 image tokens"). The kinds cannot be mixed in one call (a batch needs one
F), nor combined with detection/segmentation output (--draw, detect / segment prompts), which
reads one image.
"""

from .common import positive_int

DEFAULT_FRAMES, DEFAULT_STRIDE = 16, 9  # the PaliGemma video transfers (MSR-VTT, ActivityNet, ...)


def add_arguments(parser):
    """Adds --images, --video, --frames and --stride to the `generate` parser."""
    m = parser.add_argument_group("video and multi-image prompts (instead of --image)")
    m.add_argument("--images", action="append", metavar="A,B,...",
                   help="several images (comma-separated) in ONE prompt; repeat for a batch")
    m.add_argument("--video", action="append", metavar="FILE",
                   help="a video's frames in one prompt; repeat for a batch")
    m.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, metavar="F",
                   help=f"frames sampled from each --video (default {DEFAULT_FRAMES})")
    m.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE, metavar="N",
                   help=f"take every N-th frame, from frame 0 (default {DEFAULT_STRIDE})")


def check_arguments(args, usage_error, check_file):
    """Picks the input kind; sets `args.media` ("images", "video" or None for plain --image) and,
    for the new kinds, `args.image` to one label per example (what the output lines show)."""
    given = [flag for flag, value in (("--image", args.image), ("--images", args.images), ("--video", args.video))
             if value]
    if len(given) != 1:
        raise usage_error("give the inputs with one of --image, --images or --video" +
                          (f", not {' and '.join(given)}" if given else ""))
    args.media = None if given == ["--image"] else given[0][2:]
    if args.media is None:
        return
    from .tasks import task_of

    if args.draw is not None or any(task_of(p) for p in args.prompt):
        raise usage_error(f"{given[0]} cannot be combined with --draw or detect / segment prompts "
                          "(they read one image)")
    if args.media == "images":
        groups = [[p.strip() for p in value.split(",")] for value in args.images]
        for group in groups:
            if len(group) < 1 or "" in group:
                raise usage_error(f"--images {','.join(group)}: expected comma-separated image files")
            for path in group:
                check_file(path, "--images")
        args.groups = groups
        args.image = [",".join(g) for g in groups]
        if len({len(g) for g in groups}) > 1:
            raise usage_error(f"--images: every example needs the same number of images, got "
                              f"{[len(g) for g in groups]}")
    else:
        for path in args.video:
            check_file(path, "--video")
        args.image = list(args.video)


def inputs(args, model, err):
    """The examples for `PaliGemma.generate`: a list of image lists or of video frames
    [F, R, R, 3], one per (example, prompt) pair; prints the image token cost on `err`."""
    from paligemma.ref import load_image, load_video
    from paligemma.ref.inputs.media import token_count_line

    R = model.config.vision.image_size
    if args.media == "images":
        for group in args.groups:
            for path in group:
                load_image(path)  # decode errors name the file
        items = [list(g) for g in args.groups]
        frames, noun = len(items[0]), "images"
    else:
        items = [load_video(path, R, args.frames, args.stride, method=model.preprocess) for path in args.video]
        frames, noun = args.frames, "frames"
    if not args.quiet:
        err.write(f"paligemma: {token_count_line((1, frames, R, R, 3), model.config.vision.num_patches, noun)} "
                  f"per example\n")
    # Always a list (a bare list of images would read as a batch); one example goes with every prompt.
    return items * len(args.prompt) if len(items) == 1 else items
