"""`paligemma demo` (cli/demo.py) on a tiny random model whose answers are fixed by the test."""

import json
import types

import pytest

from paligemma import ref
from paligemma.cli.main import main
from paligemma.fast.pipeline import PaliGemma, Result
from paligemma.ref import vqvae

SEG = "".join(f"<seg{i * 7:03d}>" for i in range(16))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(d / "model.npz", config, ref.init_params(config, seed=0))
    vqvae.write_random_vae(d / "vae.npz", vqvae.VAEConfig(embed_dim=8, hidden=2), seed=1)
    return types.SimpleNamespace(tok=str(d / "tok.model"), npz=str(d / "model.npz"), vae=str(d / "vae.npz"))


@pytest.fixture
def answers(monkeypatch):
    """Each prompt's answer: a box of the top-left quarter for detect / segment, else "1"."""
    real = PaliGemma.generate

    def fake(self, images, prompts, **kwargs):
        out = real(self, images, prompts, **kwargs)
        box = "<loc0000><loc0000><loc0511><loc0511>"
        text = {"detect": box + " circle", "segment": box + SEG + " circle"}
        return [Result(text.get(p.split(" ")[0], "1"), r.tokens, r.logprobs, True) for p, r in zip(prompts, out)]

    monkeypatch.setattr(PaliGemma, "generate", fake)


def test_demo_draws_a_scene_and_annotates_it(files, answers, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--checkpoint", files.npz, "--tokenizer", files.tok, "--vae", files.vae, "--seed", "7",
            "--out", str(out), "--max-new-tokens", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (out / "scene.png").exists() and (out / "annotated.png").exists()
    for prompt in ("> caption en", "> count ", "> detect ", "> segment "):
        assert prompt in printed
    objects = [json.loads(line) for line in printed.splitlines() if line.startswith("  {")]
    # loc 511 of a 128 px scene, big_vision's convention: int(511 / 1023 * 128) = 63.
    assert [o["box"] for o in objects] == [[0, 0, 63, 63]] * 2
    assert "mask_area" in objects[1] and "mask_area" not in objects[0]
    assert main(args) == 0  # a seed fixes the scene (the timing line differs)
    assert capsys.readouterr().out.splitlines()[:-1] == printed.splitlines()[:-1]


def test_demo_errors(files, tmp_path, capsys):
    assert main(["demo", "--checkpoint", files.npz, "--out", str(tmp_path)]) == 2
    assert "--checkpoint and --tokenizer go together" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(tmp_path / "none.npz"), "--tokenizer", files.tok,
                 "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
