"""Training checkpoints: kill-and-resume gives the uninterrupted losses and weights; a crash while a
checkpoint is written leaves the previous one usable; frozen parameters come out bit-identical.

One configuration throughout, so the train step compiles once (paligemma.fast.finetune caches it).
"""

import json
import os

import numpy as np
import pytest

from finetune_fixtures import build
from paligemma import ref
from paligemma.fast import train_state
from paligemma.fast.finetune import finetune, resume
from paligemma.fast.train import TrainConfig
from paligemma.ref.params import flatten

CONFIG = TrainConfig(steps=6, batch_size=4, text_len=16, lr=1e-3, warmup=0.2, trainable="attention",
                     checkpoint_every=2, keep_checkpoints=2)


class Interrupted(Exception):
    pass


def _losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_kill_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    files = build(tmp_path)
    common = dict(progress=False, export=("npz",))
    full = finetune(files.base, files.tok_path, files.train, tmp_path / "full", CONFIG, **common)
    assert [s for s, _ in full.losses] == list(range(1, 7))

    # Frozen parameters are bit-identical; the trainable group (attention) moved.
    _, trained = ref.load(full.files["npz"])
    base, trained = flatten(files.params), flatten(trained)
    for key, value in base.items():
        if key.startswith("llm/layers/attn/"):
            assert not np.array_equal(trained[key], value), key
        else:
            np.testing.assert_array_equal(trained[key], value, err_msg=key)

    # Interrupted after step 5, between the checkpoints of steps 4 and 6.
    cut = tmp_path / "cut"

    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        finetune(files.base, files.tok_path, files.train, cut, CONFIG, on_step=stop_at_5, **common)
    ckpts = cut / "checkpoints"
    assert train_state.latest(ckpts) == str(ckpts / "step_00000004")
    with pytest.raises(ValueError, match="already holds a run"):  # a fresh start would overwrite it
        finetune(files.base, files.tok_path, files.train, cut, CONFIG, **common)

    # The resumed run crashes while writing the step-6 checkpoint: step 4 stays complete and named.
    real_write = train_state._write_npz

    def failing_write(path, arrays):
        if "opt_state" in path:
            raise OSError("disk full (simulated)")
        real_write(path, arrays)

    monkeypatch.setattr(train_state, "_write_npz", failing_write)
    with pytest.raises(OSError, match="simulated"):
        resume(cut, **common)
    monkeypatch.setattr(train_state, "_write_npz", real_write)
    assert sorted(os.listdir(ckpts)) == ["LATEST", "step_00000002", "step_00000004"]  # no half-written folder
    assert (ckpts / "LATEST").read_text() == "step_00000004"

    resumed = resume(cut, **common)
    assert resumed.first_step == 4
    assert list(resumed.losses) == list(full.losses[4:])  # exactly: same program, same inputs, same state
    assert _losses(cut) == _losses(tmp_path / "full")  # the log has each step once
    _, again = ref.load(resumed.files["npz"])
    for key, value in flatten(again).items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)
    assert sorted(os.listdir(ckpts)) == ["LATEST", "step_00000004", "step_00000006"]


def test_cli_trains_evaluates_exports_and_resumes(tmp_path, capsys):
    from paligemma.cli import main as cli

    files = build(tmp_path)
    out = str(tmp_path / "run")
    argv = ["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--train", files.train,
            "--val", files.train, "--out", out, "--steps", "2", "--batch-size", "4", "--text-len", "16",
            "--lr", "1e-3", "--trainable", "lora", "--lora-rank", "2", "--checkpoint-every", "1", "--quiet"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["finetune", "--resume", out, "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "paligemma finetune: steps 2 -> 3" in err and "exact match" in err  # the summary
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 3]  # at the end of each run
    assert all(set(r) == {"step", "loss", "grad_norm", "lr", "examples_per_s", "data_position"}
               for r in records if "loss" in r)
    assert records[-1]["val_examples"] == 4 and 0 <= records[-1]["exact_match"] <= 1
    config, merged = ref.load(os.path.join(out, "model.npz"))
    _, merged_hf = ref.load(os.path.join(out, "model_hf"))
    assert config.llm == files.config.llm
    for key, value in flatten(merged).items():
        np.testing.assert_array_equal(value, flatten(merged_hf)[key], err_msg=key)
