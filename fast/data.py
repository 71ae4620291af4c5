"""Fine-tuning data: big_vision's JSON Lines layout, checked line by line, batched and prefetched.

    {"image": "images/cat.jpg", "prefix": "caption en", "suffix": "A cat on a mat."}

One JSON object per line, as big_vision's `bv:jsonl` reads it for `forkme.py`: `image` is a
path relative to the JSONL file's folder (or to `image_root`), `prefix` the prompt, `suffix` the
target. Instead of `image` a line may give `"images": ["a.jpg", "b.jpg"]` (one multi-image
prompt) or `"video": "clip.mp4"` (`video_frames` frames at `video_stride`: from a seeded random
offset in training, from frame 0 in evaluation; `paligemma.ref.inputs.video`). The model then reads
[B, F, R, R, 3]; every example of a file must have the same frame count (a clear error names the
lines otherwise). Other keys are kept in `Examples.records` (evaluation targets such as
"answers"). Each example is tokenised by `paligemma.ref.Tokenizer.train_example`, big_vision's
`combine_and_keep_train(text_len)`: the loss covers the suffix and its EOS only.

Every line is checked before training starts (`read_jsonl`): invalid JSON, not an object, a
missing or non-string key, a missing or undecodable image, a text longer than the sequence. Each
problem is a `BadLine` naming `file:line`; `load_examples` stops with all of them (`DataError`)
or, with `skip_bad=True`, skips and counts them. Nothing is dropped silently.

Order: positions 0, 1, 2, ... of an endless stream; position p is example
`permutation(epoch = p // N)[p % N]`, each epoch's permutation drawn from `(seed, epoch)`. A batch
is a function of (seed, position) alone, so a resumed run reads exactly what the uninterrupted
one would have (`batch_indices`). `Prefetcher` decodes the images of the next few batches in a
background thread (a bounded queue).

Axes: A accumulation (micro-batches per step), B examples per micro-batch, R image size,
T text length + 1.
"""

import concurrent.futures
import dataclasses
import json
import os
import queue
import threading
from typing import NamedTuple

import numpy as np

from paligemma.ref.inputs.media import check_item, describe_count, frame_count, item_from_record, load_item

KEYS = ("image", "prefix", "suffix")  # or "images" / "video" in place of "image" (MEDIA_KEYS)
TEXT_KEYS = ("prefix", "suffix")


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A JSONL line that cannot be used, and why."""

    file: str
    line: int  # 1-based
    reason: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Bad lines in a data file; `bad` lists them all, the message names the first ones."""

    def __init__(self, path, bad, shown=5):
        self.bad = list(bad)
        more = f" (and {len(self.bad) - shown} more)" if len(self.bad) > shown else ""
        super().__init__(f"{path}: {len(self.bad)} bad line(s): " + "; ".join(map(str, self.bad[:shown])) + more
                         + "; fix them or pass skip_bad (--skip-bad-lines) to skip and count them")


@dataclasses.dataclass(frozen=True)
class Examples:
    """The usable examples of one file, tokenised.

    images: N items: an absolute image path, a tuple of them (multi-image) or a
      `paligemma.ref.inputs.media.Video`; prefixes, suffixes: N strings; sources: N "file:line".
    text, mask_ar, mask_loss: [N, T] int32 (`TrainExample` columns, T = text_len + 1).
    bad: the skipped lines (empty unless `skip_bad`).
    records: N dicts, each line's JSON object (evaluation reads its targets from them).
    frames: the frame count F of every example (None: one image each, [B, R, R, 3]).
    """

    images: tuple
    prefixes: tuple
    suffixes: tuple
    sources: tuple
    text: np.ndarray
    mask_ar: np.ndarray
    mask_loss: np.ndarray
    bad: tuple = ()
    records: tuple = ()
    frames: int | None = None

    def __len__(self):
        return len(self.images)


class Batch(NamedTuple):
    """A step's examples, split into A micro-batches of B.

    images [A, B, R, R, 3] (or [A, B, F, R, R, 3]) float32 in [-1, 1]; text, mask_ar, mask_loss [A, B, T] int32;
    weight [A, B] float32 (1 for an example, 0 for padding that fills the last eval batch).
    """

    images: np.ndarray
    text: np.ndarray
    mask_ar: np.ndarray
    mask_loss: np.ndarray
    weight: np.ndarray


