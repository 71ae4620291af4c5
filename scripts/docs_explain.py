"""Redraws the pictures of docs/architecture.md's guided tour from one run of the embedded demo model.

    .venv/bin/python scripts/docs_explain.py            # -> docs/explain-*.png (a few seconds, CPU)

It draws scene 4 of the demo's generator (`paligemma.ref.tasks.shapes`, the seed `paligemma demo --seed 4`
uses), runs `paligemma explain` on it with "caption en" and "detect triangle" (every layer, mean over
heads) and copies the pictures the doc shows into docs/. The full output, page and arrays
included, stays in the folder given by --out.
"""

import argparse
import os

import numpy as np
from PIL import Image

from paligemma.cli.main import main as paligemma
from paligemma.ref.tasks import shapes

SEED = 4
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def run(out):
    os.makedirs(out, exist_ok=True)
    scene = shapes.random_scene(np.random.default_rng(SEED), **shapes.DEMO_SCENE)
    image = os.path.join(out, "scene.png")
    Image.fromarray(scene.image).save(image)
    for prompt in ("caption en", "detect triangle"):
        folder = os.path.join(out, prompt.replace(" ", "-"))
        if paligemma(["explain", "--image", image, "--prompt", prompt, "--out", folder, "--layer", "all"]) != 0:
            raise SystemExit(f"paligemma explain failed for {prompt!r}")
    return out


def copy(out, docs):
    caption, detect = os.path.join(out, "caption-en"), os.path.join(out, "detect-triangle")
    answer = list(np.load(os.path.join(caption, "attention.npz"))["pieces"])
    noun = next(i for i, piece in enumerate(answer) if piece.strip() == "circle")  # "a red circle, ..."
    pictures = {"explain-mask.png": os.path.join(caption, "mask.png"),
                "explain-caption-strip.png": os.path.join(caption, "strip.png"),
                "explain-token.png": os.path.join(caption, f"token_{noun:02d}.png"),
                "explain-detect-strip.png": os.path.join(detect, "strip.png"),
                "explain-detect-objects.png": os.path.join(detect, "objects.png")}
    window = os.path.join(out, "mask-window.png")
    mask_with_window(window)
    pictures["explain-mask-window.png"] = window
    for name, source in pictures.items():
        target = os.path.join(docs, name)
        # 128 colours keep the maps readable at a third of the size (the doc's copies only).
        Image.open(source).convert("RGB").quantize(colors=128).save(target, optimize=True)
        print(f"{target}  ({os.path.getsize(target) // 1024} KiB)")


def mask_with_window(path, window=6):
    """A made-up short sequence (16 image tokens, 4 prefix, the separator, 10 answer tokens) under
    Gemma 2's sliding window: what `mask.png` shows for a config that has one."""
    from paligemma.ref.mask import make_attn_mask, same_block, sliding_window
    from paligemma.viz.mask_picture import draw_mask

    blocks = [("image", 0, 16), ("prefix", 16, 20), ("sep \\n", 20, 21), ("answer", 21, 31)]
    ar = np.array([[0] * 21 + [1] * 10])
    real = np.ones_like(ar, bool)
    attn = make_attn_mask(real, ar)
    positions = np.arange(31)[None]
    local = sliding_window(attn, positions, positions, window, same_block(real, ar))
    picture, _ = draw_mask(attn[0], blocks, local[0], window,
                           title=f"the prefix-LM mask with a sliding window of {window} (made-up lengths)")
    picture.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs-explain-out", help="where the full explain output goes")
    parser.add_argument("--docs", default=DOCS, help="where the pictures are copied")
    args = parser.parse_args()
    copy(run(args.out), args.docs)


if __name__ == "__main__":
    main()
