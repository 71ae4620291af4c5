"""`paligemma evaluate`'s engine: read an eval JSONL, decode greedily in batches, score, write.

    from paligemma.fast import PaliGemma
    from paligemma.fast.evaluate import evaluate_file
    model = PaliGemma.load("model.npz", "tok.model")
    result = evaluate_file(model, "eval.jsonl", "vqav2", "out/", batch_size=8)
    result.report.as_dict()      # {"vqav2_accuracy": 0.71, "count": 500, "invalid": 0}

Eval JSONL: one object per line with the visual input (exactly one of "image", "images",
"video"; `paligemma.ref.inputs.media`), the prompt "prefix", an optional "id" (default: the line
number) and the task's ground truth (`paligemma.ref.tasks.scoring`). Every line is checked before
decoding starts; problems are `paligemma.fast.data.BadLine`s naming file:line.

Writes OUT/predictions.jsonl (one line per example, file order: "id", "prefix", "prediction",
"score", "valid", and "box" / "mask_area" for detect / segment) and OUT/metrics.json (the
report, "count" and "invalid", plus the task, the data file and the settings), each through a
temporary file and a rename.
"""

import dataclasses
import json
import os
import sys

from tqdm import tqdm

from paligemma.ref.inputs.image import load_image
from paligemma.ref.inputs.media import Video, check_item, frame_count, item_from_record, load_item
from paligemma.ref.tasks import scoring

from .data import BadLine, DataError, check_frames, read_lines
from .distributed import is_writer


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One line of an eval file: id, visual item (path, tuple of paths or `Video`), prompt,
    ground truth (`scoring.truth_of`) and "file:line"."""

    id: object
    item: object
    prefix: str
    truth: object
    source: str


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate_file` produced: the report, the predictions' texts and the files written."""

    report: object
    texts: tuple
    files: dict


def _parse(line, number, task, root):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got a {type(record).__name__}"
    if not isinstance(record.get("prefix"), str):
        return None, "missing key 'prefix' (the prompt, a string)"
    item, reason = item_from_record(record, root)
    if reason:
        return None, reason
    truth, reason = scoring.truth_of(record, task, root)
    if reason:
        return None, reason
    if task in scoring.NEEDS_SIZE and frame_count(item, 1) is not None:
        return None, f"task {task} scores boxes/masks in one image's pixels: give \"image\", not several frames"
    rid = record.get("id", number)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, f"key 'id': expected a string or an integer, got {type(rid).__name__}"
    return dict(id=rid, item=item, prefix=record["prefix"], truth=truth), None


def read_eval(path, task, image_root=None, video_frames=16, skip_bad=False, check_media=True):
    """Every line of an eval JSONL, checked.

    Args:
      path: the file. task: one of `scoring.TASKS`. image_root: folder relative paths are
        resolved against (default: the file's folder). video_frames: frames of "video" lines (for
        the frame-count check). skip_bad: skip (and return) bad lines instead of raising.
      check_media: decode every image (and each video's first frame) now.
    Returns:
      (examples: [EvalExample], bad: [BadLine]).
    Raises:
      DataError naming file:line of each bad line (unless skip_bad); ValueError for an unreadable
      or empty file, no usable line, differing frame counts or repeated ids.
    """
    scoring.check_task(task)
    path, root, lines = read_lines(path, image_root)
    examples, bad = [], []
    for number, line in enumerate(lines, 1):
        parsed, reason = _parse(line, number, task, root) if line.strip() else (None, "empty line")
        if reason is None and check_media:
            reason = check_item(parsed["item"])
        if reason:
            bad.append(BadLine(path, number, reason))
        else:
            examples.append(EvalExample(source=f"{path}:{number}", **parsed))
    if bad and not skip_bad:
        raise DataError(path, bad)
    if not examples:
        raise ValueError(f"{path}: no usable examples ({len(bad)} bad lines)")
    check_frames(path, [{"item": e.item, "source": e.source} for e in examples], video_frames)
    seen = {}
    for e in examples:
        if e.id in seen:
            raise ValueError(f"{e.source}: id {e.id!r} repeats the id of {seen[e.id]}; ids must be unique")
        seen[e.id] = e.source
    return examples, bad


def image_sizes(items):
    """(height, width) of each item's original image (detect and segment score in its pixels)."""
    return [load_image(item).shape[:2] for item in items]