def _parse(line, root, tokenizer, text_len):
    """(record, None) for a usable line, (None, reason) otherwise; images are checked later."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object with keys {list(KEYS)}, got a {type(record).__name__}"
    for key in TEXT_KEYS:
        if key not in record:
            return None, f"missing key {key!r} (expected {list(KEYS)})"
        if not isinstance(record[key], str):
            return None, f"key {key!r}: expected a string, got {type(record[key]).__name__}"
    item, reason = item_from_record(record, root)
    if reason:
        return None, reason
    n = 1 + len(tokenizer.encode(record["prefix"])) + 1 + len(tokenizer.encode(record["suffix"])) + 1
    if n > text_len + 1:
        return None, (f"text is {n} tokens ([BOS] prefix, \"\\n\", suffix, EOS), more than "
                      f"text_len + 1 = {text_len + 1}")
    return dict(record, item=item), None


def read_lines(path, image_root=None):
    """(path, image root, lines) of a JSON Lines file; the root defaults to the file's folder.

    Raises:
      ValueError if the file cannot be read as UTF-8.
    """
    path = os.fspath(path)
    root = os.path.abspath(image_root if image_root is not None else os.path.dirname(os.path.abspath(path)))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return path, root, lines


def read_jsonl(path, tokenizer, text_len, image_root=None, check_images=True, workers=4):
    """Reads and checks every line of a JSONL file.

    Args:
      path: the file; tokenizer: a `paligemma.ref.Tokenizer`; text_len: the model's text length.
      image_root: folder image paths are relative to (default: the file's folder).
      check_images: decode every image now (so a bad one stops the run before training).
      workers: threads decoding images.
    Returns:
      (records, bad): usable records (the line's JSON object plus "item": its image path, tuple of
      paths or `Video`, "source": "file:line" and "line") in file order, and the `BadLine`s.
    Raises:
      ValueError if the file cannot be read or has no lines.
    """
    path, root, lines = read_lines(path, image_root)
    if not lines:
        raise ValueError(f"{path}: empty file, expected one JSON object per line")
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        record, reason = _parse(line, root, tokenizer, text_len) if line.strip() else (None, "empty line")
        if reason:
            bad.append(BadLine(path, number, reason))
        else:
            records.append(dict(record, source=f"{path}:{number}", line=number))
    if check_images and records:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            problems = list(pool.map(check_item, [r["item"] for r in records]))
        bad += [BadLine(path, r["line"], p) for r, p in zip(records, problems) if p]
        records = [r for r, p in zip(records, problems) if not p]
    return records, sorted(bad, key=lambda b: b.line)


def check_frames(path, records, video_frames):
    """The one frame count of all records (see `Examples.frames`); ValueError naming a line of
    each count when they differ."""
    counts = {}
    for r in records:
        counts.setdefault(frame_count(r["item"], video_frames), r["source"])
    if len(counts) > 1:
        seen = "; ".join(f"{describe_count(n)} at {source}" for n, source in counts.items())
        raise ValueError(f"{path}: every example must have the same number of frames (a batch is [B, F, R, R, 3]), "
                         f"found {seen}")
    return next(iter(counts))


def load_examples(path, tokenizer, text_len, image_root=None, skip_bad=False, check_images=True, video_frames=16):
    """`read_jsonl`, then tokenised; bad lines stop it unless `skip_bad`.

    Args:
      video_frames: the frames F each `"video"` line gives (only to check the frame counts).
    Returns:
      `Examples` (its `bad` lists the skipped lines).
    Raises:
      DataError naming `file:line` of the bad lines (unless `skip_bad`); ValueError if no
      usable example is left or the examples' frame counts differ.
    """
    records, bad = read_jsonl(path, tokenizer, text_len, image_root, check_images)
    if bad and not skip_bad:
        raise DataError(path, bad)
    if not records:
        raise ValueError(f"{path}: no usable examples ({len(bad)} bad lines)")
    frames = check_frames(path, records, video_frames)
    rows = [tokenizer.train_example(r["prefix"], r["suffix"], text_len) for r in records]
    column = lambda i: np.stack([row[i] for row in rows]).astype(np.int32)  # noqa: E731
    plain = lambda r: {k: v for k, v in r.items() if k not in ("item", "source", "line")}  # noqa: E731
    return Examples(tuple(r["item"] for r in records), tuple(r["prefix"] for r in records),
                    tuple(r["suffix"] for r in records), tuple(r["source"] for r in records),
                    column(0), column(1), column(2), tuple(bad), tuple(plain(r) for r in records), frames)


def batch_indices(n, seed, position, count):
    """Example indices at stream positions `position .. position + count - 1`: [count] int64.

    Position p is `permutation_e[p % n]` with e = p // n and permutation_e drawn from
    `np.random.default_rng([seed, e])`: a fresh shuffle every epoch, reproducible from the position.
    """
    positions = np.arange(position, position + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(positions // n):
        here = positions // n == epoch
        out[here] = np.random.default_rng([seed, int(epoch)]).permutation(n)[positions[here] % n]
    return out


def make_batch(examples, indices, image_size, micro_batches=1, weight=None, pool=None, video_frames=16,
               video_stride=1, seeds=None):
    """The examples at `indices` (images decoded and resized), as a `Batch` of A = micro_batches.

    Args:
      examples: `Examples`; indices: [A * B] ints; image_size: the model's R.
      weight: [A * B] (default ones); pool: an executor to decode images in parallel.
      video_frames, video_stride: how "video" lines are sampled.
      seeds: None (videos from frame 0: evaluation) or [A * B] seeds of each video's random
        start (training; see `paligemma.ref.inputs.video.random_offset`).
    """
    items = [examples.images[i] for i in indices]
    seeds = [None] * len(items) if seeds is None else list(seeds)
    load = lambda a: load_item(a[0], image_size, video_frames=video_frames, video_stride=video_stride,  # noqa: E731
                               seed=a[1])
    pairs = list(zip(items, seeds))
    images = np.stack(list(pool.map(load, pairs)) if pool else [load(p) for p in pairs])  # [A*B, (F,) R, R, 3]
    weight = np.ones(len(indices), np.float32) if weight is None else np.asarray(weight, np.float32)
    split = lambda a: a.reshape((micro_batches, -1) + a.shape[1:])  # noqa: E731
    return Batch(split(images), split(examples.text[indices]), split(examples.mask_ar[indices]),
                 split(examples.mask_loss[indices]), split(weight))


def eval_batches(examples, batch_size):
    """(indices [batch_size], weight [batch_size]) covering every example once, in file order; the
    last batch is filled up by repeating example 0 with weight 0."""
    n = len(examples)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        fill = batch_size - len(idx)
        yield np.concatenate([idx, np.zeros(fill, np.int64)]), np.r_[np.ones(len(idx)), np.zeros(fill)]


class Prefetcher:
    """Training batches for steps `start .. stop - 1`, made ahead in a background thread.

    Step s reads stream positions `s * batch_size ...` (`batch_indices`). At most `depth` batches
    wait in the queue, so memory stays bounded; an error in the thread is raised by `next`.
    Use as an iterator of `(step, Batch)`, and `close()` (or a `with` block) when done.

    rows: None (every example of a step), or the example rows of each micro-batch that this
    process feeds (`sharding.process_rows`; several processes): only those are decoded, and each
    `Batch` field is [A, len(rows), ...].
    """

    def __init__(self, examples, image_size, batch_size, micro_batches, seed, start, stop, depth=2, workers=4,
                 video_frames=16, video_stride=1, rows=None):
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._video = (video_frames, video_stride)
        B = batch_size // micro_batches
        rows = np.arange(B) if rows is None else np.asarray(rows)
        self._take = (np.arange(micro_batches)[:, None] * B + rows[None, :]).ravel()  # [A * rows] of [A * B]
        args = (examples, image_size, batch_size, micro_batches, seed, start, stop)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, examples, image_size, batch_size, micro_batches, seed, start, stop):
        try:
            for step in range(start, stop):
                idx = batch_indices(len(examples), seed, step * batch_size, batch_size)[self._take]
                # A video's start frame is a function of (seed, stream position): resumable too.
                seeds = [np.random.default_rng([seed, step * batch_size + int(t), 1]) for t in self._take]
                batch = make_batch(examples, idx, image_size, micro_batches, pool=self._pool,
                                   video_frames=self._video[0], video_stride=self._video[1], seeds=seeds)
                if not self._put((step, batch)):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)
            return
        self._put(None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join()
        self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
