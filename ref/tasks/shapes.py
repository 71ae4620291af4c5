"""Synthetic scenes of coloured shapes: the data the embedded demo model is trained and scored on.

A scene is an RGB image with 1 to 4 non-overlapping shapes (circle, square, triangle) in one of
three colours on a soft random background, and for every shape its kind, colour, pixel box
`(y0, x0, y1, x1)` (half-open: rows y0..y1-1) and boolean mask. Four tasks are asked of a scene:

    caption en        -> "two red circles and a blue square"   (groups ordered by kind, then colour)
    count triangles   -> "2"
    detect circle     -> "<locY0><locX0><locY1><locX1> circle ; ..."   (left to right)
    segment square    -> "<loc..>x4<seg...>x16 square ; ..."

Detection and segmentation targets need the loc/seg encoders of `paligemma.ref.tasks.answers`; this module
only draws scenes and writes the words.
"""

import dataclasses

import numpy as np

from .answers import format_objects

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
NUMBERS = ("no", "a", "two", "three", "four")
# The embedded demo model's scenes (scripts/train_demo.py trains on them, `paligemma demo` draws
# them): 128 px, up to 3 shapes, box corners on a 4 px grid so that at the model's 64 px input
# every box edge falls on a pixel edge.
DEMO_SCENE = {"size": 128, "max_shapes": 3, "grid": 4}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple  # (y0, x0, y1, x1) pixels, half-open
    mask: np.ndarray  # [R, R] bool


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [R, R, 3] uint8
    shapes: tuple

    def of_kind(self, kind):
        """Shapes of one kind, left to right (then top to bottom): the order of detection answers."""
        return sorted((s for s in self.shapes if s.kind == kind), key=lambda s: (s.box[1], s.box[0]))


def shape_mask(kind, size, box):
    """Boolean [size, size] mask of a shape filling `box` = (y0, x0, y1, x1).

    A circle is the disc inscribed in the box, a square fills it, a triangle has its apex at the
    top centre and its base on the bottom edge.
    """
    y0, x0, y1, x1 = box
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres  # [R, R]
    inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    cy, cx, h, w = (y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0
    if kind == "square":
        return inside
    if kind == "circle":
        return inside & (((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0)
    if kind == "triangle":
        half_width = (yy - y0) / h * (w / 2)  # widens linearly from the apex  # [R, R]
        return inside & (np.abs(xx - cx) <= half_width)
    raise ValueError(f"shape kind: expected one of {KINDS}, got {kind!r}")


def _background(rng, size):
    """A light two-colour gradient with a little noise, [R, R, 3] float in [0, 255]."""
    a, b = rng.uniform(170, 250, size=(2, 3))
    t = np.linspace(0.0, 1.0, size)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]  # vertical or horizontal
    base = a + (b - a) * ramp[..., None]  # [R, R, 3]
    return base + rng.normal(0.0, 4.0, size=(size, size, 3))


def random_scene(rng, size=64, max_shapes=4, min_side=None, max_side=None, grid=1):
    """A random scene; shapes never overlap (their boxes keep a 1-pixel gap).

    Args:
      rng: `np.random.Generator`.
      size: image side R in pixels.
      grid: box corners and sides are multiples of this many pixels (the demo model uses 4, so
        that at its 64 px input every box edge falls on a pixel edge and its loc tokens are
        determined by the image).
    Returns:
      `Scene` with image [R, R, 3] uint8.
    """
    min_side = min_side or max(6, size // 7)
    max_side = max_side or max(min_side + 1, size // 3)
    count = int(rng.integers(1, max_shapes + 1))
    image = _background(rng, size)
    shapes, taken = [], np.zeros((size, size), bool)
    for _ in range(200 * count):
        if len(shapes) == count:
            break
        side = grid * int(rng.integers(-(-min_side // grid), max_side // grid + 1))
        y0, x0 = (grid * int(v) for v in rng.integers(0, (size - side) // grid + 1, size=2))
        box = (y0, x0, y0 + side, x0 + side)
        if taken[max(y0 - 1, 0) : y0 + side + 1, max(x0 - 1, 0) : x0 + side + 1].any():
            continue
        taken[y0 : y0 + side, x0 : x0 + side] = True
        kind = KINDS[int(rng.integers(len(KINDS)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        mask = shape_mask(kind, size, box)
        image[mask] = COLOURS[colour]
        shapes.append(Shape(kind, colour, box, mask))
    return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), tuple(shapes))


def _plural(kind, n):
    return kind if n == 1 else kind + "s"


def caption(scene):
    """'two red circles and a blue square': groups of (colour, kind) ordered by kind, then colour."""
    groups = []
    for kind in KINDS:
        for colour in COLOURS:
            n = sum(1 for s in scene.shapes if s.kind == kind and s.colour == colour)
            if n:
                groups.append(f"{NUMBERS[n]} {colour} {_plural(kind, n)}")
    if len(groups) <= 1:
        return "".join(groups)
    return ", ".join(groups[:-1]) + " and " + groups[-1]


def count(scene, kind):
    """The number of shapes of `kind`, as digits ('0', '1', ...)."""
    return str(sum(1 for s in scene.shapes if s.kind == kind))


def _objects_for(scene, kind, seg_codes=None):
    objects = []
    for s in scene.of_kind(kind):
        obj = {"box": s.box, "label": kind}
        if seg_codes is not None:
            obj["seg"] = seg_codes(s)
        objects.append(obj)
    return objects


def task_examples(scene, rng, seg_codes=None):
    """The four tasks asked of one scene, as (prefix, suffix) pairs.

    The shape kind asked for by `count`, `detect` and `segment` is drawn at random, three times
    in four among the kinds present (absent kinds, answered "0" or "", are asked too); detection and segmentation
    answers list objects left to right with big_vision's `<loc>` / `<seg>` encoding.

    Args:
      scene: a `Scene`; rng: `np.random.Generator`.
      seg_codes: `seg_codes(shape) -> 16 ints` (the VQ-VAE's codes of the shape's mask crop);
        None leaves out the `segment` task.
    Returns:
      list of (prefix, suffix) str pairs.
    """
    size = scene.image.shape[0]
    present = sorted({s.kind for s in scene.shapes})

    def pick():  # mostly a kind that is there, so answers are rarely empty
        pool = present if rng.random() < 0.75 else KINDS
        return pool[int(rng.integers(len(pool)))]

    pairs = [("caption en", caption(scene))]
    kind = pick()
    pairs.append((f"count {kind}s", count(scene, kind)))
    kind = pick()
    pairs.append((f"detect {kind}", format_objects(_objects_for(scene, kind), size, size)))
    if seg_codes is not None:
        kind = pick()
        pairs.append((f"segment {kind}", format_objects(_objects_for(scene, kind, seg_codes), size, size)))
    return pairs
