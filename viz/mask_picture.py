"""The prefix-LM attention mask as a picture: one square cell per (query, key), blocks labelled.

    picture, geometry = draw_mask(attn_mask, blocks, local_mask=local, window=4)
    # cell (i, j) is picture[y0[i] : y0[i] + cell, x0[j] : x0[j] + cell]

Rows are queries, columns keys (row i may look at column j). Each cell is painted in exactly
one colour, so the picture can be read back into the boolean mask (the tests do):

    VISIBLE    the query may attend to the key (in every layer)
    WINDOWED   visible in global layers, hidden in the sliding-window (local) layers
    HIDDEN     never visible

Blocks (image | prefix | separator | answer) are parted by thin grey gaps and named in the
margins, so the rule shows at a glance: image and prefix see each other fully, each answer
token sees everything before it and itself, nothing sees the answer from the prefix.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VISIBLE = (31, 59, 115)
WINDOWED = (230, 159, 0)
HIDDEN = (236, 236, 236)
GAP = (150, 150, 150)
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def font(size=12):
    """Pillow's built-in font at `size` (a TrueType face when FreeType is there, else the bitmap)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        return ImageFont.load_default()


def cell_size(n, target=720, largest=12):
    """Pixels per token so that `n` tokens span about `target` pixels (1..largest)."""
    return int(np.clip(target // max(n, 1), 1, largest))


def _starts(blocks, n, cell, gap):
    """Left/top pixel offset of each token's cell (inside the matrix), gaps between blocks."""
    block_of = np.zeros(n, np.int64)
    for b, (_, start, stop) in enumerate(blocks):
        block_of[start:stop] = b
    return np.arange(n) * cell + block_of * gap  # [n]


def _check(attn_mask, blocks, local_mask):
    attn_mask = np.asarray(attn_mask, bool)
    n = attn_mask.shape[0]
    if attn_mask.shape != (n, n):
        raise ValueError(f"attn_mask: expected a square [S, S] array, got {list(attn_mask.shape)}")
    if local_mask is not None and np.shape(local_mask) != (n, n):
        raise ValueError(f"local_mask: expected [{n}, {n}] (as attn_mask), got {list(np.shape(local_mask))}")
    edges = [0] + [stop for _, _, stop in blocks]
    if [start for _, start, _ in blocks] != edges[:-1] or edges[-1] != n or any(
            stop <= start for _, start, stop in blocks):
        raise ValueError(f"blocks: expected consecutive non-empty (label, start, stop) covering 0..{n}, got {blocks}")
    return attn_mask


def draw_mask(attn_mask, blocks, local_mask=None, window=None, title=None):
    """Draws a mask.

    Args:
      attn_mask: [S, S] bool, the global layers' mask (`paligemma.ref.make_attn_mask`, one example).
      blocks: consecutive `(label, start, stop)` covering 0..S, e.g. ("image", 0, 64).
      local_mask: optional [S, S] bool for sliding-window layers (a subset of `attn_mask`).
      window: the window's size, for the legend.
      title: the heading (default: what the picture shows).
    Returns:
      `(PIL RGB image, geometry)`; geometry is a dict of arrays: `x0` [S], `y0` [S] (each
      token's cell, in picture pixels) and `cell` (its side).
    """
    attn_mask = _check(attn_mask, blocks, local_mask)
    n = attn_mask.shape[0]
    cell = cell_size(n)
    gap = 2 if cell >= 3 else 1
    small, big = font(11), font(13)
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(f"{lb} ({b - a})", font=small))
                  for lb, a, b in blocks)
    left, top = label_w + 22, 64
    starts = _starts(blocks, n, cell, gap)
    side = int(starts[-1]) + cell
    legend_h = 3 * 18 + 10
    width, height = max(left + side + 16, 460), top + side + 16 + legend_h
    pixels = np.full((height, width, 3), BACKGROUND, np.uint8)

    # The matrix: gaps first (grey), then every cell painted whole.
    pixels[top:top + side, left:left + side] = GAP
    state = np.where(attn_mask, 1, 0)
    if local_mask is not None:
        state = np.where(attn_mask & ~np.asarray(local_mask, bool), 2, state)
    colours = np.array([HIDDEN, VISIBLE, WINDOWED], np.uint8)
    cells = np.repeat(np.repeat(colours[state], cell, axis=0), cell, axis=1)  # [S*cell, S*cell, 3]
    rows = (starts[:, None] + np.arange(cell)).reshape(-1)  # matrix pixel of each cell pixel
    pixels[top + rows[:, None], left + rows[None, :]] = cells

    picture = Image.fromarray(pixels)
    pen = ImageDraw.Draw(picture)
    pen.text((8, 6), title or f"prefix-LM attention mask, {n} tokens: row = query, column = key it may see",
             fill=INK, font=big)
    pen.text((left, 26), "keys ->", fill=INK, font=small)
    for b, (label, start, stop) in enumerate(blocks):
        a, z = int(starts[start]), int(starts[stop - 1]) + cell  # the block's pixel span
        text = f"{label} ({stop - start})"
        # Keys along the top: a bracket over the block, labels on two staggered lines.
        y = top - 8
        pen.line((left + a, y, left + z - 1, y), fill=INK)
        tw = pen.textlength(text, font=small)
        tx = min(max(left + (a + z) / 2 - tw / 2, left), width - tw - 2)
        pen.text((tx, top - 24 - 13 * (b % 2)), text, fill=INK, font=small)
        # Queries down the left: a bracket beside the block, the label right-aligned before it.
        x = left - 8
        pen.line((x, top + a, x, top + z - 1), fill=INK)
        pen.text((x - 6 - tw, top + (a + z) / 2 - 6), text, fill=INK, font=small)

    entries = [(VISIBLE, "query may attend to key"), (HIDDEN, "hidden (causal answer, or later blocks)")]
    if local_mask is not None:
        entries.insert(1, (WINDOWED, f"hidden only in sliding-window layers (window {window})"))
    y = top + side + 16
    for colour, text in entries:
        pen.rectangle((left, y, left + 12, y + 12), fill=colour, outline=GAP)
        pen.text((left + 20, y), text, fill=INK, font=small)
        y += 18
    geometry = {"x0": left + starts, "y0": top + starts, "cell": np.int64(cell)}
    return picture, geometry

