"""`paligemma serve` as a subprocess on 127.0.0.1, talked to by real clients: the official `openai`
package (answers equal `paligemma generate`'s), a few hundred concurrent good and bad requests
(every good one exact, every bad one refused, no 5xx, no hang), a client that disconnects
mid-stream (its slot is freed), a full queue (429 with Retry-After) and SIGTERM (in-flight answers
finish, exit 0). Bounded: at most 64 clients, every wait has a timeout, servers are killed."""

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_fixtures import DEMO, data_url, live_server, long_answer_seed, scene_png

CLIENTS = 64


@pytest.fixture(scope="module")
def server():
    with live_server("--slots", "8", "--queue", "256", "--max-image-bytes", "200000", "--max-images", "2",
                     "--quiet") as s:
        yield s


def cli_generate(tmp_path, png, prompt, max_new_tokens, *sampling):
    """`paligemma generate`'s text for one image and prompt (its --json record)."""
    path = tmp_path / f"image-{abs(hash(png))}.png"
    path.write_bytes(png)
    out = subprocess.run([sys.executable, "-m", "paligemma.cli", "generate", "--checkpoint", DEMO.checkpoint,
                          "--tokenizer", DEMO.tokenizer, "--image", str(path), "--prompt", prompt,
                          "--max-new-tokens", str(max_new_tokens), "--json", "--quiet", *sampling],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)["text"]


@pytest.mark.parametrize("prompt, options, flags", [
    ("detect {kind}", {}, []),
    ("caption en", {"temperature": 1.3, "seed": 4}, ["--temperature", "1.3", "--seed", "4"]),
    ("caption en", {"temperature": 1.0, "top_p": 0.8, "seed": 2}, ["--top-p", "0.8", "--temperature", "1.0",
                                                                     "--seed", "2"]),
])
def test_openai_client_equals_paligemma_generate(server, tmp_path, prompt, options, flags):
    import openai

    png, scene = scene_png(13)
    prompt = prompt.format(kind=scene.shapes[0].kind)
    expected = cli_generate(tmp_path, png, prompt, 48, *flags)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                             {"type": "text", "text": prompt}]}]
    answer = client.chat.completions.create(model="paligemma-demo", messages=messages, max_tokens=48, **options)
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens > 64 and answer.usage.completion_tokens >= 1
    chunks = client.chat.completions.create(model="paligemma-demo", messages=messages, max_tokens=48, stream=True,
                                            **options)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert client.models.list().data[0].id == "paligemma-demo"
    with pytest.raises(openai.BadRequestError, match="n: 2"):
        client.chat.completions.create(model="paligemma-demo", messages=messages, n=2)


def good_requests(n, rng):
    """n streaming or plain requests over different scenes, prompts and seeds; (key, path, body)."""
    scenes = [scene_png(seed) for seed in range(6)]
    out = []
    for i in range(n):
        png, scene = scenes[i % len(scenes)]
        prompt = rng.choice(["caption en", f"detect {scene.shapes[0].kind}", f"count {scene.shapes[0].kind}s"])
        seed, temperature = rng.randrange(4), rng.choice([0, 0.8])
        key = (i % len(scenes), prompt, seed, temperature)
        body = {"image": data_url(png), "prompt": prompt, "max_tokens": 24, "seed": seed, "temperature": temperature}
        out.append((key, body))
    return out


def bad_requests(n, rng):
    """n requests each refused with a known status: (raw body, status)."""
    png = scene_png(0)[0]
    image = data_url(png)
    kinds = [(b"{oops", 400), (json.dumps({"prompt": "caption en"}).encode(), 400),
             (json.dumps({"image": image}).encode(), 400),
             (json.dumps({"image": "data:image/png;base64,***", "prompt": "caption en"}).encode(), 400),
             (json.dumps({"image": data_url(b"GIF89a not really"), "prompt": "caption en"}).encode(), 400),
             (json.dumps({"image": data_url(bytes(200_001)), "prompt": "caption en"}).encode(), 413),
             (json.dumps({"image": image, "prompt": "answer en " + "why " * 300}).encode(), 400),
             (json.dumps({"image": image, "prompt": "caption en", "max_tokens": 0}).encode(), 400),
             (json.dumps({"image": image, "prompt": "caption en", "model": "nope"}).encode(), 404),
             (json.dumps({"images": [image] * 3, "prompt": "caption en"}).encode(), 400)]
    return [rng.choice(kinds) for _ in range(n)]


async def native(client, body, stream):
    """(status, text) of one /v1/generate call, streamed or not."""
    if not stream:
        r = await client.post("/v1/generate", json=body)
        return r.status_code, r.json().get("text")
    async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        pieces, final = [], None
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                final = event if event.get("done") else final
                pieces.append(event.get("text", "") if not event.get("done") else "")
        assert final is not None and "".join(pieces) == final["text"]
        return 200, final["text"]


def test_mixed_good_and_bad_requests_under_load(server):
    rng = random.Random(0)
    good, bad = good_requests(180, rng), bad_requests(120, rng)
    limits = httpx.Limits(max_connections=CLIENTS)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
            alone = {}
            for key, body in good:  # each distinct request alone, one at a time
                if key not in alone:
                    alone[key] = (await native(client, body, False))[1]
            gate = asyncio.Semaphore(CLIENTS)

            async def one(kind, item, i):
                async with gate:
                    if kind == "good":
                        return kind, item, await native(client, item[1], stream=i % 2 == 0)
                    r = await client.post("/v1/generate", content=item[0], headers={"content-type": "application/json"})
                    return kind, item, (r.status_code, r.json())
            jobs = [one("good", g, i) for i, g in enumerate(good)] + [one("bad", b, i) for i, b in enumerate(bad)]
            rng.shuffle(jobs)
            return alone, await asyncio.wait_for(asyncio.gather(*jobs), 60)

    alone, results = asyncio.run(run())
    assert len(results) == 300
    for kind, item, (status, answer) in results:
        assert status < 500
        if kind == "good":
            assert status == 200 and answer == alone[item[0]], item[0]
        else:
            assert status == item[1] and set(answer["error"]) >= {"message", "type"}, (item[0][:60], answer)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'outcome="server_error"' not in metrics


