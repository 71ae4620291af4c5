"""Video files to the model's input: F frames at a stride, each preprocessed as an image.

    x = load_video("clip.mp4", 224, num_frames=16, stride=9)          # [16, 224, 224, 3], eval
    x = load_video("clip.mp4", 224, num_frames=16, stride=9, seed=7)  # random start, training

Multi-image prompts need nothing from here: `image.preprocess([a, b, c], R)` already gives
[F, R, R, 3], the same layout.

Sampling, as the PaliGemma video transfers (MSR-VTT, ActivityNet, ...: 16 frames, stride 9 in
big_vision's configs) read videos:
  - frames are counted in decoding order (the decoder's output), not by timestamp;
  - evaluation starts at frame 0; training (a `seed` given) at a random offset, uniform over
    [0, max(n - (F - 1) * stride, 1)): every start whose F frames all fit, or 0 when none
    does (DMVR's `_get_random_sampling_offset`); the seed makes it reproducible;
  - frames offset, offset + stride, ..., offset + (F - 1) * stride that exist are taken; when
    fewer than F do (a short video), the ones taken are tiled and cut to F, as big_vision's
    `video_replicate_img`: [f0, f1, f2] -> [f0, f1, f2, f0, f1] for F = 5. (DMVR's reader,
    which big_vision's configs assume but do not ship, instead wraps the frame indices
    modulo n; the two agree whenever the F frames fit.)
  - each frame: decoded to RGB by FFmpeg (through PyAV, the `video` extra), then resized and
    scaled to [-1, 1] exactly as `image.preprocess` does with the same `method`. big_vision's
    own `video_decode` op differs slightly: TF bilinear without antialiasing (our
    `antialias=False`) and no rounding to uint8 in between. Rotation metadata is not applied.

Errors raise `VideoError` (a ValueError) naming the file: cannot open, no video stream,
unreadable data, no frames, frames larger than `max_pixels`. The random offset needs the frame
count, which containers do not reliably store, so training reads the file twice (a decode-only
counting pass, then the frames); evaluation stops decoding at the last frame it needs.
"""

import contextlib
import os

import numpy as np

from . import image as image_lib


class VideoError(ValueError):
    """A video could not be read or sampled."""


def _av():
    """PyAV, imported on first use so that image-only users do not need it."""
    try:
        import av
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: pip install 'paligemma[video]'") from e
    return av


