"""Shared by the fine-tuning tests: a tiny tokenizer, a tiny PaliGemma 2 checkpoint and a synthetic
image-to-text data set, all built in a temporary folder (nothing is downloaded).

The data: four 28 x 28 images, each a solid colour with a stripe pattern of its own, captioned
"a <colour> <animal>" under the same prefix, so only the image tells the examples apart.
"""

import json
import os
import types

import numpy as np
from PIL import Image

from paligemma import ref

CAPTIONS = [("red", (220, 30, 30), "cat"), ("green", (30, 200, 40), "dog"), ("blue", (20, 40, 230), "bird"),
            ("white", (240, 240, 240), "horse")]
PREFIX = "caption en"


def write_images(folder):
    """The four images under folder/images; returns their paths relative to `folder`."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    paths = []
    for i, (name, color, _) in enumerate(CAPTIONS):
        a = np.zeros((28, 28, 3), np.uint8)
        a[:] = color
        a[:, i * 7:(i + 1) * 7] = 255 - np.array(color, np.uint8)  # a stripe at a different place each
        Image.fromarray(a).save(os.path.join(folder, "images", f"{name}.png"))
        paths.append(f"images/{name}.png")
    return paths


def records():
    return [{"image": f"images/{name}.png", "prefix": PREFIX, "suffix": f"a {name} {animal}"}
            for name, _, animal in CAPTIONS]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def build(folder, seed=0):
    """Tokenizer, float32 base checkpoint (.npz) and train.jsonl in `folder`."""
    folder = str(folder)
    tok = ref.train_tiny_tokenizer(os.path.join(folder, "tok.model"))
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    params = ref.init_params(config, seed=seed, random_norms=True)
    base = os.path.join(folder, "base.npz")
    ref.save(base, config, params)
    write_images(folder)
    train = write_jsonl(os.path.join(folder, "train.jsonl"), records())
    return types.SimpleNamespace(dir=folder, tok=tok, tok_path=os.path.join(folder, "tok.model"), config=config,
                                 params=params, base=base, train=train)
