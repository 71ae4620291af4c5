"""`paligemma evaluate` on a tiny random model, one test per task.

A random model answers noise, so the answers are fixed per prompt after the model really ran
(as tests/test_cli_tasks.py does); the expected metrics are worked out by hand below, and
unparseable answers are checked to be counted as misses. One test keeps the model's own answers
and checks the files only.
"""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from paligemma import ref
from paligemma.fast.pipeline import PaliGemma, Result
from paligemma.ref import vqvae

cli = pytest.importorskip("paligemma.cli.main")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(d / "model.npz", config, ref.init_params(config, seed=0))
    for i in range(3):
        a = np.zeros((100, 200, 3), np.uint8)  # H 100, W 200
        a[..., i] = 150
        Image.fromarray(a).save(d / f"im{i}.png")
    gt = np.zeros((100, 200), np.uint8)
    gt[0:50, 100:200] = 255  # rows 0..49, columns 100..199: 5000 pixels
    Image.fromarray(gt).save(d / "gt_mask.png")
    # A random VAE whose output is shifted far above 0: every decoded mask is "inside" everywhere,
    # so a pasted mask is exactly its box.
    vae = vqvae.init_vae(vqvae.VAEConfig(embed_dim=8, hidden=2), seed=1)
    vae["decoder"]["out"]["bias"] += np.float32(100.0)
    vqvae.save_vae(d / "vae.npz", vae)
    return types.SimpleNamespace(dir=d, tok=str(d / "tok.model"), npz=str(d / "model.npz"), vae=str(d / "vae.npz"))


@pytest.fixture
def answers(monkeypatch):
    """Makes the model answer `answers.by_prompt[prompt]` (after really generating)."""
    state = types.SimpleNamespace(by_prompt={}, calls=[])
    real = PaliGemma.generate

    def fake(self, images, prompts, **kwargs):
        r = real(self, images, prompts, **kwargs)
        state.calls.append(len(r))
        return [Result(state.by_prompt[p], x.tokens, x.logprobs, True) for x, p in zip(r, prompts)]

    monkeypatch.setattr(PaliGemma, "generate", fake)
    return state


def write(files, name, rows):
    path = os.path.join(files.dir, name)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def evaluate(capsys, files, data, task, out, *extra):
    code = cli.main(["evaluate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--data", data, "--task", task,
                     "--out", str(out), "--impl", "ref", "--batch-size", "2", "--max-new-tokens", "3", "--quiet",
                     *extra])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out, "predictions.jsonl")) as f:
        predictions = [json.loads(line) for line in f]
    assert json.loads(stdout)["count"] == metrics["count"]
    return metrics, predictions


def test_vqa_exact_match_ids_and_batches(files, capsys, answers, tmp_path):
    rows = [{"image": "im0.png", "prefix": "answer en q0", "suffix": "red", "id": "q-a"},
            {"image": "im1.png", "prefix": "answer en q1", "answers": ["green", "lime"]},
            {"image": "im2.png", "prefix": "answer en q2", "suffix": "blue"}]
    answers.by_prompt = {"answer en q0": "red", "answer en q1": "lime", "answer en q2": "Blue"}
    metrics, preds = evaluate(capsys, files, write(files, "vqa.jsonl", rows), "vqa", tmp_path)
    # red == red: 1; lime is one of the answers: 1; "Blue" != "blue" (case counts): 0 -> 2/3.
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert (metrics["count"], metrics["invalid"], metrics["task"]) == (3, 0, "vqa")
    assert [p["id"] for p in preds] == ["q-a", 2, 3]  # the JSONL id, else the line number
    assert [p["prediction"] for p in preds] == ["red", "lime", "Blue"]
    assert [p["score"] for p in preds] == [1.0, 1.0, 0.0]
    assert answers.calls == [2, 2]  # batches of 2, the last filled up (one shape, one compilation)


