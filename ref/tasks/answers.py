"""Detection and segmentation outputs: `<loc>` / `<seg>` text to objects, and back.

    parsed = parse("<loc0102><loc0205><loc0716><loc0818> cat ; <loc0000>...", height=480, width=640)
    for obj in parsed.objects:
        obj.label, obj.box, obj.seg, obj.errors       # box: pixel (y0, x0, y1, x1) of the original image
    target = format_objects([{"box": (0.1, 0.2, 0.7, 0.8), "label": "cat"}])   # for training data
    full = paste_mask(vqvae.decode(vae, [obj.seg])[0], obj.box, 480, 640)    # [H, W] mask in the image

Format (big_vision; the HF-Space demo parses the same): an object is 4 loc tokens `y0 x0 y1 x1`,
optionally 16 seg tokens (segment prompts), then an optional space and a label; objects are
joined by " ; ". `<locNNNN>` has 4 digits (0..1023), `<segNNN>` 3 digits (0..127). RefCOCO-style
targets have no label: 4 loc + 16 seg, nothing else.

Two de-quantisation conventions (they differ by at most ~0.1% of the image size):
  "big_vision": v = loc / 1023, pixel = int(v * size)  (truncation; its segmentation evaluator)
  "demo":       v = loc / 1024, pixel = round(v * size) (Python's round; Google's HF-Space demo)
Pixel boxes are half-open: rows y0 <= y < y1, columns x0 <= x < x1 (both pasting codes slice so).
The inverse quantises as big_vision's data pipeline does: round(v * 1023), clipped to [0, 1023].

Model output is untrusted: `parse` never raises on text. Each object carries an `errors` tuple
(wrong token counts, out-of-range values, inverted or empty boxes, garbage, a missing " ; ");
its fields are filled as far as they could be read.
"""

import dataclasses
import re

import numpy as np
from PIL import Image

from paligemma.options import CONVENTIONS

from ..inputs.image import resize_float_tf

NUM_LOC, NUM_SEG = 1024, 128  # token values 0..1023 and 0..127
SEG_PER_OBJECT = 16
SEPARATOR = " ; "
MASK_SIZE = 64  # the VQ-VAE's masks: 64 x 64

# One item of generated text: a loc or seg token, a ";" separator, a malformed token, or plain text.
_ITEM = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|(;)|(<(?:loc|seg)[^<>;]*>?)|([^<;]+|<)")


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object of a detection/segmentation answer.

    label: the text after the tokens, stripped ("" when absent).
    loc: the loc values as found, in order (normally 4: y0, x0, y1, x1 in 0..1023).
    box: (y0, x0, y1, x1) pixel coordinates in the original image, ints, half-open; None unless
      exactly 4 in-range loc values were found.
    normalized: (y0, x0, y1, x1) in [0, 1] by the convention's divisor; None when `box` is None.
    seg: the seg values as found (normally 16 codes in 0..127), or None when there were none.
    errors: what is wrong with this object, one sentence each; () when it is well formed.
    text: the part of the answer this object was read from.
    """

    label: str
    loc: tuple
    box: tuple | None
    normalized: tuple | None
    seg: tuple | None
    errors: tuple
    text: str

    @property
    def ok(self):
        return not self.errors

    @property
    def has_mask_codes(self):
        """True if `seg` holds exactly 16 valid codes, ready for the VQ-VAE decoder."""
        return self.seg is not None and len(self.seg) == SEG_PER_OBJECT and all(0 <= s < NUM_SEG for s in self.seg)

    def to_dict(self):
        """A JSON-ready dict (lists instead of tuples; `seg` left out when absent)."""
        d = {"label": self.label, "box": list(self.box) if self.box else None, "loc": list(self.loc),
             "errors": list(self.errors)}
        if self.seg is not None:
            d["seg"] = list(self.seg)
        return d


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A parsed answer: its objects in order, and the settings it was parsed with."""

    objects: tuple
    text: str
    height: int
    width: int
    convention: str

    @property
    def ok(self):
        return all(o.ok for o in self.objects)


def _check_convention(convention):
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {list(CONVENTIONS)}, got {convention!r}")