def _check_sampling(num_frames, stride):
    for name, v in (("num_frames", num_frames), ("stride", stride)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


# ---------------------------------------------------------------------------- sampling

def frame_indices(num_frames, stride, offset=0):
    """The frames to take: offset + i * stride for i < num_frames, ascending."""
    _check_sampling(num_frames, stride)
    return [offset + i * stride for i in range(num_frames)]


def random_offset(total, num_frames, stride, rng):
    """A training start frame, uniform over [0, max(total - (F - 1) * stride, 1)).

    Args:
      total: frames in the video (> 0).
      num_frames, stride: the sampling F and stride.
      rng: an int seed or a np.random.Generator.
    Returns:
      int offset; 0 when the F frames do not fit from any start.
    """
    _check_sampling(num_frames, stride)
    high = max(total - (num_frames - 1) * stride, 1)
    return int(np.random.default_rng(rng).integers(0, high))


def replicate_frames(frames, num_frames):
    """big_vision's `video_replicate_img(F, F)`: tile the K frames F times, keep the first F.

    Args:
      frames: [K, ...] with K >= 1.
    Returns:
      [F, ...]: frames[i % K] for i < F (the first F when K >= F).
    """
    frames = np.asarray(frames)  # [K, ...]
    if frames.shape[0] == 0:
        raise ValueError("replicate_frames: no frames to replicate")
    reps = (num_frames,) + (1,) * (frames.ndim - 1)
    return np.tile(frames, reps)[:num_frames]  # [F, ...]


# ---------------------------------------------------------------------------- decoding

def _name(source):
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(
        getattr(source, "name", "<file object>"))


def _open(source, name):
    """Opens a container and its first video stream, or raises VideoError naming the file."""
    av = _av()
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise VideoError(f"{name}: no such file (or not a regular file)")
    if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
        raise VideoError(f"{name}: empty file (0 bytes)")
    try:
        container = av.open(os.fspath(source) if isinstance(source, os.PathLike) else source)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{name}: cannot open as a video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        kinds = [s.type for s in container.streams] or "none"
        container.close()
        raise VideoError(f"{name}: no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV would crash the process decoding such a stream
        container.close()
        raise VideoError(f"{name}: the video stream has no codec parameters "
                         f"(truncated or corrupt file?)")
    return container, stream


def _frames(source, name, max_pixels):
    """Yields (index, av.VideoFrame) in decoding order; the container is closed after."""
    av = _av()
    container, stream = _open(source, name)
    stream.thread_type = "AUTO"  # frame and slice threads; the frames come out in order anyway
    with container:
        try:
            for i, frame in enumerate(container.decode(stream)):
                pixels = frame.width * frame.height
                if pixels == 0 or (max_pixels is not None and pixels > max_pixels):
                    raise VideoError(f"{name}: frame {i} is {frame.width}x{frame.height} pixels, "
                                     f"outside 1..max_pixels={max_pixels}")
                yield i, frame
        except av.error.FFmpegError as e:
            raise VideoError(f"{name}: unreadable video data ({type(e).__name__}: {e})") from e


def count_frames(source, *, max_pixels=image_lib.DEFAULT_MAX_PIXELS):
    """How many frames the video decodes to (a full decode: containers' counts are hints)."""
    name = _name(source)
    total = sum(1 for _ in _frames(source, name, max_pixels))
    if total == 0:
        raise VideoError(f"{name}: the video has no frames")
    return total


def read_frames(source, indices, *, max_pixels=image_lib.DEFAULT_MAX_PIXELS):
    """The frames at `indices` that exist, as RGB; decoding stops after the last one.

    Args:
      source: a path or a binary file object (read from its current position).
      indices: ascending frame numbers (see `frame_indices`).
      max_pixels: reject frames with more pixels than this.
    Returns:
      uint8 [K, H, W, 3], K <= len(indices): the video may end before the later indices.
    Raises:
      VideoError naming the file, also when the video has no frames at all.
    """
    name = _name(source)
    indices = list(indices)
    if not indices or min(indices) < 0:
        raise ValueError(f"indices: expected non-negative frame numbers, got {indices!r}")
    wanted, last, out, seen = set(indices), max(indices), {}, 0
    with contextlib.closing(_frames(source, name, max_pixels)) as frames:
        for i, frame in frames:
            seen += 1
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")  # [H, W, 3]
            if i >= last:
                break
    if seen == 0:
        raise VideoError(f"{name}: the video has no frames")
    if not out:
        raise VideoError(f"{name}: the video has {seen} frames, none of them at {indices}")
    return np.stack([out[i] for i in indices if i in out])  # [K, H, W, 3]


def load_video(source, size, num_frames, stride=1, *, seed=None, method="big_vision",
               antialias=True, max_pixels=image_lib.DEFAULT_MAX_PIXELS):
    """A video file -> model input: F sampled frames, resized, scaled to [-1, 1].

    Args:
      source: a path (or a seekable binary file object when `seed` is None).
      size: the model's resolution R (or (height, width)).
      num_frames: F, frames to return.
      stride: take every stride-th frame.
      seed: None to start at frame 0 (evaluation); an int or np.random.Generator for a random
        start (training), see `random_offset`.
      method, antialias: the image preprocessing convention (see `image.preprocess`).
      max_pixels: reject frames with more pixels than this.
    Returns:
      float32 [F, R, R, 3], values in [-1, 1], frames in time order.
    """
    _check_sampling(num_frames, stride)
    offset = 0
    if seed is not None:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError("seed: a random start needs a path (the file is read twice)")
        offset = random_offset(count_frames(source, max_pixels=max_pixels), num_frames, stride,
                               seed)
    rgb = read_frames(source, frame_indices(num_frames, stride, offset),
                      max_pixels=max_pixels)  # [K, H, W, 3]
    # Each distinct frame is resized once; tiling the result equals tiling the frames.
    x = np.stack([image_lib.to_model_input(image_lib.resize(f, size, method, antialias=antialias),
                                           method) for f in rgb])  # [K, R, R, 3]
    return replicate_frames(x, num_frames)  # [F, R, R, 3]
