"""Pictures for people who study the model (installed as `paligemma.viz`).

`paligemma explain` (viz/explain.py): where each answer token looked, from the float64
reference's recorded attention probabilities (viz/attention.py), drawn over the image
(viz/heatmap.py), the prefix-LM mask of the whole sequence (viz/mask_picture.py) and a static
page to explore them (viz/page.py). `paligemma plot` and `paligemma finetune` draw a run's
training curves (viz/curves.py; needs the `viz` extra, matplotlib).

This package may import `paligemma.ref` and `paligemma.fast`; neither imports it.
"""
