"""Attention over image patches, painted on the image.

    display = display_image(rgb, grid)                       # [D, D, 3], D a multiple of grid
    panel = overlay(display, maps[a, 0])                      # one token's map on the image
    token_picture(display, maps[a], "green", ["layer 2"])     # a row of panels with captions
    strip(display, maps[:, 0], ["a", "green", "square"])      # every token, small, in reading order

A map is [g, g]: the attention of one query on the g x g image tokens (row-major, as SigLIP
orders its patches), so map[r, c] covers the patch in row r, column c of the resized image.
Each map is scaled to its own maximum for the picture (the raw values are in the .npz beside);
the patches are drawn as flat squares, not smoothed, so one square is one token.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from .mask_picture import font

# A perceptually ordered ramp (dark purple -> orange -> pale yellow), like matplotlib's "magma".
_RAMP = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)], np.float64)
IMAGE_WEIGHT = 0.45  # how much of the image shows through the colours


def colormap(values):
    """[...] values in [0, 1] -> [..., 3] uint8 colours along `_RAMP`."""
    x = np.clip(np.asarray(values, np.float64), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(x).astype(np.int64), len(_RAMP) - 2)
    t = (x - i)[..., None]
    return np.round(_RAMP[i] * (1 - t) + _RAMP[i + 1] * t).astype(np.uint8)


def display_size(grid, smallest=256):
    """The side the image is drawn at: at least `smallest`, a whole number of pixels per patch."""
    return grid * math.ceil(smallest / grid)


def display_image(rgb, grid, smallest=256):
    """The image squashed to a square (as the model sees it) at `display_size`: uint8 [D, D, 3]."""
    side = display_size(grid, smallest)
    return np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).resize((side, side), Image.BILINEAR))


def overlay(display, grid_map):
    """One map on the image: uint8 [D, D, 3]. The map is scaled to its maximum."""
    grid_map = np.asarray(grid_map, np.float64)
    g, side = grid_map.shape[0], display.shape[0]
    top = grid_map.max()
    scaled = grid_map / top if top > 0 else grid_map
    colours = colormap(np.kron(scaled, np.ones((side // g, side // g))))  # [D, D, 3]
    mixed = IMAGE_WEIGHT * display.astype(np.float64) + (1 - IMAGE_WEIGHT) * colours
    return np.round(mixed).astype(np.uint8)


def _caption_height(size):
    return size + 8


def token_picture(display, maps, title, captions):
    """One answer token: a panel per map (e.g. per layer) with its caption, the token above.

    Args:
      display: uint8 [D, D, 3]; maps: [n, g, g]; title: str; captions: n str.
    Returns:
      PIL RGB image.
    """
    side, n, pad = display.shape[0], len(maps), 6
    head, cap = _caption_height(14), _caption_height(11)
    picture = Image.new("RGB", (n * (side + pad) + pad, head + side + cap + pad), (255, 255, 255))
    pen = ImageDraw.Draw(picture)
    pen.text((pad, 4), title, fill=(0, 0, 0), font=font(14))
    for k, (m, text) in enumerate(zip(maps, captions)):
        x = pad + k * (side + pad)
        picture.paste(Image.fromarray(overlay(display, m)), (x, head))
        pen.text((x, head + side + 3), text, fill=(0, 0, 0), font=font(11))
    return picture


def strip(display, maps, labels, thumb=96, per_row=12):
    """Every answer token's map as a small panel with the token under it, in reading order.

    Args:
      display: uint8 [D, D, 3]; maps: [A, g, g]; labels: A str.
    Returns:
      PIL RGB image.
    """
    g = maps.shape[-1]
    side = g * max(1, round(thumb / g))  # whole pixels per patch
    small = np.asarray(Image.fromarray(display).resize((side, side), Image.BILINEAR))
    pad, cap = 4, _caption_height(11)
    cols = min(len(maps), per_row)
    lines = math.ceil(len(maps) / per_row)
    picture = Image.new("RGB", (cols * (side + pad) + pad, lines * (side + cap + pad) + pad), (255, 255, 255))
    pen = ImageDraw.Draw(picture)
    for a, (m, label) in enumerate(zip(maps, labels)):
        x = pad + (a % per_row) * (side + pad)
        y = pad + (a // per_row) * (side + cap + pad)
        picture.paste(Image.fromarray(overlay(small, m)), (x, y))
        text = label if len(label) <= 14 else label[:13] + "~"
        pen.text((x, y + side + 2), f"{a}:{text}", fill=(0, 0, 0), font=font(11))
    return picture
