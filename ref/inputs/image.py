"""Any image to the model's input: float32 NHWC in [-1, 1], the big_vision or the HF way.

    x = preprocess("cat.jpg", 224)                     # [224, 224, 3], big_vision convention
    x = preprocess([img_a, img_b], 448, method="hf")   # [2, 448, 448, 3], HF SiglipImageProcessor

Both methods squash to R x R (aspect ratio is not kept).
  "big_vision": `decode | resize(R, antialias=True) | value_range(-1, 1)`: TF's antialiased
      bilinear (ScaleAndTranslate, triangle kernel) on the uint8 image as float32, clip to
      [0, 255], cast to uint8 (truncation), then -1 + x/255*2. Emulated in TF's float32 order of
      operations, so it is bit-exact with TF's CPU kernel, quirks included: TF's normalised
      float32 weights can sum to 1 - 2**-24, so a flat area of value v may come out as v - 1.
      `antialias=False` is TF's plain half-pixel bilinear (`resize(R)` in a few configs).
  "hf": Pillow `resize((R, R), BICUBIC)` on uint8, then float64 x * (1/255) cast to float32,
      then (x - 0.5) / 0.5 in float32: HF's PIL backend (the torchvision one differs), exactly.

Decoding (`load_image`):
  - Alpha: TF's `decode_image(channels=3)` strips it (libpng png_set_strip_alpha); HF's
    `convert_to_rgb` composites onto white, also for a `transparency` key. They disagree:
    `load_image` drops it by default, `alpha="white"` makes HF's Pillow calls, and `preprocess`
    follows its method.
  - 16-bit (I;16, I;16B, ...): the high byte, v >> 8 (65535 -> 255), as TF's libpng
    png_set_strip_16 and Pillow's own 16-bit RGB unpacking; not Pillow's convert, which clips
    everything above 255 to white (HF inherits that clip; we deliberately differ). Mode I:
    negatives clip to 0; 16-bit data if every value fits, else 0..2**31-1 (v >> 23). Mode F:
    Pillow's 0..255 scale, clipped and truncated (as Pillow's F -> L).
  - Other modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr, ...): Pillow's conversion. Multi-frame
    files give their first frame (TF: expand_animations=False). JPEGs decode with Pillow's
    accurate integer IDCT, as big_vision's `decode(precise=True)`; TF's default fast IDCT
    differs by a few levels. EXIF orientation is not applied (neither reference does) unless
    `exif_transpose=True`.

Errors raise `ImageError` (a ValueError) naming the source and the problem: unreadable path,
not an image, corrupt or truncated data (decoding is forced, with Pillow's global
LOAD_TRUNCATED_IMAGES held False meanwhile, so truncation is never padded over), zero width or
height, more than `max_pixels` pixels (checked from the header before decoding; Pillow's
DecompressionBombError too). Files opened here are closed; file objects passed in are not.
"""

import contextlib
import io
import os
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from paligemma.options import PREPROCESS

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (~ 0.25 GiB of RGB)
METHODS = PREPROCESS
_F32 = np.float32


class ImageError(ValueError):
    """An image could not be loaded or does not fit the model's input rules."""


# ---------------------------------------------------------------------------- loading

_flag = {"lock": threading.Lock(), "users": 0, "saved": False}


@contextlib.contextmanager
def _strict_truncation():
    """Holds ImageFile.LOAD_TRUNCATED_IMAGES False while any load runs; counted, so that
    concurrent loads restore the user's value once, after the last of them."""
    with _flag["lock"]:
        if _flag["users"] == 0:
            _flag["saved"], ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        _flag["users"] += 1
    try:
        yield
    finally:
        with _flag["lock"]:
            _flag["users"] -= 1
            if _flag["users"] == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _flag["saved"]


def _check_size(width, height, name, max_pixels):
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: zero-size image ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height} pixels is more than "
                         f"max_pixels={max_pixels} (possible decompression bomb); not decoded")


