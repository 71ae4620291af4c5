"""`paligemma generate` for detection and segmentation: parsed objects as JSON, masks, drawings.

For a prompt that starts with "detect " or "segment ", the answer is parsed
(`paligemma.ref.tasks.answers.parse`) into objects with boxes in pixels of the original image:

    {"objects": [{"label": "cat", "box": [y0, x0, y1, x1], "loc": [...], "errors": [],
                  "seg": [16 codes], "mask": {"area": 1234, "rle": [...]}}]}

printed as one line after the text (or as the "objects" field of the --json record). "mask"
appears for segment prompts: null without --vae (a note on stderr says so), else the pasted
mask's pixel count and its run-length encoding (row-major over the whole image, alternating
runs of 0 and 1 starting with 0; the demo convention's soft mask is read as > 0.5).
--draw out.png writes the image with labelled boxes and translucent masks; with several
(image, prompt) pairs, one file per pair: out-0.png, out-1.png, ...
"""

import os

from paligemma.options import CONVENTIONS

TASKS = ("detect", "segment")  # the prompts whose answers are parsed into objects
NEEDS_VAE = ("segment masks are not decoded without --vae PATH (the mask VQ-VAE, e.g. big_vision's "
             "vae-oid.npz); printing boxes and seg codes only")


def add_arguments(parser):
    """Adds --convention, --vae and --draw to the `generate` parser."""
    t = parser.add_argument_group("detection and segmentation (prompts starting with 'detect ' or 'segment ')")
    t.add_argument("--convention", choices=CONVENTIONS, default="big_vision",
                   help="loc de-quantisation: big_vision (/1023, truncate) or demo (/1024, round; soft masks)")
    t.add_argument("--vae", metavar="PATH", help="mask VQ-VAE (.npz, vae-oid.npz layout) to decode segment masks")
    t.add_argument("--draw", metavar="PNG", help="write the image with labelled boxes and masks "
                                                 "(several pairs: PNG-0.png, PNG-1.png, ...)")


def task_of(prompt):
    """"detect" or "segment" for prompts of those tasks, else None."""
    word = prompt.strip().split(" ", 1)[0].lower()
    return word if word in TASKS else None


def check_arguments(args, usage_error, check_file):
    """Checks --vae and --draw before anything slow runs (raises `usage_error`, or VAEError for a
    bad VAE file). The VAE of a segment prompt is loaded here, into `args.vae_params`."""
    args.vae_params = None
    if args.vae is not None:
        check_file(args.vae, "--vae")
        if any(task_of(p) == "segment" for p in args.prompt):
            args.vae_params = load_vae(args)
    if args.draw is not None:
        folder = os.path.dirname(os.path.abspath(args.draw))
        if not os.path.isdir(folder):
            raise usage_error(f"--draw {args.draw}: the folder {folder} does not exist")
        if os.path.isdir(args.draw):
            raise usage_error(f"--draw {args.draw}: is a directory, expected a .png file name")


def load_vae(args):
    """The VAE tree for --vae (in the chosen implementation), or None; VAEError for a bad file."""
    if args.vae is None:
        return None
    if args.impl == "ref":
        from paligemma.ref.vqvae import load_vae as load
        return load(args.vae, "float64" if args.dtype == "float64" else "float32")
    from paligemma.fast.vqvae import load_vae as load
    return load(args.vae)


def draw_paths(path, n):
    """`path` for one pair; `stem-i.ext` for each of n > 1 pairs."""
    if n == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def run_length(mask):
    """Row-major run lengths of a bool [H, W] mask, alternating 0 and 1, the first run of 0s (maybe empty)."""
    import numpy as np

    flat = np.asarray(mask, bool).reshape(-1)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a new run begins
    runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0] + runs if flat.size and flat[0] else runs


def _masks(objects, vae, args, height, width):
    """Pasted [H, W] masks for the objects with 16 valid codes (None elsewhere)."""
    import numpy as np

    from paligemma.ref.tasks.answers import paste_mask

    todo = [i for i, o in enumerate(objects) if o.has_mask_codes and o.box is not None]
    masks = [None] * len(objects)
    if not todo or vae is None:
        return masks
    if args.impl == "ref":
        from paligemma.ref.vqvae import decode
    else:
        from paligemma.fast.vqvae import decode
    decoded = np.asarray(decode(vae, np.array([objects[i].seg for i in todo])))  # [n, 64, 64]
    for i, m in zip(todo, decoded):
        masks[i] = paste_mask(m, objects[i].box, height, width, args.convention)
    return masks


def task_outputs(pairs, results, args, err):
    """Objects (and drawings) for each (image, prompt) pair.

    Args:
      pairs: [(image path, prompt)]; results: the `Result`s in the same order.
      args: the parsed command line (--convention, --vae, --draw, --impl, --dtype).
      err: the stream for notes (stderr).
    Returns:
      one entry per pair: {"objects": [...]} for detect / segment prompts, else None.
    """
    import numpy as np

    from paligemma.ref import load_image
    from paligemma.ref.tasks.answers import parse
    from paligemma.ref.tasks.draw import draw_objects, save_png

    tasks = [task_of(prompt) for _, prompt in pairs]
    if "segment" in tasks and args.vae is None:
        err.write(f"paligemma: note: {NEEDS_VAE}\n")
    vae = getattr(args, "vae_params", None)
    if vae is None and "segment" in tasks:
        vae = load_vae(args)
    paths = draw_paths(args.draw, len(pairs)) if args.draw else [None] * len(pairs)
    extras = []
    for (image_path, _), result, task, out_path in zip(pairs, results, tasks, paths):
        if task is None and out_path is None:
            extras.append(None)
            continue
        image = load_image(image_path)  # [H, W, 3]
        height, width = image.shape[:2]
        objects = parse(result.text, height, width, args.convention, require_seg=task == "segment").objects \
            if task else ()
        masks = _masks(objects, vae, args, height, width) if task == "segment" else [None] * len(objects)
        if out_path is not None:
            save_png(out_path, draw_objects(image, objects, masks))
        if task is None:
            extras.append(None)
            continue
        records = []
        for obj, mask in zip(objects, masks):
            record = obj.to_dict()
            if task == "segment":
                binary = None if mask is None else mask > 0.5
                record["mask"] = None if mask is None else {"area": int(np.sum(binary)), "rle": run_length(binary)}
            records.append(record)
        extras.append({"objects": records})
    return extras
