"""Video files to model input (paligemma.ref.inputs.video).

Every video is written by the test itself with PyAV: solid-colour frames, each frame its own
colour, in PNG-in-AVI (lossless RGB, so decoding must give the colours back exactly) or in
MPEG-4 Part 2 / yuv420p (lossy: colours within a few levels). Expected frame orders are worked
by hand; expected pixels come from `image.preprocess` on the known colour (the image path the
frames must follow), never from the video code.
"""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from paligemma.ref.inputs import image as I
from paligemma.ref.inputs import video as V

av = pytest.importorskip("av")

H, W, R = 24, 40, 16


def _colour(i):
    return (17 * i % 256, (255 - 13 * i) % 256, 37 * i % 256)  # distinct for i < 20


def _write(path, n, codec="png", pix_fmt="rgb24"):
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        out.start_encoding()  # so that a zero-frame video is still a valid file
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), _colour(i), np.uint8), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {n: _write(d / f"v{n}.avi", n) for n in (1, 2, 5, 10, 20)}


def _expected(indices):
    """The image path on each frame's known colour: float32 [F, R, R, 3]."""
    return np.stack([I.preprocess(np.full((H, W, 3), _colour(i), np.uint8), R) for i in indices])


def _which_frames(x):
    """Frame numbers of model-input frames, recognised by colour among the 20 written."""
    table = _expected(range(20))  # [20, R, R, 3]
    return [int(np.argmin(np.abs(table - f).max(axis=(1, 2, 3)))) for f in x]


# ---------------------------------------------------------------------------- decoding

def test_decodes_solid_colours_in_order(videos):
    frames = V.read_frames(videos[10], range(10))  # [10, H, W, 3]
    assert frames.dtype == np.uint8 and frames.shape == (10, H, W, 3)
    for i, f in enumerate(frames):
        assert (f == np.array(_colour(i), np.uint8)).all(), f"frame {i}"
    assert V.count_frames(videos[10]) == 10


def test_lossy_yuv420p_mp4_keeps_colours_and_channel_order(tmp_path):
    path = _write(tmp_path / "v.mp4", 6, codec="mpeg4", pix_fmt="yuv420p")
    frames = V.read_frames(path, range(6)).astype(int)  # [6, H, W, 3]
    want = np.array([_colour(i) for i in range(6)])[:, None, None, :]  # [6, 1, 1, 3]
    # YUV 4:2:0 round trips move a flat colour by a few levels; a swapped channel order
    # would move some by more than 100 (e.g. colour 1 is (17, 242, 37)).
    assert np.abs(frames - want).max() <= 8


def test_file_object_source(videos):
    with open(videos[5], "rb") as f:
        frames = V.read_frames(f, [1, 3])
    assert [tuple(x[0, 0]) for x in frames] == [_colour(1), _colour(3)]


# ---------------------------------------------------------------------------- sampling

def test_eval_sampling_starts_at_frame_zero_with_stride(videos):
    # 10 frames, F = 4, stride 3: frames 0, 3, 6, 9.
    x = V.load_video(videos[10], R, num_frames=4, stride=3)
    assert x.dtype == np.float32 and x.shape == (4, R, R, 3)
    np.testing.assert_array_equal(x, _expected([0, 3, 6, 9]))


@pytest.mark.parametrize("n, num_frames, stride, frames", [
    # 5 frames, F = 4, stride 2: wanted 0, 2, 4, 6; frame 6 does not exist, so the three taken
    # are tiled and cut: [0, 2, 4] -> [0, 2, 4, 0, 2, 4, ...][:4] = [0, 2, 4, 0].
    (5, 4, 2, [0, 2, 4, 0]),
    # 2 frames, F = 5, stride 1: [0, 1] -> [0, 1, 0, 1, 0].
    (2, 5, 1, [0, 1, 0, 1, 0]),
    # 1 frame, F = 3: the one frame three times.
    (1, 3, 9, [0, 0, 0]),
    # 20 frames, F = 2, stride 9: 0, 9 (long enough, nothing tiled).
    (20, 2, 9, [0, 9]),
])
def test_short_videos_are_tiled_and_cut(videos, n, num_frames, stride, frames):
    x = V.load_video(videos[n], R, num_frames=num_frames, stride=stride)
    np.testing.assert_array_equal(x, _expected(frames))


def test_one_frame_video_equals_the_image_path(videos):
    frame = V.read_frames(videos[1], [0])[0]  # [H, W, 3]
    for method in ("big_vision", "hf"):
        x = V.load_video(videos[1], R, num_frames=1, method=method)  # [1, R, R, 3]
        np.testing.assert_array_equal(x[0], I.preprocess(frame, R, method=method))


