"""`paligemma generate`: end to end through `main(argv)`, user errors, progress, the console script.

Files are built in a temporary folder (tiny tokenizer, tiny PaliGemma 2 as .npz and HF, PNGs).
Expected texts come from `paligemma.fast.PaliGemma` (itself checked against the reference by
hand in test_pipeline.py). Most runs use `--impl ref`, which needs no compilation.
"""

import io
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from paligemma import ref
from paligemma.fast import PaliGemma

cli = pytest.importorskip("paligemma.cli.main", reason="paligemma.cli is not installed: add the "
                          '"paligemma.cli" = "cli" mapping to pyproject.toml and reinstall')

MAX_NEW = "8"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    params = ref.init_params(config, seed=0, random_norms=True)
    ref.save(d / "model.npz", config, params)
    ref.save(d / "hf", config, params, format="hf")
    small = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size - 1)
    ref.save(d / "small.npz", small, ref.init_params(small))
    images = []
    for i in range(3):
        a = np.zeros((30, 44, 3), np.uint8)
        a[..., i] = 200
        a[::3, :, (i + 2) % 3] = 90
        Image.fromarray(a).save(d / f"im{i}.png")
        images.append(str(d / f"im{i}.png"))
    return types.SimpleNamespace(dir=d, tok=str(d / "tok.model"), npz=str(d / "model.npz"), hf=str(d / "hf"),
                                 small=str(d / "small.npz"), images=images)


@pytest.fixture(scope="module")
def model(files):
    return PaliGemma.load(files.npz, files.tok, impl="ref")


