"""`paligemma demo`: the embedded demo model on a freshly drawn scene (what `make demo` runs).

    paligemma demo                                   # new scene, caption / count / detect / segment
    paligemma demo --seed 3 --out demo-out           # reproducible; files land in demo-out/
    paligemma demo --checkpoint pt.npz --tokenizer tok.model --vae vae-oid.npz --image cat.jpg \\
                   --prompt "caption en" --prompt "detect cat" --prompt "segment cat"

The embedded model (`paligemma/ref/demo/assets/`, 64 px, ~1.5 M parameters, reproduced by
`scripts/train_demo.py`; its held-out accuracy is in docs/demo.md) knows circles, squares and
triangles in red, green and blue. With --checkpoint / --tokenizer / --vae any PaliGemma runs the
same way. Each answer is printed with its parsed objects; `annotated.png` shows every detected
box and segmented mask on the image.
"""

import os
import sys

from .common import model_files


def add_parser(commands, usage_error):
    """Adds the `demo` subcommand to `commands` (argparse subparsers)."""
    d = commands.add_parser("demo", help="run the embedded demo model (or a given one) on a new scene",
                            description=__doc__.splitlines()[0])
    d.add_argument("--checkpoint", metavar="PATH", help="default: the embedded demo model")
    d.add_argument("--tokenizer", metavar="PATH", help="default: the embedded demo tokenizer")
    d.add_argument("--vae", metavar="PATH", help="mask VQ-VAE; default: the embedded demo VAE")
    d.add_argument("--image", metavar="FILE", help="default: a new synthetic scene (saved as scene.png)")
    d.add_argument("--prompt", action="append", metavar="TEXT",
                   help="repeatable; default: caption en, count / detect / segment a shape in the scene")
    d.add_argument("--seed", type=int, help="scene seed (default: a new scene every run)")
    d.add_argument("--out", default="demo-out", metavar="DIR", help="where scene.png and annotated.png go")
    d.add_argument("--max-new-tokens", type=int, default=80, metavar="N")
    d.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    d.set_defaults(run=lambda args: run_demo(args, usage_error))


def _default_prompts(scene, rng):
    present = sorted({s.kind for s in scene.shapes})
    pick = lambda: present[int(rng.integers(len(present)))]  # noqa: E731
    return ["caption en", f"count {pick()}s", f"detect {pick()}", f"segment {pick()}"]


def run_demo(args, usage_error):
    """The `demo` command. Returns the exit status."""
    import json
    import time

    import numpy as np
    from PIL import Image

    from paligemma.ref.inputs.image import load_image
    from paligemma.ref.tasks import shapes
    from paligemma.ref.tasks.draw import save_png

    checkpoint, tokenizer, vae_path = model_files(args)
    os.makedirs(args.out, exist_ok=True)
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % (2**31)
    rng = np.random.default_rng(seed)
    if args.image is None:
        scene = shapes.random_scene(rng, **shapes.DEMO_SCENE)  # as the demo model was trained
        image_path = os.path.join(args.out, "scene.png")
        save_png(image_path, Image.fromarray(scene.image))
        print(f"scene (seed {seed}): {shapes.caption(scene)}  -> {image_path}")
        prompts = args.prompt or _default_prompts(scene, rng)
    else:
        image_path = args.image
        prompts = args.prompt or ["caption en"]

    from paligemma.fast.pipeline import PaliGemma
    from paligemma.fast.vqvae import decode, load_vae
    from paligemma.ref.tasks.answers import parse, paste_mask
    from paligemma.ref.tasks.draw import draw_objects

    t0 = time.perf_counter()
    model = PaliGemma.load(checkpoint, tokenizer)
    vae = load_vae(vae_path) if vae_path else None
    results = model.generate(image_path, prompts, max_new_tokens=args.max_new_tokens)
    results = results if isinstance(results, list) else [results]
    image = load_image(image_path)  # [H, W, 3]
    height, width = image.shape[:2]
    drawn, masks = [], []
    for prompt, result in zip(prompts, results):
        print(f"\n> {prompt}\n{result.text}")
        task = prompt.split(" ", 1)[0]
        if task not in ("detect", "segment"):
            continue
        objects = parse(result.text, height, width, require_seg=task == "segment").objects
        for obj in objects:
            mask = None
            if task == "segment" and obj.has_mask_codes and obj.box is not None and vae is not None:
                mask = paste_mask(np.asarray(decode(vae, np.array([obj.seg])))[0], obj.box, height, width)
            record = obj.to_dict()
            if mask is not None:
                record["mask_area"] = int(np.sum(mask > 0.5))
            print("  " + json.dumps(record))
            drawn.append(obj)
            masks.append(mask)
    annotated = os.path.join(args.out, "annotated.png")
    save_png(annotated, draw_objects(image, drawn, masks))
    print(f"\n{len(drawn)} objects drawn -> {annotated}  ({time.perf_counter() - t0:.1f}s incl. compiling)")
    print(f"the same with any checkpoint: paligemma generate --checkpoint {checkpoint} --tokenizer {tokenizer} "
          f"--image {image_path} --prompt \"{prompts[-1]}\" --vae {vae_path} --draw out.png", file=sys.stderr)
    return 0
