"""The HTTP application: OpenAI-compatible chat, the native call, health, metrics and the page.

    app = build_app(model, engine, model_id="paligemma-demo", limits=Limits(), vae=vae)
    uvicorn.run(app, host="127.0.0.1", port=8000)             # what `paligemma serve` does

Routes (docs/serving.md has the formats):
    POST /v1/chat/completions   OpenAI chat completions, streaming (SSE) or not
    POST /v1/generate           text, ids, log-probabilities and parsed detect / segment objects
    GET  /v1/models, /health, /metrics (Prometheus), / (the page), /static/...

Every request is checked (`serve.inputs`) and its images decoded before it reaches the engine,
so a bad request costs no slot and gets a 4xx with {"error": {"message", "type", "code"}}.
Decoding, preprocessing and mask decoding run in worker threads; the event loop only waits.
An answer whose client goes away (streamed or not) is cancelled, which frees its slot at the next step.
"""

import asyncio
import json
import logging
import os
import time
import uuid

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .inputs import ApiError, Limits, decode_images, load_json, parse_chat, parse_native
from .metrics import Metrics
from .outputs import TextStream, find_objects

STATIC = os.path.join(os.path.dirname(__file__), "static")
log = logging.getLogger("paligemma.serve")


def error_response(e):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Stream(StreamingResponse):
    """Server-sent events that call `on_close(outcome)` however they end: "ok", "cancelled" (the
    client went away) or "server_error";
    `finished` is a one-item list the events set to [True] after their last line."""

    def __init__(self, events, finished, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.finished, self.on_close, self.failed = finished, on_close, False

    async def __call__(self, scope, receive, send):
        events, self.body_iterator = self.body_iterator, self._guarded(self.body_iterator)
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client went away: nothing to answer
        finally:
            await events.aclose()
            self.on_close("ok" if self.finished[0] else "server_error" if self.failed else "cancelled")

    async def _guarded(self, events):
        """The events; a failure after the 200 was sent becomes a last error event."""
        try:
            async for line in events:
                yield line
        except Exception as e:
            log.exception("while streaming")
            self.failed = True
            yield sse(ApiError(500, "server_error", f"generation failed: {e}").body())
            yield "data: [DONE]\n\n"


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Server:
    """The handlers, around one model and one running engine."""

    def __init__(self, model, engine, model_id, limits, vae=None):
        self.model, self.engine, self.model_id, self.limits, self.vae = model, engine, model_id, limits, vae
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.eos_id = model.config.eos_id
        # A request body holds at most max_images base64 images and some JSON around them.
        self.max_body = limits.max_images * (limits.max_image_bytes * 4 // 3 + 4096) + 2**16

    # ------------------------------------------------------------------ admission
    async def _body(self, request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, "request_too_large", f"the request body is {length} bytes, more than this server "
                           f"takes ({self.max_body}: --max-images x --max-image-bytes, base64-encoded)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, "request_too_large", f"the request body is over {self.max_body} bytes")
            chunks.append(chunk)
        return load_json(b"".join(chunks))

    def prompt_tokens(self, job):
        """Image tokens plus [BOS] prompt "\\n", as the model reads them."""
        return len(job.images) * self.model.config.vision.num_patches + len(self.model.tokenizer.encode(job.prompt)) + 2

    async def _submit(self, job):
        """Decodes the images and queues the request: (stream, original image sizes), or ApiError."""
        from paligemma.fast.engine import AdmissionError, QueueFull

        if job.model is not None and job.model != self.model_id:
            raise ApiError(404, "model_not_found", f"model {job.model!r} is not served here; this server has "
                           f"{self.model_id!r} (GET /v1/models)")
        pixels = await to_thread.run_sync(decode_images, job, self.limits)
        images = pixels[0] if len(pixels) == 1 else pixels  # a list is ONE multi-image prompt

        def request():
            return self.model.request(images, job.prompt, max_new_tokens=job.max_tokens, sampler=job.sampler,
                                      seed=job.seed)
        try:
            req = await to_thread.run_sync(request)
            stream = self.engine.submit(req)
        except QueueFull as e:
            stats = self.engine.stats()
            raise ApiError(429, "queue_full", f"the server is busy: {stats['queued']} requests are waiting "
                           f"for {stats['slots']} slots ({e}); retry shortly", {"Retry-After": "1"}) from None
        except AdmissionError as e:
            raise ApiError(400, "context_length_exceeded" if "max_seq" in str(e) or "context" in str(e)
                           else "invalid_request_error", str(e)) from None
        except RuntimeError as e:  # the engine stops admitting while the server shuts down
            raise ApiError(503, "unavailable", f"the server is shutting down ({e})", {"Retry-After": "5"}) from None
        except ValueError as e:
            raise ApiError(400, "invalid_request_error", str(e)) from None
        return stream, [p.shape[:2] for p in pixels]

    async def _tokens(self, stream, text, t0):
        """The stream's events, fed into `text`; stops (and cancels) at a stop sequence."""
        first = True
        async for event in stream.aiter():
            if first:
                self.metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            self.metrics.tokens.inc()
            yield event, text.push(event.token)
            if text.stopped:
                stream.cancel()
                return

    def _finish_reason(self, text, count, job):
        return "stop" if text.stopped or text.ended or count < job.max_tokens else "length"

    def _usage(self, job, count):
        prompt = self.prompt_tokens(job)
        return {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}

    async def _handle(self, request, endpoint, parse, answer):
        """Parse, submit, answer; every failure becomes a JSON error and a counted outcome."""
        try:
            job = parse(await self._body(request), self.limits)
            stream, sizes = await self._submit(job)
        except ApiError as e:
            self.metrics.count(endpoint, "rejected" if e.status == 429 else "client_error")
            return error_response(e)
        except Exception as e:
            log.exception("while admitting a request")
            self.metrics.count(endpoint, "server_error")
            return error_response(ApiError(500, "server_error", f"internal error while admitting the request ({e})"))
        text = TextStream(self.model.tokenizer, self.eos_id, job.stop)
        if job.stream:
            finished = [False]

            def closed(outcome):
                if outcome != "ok":
                    stream.cancel()
                self.metrics.count(endpoint, outcome)
            return _Stream(answer(job, stream, sizes, text, finished), finished, closed)
        try:
            result = await self._unless_gone(request, self._collect(answer(job, stream, sizes, text, None)))
            if result is None:  # the client went away before its answer: free the slot
                stream.cancel()
                self.metrics.count(endpoint, "cancelled")
                return Response(status_code=499)
        except Exception as e:
            stream.cancel()
            log.exception("while generating")
            self.metrics.count(endpoint, "server_error")
            return error_response(ApiError(500, "server_error", f"internal error while generating ({e})"))
        self.metrics.count(endpoint, "ok")
        return JSONResponse(result)

    @staticmethod
    async def _unless_gone(request, work):
        """`await work`, or None as soon as the client disconnects (its body is read already, so
        the next ASGI message is the disconnect)."""
        async def gone():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
        return task.result() if task.done() and not task.cancelled() else None

    @staticmethod
    async def _collect(events):
        last = None
        async for last in events:
            pass
        return last

    # ------------------------------------------------------------------ endpoints
    async def chat(self, request):
        return await self._handle(request, "chat", parse_chat, self._chat_events)

    async def _chat_events(self, job, stream, sizes, text, finished):
        """Streaming (`finished` a list): SSE lines ending in [DONE]; else one final dict (the completion)."""
        streaming = finished is not None
        cid, created, t0, count = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter(), 0

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if streaming:
            yield sse(chunk({"role": "assistant", "content": ""}))
        async for _, delta in self._tokens(stream, text, t0):
            count += 1
            if delta and streaming:
                yield sse(chunk({"content": delta}))
        tail, finish = text.finish(), self._finish_reason(text, count, job)
        usage = self._usage(job, count)
        if not streaming:
            yield {"id": cid, "object": "chat.completion", "created": created, "model": self.model_id,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text.sent},
                                "finish_reason": finish, "logprobs": None}], "usage": usage}
            return
        if tail:
            yield sse(chunk({"content": tail}))
        yield sse(chunk({}, finish))
        if job.include_usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                       "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
        finished[0] = True

    async def generate(self, request):
        return await self._handle(request, "generate", parse_native, self._native_events)

    async def _native_events(self, job, stream, sizes, text, finished):
        """Streaming: {"text": delta} events, then the full answer with "done": true, then [DONE]."""
        t0, ids, logprobs, count, streaming = time.perf_counter(), [], [], 0, finished is not None
        async for event, delta in self._tokens(stream, text, t0):
            count += 1
            if int(event.token) != self.eos_id and not text.stopped:
                ids.append(int(event.token))
                logprobs.append(float(event.logprob))
            if delta and streaming:
                yield sse({"text": delta})
        tail = text.finish()
        if tail and streaming:
            yield sse({"text": tail})
        height, width = (int(v) for v in sizes[0])
        objects = await to_thread.run_sync(find_objects, job.prompt, text.sent, height, width, self.vae)
        result = {"model": self.model_id, "text": text.sent, "finish_reason": self._finish_reason(text, count, job),
                  "tokens": ids, "logprobs": logprobs, "image_size": [height, width],
                  "usage": self._usage(job, count)}
        if objects is not None:
            result["objects"] = objects
        if not streaming:
            yield result
            return
        yield sse({**result, "done": True})
        yield "data: [DONE]\n\n"
        finished[0] = True

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                         "created": self.created, "owned_by": "paligemma"}]})

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.model_id, **self.engine.stats()})

    async def metrics_text(self, request):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def page(self, request):
        return FileResponse(os.path.join(STATIC, "index.html"))


async def _http_error(request, exc):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ApiError(exc.status_code, kind, message))


def build_app(model, engine, model_id, limits=Limits(), vae=None, start_engine=True):
    """The Starlette app. The engine starts with the app (unless started already: `start_engine=False`)
    and drains (finishes in-flight work) when it stops."""
    import contextlib

    server = Server(model, engine, model_id, limits, vae)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_engine:
            engine.start()
        try:
            yield
        finally:
            await to_thread.run_sync(lambda: engine.stop(drain=True))

    routes = [Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/generate", server.generate, methods=["POST"]),
              Route("/v1/models", server.models), Route("/health", server.health),
              Route("/metrics", server.metrics_text), Route("/", server.page),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app
