"""The continuous-batching engine (`paligemma.fast.engine`): batching never changes an answer.

Every request's tokens and log-probabilities from the engine are compared with `fast.generate`
run on that request alone (an independent code path: one static batch, its own cache layout,
its own sampling loop). Hypothesis draws the request sets: arrival steps, prompt and answer
lengths, shared or distinct images (and a two-image prompt), fewer slots than requests, mixed
samplers and seeds, stop ids and cancellations.
"""

import asyncio
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import fast, ref
from paligemma.fast.engine import AdmissionError, Engine, QueueFull, Request
from paligemma.parity.tolerances import FLOAT32_REORDERED, relative_error

BASE = ref.get_config("tiny-paligemma2")
# A window of 8 positions bites inside these short sequences (16 image tokens + prompt + answer).
CONFIG = dataclasses.replace(BASE, llm=dataclasses.replace(BASE.llm, sliding_window=8))
PARAMS = fast.unstack_layers(ref.init_params(CONFIG, seed=1, dtype=np.float32))
R = CONFIG.vision.image_size
_PIXELS = np.random.default_rng(0).uniform(-1, 1, (2, R, R, 3)).astype(np.float32)
IMAGES = {"a": _PIXELS[0], "b": _PIXELS[1], "ab": _PIXELS}  # "ab": one prompt with two images
MAX_NEW = 40  # the longest answer any test asks for
SAMPLERS = ("greedy", "top_k(4)", "nucleus(0.7, 1.2)")  # temperature alone: test_a_request_seed_...
_ALONE = {}


def make_request(image, length, max_new, sampler="greedy", seed=0, token_seed=0, stop_ids=()):
    tokens = np.random.default_rng(token_seed).integers(3, CONFIG.llm.vocab_size, length)
    tokens[0] = 2  # BOS
    return Request(IMAGES[image], tokens, None, max_new, sampler, seed, stop_ids)


def alone(request):
    """`fast.generate` on the request by itself: (tokens, logprobs) up to its own end.

    Run for MAX_NEW tokens and cut to the request's: the first n tokens of a longer answer are
    the same draws (one key split per token) and the same numbers up to rounding; one compiled
    program then serves every answer length.
    """
    key = (request.images.shape, request.images.tobytes(), request.tokens.tobytes(), request.sampler, request.seed)
    if key not in _ALONE:
        out = fast.generate(PARAMS, CONFIG, request.images[None], request.tokens[None],
                            np.zeros((1, len(request.tokens)), np.int32), None, MAX_NEW, request.sampler,
                            request.seed)
        _ALONE[key] = out.tokens[0], out.logprobs[0]
    tokens, logprobs = (x[: request.max_new_tokens] for x in _ALONE[key])
    stops = np.flatnonzero(np.isin(tokens, (CONFIG.eos_id,) + tuple(request.stop_ids)))
    n = stops[0] + 1 if stops.size else len(tokens)
    return tokens[:n], logprobs[:n]


def check_answer(request, completion):
    tokens, logprobs = alone(request)
    n = len(completion.tokens)
    if completion.finish_reason == "cancelled":
        assert n <= len(tokens)
    else:
        assert n == len(tokens), (completion.finish_reason, completion.tokens, tokens)
    np.testing.assert_array_equal(completion.tokens, tokens[:n])
    if n:
        assert relative_error(completion.logprobs, logprobs[:n]) <= FLOAT32_REORDERED.bound()
    if completion.finish_reason == "eos":
        assert completion.tokens[-1] == CONFIG.eos_id
    elif completion.finish_reason == "stop":
        assert completion.tokens[-1] in request.stop_ids
    elif completion.finish_reason == "length":
        assert n == request.max_new_tokens