def test_vqav2_accuracy_by_hand(files, capsys, answers, tmp_path):
    rows = [{"image": "im0.png", "prefix": "answer en how many", "answers": ["2"] * 2 + ["3"] * 8},
            {"image": "im1.png", "prefix": "answer en color", "answers": ["red"] * 10}]
    answers.by_prompt = {"answer en how many": "Two", "answer en color": "the red"}
    metrics, _ = evaluate(capsys, files, write(files, "vqav2.jsonl", rows), "vqav2", tmp_path)
    # "Two" -> "2": 2 of 10 humans said 2. Leaving out one of those two: min(1, 1/3); one of the
    # eight others: min(1, 2/3). (2 * 1/3 + 8 * 2/3) / 10 = 0.6. "the red" -> "red": 10 match, 1.0.
    assert metrics["vqav2_accuracy"] == pytest.approx((0.6 + 1.0) / 2)


def test_chartqa_relaxed_accuracy_by_hand(files, capsys, answers, tmp_path):
    rows = [{"image": "im0.png", "prefix": "q a", "suffix": "10"},
            {"image": "im1.png", "prefix": "q b", "answers": ["10"]},
            {"image": "im2.png", "prefix": "q c", "suffix": "yes"}]
    answers.by_prompt = {"q a": "10.4", "q b": "12", "q c": "Yes"}
    metrics, _ = evaluate(capsys, files, write(files, "chart.jsonl", rows), "chartqa", tmp_path)
    # |10.4 - 10| / 10 = 4% <= 5%: 1; 20%: 0; "Yes" vs "yes" ignoring case: 1 -> 2/3.
    assert metrics["relaxed_accuracy"] == pytest.approx(2 / 3)


def test_caption_uses_every_reference(files, capsys, answers, tmp_path):
    from paligemma.ref.tasks.metrics import cider_d

    rows = [{"image": "im0.png", "prefix": "caption en", "captions": ["a red square", "a red box"], "id": 0},
            {"image": "im1.png", "prefix": "caption es", "suffix": "a green square", "id": 1}]
    answers.by_prompt = {"caption en": "a red square", "caption es": "a blue circle"}
    metrics, preds = evaluate(capsys, files, write(files, "cap.jsonl", rows), "caption", tmp_path)
    # cider_d itself is checked against pycocoevalcap in test_metrics.py; here: which references.
    want = cider_d(["a red square", "a blue circle"], [["a red square", "a red box"], ["a green square"]])
    assert metrics["cider"] == pytest.approx(want.metrics["cider"])
    assert preds[0]["score"] > preds[1]["score"] == 0.0  # no n-gram of "blue circle" with tf-idf weight


DETECT_HALF = "<loc0000><loc0000><loc0511><loc1023> cat"


def test_detect_box_iou_and_misses_by_hand(files, capsys, answers, tmp_path):
    rows = [{"image": "im0.png", "prefix": "detect cat", "boxes": [[0, 0, 50, 100]]},
            {"image": "im1.png", "prefix": "detect dog", "boxes": [[10, 10, 60, 60]]},
            {"image": "im2.png", "prefix": "detect cow", "suffix": "<loc0000><loc0000><loc0511><loc1023>"}]
    answers.by_prompt = {"detect cat": DETECT_HALF, "detect dog": "no idea", "detect cow": DETECT_HALF}
    metrics, preds = evaluate(capsys, files, write(files, "det.jsonl", rows), "detect", tmp_path)
    # 100 x 200 image: loc 511 -> int(511 / 1023 * 100) = 49, loc 1023 -> 200: box [0, 0, 49, 200].
    # vs [0, 0, 50, 100]: intersection 49 x 100 = 4900; union 49*200 + 50*100 - 4900 = 9900.
    first = 4900 / 9900
    assert preds[0]["box"] == [0, 0, 49, 200] and preds[0]["score"] == pytest.approx(first)
    assert preds[1] == {**preds[1], "valid": False, "box": None, "score": 0.0}  # unparseable: a miss
    assert metrics["box_iou"] == pytest.approx((first + 0 + 1) / 3)  # the third matches its own target
    assert metrics["acc@0.5"] == pytest.approx(1 / 3) and metrics["acc@0.75"] == pytest.approx(1 / 3)
    assert metrics["invalid"] == 1 and metrics["count"] == 3