def _check_size(height, width):
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1 (the original image's size), got {v!r}")


def dequantize(loc, size, convention="big_vision"):
    """One loc value (0..1023) -> (normalized coordinate, pixel coordinate) along an axis of `size` px."""
    _check_convention(convention)
    if convention == "big_vision":
        v = loc / 1023
        return v, int(v * size)
    v = loc / 1024
    return v, round(v * size)


def _tokens(text):
    """The items of `text`: (kind, value, source) with kind loc / seg / sep / bad / text."""
    out = []
    for m in _ITEM.finditer(text):
        loc, seg, sep, bad, plain = m.groups()
        if loc is not None:
            out.append(("loc", int(loc), m.group(0)))
        elif seg is not None:
            out.append(("seg", int(seg), m.group(0)))
        elif sep is not None:
            out.append(("sep", None, sep))
        elif bad is not None:
            out.append(("bad", None, bad))
        else:
            out.append(("text", None, plain))
    return out


def _chunks(items):
    """Items grouped into objects: split at ";" and, with a complaint, where a loc run follows
    a label or seg tokens without one. Returns [(items, missing_separator)]."""
    chunks, current, missing = [], [], False
    for item in items:
        if item[0] == "sep":
            chunks.append((current, missing))
            current, missing = [], False
            continue
        kinds = [k for k, _, _ in current]
        after_box = current[kinds.index("loc"):] if "loc" in kinds else []
        if item[0] == "loc" and any(k == "seg" or (k == "text" and s.strip()) for k, _, s in after_box):
            chunks.append((current, missing))
            current, missing = [], True
        current.append(item)
    chunks.append((current, missing))
    # A chunk of only whitespace (after a trailing " ; ", or an empty answer) is no object.
    return [(c, m) for c, m in chunks if any(k != "text" or s.strip() for k, _, s in c)]


def _parse_chunk(items, missing_separator, height, width, convention, require_seg):
    """One object from its items; see `parse`."""
    errors = ["no ' ; ' between this object and the previous one"] if missing_separator else []
    text = "".join(s for _, _, s in items)
    kinds = [k for k, _, _ in items]
    first_loc = kinds.index("loc") if "loc" in kinds else len(items)
    before = "".join(s for _, _, s in items[:first_loc]).strip()
    rest = items[first_loc:]
    # Expected order after `before`: loc run, optional whitespace, seg run, whitespace, label.
    loc, seg, label_parts, stage = [], [], [], 0
    for kind, value, source in rest:
        if kind == "loc" and stage == 0:
            loc.append(value)
        elif kind == "seg" and stage <= 1:
            stage = 1
            seg.append(value)
        elif kind == "text" and not source.strip() and stage <= 1:
            continue  # whitespace between the runs, as the demo's regex allows
        elif kind == "text":
            stage = 2
            label_parts.append(source)
        elif kind == "bad":
            errors.append(f"malformed token {source!r}")
        else:
            stage = max(stage, 2)
            errors.append(f"{kind} token {source} out of place (after the {'label' if label_parts else 'seg tokens'})")
    if before:
        errors.append(f"unexpected text before the box: {before!r}")
    label = "".join(label_parts).strip()
    if not loc:
        errors.append("no box: expected 4 <loc> tokens, got 0")
    elif len(loc) != 4:
        errors.append(f"expected 4 <loc> tokens, got {len(loc)}")
    bad_loc = [v for v in loc if v >= NUM_LOC]
    if bad_loc:
        errors.append(f"loc value {bad_loc[0]} out of range [0, {NUM_LOC - 1}]")
    if seg and len(seg) != SEG_PER_OBJECT:
        errors.append(f"expected {SEG_PER_OBJECT} <seg> tokens, got {len(seg)}")
    elif not seg and require_seg:
        errors.append(f"no mask: expected {SEG_PER_OBJECT} <seg> tokens, got 0")
    bad_seg = [v for v in seg if v >= NUM_SEG]
    if bad_seg:
        errors.append(f"seg value {bad_seg[0]} out of range [0, {NUM_SEG - 1}]")
    box = normalized = None
    if len(loc) == 4 and not bad_loc:
        y0, x0, y1, x1 = loc
        if y1 < y0 or x1 < x0:
            errors.append(f"inverted box: y0 {y0} x0 {x0} y1 {y1} x1 {x1} (expected y0 <= y1 and x0 <= x1)")
        (ny0, py0), (ny1, py1) = dequantize(y0, height, convention), dequantize(y1, height, convention)
        (nx0, px0), (nx1, px1) = dequantize(x0, width, convention), dequantize(x1, width, convention)
        box, normalized = (py0, px0, py1, px1), (ny0, nx0, ny1, nx1)
        if not (y1 < y0 or x1 < x0) and (py1 <= py0 or px1 <= px0):
            errors.append(f"empty box: {py1 - py0} x {px1 - px0} pixels in a {height} x {width} image")
    return DetectedObject(label=label, loc=tuple(loc), box=box, normalized=normalized,
                          seg=tuple(seg) if seg else None, errors=tuple(errors), text=text)


def parse(text, height, width, convention="big_vision", require_seg=False):
    """Objects from a detection or segmentation answer; never raises on the text.

    Args:
      text: the generated text (loc/seg tokens as their literal `<loc0123>` text).
      height, width: the ORIGINAL image's size in pixels (boxes come back in its coordinates).
      convention: "big_vision" (/1023, truncation) or "demo" (/1024, round); see the module doc.
      require_seg: a segment prompt: an object without seg tokens gets an error.
    Returns:
      `Parsed` with one `DetectedObject` per object; problems in each object's `errors`.
    Raises:
      ValueError only for bad arguments (not for bad text).
    """
    _check_convention(convention)
    _check_size(height, width)
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    objects = tuple(_parse_chunk(items, missing, height, width, convention, require_seg)
                    for items, missing in _chunks(_tokens(text)))
    return Parsed(objects=objects, text=text, height=int(height), width=int(width), convention=convention)


def parse_ids(ids, tokenizer, height, width, convention="big_vision", require_seg=False):
    """`parse` of generated ids [N], decoded (up to EOS) with `tokenizer` (a `Tokenizer`)."""
    return parse(tokenizer.decode(ids), height, width, convention, require_seg)


# --------------------------------------------------------------------------- the inverse

def quantize_box(box, height=None, width=None):
    """(y0, x0, y1, x1) -> 4 loc values, as big_vision's data pipeline: round(v * 1023), clipped.

    Args:
      box: normalized coordinates in [0, 1], or pixel coordinates if `height` and `width` are given.
      height, width: the image size, for pixel boxes.
    Returns:
      tuple of 4 ints in 0..1023.
    Raises:
      ValueError for a box that is not 4 finite numbers, or only one of height / width.
    """
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.size != 4 or not np.all(np.isfinite(values)):
        raise ValueError(f"box: expected 4 finite numbers (y0, x0, y1, x1), got {box!r}")
    if (height is None) != (width is None):
        raise ValueError("quantize_box: give both height and width (pixel box) or neither (normalized box)")
    if height is not None:
        _check_size(height, width)
        values = values / np.array([height, width, height, width], dtype=np.float64)
    # np.round is half-to-even like tf.round (big_vision's pipeline runs in TF).
    return tuple(int(v) for v in np.clip(np.round(values * (NUM_LOC - 1)), 0, NUM_LOC - 1))


def _object_string(obj, height, width):
    label, seg = obj.get("label"), obj.get("seg")
    if obj.get("loc") is not None:  # already quantised (a parsed object): kept as is
        loc = [int(v) for v in obj["loc"]]
        if len(loc) != 4 or not all(0 <= v < NUM_LOC for v in loc):
            raise ValueError(f"loc: expected 4 values in [0, {NUM_LOC - 1}], got {loc}")
    else:
        loc = quantize_box(obj.get("box"), height, width)
    text = "".join(f"<loc{v:04d}>" for v in loc)
    if seg is not None:
        seg = [int(s) for s in np.asarray(seg).reshape(-1)]
        if len(seg) != SEG_PER_OBJECT or not all(0 <= s < NUM_SEG for s in seg):
            raise ValueError(f"seg: expected {SEG_PER_OBJECT} codes in [0, {NUM_SEG - 1}], got {seg}")
        text += "".join(f"<seg{s:03d}>" for s in seg)
    if label:
        if not isinstance(label, str) or re.search(r"[;<>]", label) or label != label.strip():
            raise ValueError(f"label {label!r}: expected a str without ';', '<', '>' or surrounding spaces "
                             "(they would not parse back)")
        text += " " + label
    return text


def format_objects(objects, height=None, width=None):
    """The target string big_vision trains on, for detection or segmentation.

    Args:
      objects: a list of dicts (or `DetectedObject`s) with "box" (y0, x0, y1, x1) or "loc" (4
        loc values, used as they are), optional "label" (str) and optional "seg" (16 codes in
        0..127, e.g. from `vqvae.encode`).
      height, width: the image size if the boxes are in pixels; leave out for normalized boxes.
    Returns:
      e.g. "<loc0102><loc0205><loc0716><loc0818> cat ; <loc...>x4 dog"; segmentation objects
      put their 16 `<segNNN>` right after the 4 locs; an object without a label ends after its tokens.
    Raises:
      ValueError naming the object and the problem (bad box, seg codes or label).
    """
    parts = []
    for i, obj in enumerate(objects):
        if isinstance(obj, DetectedObject):
            obj = {"loc": obj.loc, "label": obj.label, "seg": obj.seg}
        try:
            parts.append(_object_string(obj, height, width))
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"object {i}: {e}") from None
    return SEPARATOR.join(parts)


