"""Fine-tuning on video and multi-image lines (paligemma.fast.data, paligemma.fast.finetune).

The test writes its own videos: frame i is a solid grey of level 20 * i, so every model-input
frame can be traced back to the frame number it came from.
"""

import json
import os

import numpy as np
import pytest

from finetune_fixtures import build, records, write_jsonl
from paligemma import ref
from paligemma.cli import main as cli
from paligemma.fast import data

av = pytest.importorskip("av")

TEXT_LEN = 16
N_FRAMES = 12


def _write_video(path, n=N_FRAMES, size=(20, 30)):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "rgb24"
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full(size + (3,), 20 * i, np.uint8), "rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _frame_numbers(frames):
    """[F, R, R, 3] model input -> the frame numbers (grey 20 i -> 20 i / 127.5 - 1)."""
    return [int(round((float(f.mean()) + 1) * 127.5 / 20)) for f in frames]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftvideo")
    files = build(d)
    os.makedirs(os.path.join(d, "videos"))
    for name in ("a", "b"):
        _write_video(os.path.join(d, "videos", f"{name}.avi"))
    rows = records()
    lines = [{"video": "videos/a.avi", "prefix": "caption en", "suffix": "a red cat"},
             {"video": "videos/b.avi", "prefix": "caption en", "suffix": "a green dog"},
             {"images": [rows[2]["image"], rows[3]["image"]], "prefix": "caption en", "suffix": "a blue bird"},
             {"images": [rows[0]["image"], rows[2]["image"]], "prefix": "caption en", "suffix": "a white horse"}]
    files.mixed = write_jsonl(os.path.join(d, "video.jsonl"), lines)
    val = [dict(line, answers=[line["suffix"], "something"]) for line in lines[:3]]
    files.val = write_jsonl(os.path.join(d, "val.jsonl"), val)
    return files


def test_video_lines_sample_a_seeded_stride_run_in_training_and_frame_0_in_evaluation(files):
    with pytest.raises(ValueError, match="same number of frames.*3 frames/images at .*video.jsonl:1.*"
                                         "2 frames/images at .*video.jsonl:3"):
        data.load_examples(files.mixed, files.tok, TEXT_LEN, video_frames=3)  # videos give 3, image pairs 2
    examples = data.load_examples(files.mixed, files.tok, TEXT_LEN, video_frames=2)
    assert examples.frames == 2 and isinstance(examples.images[0], ref.inputs.media.Video)
    R = files.config.vision.image_size
    starts = set()
    for step in range(6):
        with data.Prefetcher(examples, R, 4, 1, seed=5, start=step, stop=step + 1, video_frames=2,
                             video_stride=4) as pre:
            ((_, batch),) = list(pre)
        assert batch.images.shape == (1, 4, 2, R, R, 3)
        idx = data.batch_indices(len(examples), 5, step * 4, 4)
        for i, frames in zip(idx, batch.images[0]):
            if i < 2:  # a video: frames offset, offset + 4, the offset among the starts that fit (0..7)
                first, second = _frame_numbers(frames)
                assert second == first + 4 and 0 <= first <= N_FRAMES - 1 - 4
                starts.add(first)
            else:  # the two images of the line, in order
                np.testing.assert_array_equal(frames, ref.preprocess(list(examples.images[i]), R))
    assert len(starts) > 1  # random starts, not always frame 0
    # Resumable: the same step reads the same frames again.
    with data.Prefetcher(examples, R, 4, 1, seed=5, start=3, stop=4, video_frames=2, video_stride=4) as pre:
        again = list(pre)[0][1].images
    with data.Prefetcher(examples, R, 4, 1, seed=5, start=3, stop=4, video_frames=2, video_stride=4) as pre:
        np.testing.assert_array_equal(list(pre)[0][1].images, again)
    # Evaluation: every video from frame 0.
    batch = data.make_batch(examples, np.array([0, 1]), R, video_frames=2, video_stride=4)
    assert [_frame_numbers(f) for f in batch.images[0]] == [[0, 4], [0, 4]]


def test_one_image_and_several_images_do_not_mix(files, tmp_path):
    rows = records()
    path = write_jsonl(tmp_path / "mix.jsonl", [rows[0], {"images": [rows[1]["image"]] * 2, "prefix": "x",
                                                          "suffix": "y"}])
    with pytest.raises(ValueError, match="one image \\(no frame axis\\) at .*mix.jsonl:1; 2 frames/images at "
                                         ".*mix.jsonl:2"):
        data.load_examples(path, files.tok, TEXT_LEN, image_root=files.dir)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": rows[0]["image"], "video": "v.avi", "prefix": "x",
                                                "suffix": "y"}, {"video": "none.avi", "prefix": "x", "suffix": "y"},
                                               {"images": [], "prefix": "x", "suffix": "y"}])
    with pytest.raises(data.DataError) as e:
        data.load_examples(bad, files.tok, TEXT_LEN, image_root=files.dir)
    reasons = {b.line: b.reason for b in e.value.bad}
    assert "exactly one of keys ['image', 'images', 'video']" in reasons[1]
    assert "video" in reasons[2] and "no such file" in reasons[2]
    assert "non-empty list of strings" in reasons[3]


def test_finetune_a_few_steps_on_videos_and_image_pairs_with_a_task_metric(files, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--train", files.mixed,
                     "--val", files.val, "--out", str(out), "--steps", "3", "--batch-size", "2", "--text-len",
                     str(TEXT_LEN), "--lr", "1e-3", "--video-frames", "2", "--video-stride", "3", "--eval-task", "vqa",
                     "--no-export", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(out / "metrics.jsonl") as f:
        log = [json.loads(line) for line in f]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    (evaluation,) = [r for r in log if "val_loss" in r]
    # The vqa task's report: exact match against each line's "answers", every example counted.
    assert set(evaluation) >= {"exact_match", "count", "invalid", "val_examples"}
    assert evaluation["count"] == evaluation["val_examples"] == 3 and evaluation["invalid"] == 0
    assert 0 <= evaluation["exact_match"] <= 1 and np.isfinite(evaluation["val_loss"])
    # Validation lines with another frame count than the training data's are refused up front.
    single = write_jsonl(tmp_path / "single.jsonl", records())
    code = cli.main(["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--train", files.mixed,
                     "--val", single, "--image-root", files.dir, "--out", str(tmp_path / "r2"), "--steps", "1",
                     "--video-frames", "2", "--text-len", str(TEXT_LEN), "--no-export", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "frames/images each but the training data's have 2" in err, err
