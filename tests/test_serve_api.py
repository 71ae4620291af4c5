"""The HTTP layer in-process (Starlette's TestClient) on the embedded demo model: answers equal
`PaliGemma.generate`'s, streamed pieces add up to the whole, and every kind of bad input gets its
4xx with a JSON error that names the problem, while the server keeps answering."""

import base64
import dataclasses
import json
import re
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from paligemma.fast.pipeline import PaliGemma
from paligemma.parity.tolerances import FLOAT32_REORDERED, relative_error
from paligemma.serve import Limits, build_app, inputs
from paligemma.serve.outputs import TextStream, run_length

from serve_fixtures import DEMO, data_url, scene_png

MAX_SEQ, MAX_IMAGE_BYTES = 400, 200_000


@pytest.fixture(scope="module")
def model():
    return PaliGemma.load(DEMO.checkpoint, DEMO.tokenizer)


@pytest.fixture(scope="module")
def client(model):
    from starlette.testclient import TestClient

    from paligemma.fast.vqvae import load_vae

    engine = model.engine(slots=2, max_seq=MAX_SEQ, max_queue=8)
    limits = Limits(max_image_bytes=MAX_IMAGE_BYTES, max_images=2, max_tokens=200, default_max_tokens=40)
    with TestClient(build_app(model, engine, "paligemma-demo", limits, load_vae(DEMO.vae))) as c:
        yield c


def chat_body(images, prompt, **kw):
    content = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    content += [{"type": "text", "text": prompt}] if prompt is not None else []
    return {"model": "paligemma-demo", "messages": [{"role": "user", "content": content}], **kw}


def sse_events(response):
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_chat_equals_generate(client, model):
    png, _ = scene_png(1)
    expected = model.generate(png, "caption en", max_new_tokens=40)
    r = client.post("/v1/chat/completions", json=chat_body([png], "caption en", max_tokens=40))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["choices"][0]["finish_reason"] == ("stop" if expected.finished else "length")
    n_prompt = 64 + len(model.tokenizer.encode("caption en")) + 2  # 8 x 8 patches, [BOS] prompt "\n"
    assert answer["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(expected.tokens) + expected.finished,
                               "total_tokens": n_prompt + len(expected.tokens) + expected.finished}


def test_chat_stream_adds_up(client, model):
    png, _ = scene_png(2)
    expected = model.generate(png, "caption en", max_new_tokens=40, sampler="temperature(0.9)", seed=5)
    body = chat_body([png], "caption en", max_tokens=40, temperature=0.9, seed=5, stream=True,
                     stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == expected.text
    assert events[-1]["usage"]["completion_tokens"] == len(expected.tokens) + expected.finished
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"]) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client, model, stream):
    png, _ = scene_png(1)
    whole = model.generate(png, "caption en", max_new_tokens=40).text
    stop = whole.split(" ")[1]  # the second word: the answer ends before it
    body = chat_body([png], "caption en", max_tokens=40, stop=[stop, "\n"], stream=stream)
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = sse_events(r)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
    else:
        answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        text, finish = answer["message"]["content"], [answer["finish_reason"]]
    assert text == whole[:whole.find(stop)] and finish == ["stop"]


def test_cli_usage_errors(capsys):
    from paligemma.cli.main import main

    assert main(["serve", "--checkpoint", DEMO.checkpoint]) == 2
    assert "--checkpoint and --tokenizer go together" in capsys.readouterr().err
    assert main(["serve", "--vae", "/no/such/vae.npz"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_several_images_make_one_prompt(client, model):
    (a, _), (b, _) = scene_png(5), scene_png(6, size=96)
    expected = model.generate([[a, b]], "caption en", max_new_tokens=20)[0]
    r = client.post("/v1/chat/completions", json=chat_body([a, b], "caption en", max_tokens=20))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert r.json()["usage"]["prompt_tokens"] == 2 * 64 + len(model.tokenizer.encode("caption en")) + 2


def test_native_detect_boxes_in_original_pixels(client, model):
    png, scene = scene_png(3, size=96)
    kind = scene.shapes[0].kind
    expected = model.generate(png, f"detect {kind}", max_new_tokens=40)
    r = client.post("/v1/generate", json={"image": data_url(png), "prompt": f"detect {kind}", "max_tokens": 40})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == expected.text and out["tokens"] == expected.tokens.tolist()
    # The engine batches rows, so sums may run in another order: parity/tolerances.py's bound for that.
    assert relative_error(np.array(out["logprobs"]), expected.logprobs) <= FLOAT32_REORDERED.bound()
    assert out["image_size"] == [96, 96]
    locs = [int(v) for v in re.findall(r"<loc(\d{4})>", expected.text)]
    assert [v for o in out["objects"] for v in o["loc"]] == locs
    assert " ; ".join(o["text"] for o in out["objects"]) == expected.text
    for o in out["objects"]:
        if o["box"] is not None:  # big_vision's rule: int(loc / 1023 * size)
            assert o["box"] == [int(v / 1023 * 96) for v in o["loc"]]


def test_native_segment_masks_rle_and_png(client, model):
    png, scene = scene_png(4)
    prompt = f"segment {scene.shapes[0].kind}"
    r = client.post("/v1/generate", json={"images": [data_url(png)], "prompt": prompt, "max_tokens": 60})
    assert r.status_code == 200, r.text
    for o in r.json()["objects"]:
        if o["mask"] is None:
            continue
        runs = o["mask"]["rle"]
        assert sum(runs) == 128 * 128 and sum(runs[1::2]) == o["mask"]["area"]
        from PIL import Image
        import io
        alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(o["mask"]["png"].split(",", 1)[1]))))[..., 3]
        assert int((alpha > 0).sum()) == o["mask"]["area"]