def run(capsys, argv):
    """`main(argv)` -> (exit status, stdout, stderr)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def generate_argv(files, *extra, checkpoint=None, tokenizer=None):
    return ["generate", "--checkpoint", checkpoint or files.npz, "--tokenizer", tokenizer or files.tok,
            "--max-new-tokens", MAX_NEW, *extra]


def test_prints_the_text_and_progress(files, model, capsys):
    code, out, err = run(capsys, generate_argv(files, "--impl", "ref", "--image", files.images[0],
                                               "--prompt", "caption en"))
    assert code == 0
    assert out == model.generate(files.images[0], "caption en", max_new_tokens=8).text + "\n"
    # stderr is not a terminal here: one line per finished stage, nothing else.
    stages = [line.split(":")[1].strip() for line in err.splitlines()]
    assert stages == ["loading tokenizer", "loading checkpoint", "preparing parameters", "generating"]


def test_fast_several_images_one_prompt(files, model, capsys):
    # Three examples, as in test_pipeline.py: the same shapes, so one process compiles once.
    images = [arg for path in files.images for arg in ("--image", path)]
    code, out, err = run(capsys, generate_argv(files, *images, "--prompt", "caption en"))
    assert code == 0
    expected = model.generate(files.images, "caption en", max_new_tokens=8)
    assert out.splitlines() == [f"{i}\tcaption en\t{r.text}" for i, r in zip(files.images, expected)]
    assert "compiling" in err or "generating" in err


def test_show_tokens_and_json(files, model, capsys):
    argv = generate_argv(files, "--impl", "ref", "--image", files.images[2], "--prompt", "ocr",
                         "--prompt", "caption en", "--show-tokens", "--quiet")
    expected = model.generate(files.images[2], ["ocr", "caption en"], max_new_tokens=8)
    code, out, _ = run(capsys, argv + ["--json"])
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in records] == ["ocr", "caption en"]
    for record, r in zip(records, expected):
        assert record["text"] == r.text and record["tokens"] == r.tokens.tolist()
        np.testing.assert_allclose(record["logprobs"], r.logprobs, atol=1e-5)
    code, out, _ = run(capsys, argv)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 6
    assert lines[1] == "  tokens: " + " ".join(map(str, expected[0].tokens))
    assert lines[2].startswith("  logprobs: ")


def test_hf_directory_gives_the_same_text(files, capsys):
    outs = [run(capsys, generate_argv(files, "--impl", "ref", "--image", files.images[1], "--prompt", "ocr",
                                      "--quiet", checkpoint=c))[1] for c in (files.npz, files.hf)]
    assert outs[0] == outs[1] and outs[0]


@pytest.mark.parametrize("flags, spec", [
    ([], "greedy"), (["--temperature", "0.7"], "temperature(0.7)"), (["--top-k", "5"], "top_k(5)"),
    (["--top-k", "5", "--temperature", "0.5"], "top_k(5, 0.5)"), (["--top-p", "0.9"], "nucleus(0.9)"),
    (["--top-p", "0.9", "--temperature", "2"], "nucleus(0.9, 2.0)"), (["--beam", "3"], "beam(3)"),
    (["--sampler", "nucleus(0.5)"], "nucleus(0.5)"),
])
def test_sampler_flags_build_the_spec(flags, spec):
    args = cli.build_parser().parse_args(["generate", "--checkpoint", "c", "--tokenizer", "t", "--image", "i",
                                          "--prompt", "p", *flags])
    assert cli.sampler_spec(args) == spec


def test_sampling_is_seeded(files, model, capsys):
    argv = generate_argv(files, "--impl", "ref", "--image", files.images[0], "--prompt", "caption en",
                         "--top-k", "20", "--temperature", "1.5", "--seed", "3", "--quiet")
    first, second = run(capsys, argv)[1], run(capsys, argv)[1]
    expected = model.generate(files.images[0], "caption en", max_new_tokens=8, sampler="top_k(20, 1.5)", seed=3)
    assert first == second == expected.text + "\n"
    code, out, _ = run(capsys, generate_argv(files, "--impl", "ref", "--image", files.images[0],
                                             "--prompt", "ocr", "--beam", "2", "--quiet"))
    assert code == 0 and out.endswith("\n")


USER_ERRORS = [
    (lambda f: ["generate", "--checkpoint", f.npz, "--tokenizer", f.tok, "--image", f.images[0]], "required"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--foo"), "unrecognized"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--max-new-tokens", "0"), ">= 1"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--impl", "jax"), "invalid choice"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--sampler", "greedy", "--top-k", "2"),
     "--sampler cannot be combined with --top-k"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--beam", "2", "--temperature", "2"),
     "--beam cannot be combined with --temperature"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--top-k", "2", "--top-p", ".5"),
     "--top-k and --top-p"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--temperature", "0"), "sampler"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--dtype", "float64"), "--impl ref"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", checkpoint=str(f.dir / "no.npz")),
     "--checkpoint .* no such file"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", checkpoint=str(f.dir)),
     "no model.safetensors"),
    (lambda f: generate_argv(f, "--image", str(f.dir / "no.png"), "--prompt", "x"), "--image .* no such file"),
    (lambda f: generate_argv(f, "--image", f.tok, "--prompt", "x"), "not an image"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--image", f.images[1], "--prompt", "a", "--prompt", "b",
                             "--prompt", "c"), "equal numbers"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--impl", "ref", checkpoint=f.small),
     "does not belong"),
    (lambda f: generate_argv(f, "--image", f.images[0], "--prompt", "x", "--impl", "ref", tokenizer=f.images[1]),
     "not a SentencePiece model"),
]


@pytest.mark.parametrize("argv, match", USER_ERRORS)
def test_user_errors_exit_2_with_one_line(files, capsys, argv, match):
    code, out, err = run(capsys, argv(files) + ["--quiet"])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("paligemma") and re.search(match, err), err


def test_debug_shows_the_traceback(files, capsys):
    argv = generate_argv(files, "--image", files.images[0], "--prompt", "x", "--impl", "ref", "--quiet", "--debug",
                         tokenizer=files.images[0])
    code, _, err = run(capsys, argv)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("paligemma generate: error")


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, ["generate", "--help"])
    assert code == 0 and "--checkpoint" in out and "--top-p" in out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_lines_on_a_terminal_complete_in_place():
    stream = _Terminal()
    status = cli.StatusLines(stream)
    with status("loading checkpoint"):
        pass
    with pytest.raises(KeyError), status("compiling"):
        raise KeyError
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("loading checkpoint ... done in ") and lines[0].endswith(" s")
    assert lines[1] == "compiling ... failed"
    quiet = io.StringIO()
    with cli.StatusLines(quiet, enabled=False)("generating"):
        pass
    assert quiet.getvalue() == ""


def test_console_script(files, model):
    script = os.path.join(os.path.dirname(sys.executable), "paligemma")
    if not os.path.exists(script):
        pytest.skip("no `paligemma` console script: add [project.scripts] to pyproject.toml and reinstall")
    base = [script, "generate", "--checkpoint", files.npz, "--tokenizer", files.tok, "--impl", "ref",
            "--max-new-tokens", MAX_NEW, "--quiet", "--image", files.images[1]]
    done = subprocess.run(base + ["--prompt", "ocr"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == model.generate(files.images[1], "ocr", max_new_tokens=8).text + "\n"
    bad = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
