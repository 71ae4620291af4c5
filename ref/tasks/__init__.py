"""What PaliGemma's task prefixes ask for and how the answers are read, scored and shown.

    answers   `<loc>` / `<seg>` text to objects (boxes, masks) and back
    scoring   a transfer task's ground truth and predictions -> a `metrics` report
    metrics   CIDEr-D, VQA accuracy, relaxed accuracy, box and mask IoU, ...
    draw      detections and masks drawn on the image
    shapes    synthetic scenes of coloured shapes with their answers (the demo model's data)

The names of `answers` are also re-exported here, so `paligemma.ref.tasks.parse` (the spelling
from before `ref/tasks.py` became `ref/tasks/answers.py`) keeps working.
"""

from paligemma.options import CONVENTIONS

from .answers import (MASK_SIZE, NUM_LOC, NUM_SEG, SEG_PER_OBJECT, SEPARATOR, DetectedObject, Parsed, crop_mask,
                      dequantize, format_objects, parse, parse_ids, paste_mask, quantize_box)

__all__ = [
    "CONVENTIONS", "MASK_SIZE", "NUM_LOC", "NUM_SEG", "SEG_PER_OBJECT", "SEPARATOR", "DetectedObject", "Parsed",
    "crop_mask", "dequantize", "format_objects", "parse", "parse_ids", "paste_mask", "quantize_box",
]