def test_models_health_metrics_page(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "paligemma-demo"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["slots"] == 2
    text = client.get("/metrics").text
    for name in ("paligemma_requests_total", "paligemma_queue_depth", "paligemma_active_slots",
                 "paligemma_generated_tokens_total", "paligemma_time_to_first_token_seconds_bucket"):
        assert name in text
    assert 'outcome="ok"' in text
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and client.get("/static/app.js").status_code == 200


def bomb_png(side=20000):
    """A real 1-bit PNG of side x side zeros: ~50 kB that would decode to side**2 pixels."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    z = zlib.compressobj(9)
    row = bytes(1 + side // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_requests():
    """(name, path, body (dict or raw bytes), status, error type, words the message must hold)."""
    png, _ = scene_png(9)
    ok = chat_body([png], "caption en")
    raw = lambda url: {"image": url, "prompt": "caption en"}  # noqa: E731
    return [
        ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json", ["not valid JSON"]),
        ("deeply nested JSON", "/v1/generate", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", ["nested"]),
        ("missing image", "/v1/chat/completions", chat_body([], "caption en"), 400, "missing_image", ["no image"]),
        ("missing prompt", "/v1/chat/completions", chat_body([png], None), 400, "missing_prompt", ["no prompt"]),
        ("invalid base64", "/v1/generate", raw("data:image/png;base64,@@@@"), 400, "invalid_image", ["base64"]),
        ("not an image", "/v1/generate", raw(data_url(b"hello, world" * 10)), 400, "invalid_image", ["not an image"]),
        ("decompression bomb", "/v1/generate", raw(data_url(bomb_png())), 400, "invalid_image",
         ["decompression bomb", "400000000", "50000000"]),
        ("image too large", "/v1/generate", raw(data_url(bytes(MAX_IMAGE_BYTES + 1))), 413, "image_too_large",
         [str(MAX_IMAGE_BYTES)]),
        ("prompt too long", "/v1/generate", {"image": data_url(png), "prompt": "answer en " + "what " * 400},
         400, "context_length_exceeded", [str(MAX_SEQ)]),
        ("max_tokens 0", "/v1/chat/completions", {**ok, "max_tokens": 0}, 400, "invalid_request_error", ["max_tokens", "0"]),
        ("max_tokens huge", "/v1/chat/completions", {**ok, "max_tokens": 10**6}, 400, "invalid_request_error",
         ["max_tokens", "200"]),
        ("unknown model", "/v1/chat/completions", {**ok, "model": "gpt-9"}, 404, "model_not_found", ["gpt-9"]),
        ("too many images", "/v1/chat/completions", chat_body([png] * 3, "caption en"), 400, "too_many_images",
         ["3 images", "2"]),
        ("n > 1", "/v1/chat/completions", {**ok, "n": 2}, 400, "invalid_request_error", ["n:"]),
        ("tools", "/v1/chat/completions", {**ok, "tools": [{"type": "function"}]}, 400, "invalid_request_error",
         ["tools"]),
        ("bad temperature", "/v1/chat/completions", {**ok, "temperature": -1}, 400, "invalid_request_error",
         ["temperature"]),
        ("no route", "/v1/nothing", {}, 404, "not_found", ["/v1/nothing"]),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda c: c[0])
def test_bad_input_is_refused_by_name(client, case):
    _, path, body, status, kind, words = case
    r = client.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind
    for word in words:
        assert word in error["message"], error["message"]
    if kind == "context_length_exceeded":  # both numbers: what the request needs, and the limit
        assert max(int(n) for n in re.findall(r"\d+", error["message"])) > MAX_SEQ
    good = client.post("/v1/generate", json={"image": data_url(scene_png(9)[0]), "prompt": "caption en",
                                             "max_tokens": 8})
    assert good.status_code == 200  # and the server still answers


# ---------------------------------------------------------------------------- TextStream and RLE

@settings(max_examples=40)
@given(ids=st.lists(st.integers(3, 1499), min_size=1, max_size=24), cut=st.integers(0, 30),
       width=st.integers(1, 4), eos=st.booleans())
def test_streamed_pieces_add_up_to_the_cut_text(model, ids, cut, width, eos):
    tok = model.tokenizer
    whole = tok.decode(ids, stop_at_eos=False)
    stop = whole[cut:cut + width] if whole[cut:cut + width].strip() else None
    stream = TextStream(tok, tok.eos_id, (stop,) if stop else ())
    pieces = []
    for token in ids + ([tok.eos_id] if eos else []):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    expected = whole[:whole.find(stop)] if stop else whole
    assert "".join(pieces) == expected == stream.sent
    assert stream.stopped == bool(stop)


@settings(max_examples=40)
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(1, 6))
def test_run_length_matches_the_cli_encoding_and_decodes_back(bits, rows):
    from paligemma.cli.tasks import run_length as cli_run_length

    mask = np.array(bits * rows, bool).reshape(rows, len(bits))
    runs = run_length(mask)
    assert runs == cli_run_length(mask)
    decoded = np.concatenate([np.full(n, i % 2 == 1, bool) for i, n in enumerate(runs)])
    np.testing.assert_array_equal(decoded, mask.reshape(-1))


def test_an_engine_failure_is_a_500_or_a_last_error_event(client, monkeypatch):
    server = client.app.state.server
    real = server.engine.submit

    def failing(request):  # the stream breaks after its first token, as a lost device would
        stream = real(request)

        async def aiter():
            async for event in type(stream).aiter(stream):
                yield event
                raise RuntimeError("device lost")
        stream.aiter = aiter
        return stream
    monkeypatch.setattr(server.engine, "submit", failing)
    body = {"image": data_url(scene_png(1)[0]), "prompt": "caption en", "max_tokens": 8}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "device lost" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert "device lost" in events[-1]["error"]["message"]
    assert 'paligemma_requests_total{endpoint="generate",outcome="server_error"} 2.0' in client.get("/metrics").text
    monkeypatch.undo()
    assert client.post("/v1/generate", json=body).status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=12)
IMAGE = st.just("data:image/png;base64,AAAA") | JSON
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "audio"]) | JSON},
                             optional={"text": st.just("caption en") | JSON,
                                       "image_url": st.fixed_dictionaries({"url": IMAGE}) | IMAGE})
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.just("user") | JSON},
                                          optional={"content": st.lists(PART | JSON, max_size=3) | JSON}) | JSON,
                    max_size=2) | JSON
VALUES = {"messages": MESSAGES, "images": st.lists(IMAGE, max_size=3) | JSON, "image": IMAGE,
          "prompt": st.just("detect cat") | JSON}


@settings(max_examples=300)
@given(data=st.data(), chat=st.booleans(), junk=st.binary(max_size=64))
def test_any_json_body_is_a_job_or_a_4xx(data, chat, junk):
    """No request body can make the checks fail with anything but a 4xx ApiError."""
    fields = sorted(inputs.CHAT_FIELDS if chat else inputs.NATIVE_FIELDS)
    body = data.draw(st.dictionaries(st.sampled_from(fields), JSON, max_size=1))
    body.update(data.draw(st.fixed_dictionaries({}, optional={k: v for k, v in VALUES.items() if k in fields})))
    limits = Limits(max_image_bytes=100, max_images=2)
    try:
        job = (inputs.parse_chat if chat else inputs.parse_native)(body, limits)
    except inputs.ApiError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert job.images and job.prompt.strip() and 1 <= job.max_tokens <= limits.max_tokens
    try:  # and the image check: ImageError only, as a 400
        inputs.decode_images(dataclasses.replace(job, images=(junk,)), limits)
    except inputs.ApiError as e:
        assert e.status == 400
