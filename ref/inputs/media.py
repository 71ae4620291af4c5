"""One example's visual input: an image, several images (one multi-image prompt), or a video.

    pixels = load_item("cat.jpg", 224)                               # [224, 224, 3]
    pixels = load_item(("a.jpg", "b.jpg"), 224)                      # [2, 224, 224, 3]
    pixels = load_item(Video("clip.mp4"), 224, video_frames=16, video_stride=9)  # [16, 224, 224, 3]
    batch = stack_examples([pixels, ...])                            # [B, (F,) R, R, 3]

The model reads [B, R, R, 3] (one image per example) or [B, F, R, R, 3] (F frames or images per
example, F x P image tokens; see `paligemma.ref.model.embed_images`). A batch needs one F, so all
examples of a batch (and of a fine-tuning run) must have the same frame count: `frame_count`
gives it per item, `stack_examples` says which example differs.

In a JSONL record (fine-tuning and `paligemma evaluate`) the item is exactly one of
`"image": "a.jpg"`, `"images": ["a.jpg", "b.jpg"]` or `"video": "clip.mp4"`, paths relative to
the file's folder (or an image root); `item_from_record` reads it.
"""

import dataclasses
import os

import numpy as np

from .image import ImageError, load_image, preprocess
from .video import VideoError, load_video, read_frames

MEDIA_KEYS = ("image", "images", "video")


@dataclasses.dataclass(frozen=True)
class Video:
    """A video file; its frames are sampled when it is loaded (`load_item`)."""

    path: str

    def __str__(self):
        return self.path


def frame_count(item, video_frames):
    """None for one image (no frame axis), len(item) for several images, `video_frames` for a video."""
    if isinstance(item, Video):
        return video_frames
    if isinstance(item, (list, tuple)):
        return len(item)
    return None


def describe_count(frames):
    """"one image", "3 images/frames" for `frame_count` values (error messages)."""
    return "one image (no frame axis)" if frames is None else f"{frames} frames/images"


def item_from_record(record, root):
    """The visual item of a JSONL record: (item, None), or (None, reason).

    Args:
      record: a dict with exactly one of "image" (str), "images" (non-empty list of str), "video" (str).
      root: folder relative paths are resolved against.
    Returns:
      (absolute path str | tuple of them | `Video`, None) or (None, why the record has none).
    """
    given = [k for k in MEDIA_KEYS if k in record]
    if len(given) != 1:
        return None, (f"expected exactly one of keys {list(MEDIA_KEYS)}, got "
                      f"{given or 'none'}")
    key, value = given[0], record[given[0]]
    if key == "images":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return None, f"key 'images': expected a non-empty list of strings, got {json_type(value)}"
        return tuple(os.path.join(root, v) for v in value), None
    if not isinstance(value, str):
        return None, f"key {key!r}: expected a string, got {json_type(value)}"
    path = os.path.join(root, value)
    return (Video(path) if key == "video" else path), None


def json_type(value):
    """A JSON value's type name for messages ("list", "int", ...)."""
    return type(value).__name__


def check_item(item):
    """None if the item's files decode (images fully; a video's first frame), else the reason."""
    paths = [item.path] if isinstance(item, Video) else list(item) if isinstance(item, tuple) else [item]
    for path in paths:
        kind = "video" if isinstance(item, Video) else "image"
        if not os.path.isfile(path):
            return f"{kind} {path}: no such file"
        try:
            read_frames(path, [0]) if kind == "video" else load_image(path)
        except (ImageError, VideoError) as e:
            return f"{kind} {e}"
        except ImportError as e:
            return f"video {path}: {e}"
    return None


def load_item(item, size, method="big_vision", *, video_frames=16, video_stride=1, seed=None):
    """An item's model input in [-1, 1].

    Args:
      item: an image source (path, bytes, file, uint8 array), a list/tuple of image sources, a
        `Video`, or frames already prepared (float [F, R, R, 3], e.g. from `load_video`).
      size: the model's resolution R. method: the preprocessing convention (`image.preprocess`).
      video_frames, video_stride: how a `Video` is sampled (`video.load_video`).
      seed: None samples a video from frame 0 (evaluation); an int or np.random.Generator
        starts at a seeded random offset (training).
    Returns:
      float32 [R, R, 3] for one image, [F, R, R, 3] otherwise.
    """
    if isinstance(item, Video):
        return load_video(item.path, size, video_frames, video_stride, seed=seed, method=method)
    if isinstance(item, np.ndarray) and item.ndim == 4 and np.issubdtype(item.dtype, np.floating):
        return item.astype(np.float32, copy=False)  # [F, R, R, 3] prepared frames
    if isinstance(item, (list, tuple)):
        return preprocess(list(item), size, method)  # [F, R, R, 3]
    return preprocess(item, size, method)  # [R, R, 3]


def stack_examples(pixels):
    """Examples' inputs as one batch: [B, R, R, 3] or [B, F, R, R, 3].

    Raises:
      ValueError naming the first example whose shape differs from example 0's (a batch needs
      one frame count).
    """
    if not pixels:
        raise ValueError("stack_examples: no examples")
    first = np.shape(pixels[0])
    for i, p in enumerate(pixels):
        if np.shape(p) != first:
            raise ValueError(f"images: example {i} has shape {list(np.shape(p))} but example 0 has "
                             f"{list(first)}; every example of a batch needs the same number of frames "
                             f"(images) at the same size")
    return np.stack(pixels)  # [B, (F,) R, R, 3]


def token_count_line(image_shape, num_patches, noun="frames"):
    """What an input costs in image tokens: "16 frames x 256 = 4096 image tokens" for
    [B, 16, R, R, 3] (`noun` "images" for a multi-image prompt), "1 image x 256 = 256 image
    tokens" for [B, R, R, 3]."""
    frames = image_shape[1] if len(image_shape) == 5 else 1
    noun = noun if len(image_shape) == 5 else "image"
    return f"{frames} {noun} x {num_patches} = {frames * num_patches} image tokens"