@st.composite
def scenarios(draw):
    count = draw(st.integers(1, 6))
    requests = []
    for i in range(count):
        image = draw(st.sampled_from(["a", "b", "ab"]))
        request = make_request(image, draw(st.sampled_from([3, 17])), draw(st.sampled_from([1, 3, 8])),
                               draw(st.sampled_from(SAMPLERS)), draw(st.integers(0, 2)), draw(st.integers(0, 3)))
        if draw(st.booleans()):  # a stop id the answer may well produce: one of the alone answer's tokens
            request = dataclasses.replace(request, stop_ids=(int(alone(request)[0][-1]),))
        requests.append((draw(st.integers(0, 5)), draw(st.none() | st.integers(0, 6)), request))
    return draw(st.sampled_from([1, 3])), requests


def run_scenario(engine, requests):
    """Submits each request at its arrival step, cancels at its step; returns the streams."""
    streams = [None] * len(requests)
    for step in range(1000):
        for i, (arrive, cancel, request) in enumerate(requests):
            if arrive == step:
                streams[i] = engine.submit(request)
            if cancel == step and streams[i] is not None:
                streams[i].cancel()
        if not engine.step() and step > 6:
            return streams
    raise AssertionError("the engine never went idle")


@settings(max_examples=20)
@given(scenarios())
def test_batching_never_changes_an_answer(scenario):
    slots, requests = scenario
    engine = Engine(PARAMS, CONFIG, slots=slots, max_seq=64, prefill_sizes=(1, slots))  # fewer programs to compile
    streams = run_scenario(engine, requests)
    for (_, _, request), stream in zip(requests, streams):
        check_answer(request, stream.result(timeout=0))
    assert engine.stats() == {**engine.stats(), "queued": 0, "active": 0, "free": slots}


def test_one_slot_reused_by_shorter_requests_sees_nothing_of_the_last():
    """A long answer fills slot 0's cache; the short requests after it must not see its columns."""
    engine = Engine(PARAMS, CONFIG, slots=1, max_seq=64)
    requests = [make_request("a", 17, 8, token_seed=1), make_request("b", 3, 8, token_seed=2),
                make_request("a", 6, 3, "temperature(0.9)", seed=1, token_seed=3)]
    streams = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    for request, stream in zip(requests, streams):
        check_answer(request, stream.result(timeout=0))


def test_a_prefill_stays_within_max_prefill_tokens(monkeypatch):
    """Four arrivals of one shape (16 image + 16 text positions each) with room for 64 positions per
    prefill: two admissions of two rows, not one of four; the answers are unchanged."""
    from paligemma.fast import pool

    batches, admit = [], pool.admit
    monkeypatch.setattr(pool, "admit", lambda params, cache, rows, *a, **k: batches.append(len(rows))
                        or admit(params, cache, rows, *a, **k))
    engine = Engine(PARAMS, CONFIG, slots=4, max_seq=64, prefill_sizes=(1, 2, 4), max_prefill_tokens=64)
    requests = [make_request("a", 5 + i, 4, token_seed=i) for i in range(4)]
    streams = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    assert batches == [2, 2]
    for request, stream in zip(requests, streams):
        check_answer(request, stream.result(timeout=0))


