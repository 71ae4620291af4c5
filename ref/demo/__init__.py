"""The demos: the stage-by-stage tour of a random model and the trained embedded demo model.

    python -m paligemma.ref.demo      # tour.py: a random PaliGemma 2 run end to end, with shapes
    paligemma demo                    # cli/demo.py: the trained model of assets/ on a scene

`assets/` holds the embedded demo model (64 px, ~1.5 M parameters; scripts/train_demo.py
reproduces it, docs/demo.md describes it): demo-model.npz, demo-tokenizer.model, demo-vae.npz
and demo-metrics.json. It is installed as package data beside this file.
"""

import pathlib

ASSETS = pathlib.Path(__file__).parent / "assets"


def asset(name):
    """The path of one file of the embedded demo model, e.g. `asset("demo-model.npz")`."""
    return str(ASSETS / name)