def test_a_client_that_disconnects_frees_its_slot(server):
    png = scene_png(1)[0]  # at temperature 2 and this seed the answer runs to max_tokens (no early EOS)
    body = {"image": data_url(png), "prompt": "caption en", "max_tokens": 200, "temperature": 2.0,
            "seed": long_answer_seed()}

    def settled():
        deadline = time.monotonic() + 20
        while (health := httpx.get(server.url + "/health").json())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["active"] == 0 and health["queued"] == 0 and health["free"] == health["slots"]
        return health["generated_tokens"]

    before = settled()
    for _ in range(3):  # streamed: hang up after the first token
        with httpx.Client(base_url=server.url, timeout=30) as client:
            with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                assert next(line for line in r.iter_lines() if line.startswith("data: "))
    after_streams = settled()
    assert after_streams - before < 3 * 200  # cancelled, not run to the end
    with pytest.raises(httpx.ReadTimeout):  # not streamed: a client that gives up waiting
        httpx.post(server.url + "/v1/generate", json=body, timeout=0.3)
    assert settled() - after_streams < 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'paligemma_requests_total{endpoint="generate",outcome="cancelled"} 4.0' in metrics


def test_full_queue_answers_429_and_sigterm_drains():
    png = scene_png(2)[0]
    body = {"image": data_url(png), "prompt": "caption en", "max_tokens": 120, "temperature": 2.0,
            "seed": long_answer_seed()}
    with live_server("--slots", "1", "--queue", "2", "--quiet") as server:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.wait_for(asyncio.gather(*[client.post("/v1/generate", json=body)
                                                               for _ in range(12)]), 60)
        statuses = [r.status_code for r in asyncio.run(burst())]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3
        refused = [r for r in asyncio.run(burst()) if r.status_code == 429][0]
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "queue_full"

        # SIGTERM while one stream generates and one waits: no new connections, both finish, exit 0.
        answers, started = [], threading.Barrier(3, timeout=30)
        long = {**body, "max_tokens": 200, "stream": True}  # runs to max_tokens (`long_answer_seed`)

        def stream():
            with httpx.stream("POST", server.url + "/v1/generate", json=long, timeout=60) as r:
                started.wait()  # the response has begun
                answers.append([line for line in r.iter_lines() if line])
        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        started.wait()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
            httpx.get(server.url + "/health", timeout=5)
        assert server.terminate(timeout=60) == 0
        for t in threads:
            t.join(30)
        assert len(answers) == 2 and all(a[-1] == "data: [DONE]" for a in answers)
        finals = [json.loads(a[-2][len("data: "):]) for a in answers]
        assert [f["usage"]["completion_tokens"] for f in finals] == [200, 200]


def test_serve_across_two_processes_answers_as_one(tmp_path):
    """`paligemma serve --mesh data=2,model=2` as 2 JAX processes x 2 devices (PALIGEMMA_*): process 0
    serves HTTP and schedules, process 1 runs its steps (`fast.lockstep`); concurrent answers equal
    one process's `paligemma generate`; SIGTERM to process 0 drains it and releases process 1
    (both exit 0; a follower that missed the release would hang until the wait's bound)."""
    import os

    from serve_fixtures import free_port

    coordinator = free_port()

    def env(i):
        out = {k: v for k, v in os.environ.items() if not k.startswith(("PALIGEMMA_", "XLA_FLAGS"))}
        return dict(out, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                    PALIGEMMA_COORDINATOR=f"127.0.0.1:{coordinator}", PALIGEMMA_NUM_PROCESSES="2",
                    PALIGEMMA_PROCESS_ID=str(i), PALIGEMMA_HEARTBEAT_TIMEOUT="30")

    args = ["--mesh", "data=2,model=2", "--slots", "2", "--quiet"]
    follower = subprocess.Popen([sys.executable, "-m", "paligemma.cli", "serve", "--port", "0", *args], env=env(1),
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "process1.log", "w"))
    try:
        with live_server(*args, env=env(0)) as server:
            cases = [(scene_png(seed)[0], prompt) for seed, prompt in ((13, "caption en"), (5, "caption en"),
                                                                       (13, "count circles"))]
            bodies = [{"image": data_url(png), "prompt": prompt, "max_tokens": 24} for png, prompt in cases]
            with httpx.Client(timeout=120) as client:
                threads, answers = [], {}
                for i, body in enumerate(bodies):  # concurrent (tests/test_multiprocess.py pins two-row admissions)
                    threads.append(threading.Thread(
                        target=lambda i=i, body=body: answers.update({i: client.post(server.url + "/v1/generate",
                                                                                      json=body)})))
                    threads[-1].start()
                for t in threads:
                    t.join(180)
            for i, (png, prompt) in enumerate(cases):
                assert answers[i].status_code == 200, answers[i].text
                assert answers[i].json()["text"] == cli_generate(tmp_path, png, prompt, 24), (prompt, answers[i].json())
            assert server.terminate(120) == 0, "".join(server.output)[-3000:]
        assert follower.wait(60) == 0, (tmp_path / "process1.log").read_text()[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
