"""`paligemma generate --video` / `--images`: one example made of several frames or images."""

import json
import types

import numpy as np
import pytest
from PIL import Image

from paligemma import ref
from paligemma.fast.pipeline import PaliGemma

av = pytest.importorskip("av")
cli = pytest.importorskip("paligemma.cli.main")


def write_video(path, colours, size=(24, 40)):
    """A video whose frame i is a solid `colours[i]` (lossless codec, so it decodes exactly)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "rgb24"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.full(size + (3,), colour, np.uint8), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_media")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(d / "model.npz", config, ref.init_params(config, seed=0))
    images = []
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20)]):
        a = np.zeros((30, 20, 3), np.uint8)
        a[:] = colour
        a[i * 10:(i + 1) * 10] = 255
        images.append(str(d / f"{i}.png"))
        Image.fromarray(a).save(images[-1])
    video = write_video(d / "clip.avi", [(10 * i, 255 - 20 * i, 30) for i in range(5)])
    return types.SimpleNamespace(tok=str(d / "tok.model"), npz=str(d / "model.npz"), images=images, video=video)


def run(capsys, files, *extra):
    code = cli.main(["generate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--max-new-tokens", "4",
                     "--impl", "ref", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def records(out):
    return [json.loads(line) for line in out.splitlines()]


def same(record, result):
    """The CLI's record is this `Result`: the tiny random model often answers the same tokens for
    any input, so its log-probabilities (6 decimals) are what tells inputs apart."""
    return record["tokens"] == result.tokens.tolist() and np.allclose(record["logprobs"], result.logprobs, atol=2e-6)


def test_video_is_one_example_of_its_frames_and_its_cost_is_printed(files, capsys):
    code, out, err = run(capsys, files, "--video", files.video, "--frames", "3", "--stride", "2",
                         "--prompt", "caption en", "--json", "--show-tokens")
    assert code == 0, err
    model = PaliGemma.load(files.npz, files.tok, impl="ref")
    frames = ref.load_video(files.video, 28, 3, 2)  # frames 0, 2, 4
    (record,) = records(out)
    assert record["image"] == files.video and same(record, model.generate(frames, "caption en", max_new_tokens=4))
    assert not same(record, model.generate(frames[::-1], "caption en", max_new_tokens=4))  # order matters
    # tiny-paligemma2: 28 px / 7 px patches = 4 x 4 = 16 tokens per frame.
    assert "paligemma: 3 frames x 16 = 48 image tokens per example" in err.splitlines()


def test_images_flag_is_one_multi_image_prompt(files, capsys):
    code, out, err = run(capsys, files, "--images", ",".join(files.images), "--prompt", "caption en",
                         "--prompt", "ocr", "--json", "--show-tokens", "--quiet")
    assert code == 0 and err == "", err
    model = PaliGemma.load(files.npz, files.tok, impl="ref")
    want = model.generate([files.images, files.images], ["caption en", "ocr"], max_new_tokens=4)
    got = records(out)
    assert [(r["image"], r["prompt"]) for r in got] == [(",".join(files.images), p) for p in ["caption en", "ocr"]]
    assert all(same(r, w) for r, w in zip(got, want))
    # --image twice stays a batch of two one-image examples (not one two-image prompt).
    _, batch_out, _ = run(capsys, files, "--image", files.images[0], "--image", files.images[1],
                          "--prompt", "caption en", "--json", "--show-tokens", "--quiet")
    singles = model.generate(files.images, "caption en", max_new_tokens=4)
    assert all(same(r, w) for r, w in zip(records(batch_out), singles))
    assert not same(got[0], singles[0]) and not same(got[0], singles[1])


@pytest.mark.parametrize("extra, match", [
    (lambda f: ["--image", f.images[0], "--video", f.video],
     "one of --image, --images or --video, not --image and --video"),
    (lambda f: [], "one of --image, --images or --video"),
    (lambda f: ["--images", f"{f.images[0]},{f.images[1]}", "--images", f.images[0]], "same number of images"),
    (lambda f: ["--video", f.video, "--draw", "x.png"], "cannot be combined with --draw"),
    (lambda f: ["--images", f"{f.images[0]},missing.png"], "--images missing.png: no such file"),
    (lambda f: ["--video", f.video, "--frames", "0"], "expected an integer >= 1"),
])
def test_bad_media_arguments_are_one_line_errors(files, capsys, extra, match):
    code, _, err = run(capsys, files, *extra(files), "--prompt", "caption en", "--quiet")
    assert code == 2 and match in err, err


def test_detect_prompt_on_a_video_is_refused(files, capsys):
    code, _, err = run(capsys, files, "--video", files.video, "--prompt", "detect cat", "--quiet")
    assert code == 2 and "detect / segment prompts" in err