def predict(model, examples, batch_size=8, max_new_tokens=32, video_frames=16, video_stride=1, progress=True,
            stream=None):
    """Greedy answers of a `PaliGemma` for each example, in batches of `batch_size`.

    The last batch is filled up with copies of its first example (answers dropped), so every
    call has one shape (the fast implementation compiles once). Videos start at frame 0.

    Returns:
      [N] str.
    """
    R, method = model.config.vision.image_size, model.preprocess
    texts = []
    bar = tqdm(total=len(examples), disable=not progress, file=stream or sys.stderr, unit="example",
               dynamic_ncols=True)
    with bar:
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            real = len(chunk)
            chunk += [chunk[0]] * (batch_size - real)
            items = [load_item(e.item, R, method, video_frames=video_frames, video_stride=video_stride)
                     if isinstance(e.item, Video) else e.item for e in chunk]
            results = model.generate(items, [e.prefix for e in chunk], max_new_tokens=max_new_tokens)
            texts += [r.text for r in results[:real]]
            bar.update(real)
    return texts


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(out, task, examples, texts, report, details, settings):
    """OUT/predictions.jsonl and OUT/metrics.json; returns their paths (several processes:
    process 0 writes, `paligemma.fast.distributed.is_writer`)."""
    files = {"predictions": os.path.join(out, "predictions.jsonl"), "metrics": os.path.join(out, "metrics.json")}
    if not is_writer():
        return files
    os.makedirs(out, exist_ok=True)
    lines = [json.dumps({"id": e.id, "prefix": e.prefix, "prediction": t, **d}, ensure_ascii=False)
             for e, t, d in zip(examples, texts, details)]
    _write_atomic(files["predictions"], "".join(line + "\n" for line in lines))
    _write_atomic(files["metrics"], json.dumps({"task": task, **report.as_dict(), **settings}, indent=1) + "\n")
    return files


def evaluate_file(model, data, task, out, batch_size=8, max_new_tokens=32, decode=None, image_root=None,
                  video_frames=16, video_stride=1, convention="big_vision", progress=True, stream=None):
    """Reads `data`, predicts, scores and writes OUT/predictions.jsonl and OUT/metrics.json.

    Args:
      model: a `paligemma.fast.PaliGemma` (either impl). data: the eval JSONL. task: one of
        `scoring.TASKS`. out: output folder. decode: the VQ-VAE decoder, codes [n, 16] ->
        [n, 64, 64] (segment). Others: see `read_eval`, `predict` and `scoring.score`.
    Returns:
      `EvalResult`.
    """
    if task == "segment" and decode is None:
        raise ValueError("segment: scoring masks needs the mask VQ-VAE (--vae PATH, e.g. vae-oid.npz)")
    examples, _ = read_eval(data, task, image_root, video_frames)
    texts = predict(model, examples, batch_size, max_new_tokens, video_frames, video_stride, progress, stream)
    sizes = image_sizes([e.item for e in examples]) if task in scoring.NEEDS_SIZE else None
    report, details = scoring.score(task, texts, [e.truth for e in examples], sizes, decode, convention)
    settings = {"data": os.path.abspath(data), "max_new_tokens": max_new_tokens, "convention": convention,
                "video_frames": video_frames, "video_stride": video_stride}
    files = write_outputs(out, task, examples, texts, report, details, settings)
    return EvalResult(report, tuple(texts), files)



def task_truths(examples, task, root):
    """Ground truths of fine-tuning's validation `Examples` (`paligemma.fast.data`) for `task`.

    Raises:
      ValueError naming file:line of each line without a usable ground truth (or with several
      frames where detect / segment need one image).
    """
    truths, problems = [], []
    for record, item, source in zip(examples.records, examples.images, examples.sources):
        truth, reason = scoring.truth_of(record, task, root)
        if reason is None and task in scoring.NEEDS_SIZE and frame_count(item, 1) is not None:
            reason = f"task {task} scores boxes/masks in one image's pixels: give \"image\", not several frames"
        if reason:
            problems.append(f"{source}: {reason}")
        truths.append(truth)
    if problems:
        raise ValueError(f"eval_task {task}: {len(problems)} validation line(s) without a usable ground truth: "
                         + "; ".join(problems[:5]))
    return truths


def score_answers(task, answers, examples, truths, decode=None):
    """`scoring.score` of fine-tuning's validation answers: the report's dict ("count", "invalid", ...)."""
    sizes = image_sizes(examples.images) if task in scoring.NEEDS_SIZE else None
    report, _ = scoring.score(task, answers, truths, sizes, decode)
    return report.as_dict()