def test_training_offset_is_seeded_and_in_range(videos):
    # 20 frames, F = 4, stride 3: a window spans (4 - 1) * 3 + 1 = 10 frames, so it can start
    # at 0..10: offsets drawn from [0, 20 - 9) = [0, 11).
    starts = set()
    for seed in range(12):
        x = V.load_video(videos[20], R, num_frames=4, stride=3, seed=seed)
        got = _which_frames(x)
        o = got[0]
        assert got == [o, o + 3, o + 6, o + 9] and 0 <= o <= 10, (seed, got)
        np.testing.assert_array_equal(x, V.load_video(videos[20], R, 4, 3, seed=seed))
        starts.add(o)
    assert len(starts) > 3  # it does move


def test_training_offset_when_the_window_does_not_fit(videos):
    # 5 frames, F = 4, stride 3: the window needs 10 frames; the start is always 0, then the
    # existing 0, 3 are tiled: [0, 3, 0, 3].
    for seed in range(5):
        x = V.load_video(videos[5], R, num_frames=4, stride=3, seed=seed)
        np.testing.assert_array_equal(x, _expected([0, 3, 0, 3]))


def test_random_offset_range_hand_worked():
    # total 12, F = 4, stride 3: starts 0, 1, 2 fit (2 + 9 = 11 is the last frame).
    assert {V.random_offset(12, 4, 3, s) for s in range(200)} == {0, 1, 2}
    assert {V.random_offset(10, 4, 3, s) for s in range(50)} == {0}  # exactly one fits
    assert {V.random_offset(3, 4, 3, s) for s in range(50)} == {0}   # none fits
    rng = np.random.default_rng(0)
    assert 0 <= V.random_offset(100, 16, 1, rng) < 85


def test_frame_indices_and_replicate_frames():
    assert V.frame_indices(4, 3, offset=2) == [2, 5, 8, 11]
    x = np.arange(3)[:, None] * np.ones((3, 2))  # [3, 2]: rows 0, 1, 2
    np.testing.assert_array_equal(V.replicate_frames(x, 5)[:, 0], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(V.replicate_frames(x, 2)[:, 0], [0, 1])
    with pytest.raises(ValueError, match="num_frames: expected a positive int"):
        V.frame_indices(0, 1)
    with pytest.raises(ValueError, match="stride: expected a positive int"):
        V.load_video("x.mp4", R, num_frames=4, stride=0)


# ---------------------------------------------------------------------------- bad files

def test_bad_files_error_naming_the_file(tmp_path, videos):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = tmp_path / "sound.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    no_frames = _write(tmp_path / "none.avi", 0)
    cases = [
        (tmp_path / "missing.mp4", "no such file"),
        (tmp_path, "no such file"),  # a directory
        (text, "cannot open as a video"),
        (empty, r"empty file \(0 bytes\)"),
        (audio, r"no video stream \(streams: \['audio'\]\)"),
        (no_frames, "the video has no frames"),
    ]
    for path, problem in cases:
        with pytest.raises(V.VideoError, match=f"^{re.escape(str(path))}: {problem}"):
            V.load_video(path, R, num_frames=2)
    with pytest.raises(V.VideoError, match="no frames"):
        V.count_frames(no_frames)
    with pytest.raises(V.VideoError, match=rf"{re.escape(videos[5])}: frame 0 is {W}x{H} pixels"):
        V.load_video(videos[5], R, num_frames=2, max_pixels=W * H - 1)
    with pytest.raises(ValueError, match="a random start needs a path"):
        with open(videos[5], "rb") as f:
            V.load_video(f, R, num_frames=2, seed=0)


def test_truncated_files_error_cleanly_or_decode(tmp_path):
    # Every 64-byte truncation of an MP4 and an AVI: a VideoError naming the file, or frames.
    # Run in a child process: a PyAV crash (a stream without codec parameters segfaults
    # when decoded, which `_open` guards against) must fail this test, not kill the run.
    paths = [_write(tmp_path / "v.mp4", 8, "mpeg4", "yuv420p"), _write(tmp_path / "v.avi", 8)]
    script = textwrap.dedent("""
        import os, sys
        from paligemma.ref.inputs import video as V
        for src in sys.argv[1:]:
            data = open(src, "rb").read()
            for k in range(1, len(data), 64):
                cut = src + ".cut"
                open(cut, "wb").write(data[:k])
                try:
                    print("frames", V.read_frames(cut, [0, 4]).shape[0])
                except V.VideoError as e:
                    print("error" if str(e).startswith(cut + ": ") else "unnamed " + str(e))
    """)
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = done.stdout.split("\n")[:-1]
    assert outcomes and all(o == "error" or o.startswith("frames") for o in outcomes), outcomes
    assert "error" in outcomes
