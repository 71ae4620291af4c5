"""Scoring generated answers for a transfer task: ground truths from JSONL records, answers to
predictions (parsing boxes and masks), and the task's `metrics` report.

    truth, problem = truth_of(record, "vqav2", root)       # per line; problem names what is wrong
    report, details = score("vqav2", texts, truths)       # metrics.Report, one dict per example

Used by `paligemma evaluate` (paligemma.fast.evaluate) and by fine-tuning's periodic evaluation.
Tasks and their ground truth (a JSONL record's keys; docs/transfer.md has the full layout):

    caption  "captions": [str, ...] (all references of the image) or "suffix"   CIDEr-D
    vqa      "answers": [str, ...] (any one counts) or "suffix"                 exact match
    vqav2    "answers": the ten human answers                                    VQAv2 accuracy
    chartqa  "answers": [str, ...] or "suffix"                                   relaxed accuracy
    detect   "boxes": [[y0, x0, y1, x1]] in pixels (one box) or "suffix" (loc tokens)   box IoU, acc@0.5/0.75
    segment  "mask": a PNG path (nonzero = inside) or "suffix" (loc + 16 seg tokens,
             decoded with the VQ-VAE)                                           mask IoU (mIoU)

A prediction that cannot be read (detect: no object with a box; segment: no object with a box
and 16 valid mask codes) is None: it scores 0 and is counted in the report's `invalid`.
"""

import os

import numpy as np

from paligemma.options import TASKS

from ..inputs.image import ImageError, load_image
from . import metrics
from .answers import parse, paste_mask

NEEDS_SIZE = ("detect", "segment")  # scored in the original image's pixels


def check_task(task):
    if task not in TASKS:
        raise ValueError(f"task: expected one of {list(TASKS)}, got {task!r}")
    return task


def _strings(value, key, minimum=1):
    if not isinstance(value, list) or len(value) < minimum or not all(isinstance(v, str) for v in value):
        return None, f"key {key!r}: expected a list of at least {minimum} string(s), got {value!r:.80}"
    return list(value), None


def truth_of(record, task, root):
    """The ground truth of one JSONL record for `task`: (truth, None) or (None, reason).

    Args:
      record: the line's JSON object.
      task: one of TASKS.
      root: folder a "mask" path is relative to.
    Returns:
      caption / vqa / chartqa / vqav2: a list of strings; detect: {"box": [4 floats]} or
      {"text": loc string}; segment: {"mask": absolute PNG path} or {"text": loc + seg string}.
    """
    check_task(task)
    suffix = record.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        return None, f"key 'suffix': expected a string, got {type(suffix).__name__}"
    if task == "vqav2":
        if "answers" not in record:
            return None, "missing key 'answers' (vqav2 needs the ten human answers)"
        return _strings(record["answers"], "answers", minimum=2)
    if task in ("caption", "vqa", "chartqa"):
        key = "captions" if task == "caption" else "answers"
        if key in record:
            return _strings(record[key], key)
        return ([suffix], None) if suffix is not None else (None, f"missing key {key!r} or 'suffix'")
    if task == "detect":
        if "boxes" in record:
            boxes = record["boxes"]
            ok = (isinstance(boxes, list) and len(boxes) == 1 and isinstance(boxes[0], list) and len(boxes[0]) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in boxes[0]))
            if not ok or not (boxes[0][2] > boxes[0][0] and boxes[0][3] > boxes[0][1]):
                return None, (f"key 'boxes': expected one box [[y0, x0, y1, x1]] in pixels with y1 > y0 and "
                              f"x1 > x0 (a referring expression has one target), got {boxes!r:.80}")
            return {"box": [float(v) for v in boxes[0]]}, None
        return ({"text": suffix}, None) if suffix is not None else (None, "missing key 'boxes' or 'suffix'")
    if "mask" in record:
        if not isinstance(record["mask"], str):
            return None, f"key 'mask': expected a PNG path, got {type(record['mask']).__name__}"
        path = os.path.join(root, record["mask"])
        return ({"mask": path}, None) if os.path.isfile(path) else (None, f"mask {path}: no such file")
    return ({"text": suffix}, None) if suffix is not None else (None, "missing key 'mask' or 'suffix'")


