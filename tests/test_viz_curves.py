"""loss.png: `paligemma plot` and the drawing `paligemma finetune` does at checkpoints and at the end.

The figure's lines are read back and compared with the numbers of metrics.jsonl, parsed here.
"""

import json
import os
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paligemma.cli.main import main
from paligemma.viz import curves
from finetune_fixtures import build

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def logs(draw):
    """metrics.jsonl lines as `paligemma finetune` writes them: training records every few steps,
    evaluations with exact match or a task's metrics."""
    task = draw(st.sampled_from(["exact_match", "cider"]))
    lines, step = [], 0
    for _ in range(draw(st.integers(0, 12))):
        step += draw(st.integers(1, 5))
        lines.append({"step": step, "loss": draw(finite), "grad_norm": 1.0, "lr": draw(st.floats(0, 1)),
                      "examples_per_s": 3.0, "data_position": step * 4})
        if draw(st.booleans()):
            metric = {"exact_match": draw(st.floats(0, 1))} if task == "exact_match" else {
                "cider": draw(finite), "count": 4, "invalid": 0}
            lines.append({"step": step, "val_loss": draw(finite), **metric, "val_examples": 4})
    return lines


def lines_by_label(fig):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines()}


@settings(max_examples=30)
@given(logs())
def test_plotted_points_are_the_logged_ones(tmp_path_factory, lines):
    run = tmp_path_factory.mktemp("run")
    with open(run / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    drawn = lines_by_label(curves.figure(curves.read_metrics(run / "metrics.jsonl")))
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    expected = {}
    for label, key in (("train loss", "loss"), ("val loss", "val_loss"), ("learning rate", "lr"),
                       ("exact_match", "exact_match"), ("cider", "cider")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            expected[label] = ([s for s, _ in points], [v for _, v in points])
    assert drawn == expected


def test_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.0, "lr": 0.2},
               {"step": 2, "val_loss": 1.5, "exact_match": 0.25, "val_examples": 4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png") and Image.open(tmp_path / "c.png")
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").exists()
    (run / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n{oops\n")
    assert main(["plot", str(run)]) == 2
    assert f"{run / 'metrics.jsonl'}:2: not JSON" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "none")]) == 2
    assert "RUN " in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_a_warning_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert curves.draw_quietly(str(tmp_path), sys.stderr) is None
    assert "pip install 'paligemma[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "loss.png").exists()
    assert main(["plot", str(tmp_path)]) == 2
    assert "matplotlib is not installed; pip install 'paligemma[viz]'" in capsys.readouterr().err


def test_finetune_draws_at_each_checkpoint_and_at_the_end_and_survives_a_failed_drawing(
        tmp_path, monkeypatch, capsys):
    from paligemma.cli import finetune as cli_finetune

    files = build(tmp_path)
    out = tmp_path / "run"
    seen = []  # the training steps metrics.jsonl held at each drawing

    def draw(run, stream):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            seen.append([json.loads(line)["step"] for line in f if '"loss"' in line])
        if len(seen) == 1:  # the first drawing fails: training goes on
            monkeypatch.setattr(curves, "figure", broken)
        elif len(seen) == 2:
            monkeypatch.setattr(curves, "figure", real)
        return curves.draw_quietly(run, stream)

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    real = curves.figure
    monkeypatch.setattr(cli_finetune, "draw_quietly", draw)
    argv = ["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--train", files.train,
            "--out", str(out), "--steps", "3", "--batch-size", "4", "--text-len", "16", "--checkpoint-every", "2",
            "--no-export", "--quiet"]
    assert main(argv) == 0
    assert seen == [[1, 2], [1, 2, 3]]  # at the checkpoint of step 2, then at the end
    err = capsys.readouterr().err
    assert "paligemma: warning: loss.png not drawn: RuntimeError: no ink" in err
    drawn = np.asarray(Image.open(out / "loss.png"))
    assert drawn.ndim == 3 and drawn.shape[1] > 400