def test_segment_mask_iou_by_hand(files, capsys, answers, tmp_path):
    seg = "".join(f"<seg{s:03d}>" for s in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    rows = [{"image": "im0.png", "prefix": "segment cat", "mask": "gt_mask.png"},
            {"image": "im1.png", "prefix": "segment dog", "mask": "gt_mask.png"},
            {"image": "im2.png", "prefix": "segment cow", "suffix": "<loc0256><loc0512><loc0767><loc1023>" + seg}]
    answers.by_prompt = {"segment cat": "<loc0256><loc0512><loc0767><loc1023>" + seg + " cat",
                         "segment dog": "<loc0256><loc0512><loc0767><loc1023> dog",  # no mask codes: a miss
                         "segment cow": "<loc0256><loc0512><loc0767><loc1023>" + seg}
    data = write(files, "seg.jsonl", rows)
    metrics, preds = evaluate(capsys, files, data, "segment", tmp_path, "--vae", files.vae)
    # Box: int(256/1023*100) = 25, int(512/1023*200) = 100, int(767/1023*100) = 74, 200: rows 25..73,
    # columns 100..199 = 49 x 100 = 4900 pixels (the VAE's mask is all inside). Truth: rows 0..49,
    # the same columns, 5000 pixels. Intersection rows 25..49: 2500; union 4900 + 5000 - 2500 = 7400.
    first = 2500 / 7400
    assert [p["mask_area"] for p in preds] == [4900, None, 4900]
    assert metrics["miou"] == pytest.approx((first + 0 + 1) / 3)
    assert (metrics["invalid"], metrics["count"]) == (1, 3)
    # Without the VAE the command refuses before loading anything.
    code = cli.main(["evaluate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--data", data,
                     "--task", "segment", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "--vae" in capsys.readouterr().err


def rows_path(files):
    return os.path.join(files.dir, "multi.jsonl")


def test_real_answers_files_and_bad_lines(files, capsys, tmp_path):
    rows = [{"image": "im0.png", "prefix": "caption en", "suffix": "a red square"},
            {"images": ["im0.png", "im1.png"], "prefix": "caption en", "suffix": "two squares"}]
    data = write(files, "mixed.jsonl", rows)
    code = cli.main(["evaluate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--data", data,
                     "--task", "caption", "--out", str(tmp_path), "--impl", "ref", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "same number of frames" in err and "mixed.jsonl:1" in err and "mixed.jsonl:2" in err
    rows = [{"images": ["im0.png", "im1.png"], "prefix": "caption en", "suffix": "two squares"},
            {"images": ["im2.png", "im1.png"], "prefix": "caption en", "captions": ["two", "squares"]},
            {"images": ["im2.png", "im0.png"], "prefix": "caption en", "suffix": "three"}]
    metrics, preds = evaluate(capsys, files, write(files, "multi.jsonl", rows), "caption", tmp_path / "out")
    capsys.readouterr()
    assert [p["id"] for p in preds] == [1, 2, 3] and metrics["count"] == 3 and metrics["invalid"] == 0
    assert all(isinstance(p["prediction"], str) for p in preds)
    # The compiled implementation answers the same (float32 both; the random model has no near ties here).
    code = cli.main(["evaluate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--data", rows_path(files),
                     "--task", "caption", "--out", str(tmp_path / "fast"), "--batch-size", "2", "--max-new-tokens",
                     "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "fast" / "predictions.jsonl") as f:
        assert [json.loads(line)["prediction"] for line in f] == [p["prediction"] for p in preds]
    bad = write(files, "bad.jsonl", [{"image": "im0.png", "prefix": "x"}, {"image": "nope.png", "prefix": "x",
                                                                           "answers": ["1"] * 10}])
    code = cli.main(["evaluate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--data", bad,
                     "--task", "vqav2", "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:1: missing key 'answers'" in err and "bad.jsonl:2: image" in err