# --------------------------------------------------------------------------- masks in images

def crop_mask(mask, box):
    """The encoder's input for one object, as big_vision builds it: the box cut out of the image's
    mask and resized to 64 x 64 with TF's antialiased bilinear.

    Args:
      mask: [H, W] bool or float in [0, 1], the object's mask in the whole image.
      box: (y0, x0, y1, x1) pixel ints, half-open, non-empty.
    Returns:
      [64, 64] float32 in [0, 1].
    """
    mask = np.asarray(mask, dtype=np.float32)
    y0, x0, y1, x1 = (int(v) for v in box)
    if mask.ndim != 2 or not (0 <= y0 < y1 <= mask.shape[0] and 0 <= x0 < x1 <= mask.shape[1]):
        raise ValueError(f"crop_mask: box {tuple(box)} is empty or outside the mask {list(mask.shape)}")
    crop = mask[y0:y1, x0:x1, None]  # [h, w, 1]
    return np.clip(resize_float_tf(crop, (MASK_SIZE, MASK_SIZE), antialias=True)[..., 0], 0, 1)


def paste_mask(mask64, box, height, width, convention="big_vision"):
    """A decoded 64 x 64 mask placed into its box at the original resolution.

    "big_vision" (its evaluator): Pillow BILINEAR resize of the float mask to the box, then > 0.
    "demo" (the HF Space): clip(0.5 m + 0.5, 0, 1) -> uint8 (x 255, truncated) -> Pillow resize
    (BICUBIC, Pillow's default) -> / 255: a soft mask.

    Args:
      mask64: [64, 64] decoder output.
      box: (y0, x0, y1, x1) pixel ints from `parse` with the same convention (clipped to the image).
      height, width: the original image's size.
      convention: "big_vision" or "demo".
    Returns:
      [height, width] float32 in [0, 1] (exactly 0 or 1 for "big_vision"); zero outside the box,
      all zero for an empty box.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {list(CONVENTIONS)}, got {convention!r}")
    out = np.zeros((height, width), np.float32)  # [H, W]
    y0, x0, y1, x1 = (int(v) for v in box)
    y0, y1 = max(0, y0), min(height, y1)
    x0, x1 = max(0, x0), min(width, x1)
    if y1 <= y0 or x1 <= x0:
        return out
    m = np.asarray(mask64, dtype=np.float32)  # [64, 64]
    if convention == "big_vision":
        resized = np.asarray(Image.fromarray(m).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
        out[y0:y1, x0:x1] = resized > 0
    else:
        m8 = (np.clip(0.5 * m + 0.5, 0, 1) * 255).astype(np.uint8)
        out[y0:y1, x0:x1] = np.asarray(Image.fromarray(m8).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC)) / 255.0
    return out
