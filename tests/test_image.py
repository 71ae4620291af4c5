"""Image loading and preprocessing (paligemma.ref.inputs.image).

Expected values come from the formulas written out here (explicit per-pixel loops for TF's
antialiased bilinear), from Pillow's own conversions, or from transformers; none from the code
under test. Test images are written to tmp_path or built in memory.
"""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageFile

from paligemma.ref import get_config
from paligemma.ref.inputs import image as I
from paligemma.ref.inputs.image import load_image, preprocess, resize, to_model_input
from paligemma.ref.model import validate_inputs

RNG = np.random.default_rng(0)


def _u8(*shape, hi=256):
    return RNG.integers(0, hi, shape).astype(np.uint8)


def _encode(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width, height, bit_depth, color_type, rows=b""):
    """A PNG written by hand: lets the header say anything (zero size, huge size, 16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------------- modes -> RGB

def _gray3(g):
    return np.repeat(np.asarray(g, np.uint8)[..., None], 3, axis=-1)


def test_8bit_modes_from_files(tmp_path):
    rgb, gray, a = _u8(9, 11, 3), _u8(9, 11), _u8(9, 11)
    cases = {
        "l.png": (Image.fromarray(gray), _gray3(gray)),
        "la.png": (Image.fromarray(np.stack([gray, a], -1), "LA"), _gray3(gray)),
        "rgb.png": (Image.fromarray(rgb), rgb),
        "rgba.png": (Image.fromarray(np.dstack([rgb, a]), "RGBA"), rgb),  # alpha dropped
        "one.png": (Image.fromarray(gray > 127), _gray3(np.where(gray > 127, 255, 0))),
    }
    for name, (im, expected) in cases.items():
        im.save(tmp_path / name)
        np.testing.assert_array_equal(load_image(tmp_path / name), expected, err_msg=name)


@pytest.mark.parametrize("transparency", [None, 3])
def test_palette_gives_palette_colours(tmp_path, transparency):
    palette = _u8(16, 3)
    index = _u8(7, 5, hi=16)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.ravel().tolist())
    kw = {} if transparency is None else {"transparency": transparency}
    im.save(tmp_path / "p.png", **kw)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), palette[index])
    white = load_image(tmp_path / "p.png", alpha="white")
    expected = palette[index].copy()
    if transparency is not None:
        expected[index == transparency] = 255
    np.testing.assert_array_equal(white, expected)


def test_cmyk_uses_pillows_conversion(tmp_path):
    cmyk = np.concatenate([np.array([[[255, 0, 0, 0]]], np.uint8), _u8(1, 5, 4)], axis=1)  # cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    got = load_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(got, np.array(Image.fromarray(cmyk, "CMYK").convert("RGB")))
    assert tuple(got[0, 0]) == (0, 255, 255)


def test_16bit_keeps_the_high_byte(tmp_path):
    v = np.array([[0, 255, 256, 32767, 32768, 65280, 65534, 65535]], np.uint16)
    expected = _gray3(v // 256)
    assert tuple(expected[0, [0, 1, 2, -1], 0]) == (0, 0, 1, 255)
    Image.fromarray(v).save(tmp_path / "g16.png")  # Pillow reads it back as I;16
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png"), expected)
    Image.fromarray(v).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.tif"), expected)
    big_endian = Image.frombytes("I;16B", (v.shape[1], 1), v.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(big_endian), expected)
    as_int32 = Image.fromarray(v.astype(np.int32))  # mode I holding 16-bit data
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(load_image(as_int32), expected)


def test_16bit_rgb_png_keeps_the_high_byte():
    rgb = RNG.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    np.testing.assert_array_equal(load_image(_png(6, 4, 16, 2, rows)), (rgb >> 8).astype(np.uint8))


def test_32bit_int_and_float_modes():
    v = np.array([[-5, 0, 2**23, 2**31 - 1]], np.int32)
    np.testing.assert_array_equal(load_image(Image.fromarray(v)), _gray3([[0, 0, 1, 255]]))
    f = np.array([[-3.0, 0.0, 0.99, 1.5, 127.5, 254.9, 255.0, 1e6]], np.float32)
    im = Image.fromarray(f)
    assert im.mode == "F"
    np.testing.assert_array_equal(load_image(im), _gray3(np.asarray(im.convert("L"))))
    np.testing.assert_array_equal(load_image(im)[0, :, 0], [0, 0, 0, 1, 127, 254, 255, 255])
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(Image.fromarray(np.array([[1.0, np.nan]], np.float32)))


def test_white_alpha_matches_hf_convert_to_rgb():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    rgba = _u8(6, 7, 4)
    p = Image.fromarray(_u8(6, 7, hi=8), "P")
    p.putpalette(_u8(24).tolist())
    p.info["transparency"] = 2
    for im in [Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., :2], "LA"), p]:
        expected = image_transforms.convert_to_rgb(im, return_numpy=True)
        np.testing.assert_array_equal(load_image(im, alpha="white"), expected, err_msg=im.mode)
    # Independent of HF: white + alpha * (colour - white), within Pillow's rounding.
    got = load_image(Image.fromarray(rgba, "RGBA"), alpha="white").astype(float)
    a = rgba[..., 3:] / 255
    np.testing.assert_allclose(got, 255 + a * (rgba[..., :3] - 255.0), atol=1)


def test_exif_orientation_only_on_request(tmp_path):
    a = _u8(6, 4, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "o.png"), a)
    np.testing.assert_array_equal(load_image(tmp_path / "o.png", exif_transpose=True),
                                  np.rot90(a, k=-1))


def test_every_kind_of_source_gives_the_same_pixels(tmp_path):
    rgb = _u8(5, 8, 3)
    data = _encode(Image.fromarray(rgb))
    (tmp_path / "x.png").write_bytes(data)
    with open(tmp_path / "x.png", "rb") as f:
        from_file = load_image(f)
        assert not f.closed  # the caller's file object stays the caller's
    for got in [load_image(str(tmp_path / "x.png")), load_image(tmp_path / "x.png"),
                load_image(data), load_image(bytearray(data)), load_image(memoryview(data)),
                load_image(Image.open(io.BytesIO(data))), load_image(rgb), from_file]:
        np.testing.assert_array_equal(got, rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(load_image(gray), _gray3(gray))
    np.testing.assert_array_equal(load_image(gray[..., None]), _gray3(gray))
    np.testing.assert_array_equal(load_image(np.dstack([rgb, gray])), rgb)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")
def test_no_file_handles_left_open(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_u8(40, 40, 3)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:300])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(good)
        with pytest.raises(ValueError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------- errors

def test_not_an_image():
    for data in [b"definitely not an image", b""]:
        with pytest.raises(ValueError, match="not an image"):
            load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("flag", [False, True])
def test_truncated_files(tmp_path, monkeypatch, fmt, flag):
    data = _encode(Image.fromarray(_u8(64, 64, 3)), fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)  # the user's choice ...
    with pytest.raises(ValueError, match=r"half\.\w+: corrupt or truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is flag  # ... is left as it was


def test_zero_size_images():
    for data in [_png(0, 5, 8, 0), _png(5, 0, 8, 0)]:
        with pytest.raises(ValueError, match="zero-size image"):
            load_image(data)
    with pytest.raises(ValueError, match=r"zero-size image \(0x5"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero-size image"):
        load_image(np.zeros((3, 0, 3), np.uint8))


def test_max_pixels_is_checked_before_decoding(monkeypatch):
    data = _encode(Image.fromarray(_u8(50, 40, 3)))
    with pytest.raises(ValueError, match="40x50 = 2000 pixels is more than max_pixels=1999"):
        load_image(data, max_pixels=1999)
    assert load_image(data, max_pixels=2000).shape == (50, 40, 3)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(Image.new("L", (100, 100)), max_pixels=10)


@pytest.mark.parametrize("side", [10_000, 20_000])  # above Pillow's warning / error limits
def test_decompression_bombs_rejected_by_default(monkeypatch, side):
    compress = zlib.compressobj(9)
    zero_row = bytes(1 + side // 8)  # filter byte + 1-bit pixels
    idat = b"".join(compress.compress(zero_row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))
    assert len(data) < 100_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(data)
    assert not decoded


def test_bad_paths_and_sources(tmp_path):
    with pytest.raises(ValueError, match="nope.png: cannot open file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="cannot open file"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="expected dtype uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="expected \\[H, W\\]"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="unsupported image source of type int"):
        load_image(42)
    with pytest.raises(ValueError, match="method"):
        preprocess(_u8(4, 4, 3), 8, method="tf")
    with pytest.raises(ValueError, match="size"):
        resize(_u8(4, 4, 3), 0)
    with pytest.raises(ValueError, match="image 1: <13 bytes>: not an image"):
        preprocess([_u8(4, 4, 3), b"not an image!"], 8)


# ---------------------------------------------------------------------------- big_vision resize

def _triangle_row(out_index, n_in, n_out):
    """TF ScaleAndTranslate (antialias) weights of one output pixel, straight from the formula."""
    scale = n_in / n_out  # input pixels per output pixel
    width = max(scale, 1.0)  # the triangle widens by the downscale factor
    centre = (out_index + 0.5) * scale
    w = np.array([max(0.0, 1.0 - abs(j + 0.5 - centre) / width) for j in range(n_in)])
    return w / w.sum()


def _bilinear_row(out_index, n_in, n_out):
    """TF ResizeBilinear(half_pixel_centers=True) weights of one output pixel, edges clamped."""
    src = (out_index + 0.5) * n_in / n_out - 0.5
    lo = int(np.floor(src))
    w = np.zeros(n_in)
    w[min(max(lo, 0), n_in - 1)] += 1 - (src - lo)
    w[min(max(lo + 1, 0), n_in - 1)] += src - lo
    return w


def _reference_resize(img, oh, ow, antialias):
    H, W, _ = img.shape
    out = np.zeros((oh, ow, 3))
    for y in range(oh):
        wy = _triangle_row(y, H, oh) if antialias else _bilinear_row(y, H, oh)
        for x in range(ow):
            wx = _triangle_row(x, W, ow) if antialias else _bilinear_row(x, W, ow)
            out[y, x] = np.einsum("i,j,ijc->c", wy, wx, img.astype(float))
    return out


def _assert_truncates(got_uint8, reference, tol=2e-3):
    """uint8 == floor(clip(reference)), except where reference is within tol of an integer."""
    ref = np.clip(reference, 0, 255)
    lo, hi = np.floor(np.clip(ref - tol, 0, 255)), np.floor(np.clip(ref + tol, 0, 255))
    assert np.all((got_uint8 >= lo) & (got_uint8 <= hi)), np.abs(got_uint8 - ref).max()


@given(h=st.integers(1, 40), w=st.integers(1, 40), oh=st.integers(1, 20), ow=st.integers(1, 20),
       antialias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_big_vision_resize_matches_per_pixel_formula(h, w, oh, ow, antialias, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    ref = _reference_resize(img, oh, ow, antialias)
    np.testing.assert_allclose(I.resize_float_tf(img, (oh, ow), antialias), ref, atol=2e-3)
    _assert_truncates(resize(img, (oh, ow), antialias=antialias), ref)


@given(h=st.integers(1, 30), w=st.integers(1, 30), up=st.integers(0, 30), seed=st.integers(0, 99))
def test_upscaling_with_antialias_is_plain_bilinear(h, w, up, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    size = (h + up, w + up)
    # Two algorithms, two float32 summation orders: values up to 255 agree to a few ulps
    # (measured 4.6e-6 relative at worst), far below the 1.0 a uint8 level would need.
    np.testing.assert_allclose(I.resize_float_tf(img, size, True),
                               I.resize_float_tf(img, size, False), rtol=2e-5, atol=1e-3)


@pytest.mark.parametrize("shape,size", [((300, 200, 3), 32), ((15, 9, 3), 37), ((7, 64, 3), 16)])
def test_big_vision_resize_large_and_non_square(shape, size):
    img = _u8(*shape)
    got = resize(img, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    _assert_truncates(got, _reference_resize(img, size, size, True))


@given(h=st.integers(1, 60), w=st.integers(1, 60), size=st.integers(1, 40),
       value=st.integers(0, 255), antialias=st.booleans())
def test_constant_image_stays_constant(h, w, size, value, antialias):
    img = np.full((h, w, 3), value, np.uint8)
    # TF's float32 normalised weights can sum to 1 - 2**-24, so after big_vision's truncation a
    # constant v may come out as v - 1 (real TF does this too); never anything else.
    got = resize(img, size, antialias=antialias).astype(int)
    assert np.all((got == value) | (got == value - 1))
    np.testing.assert_allclose(I.resize_float_tf(img, (size, size), antialias), value, rtol=1e-5)
    np.testing.assert_array_equal(resize(img, size, "hf"), img[:1, :1].repeat(size, 0).repeat(size, 1))


# Interior weight of each neighbouring block when a block image (f x f constant blocks) is
# downscaled by f with the triangle kernel widened to f: sum of 1 - |t|/f over the neighbour's
# taps, normalised by f. f=2: t=1.5 -> 1/4 of 2 = 1/8; f=3: t=2 -> 1/3 of 3 = 1/9;
# f=4: t=2.5, 3.5 -> (3/8 + 1/8) of 4 = 1/8. At the image border the missing neighbour's weight
# is dropped and the rest renormalised. (The result is NOT the block mean: the kernel spans
# half of each neighbour.)
NEIGHBOUR = {2: 1 / 8, 3: 1 / 9, 4: 1 / 8}


def _block_filter(n, f):
    m = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            if 0 <= j < n:
                m[i, j] = NEIGHBOUR[f] if j != i else 1 - 2 * NEIGHBOUR[f]
    return m / m.sum(1, keepdims=True)


@given(f=st.sampled_from([2, 3, 4]), bh=st.integers(1, 8), bw=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_integer_downscale_of_block_image(f, bh, bw, seed):
    blocks = np.random.default_rng(seed).integers(0, 256, (bh, bw, 3)).astype(np.uint8)
    img = blocks.repeat(f, 0).repeat(f, 1)
    expected = np.einsum("yi,xj,ijc->yxc", _block_filter(bh, f), _block_filter(bw, f), blocks)
    got = resize(img, (bh, bw)).astype(float)
    assert np.all(np.abs(got - expected) <= 1 + 1e-9), np.abs(got - expected).max()


def test_bit_exact_against_tensorflow_when_installed():
    tf = pytest.importorskip("tensorflow")
    for shape, size, antialias in [((50, 70, 3), 32, True), ((9, 5, 3), 21, True),
                                   ((40, 30, 3), 17, False)]:
        img = _u8(*shape)
        r = tf.image.resize(img, (size, size), method="bilinear", antialias=antialias)
        expected = tf.cast(tf.clip_by_value(r, 0, 255), tf.uint8).numpy()
        np.testing.assert_array_equal(resize(img, size, antialias=antialias), expected)


# ---------------------------------------------------------------------------- HF and scaling

def test_hf_method_equals_siglip_image_processor_exactly():
    transformers = pytest.importorskip("transformers")
    # transformers 5.x: SiglipImageProcessor is the torchvision backend and falls back to the PIL
    # one when torchvision is missing (as here); name the PIL backend so the test means the same
    # thing either way. 4.x has only the (PIL-based) SiglipImageProcessor.
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    for R in (32, 56):
        processor = cls(do_resize=True, size={"height": R, "width": R}, resample=3,
                        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
        p = Image.fromarray(_u8(30, 20, hi=16), "P")
        p.putpalette(_u8(48).tolist())
        p.info["transparency"] = 1
        images = [Image.fromarray(_u8(45, 61, 3)), Image.fromarray(_u8(100, 30, 4), "RGBA"),
                  Image.fromarray(_u8(20, 20)), p]
        expected = processor(images=images, return_tensors="np")["pixel_values"]
        got = preprocess(images, R, method="hf")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.transpose(0, 2, 3, 1))


def test_value_scaling():
    x = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=-1)
    for method in I.METHODS:
        y = to_model_input(x, method)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert y[0, 0, 0] == -1 and y[0, -1, 0] == 1 and np.all(np.diff(y[0, :, 0]) > 0)
        np.testing.assert_allclose(y, x / 127.5 - 1, atol=1.5e-7)
    # big_vision's value_range: -1 + (x / 255) * 2, each step rounded to float32.
    f = np.float32
    expected = [f(-1) + (f(v) / f(255)) * f(2) for v in range(256)]
    np.testing.assert_array_equal(to_model_input(x, "big_vision")[0, :, 0], expected)
    np.testing.assert_array_equal(to_model_input(x, "hf"), to_model_input(x, "big_vision"))
    with pytest.raises(ValueError, match="expected uint8"):
        to_model_input(x.astype(np.float32))


@pytest.mark.parametrize("method", I.METHODS)
def test_preprocess_shapes_dtype_range(tmp_path, method):
    Image.fromarray(_u8(33, 47, 3)).save(tmp_path / "a.png")
    sources = [tmp_path / "a.png", _u8(10, 90, 3), Image.fromarray(_u8(64, 64, 4), "RGBA")]
    one = preprocess(sources[0], 28, method)
    assert one.shape == (28, 28, 3) and one.dtype == np.float32
    batch = preprocess(sources, 28, method)
    assert batch.shape == (3, 28, 28, 3) and batch.dtype == np.float32
    assert batch.min() >= -1 and batch.max() <= 1
    np.testing.assert_array_equal(batch[0], one)
    np.testing.assert_array_equal(batch[1], to_model_input(resize(sources[1], 28, method), method))
    config = get_config("tiny-paligemma2")
    assert config.vision.image_size == 28
    tokens = np.zeros((3, 4), np.int64)
    validate_inputs(config, batch, tokens, tokens)  # the model accepts it as is
    with pytest.raises(ValueError, match="empty list"):
        preprocess([], 28, method)
