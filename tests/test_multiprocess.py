"""Several JAX processes on this machine (127.0.0.1, gloo CPU collectives): the commands users run
give what one process with the same 8 devices gives.

  - `paligemma launch --processes 2 --devices-per-process 4 -- finetune --mesh data=2,fsdp=4`
    logs the single-process losses step for step, writes each record and checkpoint once, and
    its step-2 checkpoint resumes in ONE process x 8 devices to the same next losses;
  - two processes started by hand with PALIGEMMA_* (the contract a pod slice uses): each decodes
    only its half of every batch (no example twice, none dropped); SIGKILL one mid-run and the
    other ends by itself within a bound, naming the dead peer; the last checkpoint still loads;
  - `generate --mesh data=2,model=4` and `evaluate --mesh data=2,model=4` across two processes
    print / write what one process prints / writes (the shipped demo model, which has something
    to say).

Every process is started here on a free port of 127.0.0.1, waited for with a timeout, and killed
(its whole process group) if still running at the end. 3 minutes on the shared 2-core machine
at load average 5, 5.4 at load 8 (most of it compiling the tiny model in each process).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from finetune_fixtures import CAPTIONS, PREFIX, build, write_jsonl
from paligemma.cli.common import demo_asset
from paligemma.fast import data, train_state
from paligemma.fast.train import TrainConfig, make_optimizer, split_params
from paligemma.parity.tolerances import FLOAT32_REORDERED, relative_error
from paligemma.ref.tasks import shapes

PY = [sys.executable, "-m", "paligemma.cli"]
BATCH, EXAMPLES, SEED = 8, 16, 0
TRAIN = ["--steps", "4", "--batch-size", str(BATCH), "--text-len", "16", "--lr", "2e-3", "--warmup", "0.2",
         "--checkpoint-every", "2", "--keep-checkpoints", "2", "--mesh", "data=2,fsdp=4", "--seed", str(SEED)]
SLOW = 600  # seconds any one command may take on a loaded 2-core machine


def _env(devices=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PALIGEMMA_", "XLA_FLAGS"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@contextlib.contextmanager
def _started(argvs, envs, logs):
    """Popen of each argv in a session of its own (stderr to its log file, stdout to log + ".out");
    on leaving, every process group still running is killed."""
    procs = []
    try:
        for argv, env, log in zip(argvs, envs, logs):
            with open(log, "w") as err, open(f"{log}.out", "w") as out:
                procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=err,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)


def _run(argv, env, log, timeout=SLOW):
    """Runs one command (its process group killed after `timeout`); returns (status, stdout, stderr)."""
    start = time.monotonic()
    with _started([argv], [env], [log]) as (proc,):
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
    print(f"{' '.join(argv[3:6])}: {time.monotonic() - start:.1f} s")
    with open(log) as f, open(f"{log}.out") as g:
        text, out = f.read(), g.read()
    assert code is not None, f"{argv[3:5]} still running after {timeout} s:\n{text[-3000:]}"
    return code, out, text


def _ok(argv, env, log, timeout=SLOW):
    """Runs one command that must succeed; returns its stdout."""
    code, out, text = _run(argv, env, log, timeout)
    assert code == 0, f"{argv[3:5]} exited {code}:\n{text[-3000:]}"
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(folder):
    return {r["step"]: r["loss"] for r in _records(folder) if "loss" in r}


def _close(a, b, tol=FLOAT32_REORDERED.rel, scale=0.0):
    """Relative agreement within float32 reordered-reduction noise (relative to at least `scale`)."""
    return abs(a - b) <= tol * max(abs(a), abs(b), scale)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny PaliGemma 2, its tokenizer, 16 training examples with images of their own (more than a
    batch, so a process reading the wrong rows changes the loss) and 4 validation lines."""
    folder = tmp_path_factory.mktemp("multiprocess")
    files = build(folder)
    rows = []
    for i in range(EXAMPLES):
        name, color, animal = CAPTIONS[i % 4]
        a = np.zeros((28, 28, 3), np.uint8)
        a[:] = color
        a[i % 14 * 2:i % 14 * 2 + 2 + i // 14, :] = 255 - np.array(color, np.uint8)  # a band of its own
        Image.fromarray(a).save(folder / "images" / f"{i:02d}.png")
        rows.append({"image": f"images/{i:02d}.png", "prefix": PREFIX, "suffix": f"a {name} {animal}"})
    files.train = write_jsonl(folder / "train16.jsonl", rows)
    files.images = [str(folder / r["image"]) for r in rows]
    files.val = write_jsonl(folder / "val.jsonl", rows[:4])
    return files


def _finetune_args(files, out):
    return ["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--train", files.train,
            "--out", str(out), *TRAIN, "--quiet"]


def _launch(command, devices=4, heartbeat=20):
    return PY + ["launch", "--processes", "2", "--devices-per-process", str(devices), "--init-timeout", "300",
                 "--heartbeat-timeout", str(heartbeat), "--"] + command


def test_finetune_two_processes_equal_one_and_resume_on_one(files, tmp_path):
    single, multi, resumed = tmp_path / "single", tmp_path / "multi", tmp_path / "resumed"
    val = ["--val", files.val]
    _ok(PY + _finetune_args(files, single) + val + ["--no-export"], _env(8), tmp_path / "single.log")
    _ok(_launch(_finetune_args(files, multi) + val), _env(), tmp_path / "multi.log")

    one, two = _losses(single), _losses(multi)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert one[4] < one[1]  # it trains
    # The same program with the gradients' sums over 8 devices split between two processes (gloo):
    # float32 reordering at most. Reading the wrong rows (one example twice, another never) moves
    # the loss by ~1e-2 from step 1 on (planted: 8.106 vs 8.037).
    for step in one:
        assert _close(one[step], two[step]), (step, one, two)
    print("largest relative loss difference, 2 processes vs 1:",
          max(abs(one[s] - two[s]) / abs(one[s]) for s in one))

    # Written once, by process 0: 4 step records and 1 evaluation (two writers would double them),
    # complete checkpoints, no temporary leftovers, the exported weights.
    assert [r["step"] for r in _records(multi)] == [1, 2, 3, 4, 4]
    (ev1,), (ev2,) = ([r for r in _records(f) if "val_loss" in r] for f in (single, multi))
    assert _close(ev1["val_loss"], ev2["val_loss"]) and ev1["exact_match"] == ev2["exact_match"], (ev1, ev2)
    ckpts = multi / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["LATEST", "step_00000002", "step_00000004"]
    assert sorted(os.listdir(multi)) == ["checkpoints", "loss.png", "metrics.jsonl", "model.npz", "model_hf", "run.json"]
    # The checkpoint holds the gathered arrays (fsdp shards of both processes), as one process has them.
    a, b = (np.load(f / "checkpoints" / "step_00000004" / "trainable.npz") for f in (single, multi))
    assert a.files == b.files
    scale = max(float(np.abs(a[k]).max()) for k in a.files)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    assert worst <= 1e-4 * scale, (worst, scale)  # Adam turns float32 noise into up to lr-sized steps

    # Resume the 2-process run's step-2 checkpoint in ONE process with the 8 devices.
    shutil.copytree(multi, resumed, ignore=shutil.ignore_patterns("step_00000004", "model*"))
    _ok(PY + ["finetune", "--resume", str(resumed), "--quiet", "--no-export"], _env(8), tmp_path / "resumed.log")
    again = _losses(resumed)
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert _close(again[step], two[step]) and _close(again[step], one[step]), (step, again, two)
    print("resumed on 1 process vs 2 processes:", [abs(again[s] - two[s]) / abs(two[s]) for s in (3, 4)])


RECORDER = """
import json, os, sys
from paligemma.fast import data
make_batch = data.make_batch
def recorded(examples, indices, *args, **kwargs):  # the examples this process decodes, batch by batch
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps([int(i) for i in indices]) + "\\n")
    return make_batch(examples, indices, *args, **kwargs)
data.make_batch = recorded
from paligemma.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_each_process_reads_its_half_and_a_killed_peer_stops_the_other(files, tmp_path):
    out, port, heartbeat = tmp_path / "run", _free_port(), 10
    args = _finetune_args(files, out)
    args[args.index("--steps") + 1] = "500"  # long enough to be killed in the middle
    envs = [_env(4, PALIGEMMA_COORDINATOR=f"127.0.0.1:{port}", PALIGEMMA_NUM_PROCESSES="2",
                 PALIGEMMA_PROCESS_ID=str(i), PALIGEMMA_INIT_TIMEOUT="300",
                 PALIGEMMA_HEARTBEAT_TIMEOUT=str(heartbeat), RECORD=str(tmp_path / f"rows{i}.jsonl"))
            for i in range(2)]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    argv = [sys.executable, "-c", RECORDER] + args
    ckpts = out / "checkpoints"
    with _started([argv, argv], envs, logs) as procs:
        deadline = time.monotonic() + SLOW
        while not (train_state.latest(ckpts) or "").endswith("step_00000004"):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [open(f).read()[-2000:] for f in logs]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = procs[0].wait(heartbeat + 50)  # the heartbeat timeout plus slack for a loaded machine
        except subprocess.TimeoutExpired:
            code = None
        waited = time.monotonic() - killed
    text = open(logs[0]).read()
    assert code is not None, f"process 0 still running {heartbeat + 50} s after its peer died:\n{text[-2000:]}"
    assert code != 0 and "another task died" in text, (code, text[-2000:])
    print(f"process 0 ended {waited:.1f} s after process 1 was killed (heartbeat timeout {heartbeat} s)")

    # Step by step the two processes decoded disjoint halves that make up the whole batch.
    read = [[json.loads(line) for line in open(tmp_path / f"rows{i}.jsonl")] for i in range(2)]
    steps = min(map(len, read))
    assert steps >= 4, read
    for step in range(steps):
        whole = data.batch_indices(EXAMPLES, SEED, step * BATCH, BATCH)
        first, second = read[0][step], read[1][step]
        assert len(first) == len(second) == BATCH // 2, (step, first, second)
        assert not set(first) & set(second) and sorted(first + second) == sorted(whole.tolist()), (step, read)

    # The newest checkpoint (written by process 0 before it died) is complete and loads.
    latest = train_state.latest(ckpts)
    config = TrainConfig(text_len=16)
    trainable, _ = split_params(files.params, config)
    import jax

    opt_like = jax.eval_shape(make_optimizer(config).init, trainable)
    got, opt_state, state = train_state.load(latest, trainable, opt_like)
    assert state["step"] >= 4 and state["data_position"] == state["step"] * BATCH
    assert all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(got))


def _scenes(folder, n, seed=7):
    """n demo scenes (PNG) and a detect line with a non-empty answer for each."""
    rng, spec, lines = np.random.default_rng(seed), shapes.DEMO_SCENE, []
    while len(lines) < n:
        scene = shapes.random_scene(rng, spec["size"], spec["max_shapes"], grid=spec["grid"])
        detect = [(p, s) for p, s in shapes.task_examples(scene, rng) if p.startswith("detect") and s]
        if detect:
            path = os.path.join(folder, f"scene{len(lines)}.png")
            Image.fromarray(scene.image).save(path)
            lines.append({"image": os.path.basename(path), "prefix": detect[0][0], "suffix": detect[0][1]})
    return write_jsonl(os.path.join(folder, "eval.jsonl"), lines), [os.path.join(folder, x["image"]) for x in lines]


def test_generate_and_evaluate_two_processes_equal_one(tmp_path):
    model = ["--checkpoint", demo_asset("demo-model.npz"), "--tokenizer", demo_asset("demo-tokenizer.model")]
    mesh = ["--mesh", "data=2,model=4", "--max-new-tokens", "12", "--quiet"]
    evals, images = _scenes(str(tmp_path), 6)
    generate = ["generate", *model, *mesh, "--image", images[0], "--image", images[1], "--prompt", "caption en",
                "--prompt", "detect circle", "--json", "--show-tokens"]
    one = _ok(PY + generate, _env(8), tmp_path / "g1.log")
    two = _ok(_launch(generate), _env(), tmp_path / "g2.log")
    lines = lambda text: [json.loads(x) for x in text.splitlines()]  # noqa: E731  (stdout: results only)
    one, two = lines(one), lines(two)
    assert len(one) == len(two) == 2 and one[0]["text"], (one, two)  # the demo model captions the scene
    for a, b in zip(one, two):
        assert (a["text"], a["tokens"]) == (b["text"], b["tokens"]), (a, b)
        # A log-probability is a logit minus a log-sum-exp, both of order 1-10, and float32
        # reordering moves it by ~1e-6 absolute: near 0 (a confident token) a relative bound
        # on the log-probability alone would ask more than float32 gives.
        assert all(_close(x, y, scale=1.0) for x, y in zip(a["logprobs"], b["logprobs"])), (a, b)

    evaluate = ["evaluate", *model, *mesh, "--data", evals, "--task", "detect", "--batch-size", "4"]
    printed = [_ok(cmd + ["--out", str(tmp_path / name)], env, tmp_path / f"{name}.log")
               for cmd, env, name in ((PY + evaluate, _env(8), "e1"), (_launch(evaluate), _env(), "e2"))]
    m1, m2 = (lines(p) for p in printed)
    assert len(m1) == len(m2) == 1 and m1[0]["count"] == 6, (m1, m2)  # printed once, by process 0 only
    assert '"task"' not in (tmp_path / "e2.log").read_text()  # nor by process 1 on stderr
    assert m1[0] == m2[0]
    p1, p2 = ((tmp_path / name / "predictions.jsonl").read_text() for name in ("e1", "e2"))
    assert p1 == p2


def engine_requests(t):
    """The two-process engine test's requests (`t`: tests/test_engine.py). The first two share a
    shape, so they are admitted together: one row on each process's devices."""
    return [t.make_request("a", 5, 6, token_seed=1), t.make_request("b", 3, 9, "top_k(4)", seed=2, token_seed=2),
            t.make_request("ab", 3, 5, token_seed=3), t.make_request("b", 17, 7, "nucleus(0.7, 1.2)", token_seed=4),
            t.make_request("a", 3, 40, seed=5, token_seed=5), t.make_request("a", 5, 4, token_seed=6)]


ENGINE_SCRIPT = """
import json, os, sys
from paligemma.fast import distributed
distributed.initialize()  # PALIGEMMA_* from the environment; a no-op for one process
import jax
sys.path.insert(0, os.environ["TESTS"])
import test_engine as t
import test_multiprocess as m
from paligemma.fast.engine import Engine

engine = Engine(t.PARAMS, t.CONFIG, slots=2, max_seq=64, mesh="data=2,model=2")
if engine.leader:  # arrivals between steps, a cancel, slots reused: plans of every kind
    requests = m.engine_requests(t)
    streams = [engine.submit(r) for r in requests[:2]]
    engine.step(); engine.step()
    streams += [engine.submit(r) for r in requests[2:5]]
    for _ in range(8):
        engine.step()
    streams[4].cancel()  # the 40-token answer, in a slot by now
    streams.append(engine.submit(requests[5]))
    engine.run_until_idle()
    engine.stop()
    engine.stop()  # a second stop returns at once (the followers have left: no collective)
    out = [dict(tokens=s.result(timeout=0).tokens.tolist(), logprobs=s.result(timeout=0).logprobs.tolist(),
                reason=s.result(timeout=0).finish_reason) for s in streams]
    print("RESULT" + json.dumps(dict(out=out, processes=jax.process_count(), stats=engine.stats())))
else:
    engine.follow()
    print("FOLLOWED" + json.dumps(engine.stats()))
"""


def test_the_engine_across_two_processes_gives_the_answers_of_one(tmp_path):
    """`fast.Engine` on a data=2,model=2 mesh over 2 processes x 2 devices: process 0 schedules
    (arrivals between steps, a cancel, slots reused), process 1 follows its plans; every answer
    equals `fast.generate` on that request alone, as on one process (tests/test_engine.py)."""
    sys.path.insert(0, os.path.dirname(__file__))
    import test_engine as t

    port = _free_port()
    envs = [_env(2, PALIGEMMA_COORDINATOR=f"127.0.0.1:{port}", PALIGEMMA_NUM_PROCESSES="2", PALIGEMMA_PROCESS_ID=str(i),
                 PALIGEMMA_HEARTBEAT_TIMEOUT="30", TESTS=os.path.dirname(os.path.abspath(__file__))) for i in range(2)]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    argv = [sys.executable, "-c", ENGINE_SCRIPT]
    with _started([argv, argv], envs, logs) as procs:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(SLOW))
            except subprocess.TimeoutExpired:
                codes.append(None)
    texts = [open(f).read() + open(f"{f}.out").read() for f in logs]
    assert codes == [0, 0], (codes, [x[-2500:] for x in texts])
    result = json.loads(texts[0].split("RESULT", 1)[1].splitlines()[0])
    followed = json.loads(texts[1].split("FOLLOWED", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and followed["active"] == 0 and followed["queued"] == 0
    assert followed["generated_tokens"] == result["stats"]["generated_tokens"]  # process 1 ran every step too
    requests = engine_requests(t)
    assert [r["reason"] for r in result["out"]][4] == "cancelled"
    for request, got in zip(requests, result["out"]):
        tokens, logprobs = t.alone(request)
        n = len(got["tokens"])
        assert got["tokens"] == tokens[:n].tolist(), (got, tokens)
        assert n == len(tokens) or got["reason"] == "cancelled"
        assert relative_error(np.array(got["logprobs"]), logprobs[:n]) <= FLOAT32_REORDERED.bound()