def _high_depth_to_uint8(im):
    """I;16*, I and F images -> uint8 [H, W] (see the module docstring for the rules)."""
    a = np.asarray(im)
    if im.mode == "F":
        if not np.isfinite(a).all():
            raise ImageError("mode F image has NaN or infinite pixels")
        return np.clip(a, 0, 255).astype(np.uint8)  # astype truncates toward zero, like Pillow
    a = np.clip(a.astype(np.int64), 0, None)
    shift = 8 if im.mode.startswith("I;16") or a.max() <= 0xFFFF else 23  # 0..2**31-1 if 32-bit
    return (a >> shift).astype(np.uint8)


def _pil_to_rgb(im, alpha):
    """Loaded PIL image of any mode -> uint8 [H, W, 3]."""
    if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
        return np.repeat(_high_depth_to_uint8(im)[..., None], 3, axis=-1)
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if not has_alpha:
        return np.array(im.convert("RGB"))
    rgba = im.convert("RGBA")  # RGBA, not RGB: no Pillow warning for P + bytes transparency
    if alpha == "drop":
        return np.array(rgba)[..., :3]
    # HF's convert_to_rgb, call for call, so the "hf" method matches it exactly.
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.array(Image.alpha_composite(white, rgba).convert("RGB"))


def _decode(im, name, max_pixels, alpha, exif_transpose):
    """Header-checked, fully decoded, converted: PIL image (maybe lazy) -> uint8 [H, W, 3]."""
    _check_size(im.width, im.height, name, max_pixels)
    try:
        im.load()
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, possible decompression bomb ({e})") from e
    except Exception as e:  # corrupt data can surface as almost any exception type
        raise ImageError(f"{name}: corrupt or truncated image data "
                         f"({type(e).__name__}: {e})") from e
    try:
        return _pil_to_rgb(im, alpha)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from e
    except (ValueError, OSError) as e:  # Pillow: "conversion from X to RGB not supported"
        raise ImageError(f"{name}: cannot convert mode {im.mode} to RGB ({e})") from e


def _check_png_header(fp, name):
    """Pillow calls a zero-size image unidentified; say what is wrong, for PNG at least."""
    try:
        fp.seek(0)
        head = fp.read(24)
    except Exception:  # a stream that cannot rewind keeps the generic message
        return
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        _check_size(*struct.unpack(">II", head[16:24]), name, None)


def _decode_stream(fp, name, max_pixels, alpha, exif_transpose):
    """Opens an encoded image from a binary stream and decodes it; the PIL image is closed."""
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels, possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        _check_png_header(fp, name)
        raise ImageError(f"{name}: not an image, or a format Pillow cannot read") from e
    except Exception as e:
        raise ImageError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from e
    with im:
        return _decode(im, name, max_pixels, alpha, exif_transpose)