def test_a_step_computes_only_the_active_rows_padded_to_a_decode_size(monkeypatch):
    """A step takes out the active slots' rows (padded with free ones to a decode size) and
    advances only those; answers unchanged. Slots 0 and 1 answer 2 and 6 tokens: a step of both,
    then slot 1 alone; two arrivals take slots 0 and 2: three rows padded with free slot 3."""
    from paligemma.fast import pool

    steps, decode_rows = [], pool.decode_rows
    monkeypatch.setattr(pool, "decode_rows", lambda params, cache, rows, *a, **k: steps.append(list(rows))
                        or decode_rows(params, cache, rows, *a, **k))
    engine = Engine(PARAMS, CONFIG, slots=8, max_seq=64)
    assert engine.decode_sizes == (1, 2, 4, 8)
    requests = [make_request("a", 5, 2, token_seed=1), make_request("b", 5, 6, token_seed=2)]
    streams = [engine.submit(r) for r in requests]
    engine.step()
    engine.step()
    requests += [make_request("a", 4, 4, "top_k(4)", seed=3, token_seed=3),
                 make_request("b", 6, 3, "nucleus(0.7, 1.2)", seed=4, token_seed=4)]
    streams += [engine.submit(r) for r in requests[2:]]
    engine.run_until_idle()
    assert steps == [[0, 1], [1], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    for request, stream in zip(requests, streams):
        check_answer(request, stream.result(timeout=0))


def test_a_request_seed_not_its_slot_decides_the_samples():
    engine = Engine(PARAMS, CONFIG, slots=3, max_seq=64)
    request = make_request("a", 6, 8, "temperature(1.5)", seed=7)
    streams = [engine.submit(make_request("b", 3, 8, "temperature(1.5)", seed=s)) for s in (1, 2)]
    streams.append(engine.submit(request))  # lands in slot 2
    engine.run_until_idle()
    check_answer(request, streams[-1].result(timeout=0))


def test_the_image_cache_tells_images_one_pixel_apart():
    engine = Engine(PARAMS, CONFIG, slots=2, max_seq=64)
    near = IMAGES["a"].copy()
    near[5, 9, 1] += 0.25
    first = make_request("a", 6, 8)
    second = dataclasses.replace(first, images=near)
    streams = [engine.submit(first), engine.submit(second), engine.submit(first)]
    engine.run_until_idle()
    assert engine.stats()["image_cache_misses"] == 2 and engine.stats()["image_cache_hits"] == 1
    for request, stream in zip([first, second, first], streams):
        check_answer(request, stream.result(timeout=0))
    encoded = [engine._image_tokens(x) for x in (IMAGES["a"], near)]
    assert not np.array_equal(np.asarray(encoded[0]), np.asarray(encoded[1]))


def test_streams_iterate_await_and_cancel_from_threads():
    engine = Engine(PARAMS, CONFIG, slots=2, max_seq=64).start()
    try:
        request = make_request("b", 6, 8)
        stream = engine.submit(request)
        tokens = [event.token for event in stream]
        np.testing.assert_array_equal(tokens, alone(request)[0])

        async def read():
            return [event.token async for event in engine.submit(request).aiter()]

        np.testing.assert_array_equal(asyncio.run(read()), tokens)
        long = engine.submit(make_request("a", 3, 40, "temperature(1.0)"))
        next(iter(long))
        long.cancel()
        assert long.result(timeout=60).finish_reason == "cancelled"
    finally:
        engine.stop()
    assert engine.stats()["free"] == 2


def test_admission_refuses_what_cannot_fit_with_both_numbers():
    engine = Engine(PARAMS, CONFIG, slots=1, max_seq=40, max_queue=1)
    with pytest.raises(AdmissionError, match=r"16 image tokens \+ 17 prompt tokens \+ 8 new tokens = 41 .* max_seq 40"):
        engine.submit(make_request("a", 17, 8))
    with pytest.raises(AdmissionError, match="beam"):
        engine.submit(make_request("a", 3, 2, "beam(2)"))
    with pytest.raises(AdmissionError, match="images"):
        engine.submit(dataclasses.replace(make_request("a", 3, 2), images=np.zeros((R + 1, R, 3))))
    with pytest.raises(ValueError, match="context of 8192"):
        Engine(PARAMS, CONFIG, max_seq=9000)
    engine.submit(make_request("a", 3, 2))
    with pytest.raises(QueueFull):
        engine.submit(make_request("a", 3, 2))


def test_generate_refuses_a_prompt_past_the_context_before_any_work():
    tokens = np.full((1, 12_000), 5)
    with pytest.raises(ValueError, match=r"16 image tokens \+ 12000 text tokens \+ 4 new tokens = 12020 positions.*8192"):
        fast.generate(PARAMS, CONFIG, IMAGES["a"][None], tokens, np.zeros_like(tokens), None, 4)


def test_the_pallas_kernels_serve_the_engine_cache():
    """The decode kernel reads the pool's cache (per-row lengths, max_seq rounded to whole tiles)."""
    from paligemma.parity.tolerances import KERNEL_FLOAT32

    engine = Engine(PARAMS, CONFIG, slots=2, max_seq=64, policy=fast.Policy(attention_impl="pallas_interpret"))
    assert engine.max_seq == 128
    requests = [make_request("a", 17, 5, token_seed=1), make_request("b", 3, 5, "top_k(4)", seed=2, token_seed=2),
                make_request("a", 3, 5, token_seed=3)]
    streams = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    for request, stream in zip(requests, streams):
        completion = stream.result(timeout=0)
        tokens, logprobs = alone(request)
        np.testing.assert_array_equal(completion.tokens, tokens)
        assert relative_error(completion.logprobs, logprobs) <= KERNEL_FLOAT32.bound()


MESH_SCRIPT = """
import json, numpy as np
from paligemma import fast
from paligemma.fast.engine import Engine
import tests.test_engine as t
engine = Engine(t.PARAMS, t.CONFIG, slots=4, max_seq=64, mesh="data=2,model=2")
requests = [t.make_request("a", 17, 6, token_seed=1), t.make_request("b", 3, 6, "top_k(4)", seed=2, token_seed=2),
            t.make_request("ab", 3, 6, token_seed=3), t.make_request("b", 17, 6, "nucleus(0.7, 1.2)", token_seed=4),
            t.make_request("a", 3, 6, seed=5, token_seed=5)]
streams = [engine.submit(r) for r in requests]
engine.run_until_idle()
out = []
for r, s in zip(requests, streams):
    c = s.result(timeout=0)
    tokens, logprobs = t.alone(r)
    out.append(dict(tokens=c.tokens.tolist(), alone=tokens.tolist(), logprobs=c.logprobs.tolist(),
                    alone_logprobs=logprobs.tolist(), sharding=str(engine._cache.k.sharding.spec)))
print("RESULT" + json.dumps(out))
"""


def test_the_engine_on_a_mesh_gives_the_one_device_answers():
    """Slots over data, heads over model (4 virtual CPU devices in a subprocess)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    run = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULT", 1)[1])
    for r in results:
        assert r["tokens"] == r["alone"]
        assert relative_error(np.array(r["logprobs"]), np.array(r["alone_logprobs"])) <= FLOAT32_REORDERED.bound()
        assert "data" in r["sharding"]


def test_the_engine_programs_compile_for_a_tpu_topology():
    """bench/compile_engine.py on a tiny preset: the decode step and an admission compile for TPU v5e
    (Mosaic kernels under shard_map) with the pool's cache donated (in `.venv-tpu`, libtpu)."""
    import json
    import os
    import subprocess
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    python = root / ".venv-tpu" / "bin" / "python"
    if not python.exists():
        if os.environ.get("PALIGEMMA_REQUIRE_TPU"):
            pytest.fail(f"{python} is missing: `make tpu-env` installs jax[tpu]")
        pytest.skip(f"no TPU compile environment: {python} is missing (`make tpu-env`)")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(root / "bench")!r})
        import compile_engine
        print("@@" + json.dumps(compile_engine.plan("tiny-paligemma2", "data=2,model=4", 4, 64, 2)))
    """)
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=600, cwd=root,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    line = next((x for x in run.stdout.splitlines() if x.startswith("@@")), None)
    assert line, run.stderr[-4000:]
    plan = json.loads(line[2:])
    assert plan["max_seq"] == 128
    for stage in ("decode", "admit"):
        assert plan[stage]["arguments"] > 0 and plan[stage]["alias"] > 0, plan  # the cache updated in place


def test_paligemma_generate_refuses_a_prompt_past_the_context(tmp_path, capsys):
    """The demo model and a 12,000-token prompt: exit 2 naming both numbers (it used to run out of memory)."""
    import os

    from PIL import Image

    from paligemma.cli.main import main
    from paligemma.ref.demo import ASSETS as assets

    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    code = main(["generate", "--checkpoint", os.path.join(assets, "demo-model.npz"), "--tokenizer",
                 os.path.join(assets, "demo-tokenizer.model"), "--image", str(image), "--prompt",
                 "caption " + "circle " * 12_000, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "more than the language model's context of 8192" in err and "64 image tokens" in err, err