def _first_box(text, height, width, convention):
    """The first parsed object's pixel box, or None."""
    objects = [o for o in parse(text, height, width, convention).objects if o.box is not None]
    return list(objects[0].box) if objects else None


def _first_mask(text, height, width, convention, decode):
    """The first object with a box and 16 mask codes, decoded and pasted: bool [H, W], or None."""
    found = [o for o in parse(text, height, width, convention, require_seg=True).objects
             if o.box is not None and o.has_mask_codes]
    if not found:
        return None
    mask64 = np.asarray(decode(np.array([found[0].seg])))[0]  # [64, 64]
    return paste_mask(mask64, found[0].box, height, width, convention) > 0.5  # [H, W]


def read_mask(path, height, width):
    """A ground-truth mask PNG as bool [H, W] (nonzero = inside); ValueError if its size is not
    the image's."""
    try:
        mask = load_image(path, alpha="drop")  # [h, w, 3]
    except ImageError as e:
        raise ValueError(f"mask {e}") from None
    if mask.shape[:2] != (height, width):
        raise ValueError(f"mask {path}: {mask.shape[1]}x{mask.shape[0]} pixels, expected the image's "
                         f"{width}x{height}")
    return mask.any(axis=-1)  # [H, W]


def score(task, texts, truths, sizes=None, decode=None, convention="big_vision"):
    """The task's metric over generated answers.

    Args:
      task: one of TASKS. texts: [N] generated answers. truths: [N] from `truth_of`.
      sizes: [N] (height, width) of each original image (detect and segment).
      decode: segment only: codes [n, 16] -> [n, 64, 64] float masks (the VQ-VAE decoder).
      convention: loc de-quantisation for parsing (paligemma.ref.tasks.answers).
    Returns:
      (metrics.Report, details): details[i] is a JSON-ready dict for predictions.jsonl:
      {"score", "valid"} plus "box" (detect) or "mask_area" (segment).
    Raises:
      ValueError for truths that cannot be used (an unparseable target, a mask of another size,
      segment without `decode`).
    """
    check_task(task)
    if len(texts) != len(truths):
        raise ValueError(f"score: {len(texts)} answers but {len(truths)} ground truths")
    if task in NEEDS_SIZE and (sizes is None or len(sizes) != len(texts)):
        raise ValueError(f"score: task {task} needs each image's (height, width)")
    if task == "segment" and decode is None:
        raise ValueError("segment: scoring masks needs the mask VQ-VAE (--vae PATH, e.g. vae-oid.npz)")
    if task == "caption":
        report = metrics.cider_d(list(texts), [list(t) for t in truths])
    elif task == "vqa":
        report = metrics.exact_match_report(list(texts), truths)
    elif task == "vqav2":
        report = metrics.vqav2_report(list(texts), truths)
    elif task == "chartqa":
        report = metrics.relaxed_accuracy_report(list(texts), truths)
    if task not in NEEDS_SIZE:
        return report, [{"score": s, "valid": True} for s in report.per_example]

    preds, gts = [], []
    for i, (text, truth, (height, width)) in enumerate(zip(texts, truths, sizes)):
        if task == "detect":
            preds.append(_first_box(text, height, width, convention))
            gt = truth.get("box") or _first_box(truth["text"], height, width, convention)
        else:
            preds.append(_first_mask(text, height, width, convention, decode))
            gt = read_mask(truth["mask"], height, width) if "mask" in truth else \
                _first_mask(truth["text"], height, width, convention, decode)
        if gt is None or (task == "segment" and not np.any(gt)):
            raise ValueError(f"example {i}: the target {truth} gives no {'box' if task == 'detect' else 'mask'}")
        gts.append(gt)
    report = metrics.detection_report(preds, gts) if task == "detect" else metrics.segmentation_report(preds, gts)
    details = []
    for pred, s in zip(preds, report.per_example):
        extra = {"box": pred} if task == "detect" else {"mask_area": None if pred is None else int(pred.sum())}
        details.append({"score": s, "valid": pred is not None, **extra})
    return report, details
