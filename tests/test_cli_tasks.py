"""`paligemma generate` for detect / segment prompts: objects as JSON, --vae masks, --draw.

A tiny random model answers noise, so most tests replace `PaliGemma.generate`'s answer with a
fixed text (the model still loads and runs); expected boxes are worked out by hand.
"""

import json
import re
import types

import numpy as np
import pytest
from PIL import Image

from paligemma import ref
from paligemma.fast.pipeline import PaliGemma, Result
from paligemma.ref import vqvae
from paligemma.ref.tasks import answers

cli = pytest.importorskip("paligemma.cli.main")
cli_tasks = pytest.importorskip("paligemma.cli.tasks")

SEG = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]
DETECT = "<loc0000><loc0000><loc0511><loc1023> cat ; <loc0100><loc0200><loc0300><loc0400> dog"
SEGMENT = "<loc0256><loc0512><loc0767><loc1023>" + "".join(f"<seg{s:03d}>" for s in SEG) + " cat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_tasks")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(d / "model.npz", config, ref.init_params(config, seed=0))
    a = np.zeros((100, 200, 3), np.uint8)  # H 100, W 200
    a[..., 1] = 120
    Image.fromarray(a).save(d / "im.png")
    # A random VAE, its output shifted so that about half of SEG's mask is positive (inside).
    vae = vqvae.init_vae(vqvae.VAEConfig(embed_dim=8, hidden=2), seed=1)
    vae["decoder"]["out"]["bias"] -= np.median(vqvae.decode(vae, np.array([SEG]))).astype(np.float32)
    vqvae.save_vae(d / "vae.npz", vae)
    return types.SimpleNamespace(dir=d, tok=str(d / "tok.model"), npz=str(d / "model.npz"), image=str(d / "im.png"),
                                 vae=str(d / "vae.npz"))


def run(capsys, files, *extra):
    code = cli.main(["generate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--image", files.image,
                     "--max-new-tokens", "4", "--impl", "ref", "--quiet", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def answer(monkeypatch):
    """Makes the model answer `answer.text` (after really generating)."""
    state = types.SimpleNamespace(text=None)
    real = PaliGemma.generate

    def fake(self, images, prompts, **kwargs):
        r = real(self, images, prompts, **kwargs)
        fix = lambda x: Result(state.text, x.tokens, x.logprobs, True)  # noqa: E731
        return [fix(x) for x in r] if isinstance(r, list) else fix(r)

    monkeypatch.setattr(PaliGemma, "generate", fake)
    return state


def test_detect_prints_text_then_objects_in_pixels(files, capsys, answer):
    answer.text = DETECT
    code, out, _ = run(capsys, files, "--prompt", "detect cat ; dog")
    text, objects = out.splitlines()
    assert code == 0 and text == DETECT
    # 100 x 200 image, big_vision: int(511/1023*100) = int(49.95) = 49; 1023 -> 200; 100/1023*100 = 9.78 -> 9;
    # 200/1023*200 = 39.10 -> 39; 300/1023*100 = 29.33 -> 29; 400/1023*200 = 78.20 -> 78.
    got = json.loads(objects)["objects"]
    assert [(o["label"], o["box"], o["errors"]) for o in got] == [("cat", [0, 0, 49, 200], []),
                                                                   ("dog", [9, 39, 29, 78], [])]
    assert "mask" not in got[0]
    code, out, _ = run(capsys, files, "--prompt", "detect cat ; dog", "--convention", "demo", "--json")
    record = json.loads(out)
    # demo: round(511/1024*100) = round(49.90) = 50, round(1023/1024*200) = round(199.8) = 200.
    assert record["text"] == DETECT and record["objects"][0]["box"] == [0, 0, 50, 200]


def test_segment_without_vae_says_so(files, capsys, answer):
    answer.text = SEGMENT
    code, out, err = run(capsys, files, "--prompt", "segment cat")
    obj = json.loads(out.splitlines()[1])["objects"][0]
    assert code == 0 and obj["seg"] == SEG and obj["mask"] is None and obj["errors"] == []
    assert "--vae" in err


@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_segment_with_vae_and_draw(files, capsys, answer, tmp_path, impl):
    answer.text = SEGMENT
    png = tmp_path / "out.png"
    code, out, err = run(capsys, files, "--prompt", "segment cat", "--vae", files.vae, "--draw", str(png),
                         "--impl", impl)
    assert code == 0 and "--vae" not in err
    obj = json.loads(out.splitlines()[1])["objects"][0]
    # big_vision: 256/1023*100 = 25.02 -> 25, 512/1023*200 = 100.1 -> 100, 767/1023*100 = 74.98 -> 74, 1023 -> 200.
    assert obj["box"] == [25, 100, 74, 200]
    params = vqvae.load_vae(files.vae, np.float64)
    expected = answers.paste_mask(vqvae.decode(params, np.array([SEG]))[0], (25, 100, 74, 200), 100, 200) > 0.5
    if impl == "ref":
        assert obj["mask"]["area"] == int(expected.sum()) and 0.2 < expected.mean() / (49 * 100 / 20000) < 0.8
    else:  # float32: a pixel whose bilinear value sits within rounding of 0 may flip
        assert abs(obj["mask"]["area"] - int(expected.sum())) <= 3
    runs = np.repeat(np.arange(len(obj["mask"]["rle"])) % 2, obj["mask"]["rle"]).reshape(100, 200).astype(bool)
    assert runs.sum() == obj["mask"]["area"] and not runs[:25].any() and not runs[:, :100].any()
    drawn, original = np.asarray(Image.open(png)), np.asarray(Image.open(files.image))
    assert drawn.shape == original.shape
    assert (drawn[30:73, 101:199][runs[30:73, 101:199]] != original[30:73, 101:199][runs[30:73, 101:199]]).any()
    assert (drawn[90:, :90] == original[90:, :90]).all()  # away from the box: untouched


def test_several_pairs_draw_one_file_each(files, capsys, answer, tmp_path):
    answer.text = DETECT
    code, out, _ = run(capsys, files, "--prompt", "detect cat", "--prompt", "caption en", "--image", files.image,
                       "--draw", str(tmp_path / "pic.png"))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and json.loads(lines[1])["objects"][0]["label"] == "cat"
    assert lines[2].endswith("\tcaption en\t" + DETECT)  # no objects for a caption prompt
    assert (tmp_path / "pic-0.png").exists() and (tmp_path / "pic-1.png").exists()


def test_real_noise_is_reported_not_raised(files, capsys):
    code, out, _ = run(capsys, files, "--prompt", "detect cat", "--json")
    record = json.loads(out)
    expected = answers.parse(record["text"], 100, 200).objects
    assert code == 0 and record["objects"] == [o.to_dict() for o in expected]


@pytest.mark.parametrize("extra, match", [
    (lambda f: ["--vae", str(f.dir / "none.npz")], "--vae .* no such file"),
    (lambda f: ["--vae", f.image], "not a readable .npz"),
    (lambda f: ["--vae", f.npz], "missing key '_vq_vae._embedding'"),
    (lambda f: ["--draw", str(f.dir / "no" / "x.png")], "--draw .* does not exist"),
    (lambda f: ["--convention", "hf"], "invalid choice"),
])
def test_user_errors(files, capsys, extra, match):
    code, out, err = run(capsys, files, "--prompt", "segment cat", *extra(files))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_cli_conventions_match_the_parser():
    assert cli_tasks.CONVENTIONS == answers.CONVENTIONS
    assert [cli_tasks.task_of(p) for p in ("detect cat", "segment a b", "caption en", "detection")] == \
        ["detect", "segment", None, None]