def _array_to_rgb(a, alpha):
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3] (a copy)."""
    name = f"array of shape {list(a.shape)}"
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"{name}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    _check_size(a.shape[1], a.shape[0], name, None)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.shape[-1] == 4:
        return _pil_to_rgb(Image.fromarray(a, "RGBA"), alpha)
    return np.array(a)


def load_image(source, *, max_pixels=DEFAULT_MAX_PIXELS, alpha="drop", exif_transpose=False):
    """Any image source -> uint8 RGB array, fully decoded, no file left open.

    Args:
      source: a path (str or os.PathLike), encoded bytes, a binary file object (read from its
        start, as Pillow does; not closed), a `PIL.Image.Image` (loaded if lazy), or a uint8 array
        [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
      max_pixels: reject images with more pixels than this (from the header, before decoding);
        None for no limit of our own (Pillow's DecompressionBombError still applies).
      alpha: "drop" (big_vision) or "white" (composite onto white, as HF).
      exif_transpose: apply the EXIF orientation tag.
    Returns:
      uint8 [H, W, 3].
    Raises:
      ImageError (a ValueError) naming the source and the problem.
    """
    _check_choice("alpha", alpha, ("drop", "white"))
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive int or None, got {max_pixels!r}")
    args = (max_pixels, alpha, exif_transpose)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, alpha)
    # Our size check replaces Pillow's warning; both run before any pixel is decoded.
    with _strict_truncation(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(source, Image.Image):
            return _decode(source, f"<PIL image {source.mode} {source.width}x{source.height}>",
                           *args)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            return _decode_stream(io.BytesIO(data), f"<{len(data)} bytes>", *args)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            try:
                fp = open(path, "rb")
            except OSError as e:
                raise ImageError(f"{path}: cannot open file ({e.strerror or e})") from e
            with fp:
                return _decode_stream(fp, path, *args)
        if hasattr(source, "read"):
            return _decode_stream(source, str(getattr(source, "name", "<file object>")), *args)
    raise ImageError(f"unsupported image source of type {type(source).__name__}")


# ---------------------------------------------------------------------------- resizing

def _triangle_spans(in_size, out_size, antialias):
    """TF ScaleAndTranslate weights for the triangle kernel, translation 0, in TF's float32 ops.

    Output pixel x samples at s = (x + 0.5) / scale (half-pixel centres); input pixel j (centre
    j + 0.5) weighs max(1 - |j + 0.5 - s| / k, 0), k = max(1 / scale, 1) when antialiasing (the
    kernel widens by the downscale factor) else 1. Only j in [0, in_size) count, renormalised to
    sum 1: that is the edge handling (for upscaling, bilinear with edge clamping).

    Returns:
      starts int64 [out], weights float32 [out, span]: out[x] = sum_t w[x, t] in[starts[x] + t].
    """
    scale = _F32(out_size) / _F32(in_size)  # tf.image.resize: cast both sizes to float32, divide
    inv_scale = _F32(1.0 / float(scale))  # C++ `float inv_scale = 1.0 / scale` divides in double
    kernel_scale = max(inv_scale, _F32(1)) if antialias else _F32(1)
    span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
    sample = (np.arange(out_size).astype(_F32) + _F32(0.5)) * inv_scale  # [out]
    starts = np.clip(np.ceil(sample - kernel_scale - _F32(0.5)), 0, in_size - 1).astype(np.int64)
    ends = np.clip(np.floor(sample + kernel_scale - _F32(0.5)), 0, in_size - 1).astype(np.int64) + 1
    taps = starts[:, None] + np.arange(span)  # [out, span]
    t = np.abs(((taps.astype(_F32) + _F32(0.5)) - sample[:, None]) * (_F32(1) / kernel_scale))
    w = np.where((t < 1) & (taps < ends[:, None]), _F32(1) - t, _F32(0)).astype(_F32)
    total = np.zeros(out_size, _F32)
    for k in range(span):  # summed tap by tap, as TF does, so the float32 rounding matches
        total += w[:, k]
    ok = np.abs(total) >= 1000 * np.finfo(_F32).tiny
    w = np.where(ok[:, None], w * (_F32(1) / np.where(ok, total, _F32(1)))[:, None], _F32(0))
    return starts, w.astype(_F32)


def _gather_axis(x, starts, weights, axis):
    """out[i] = sum_t weights[i, t] * x[starts[i] + t] along `axis`, tap by tap in float32."""
    x = np.moveaxis(x, axis, 0)
    idx = np.minimum(starts[:, None] + np.arange(weights.shape[1]), x.shape[0] - 1)
    out = np.zeros((len(starts),) + x.shape[1:], _F32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    for k in range(weights.shape[1]):
        out += weights[:, k].reshape(shape) * x[idx[:, k]]  # past-the-span taps have weight 0
    return np.moveaxis(out, 0, axis)


def _bilinear_coords(in_size, out_size):
    """TF ResizeBilinear (half_pixel_centers=True): lower, upper int64 [out], lerp float32 [out]."""
    scale = _F32(in_size) / _F32(out_size)
    src = (np.arange(out_size).astype(_F32) + _F32(0.5)) * scale - _F32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - floor).astype(_F32)


def resize_float_tf(image, size, antialias=True):
    """`tf.image.resize(image, size, "bilinear", antialias)`: [H, W, C] -> float32 [h, w, C]."""
    x = np.asarray(image).astype(_F32)
    (H, W), (oh, ow) = x.shape[:2], size
    if antialias:  # ScaleAndTranslate: rows into [oh, W, C] first, then columns
        x = _gather_axis(x, *_triangle_spans(H, oh, True), axis=0)
        return _gather_axis(x, *_triangle_spans(W, ow, True), axis=1)
    ylo, yhi, ylerp = _bilinear_coords(H, oh)
    xlo, xhi, xlerp = _bilinear_coords(W, ow)
    xl = xlerp[None, :, None]
    top = x[ylo][:, xlo] + (x[ylo][:, xhi] - x[ylo][:, xlo]) * xl
    bottom = x[yhi][:, xlo] + (x[yhi][:, xhi] - x[yhi][:, xlo]) * xl
    return top + (bottom - top) * ylerp[:, None, None]


def _size2(size):
    size = (size, size) if np.isscalar(size) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"size: expected a positive int R or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _check_choice(argument, value, choices):
    if value not in choices:
        raise ValueError(f"{argument}: expected one of {choices}, got {value!r}")


def _check_uint8_rgb(image, argument, expected="[..., H, W, 3]"):
    image = np.asarray(image)
    ndim_ok = image.ndim == 3 if expected == "[H, W, 3]" else image.ndim >= 3
    if image.dtype != np.uint8 or not ndim_ok or image.shape[-1] != 3:
        raise ValueError(f"{argument}: expected uint8 {expected}, "
                         f"got {image.dtype} shape {list(image.shape)}")
    return image


def resize(image, size, method="big_vision", *, antialias=True):
    """Squashes a uint8 RGB image to `size` (aspect ratio not kept) by the named convention.

    Args:
      image: uint8 [H, W, 3].
      size: R (square) or (height, width).
      method: "big_vision" (TF bilinear, clip, truncate) or "hf" (Pillow bicubic).
      antialias: big_vision only; False gives TF's plain half-pixel bilinear.
    Returns:
      uint8 [R, R, 3] (or [height, width, 3]).
    """
    _check_choice("method", method, METHODS)
    image = _check_uint8_rgb(image, "image", "[H, W, 3]")
    oh, ow = _size2(size)
    if method == "hf":
        if not antialias:
            raise ValueError("antialias=False exists only for method='big_vision'")
        return np.array(Image.fromarray(image).resize((ow, oh), resample=Image.BICUBIC))
    # big_vision's resize op: clip to the uint8 range, then tf.cast, which truncates.
    return np.clip(resize_float_tf(image, (oh, ow), antialias), 0, 255).astype(np.uint8)


def to_model_input(image_uint8, method="big_vision"):
    """uint8 [..., 3] -> float32 [..., 3] in [-1, 1], in the named convention's float32 ops.

    big_vision value_range(-1, 1): -1 + (x / 255) * 2. HF: (float64 x * (1/255)) -> float32,
    then (x - 0.5) / 0.5. (The two happen to agree on all 256 values.)
    """
    _check_choice("method", method, METHODS)
    x = _check_uint8_rgb(image_uint8, "image_uint8")
    if method == "big_vision":
        return x.astype(_F32) / _F32(255) * _F32(2) - _F32(1)
    x = (x.astype(np.float64) * (1 / 255)).astype(_F32)
    return (x - _F32(0.5)) / _F32(0.5)


def preprocess(source_or_list, size, method="big_vision", *, antialias=True, alpha=None,
               exif_transpose=False, max_pixels=DEFAULT_MAX_PIXELS):
    """Sources -> model input: load, convert to RGB, resize, scale to [-1, 1].

    Args:
      source_or_list: one source (see `load_image`) or a list/tuple of them.
      size: the model's resolution R (or (height, width)).
      method: "big_vision" or "hf" (see the module docstring).
      antialias: big_vision only (see `resize`).
      alpha: None for the method's own rule ("drop" for big_vision, "white" for hf).
      exif_transpose, max_pixels: see `load_image`.
    Returns:
      float32 [R, R, 3] for one source, [B, R, R, 3] for a list, NHWC, values in [-1, 1].
    """
    _check_choice("method", method, METHODS)
    alpha = alpha or ("white" if method == "hf" else "drop")
    batch = isinstance(source_or_list, (list, tuple))
    sources = list(source_or_list) if batch else [source_or_list]
    if not sources:
        raise ValueError("source_or_list: empty list, expected at least one image")
    out = []
    for i, source in enumerate(sources):
        try:
            rgb = load_image(source, max_pixels=max_pixels, alpha=alpha,
                             exif_transpose=exif_transpose)
        except ImageError as e:
            raise ImageError(f"image {i}: {e}" if batch else str(e)) from e
        out.append(to_model_input(resize(rgb, size, method, antialias=antialias), method))
    return np.stack(out) if batch else out[0]
