"""Shared by the server tests: scenes as PNG data URLs, the embedded demo model, and a running
`paligemma serve` subprocess on 127.0.0.1 (a free port, bounded waits, killed at the end).

`standin_engine` is a test double with the engine's interface (`paligemma.fast.engine`) that runs
`model.generate` one request at a time; the in-process API tests use it where the real engine
is not available, so that the HTTP layer is tested on its own.
"""

import asyncio
import base64
import contextlib
import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
from PIL import Image

from paligemma.ref import shapes

ASSETS = os.path.join(os.path.dirname(shapes.__file__), "assets")
DEMO = types.SimpleNamespace(checkpoint=os.path.join(ASSETS, "demo-model.npz"),
                             tokenizer=os.path.join(ASSETS, "demo-tokenizer.model"),
                             vae=os.path.join(ASSETS, "demo-vae.npz"))


def scene_png(seed, size=128):
    """(png bytes, scene) of a demo-style scene of shapes."""
    scene = shapes.random_scene(np.random.default_rng(seed), **{**shapes.DEMO_SCENE, "size": size})
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    return buffer.getvalue(), scene


def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`paligemma serve` in a subprocess; `url`, `stop()` (SIGTERM, bounded wait, then kill)."""

    def __init__(self, *args, timeout=240):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w") if os.environ.get("SERVE_QUIET_LOG") else None
        cmd = [sys.executable, "-m", "paligemma.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"paligemma serve exited with {self.proc.returncode}:\n" + "".join(self.output))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("paligemma serve did not become healthy in time:\n" + "".join(self.output))

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def terminate(self, timeout=60):
        """SIGTERM, then the exit status (killed after `timeout` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def live_server(*args, timeout=240):
    server = LiveServer(*args, timeout=timeout)
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------------- a stand-in engine

class AdmissionError(ValueError):
    pass


class QueueFull(RuntimeError):
    pass


def engine_module():
    """`paligemma.fast.engine` if it exists, else this file's stand-in classes as that module."""
    try:
        from paligemma.fast import engine
        return engine
    except ImportError:
        return types.SimpleNamespace(AdmissionError=AdmissionError, QueueFull=QueueFull)


class _Stream:
    def __init__(self):
        self.events, self.cancelled, self.completion = queue.Queue(), False, None

    def __iter__(self):
        while (event := self.events.get()) is not None:
            yield event

    async def aiter(self):
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.002)
                continue
            if event is None:
                return
            yield event

    def cancel(self):
        self.cancelled = True

    def result(self, timeout=None):
        list(self)
        return self.completion


class StandinEngine:
    """The engine's interface over `model.generate`, one request at a time, in a thread."""

    def __init__(self, model, slots=2, max_seq=400, max_queue=8):
        self.model, self.slots, self.max_seq, self.max_queue = model, slots, max_seq, max_queue
        self.waiting, self.lock, self.active, self.generated = queue.Queue(), threading.Lock(), 0, 0
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, req):
        mod = engine_module()
        frames = 1 if np.ndim(req.images) == 3 else len(req.images)
        need = frames * self.model.config.vision.num_patches + len(self.model.tokenizer.encode(req.prompt)) + 2
        if need + req.max_new_tokens > self.max_seq:
            raise mod.AdmissionError(f"{need} prompt tokens + max_new_tokens {req.max_new_tokens} is more than "
                                     f"max_seq {self.max_seq}")
        if self.waiting.qsize() >= self.max_queue:
            raise mod.QueueFull(f"{self.max_queue} requests waiting")
        stream = _Stream()
        self.waiting.put((req, stream))
        return stream

    def _loop(self):
        while (item := self.waiting.get()) is not None:
            req, stream = item
            with self.lock:
                self.active = 1
            r = self.model.generate(req.images, req.prompt, max_new_tokens=req.max_new_tokens,
                                    sampler=req.sampler, seed=req.seed)
            ids = list(r.tokens) + ([self.model.config.eos_id] if r.finished else [])
            logprobs = list(r.logprobs) + ([0.0] if r.finished else [])
            for token, logprob in zip(ids, logprobs):
                if stream.cancelled:
                    break
                stream.events.put(types.SimpleNamespace(token=int(token), logprob=float(logprob)))
                self.generated += 1
            stream.completion = types.SimpleNamespace(tokens=np.array(ids), finish_reason="eos")
            stream.events.put(None)
            with self.lock:
                self.active = 0

    def stats(self):
        return {"queued": self.waiting.qsize(), "active": self.active, "slots": self.slots,
                "free": self.slots - self.active, "generated_tokens": self.generated}

    def stop(self, drain=True):
        self.waiting.put(None)
        if self.thread is not None:
            self.thread.join(60)


class StandinModel:
    """A `PaliGemma` with the engine's `request` and `engine` methods."""

    def __init__(self, model):
        self.model, self.config, self.tokenizer = model, model.config, model.tokenizer

    def request(self, images, prompt, max_new_tokens=32, sampler="greedy", seed=0, stop_ids=()):
        return types.SimpleNamespace(images=images, prompt=prompt, max_new_tokens=max_new_tokens, sampler=sampler,
                                     seed=seed)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def engine(self, slots=2, max_seq=400, max_queue=8):
        return StandinEngine(self, slots, max_seq or 400, max_queue or 8)
