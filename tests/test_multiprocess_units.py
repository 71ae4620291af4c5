"""The pieces of the multi-process path that need no second process: the PALIGEMMA_* contract,
the launcher's environment and its failure handling, and a process's share of a batch."""

import os
import sys

import numpy as np
import pytest

from finetune_fixtures import build
from paligemma.cli.launch import process_env
from paligemma.cli.main import main
from paligemma.fast import data, distributed, sharding

FULL = {"PALIGEMMA_COORDINATOR": "10.0.0.1:8476", "PALIGEMMA_NUM_PROCESSES": "4", "PALIGEMMA_PROCESS_ID": "3"}


def test_settings_read_the_contract():
    assert distributed.settings({}) is None
    got = distributed.settings(FULL)
    assert (got["coordinator_address"], got["num_processes"], got["process_id"]) == ("10.0.0.1:8476", 4, 3)
    assert (got["initialization_timeout"], got["heartbeat_timeout_seconds"]) == (300, 100)  # JAX's defaults
    auto = distributed.settings({"PALIGEMMA_COORDINATOR": "auto", "PALIGEMMA_HEARTBEAT_TIMEOUT": "20"})
    assert auto == {"initialization_timeout": 300, "heartbeat_timeout_seconds": 20}  # JAX detects the rest


@pytest.mark.parametrize("change, names", [
    ({"PALIGEMMA_PROCESS_ID": "4"}, "PALIGEMMA_PROCESS_ID=4"),
    ({"PALIGEMMA_PROCESS_ID": None}, "PALIGEMMA_PROCESS_ID is not set"),
    ({"PALIGEMMA_NUM_PROCESSES": "two"}, "PALIGEMMA_NUM_PROCESSES='two'"),
    ({"PALIGEMMA_NUM_PROCESSES": "0"}, "PALIGEMMA_NUM_PROCESSES='0'"),
    ({"PALIGEMMA_COORDINATOR": "10.0.0.1"}, "expected host:port"),
    ({"PALIGEMMA_COORDINATOR": None}, "set without PALIGEMMA_COORDINATOR"),
    ({"PALIGEMMA_HEARTBEAT_TIMEOUT": "-1"}, "PALIGEMMA_HEARTBEAT_TIMEOUT"),
])
def test_a_bad_contract_names_the_variable(change, names):
    environ = {k: v for k, v in {**FULL, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=names.replace("(", r"\(")):
        distributed.settings(environ)


def test_a_bad_contract_stops_the_command_with_status_2(monkeypatch, capsys):
    monkeypatch.setenv("PALIGEMMA_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("PALIGEMMA_NUM_PROCESSES", "2")
    monkeypatch.setenv("PALIGEMMA_PROCESS_ID", "2")
    assert main(["generate", "--checkpoint", "x", "--tokenizer", "y", "--image", "z", "--prompt", "p"]) == 2
    assert "PALIGEMMA_PROCESS_ID=2 with PALIGEMMA_NUM_PROCESSES=2" in capsys.readouterr().err


def test_process_env_sets_the_contract_and_the_devices():
    env = process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "HOME": "/h"},
                      1, 2, 4321, 4, 60, 9)
    assert distributed.settings(env) == dict(coordinator_address="127.0.0.1:4321", num_processes=2, process_id=1,
                                             initialization_timeout=60, heartbeat_timeout_seconds=9)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"  # replaced, not doubled
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"


def test_launch_reports_a_failing_process_and_returns_its_status(capsys):
    # A bad command fails in every process before JAX starts: status 2 from each, reported.
    code = main(["launch", "--processes", "2", "--heartbeat-timeout", "5", "--", "generate", "--checkpoint",
                 "/nonexistent.npz", "--tokenizer", "/nonexistent.model", "--image", "x.png", "--prompt", "p"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "[process 1] paligemma generate: error: --checkpoint /nonexistent.npz: no such file" in err
    assert "paligemma launch: process 0 exited with status 2" in err


def test_launch_without_a_command_is_a_usage_error(capsys):
    assert main(["launch", "--processes", "2"]) == 2
    assert "no command" in capsys.readouterr().err


def test_prefetcher_rows_are_the_rows_of_the_whole_batch(tmp_path):
    """A process's share (rows of each micro-batch) is exactly those rows of the batch one process
    makes, accumulation and all: 2 micro-batches of 4, this process feeding rows 1 and 3."""
    files = build(tmp_path)
    examples = data.load_examples(files.train, files.tok, 16)
    args = (examples, 28, 8, 2, 0, 0, 3)
    with data.Prefetcher(*args) as whole, data.Prefetcher(*args, rows=[1, 3]) as part:
        for (s1, b1), (s2, b2) in zip(whole, part):
            assert s1 == s2
            for full, mine in zip(b1, b2):
                np.testing.assert_array_equal(full[:, [1, 3]], mine)


def test_put_rows_places_a_process_share():
    mesh = sharding.make_mesh({"data": 1})
    sh = sharding.batch_sharding(mesh)
    rows = sharding.process_rows(sh, (2, 4, 3))
    assert rows.tolist() == [0, 1, 2, 3]  # one process holds every row
    x = np.arange(24).reshape(2, 4, 3)
    np.testing.assert_array_equal(np.asarray(sharding.put_rows(x, rows, x.shape, sh)), x)
    with pytest.raises(ValueError, match="holds rows"):
        sharding.put_rows(x[:, :2], rows[:2], x.shape, sh)


def test_evaluate_mesh_is_checked_before_loading(tmp_path, capsys):
    from paligemma.cli.demo import _asset

    data_file = tmp_path / "eval.jsonl"
    data_file.write_text('{"image": "x.png", "prefix": "caption en", "suffix": "a"}\n')
    base = ["evaluate", "--checkpoint", _asset("demo-model.npz"), "--tokenizer", _asset("demo-tokenizer.model"),
            "--data", str(data_file), "--task", "caption", "--out", str(tmp_path / "out")]
    assert main(base + ["--mesh", "data=2,tensor=4"]) == 2
    assert "mesh: bad part 'tensor=4'" in capsys.readouterr().err
    assert main(base + ["--mesh", "data=2", "--impl", "ref"]) == 2
    assert "--mesh needs --impl fast" in capsys.readouterr().err


def test_a_process_whose_peers_never_come_ends_after_the_init_timeout(tmp_path):
    """No hang at start-up either: process 0 of 2 alone gives up after PALIGEMMA_INIT_TIMEOUT."""
    import socket
    import subprocess
    import time

    from paligemma.cli.demo import _asset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PALIGEMMA_", "XLA_FLAGS"))}
    env.update(PALIGEMMA_COORDINATOR=f"127.0.0.1:{port}", PALIGEMMA_NUM_PROCESSES="2", PALIGEMMA_PROCESS_ID="0",
               PALIGEMMA_INIT_TIMEOUT="3", JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "paligemma.cli", "generate", "--checkpoint", _asset("demo-model.npz"),
            "--tokenizer", _asset("demo-tokenizer.model"), "--image", str(tmp_path / "x.png"), "--prompt", "p"]
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60  # 3 s and the start-up of python and jax
    assert f"joining as process 0 of 2 at 127.0.0.1:{port}, waiting up to 3 s" in proc.stderr
    assert "RegisterTask" in proc.stderr, proc.stderr[-2000:]  # JAX names the step that timed out
