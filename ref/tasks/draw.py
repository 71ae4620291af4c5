"""Detections and masks drawn on the image, for people: labelled boxes and translucent masks.

    picture = draw_objects(image, parsed.objects, masks)      # a PIL RGB image
    save_png("out.png", picture)                              # written atomically
"""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..checkpoints.tensorfiles import atomic_write

# Colour-blind-friendly (Okabe-Ito), cycled over objects.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255))
MASK_OPACITY = 0.45


def draw_objects(image, objects, masks=None):
    """The image with each object's box, label and (optional) mask.

    Args:
      image: uint8 [H, W, 3] (e.g. `paligemma.ref.load_image`) or a PIL image.
      objects: `DetectedObject`s (from `tasks.parse`) or dicts with "box" (pixel y0, x0, y1, x1,
        half-open) and "label"; objects without a box are skipped.
      masks: None, or one entry per object: None or [H, W] in [0, 1] (e.g. `tasks.paste_mask`).
    Returns:
      a PIL RGB image of the same size.
    Raises:
      ValueError if the masks do not match the objects or the image.
    """
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if base.dtype != np.uint8 or base.ndim != 3 or base.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {base.dtype} {list(base.shape)}")
    H, W = base.shape[:2]
    objects = list(objects)
    masks = [None] * len(objects) if masks is None else list(masks)
    if len(masks) != len(objects):
        raise ValueError(f"masks: expected one per object ({len(objects)}), got {len(masks)}")
    pixels = base.astype(np.float32)  # [H, W, 3]
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        mask = np.asarray(mask, np.float32)
        if mask.shape != (H, W):
            raise ValueError(f"mask {i}: expected [{H}, {W}] (the image), got {list(mask.shape)}")
        alpha = MASK_OPACITY * np.clip(mask, 0, 1)[..., None]  # [H, W, 1]
        pixels = pixels * (1 - alpha) + alpha * np.asarray(PALETTE[i % len(PALETTE)], np.float32)
    picture = Image.fromarray(np.round(pixels).astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    line = max(1, round(min(H, W) / 200))
    for i, obj in enumerate(objects):
        box = obj.get("box") if isinstance(obj, dict) else obj.box
        label = (obj.get("label") if isinstance(obj, dict) else obj.label) or ""
        if box is None:
            continue
        y0, x0, y1, x1 = (int(v) for v in box)
        if y1 <= y0 or x1 <= x0:
            continue
        colour = PALETTE[i % len(PALETTE)]
        # PIL rectangles include their far corner; the box is half-open.
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=line)
        if label:
            left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
            tw, th = right - left, bottom - top
            ty = y0 - th - 4 if y0 - th - 4 >= 0 else y0  # above the box, or inside at the top
            pen.rectangle((x0, ty, x0 + tw + 4, ty + th + 4), fill=colour)
            pen.text((x0 + 2 - left, ty + 2 - top), label, fill=(0, 0, 0), font=font)
    return picture


def save_png(path, picture):
    """Writes a PIL image as PNG atomically (a temporary file beside `path`, then a rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: the folder {folder} does not exist")
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
