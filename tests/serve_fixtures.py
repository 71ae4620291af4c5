"""Shared by the server tests: scenes as PNG data URLs, the embedded demo model, and a running
`paligemma serve` subprocess on 127.0.0.1 (a free port, bounded waits, killed at the end).
"""

import base64
import contextlib
import functools
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
from PIL import Image

from paligemma.ref.demo import ASSETS
from paligemma.ref.tasks import shapes

DEMO = types.SimpleNamespace(checkpoint=os.path.join(ASSETS, "demo-model.npz"),
                             tokenizer=os.path.join(ASSETS, "demo-tokenizer.model"),
                             vae=os.path.join(ASSETS, "demo-vae.npz"))


def scene_png(seed, size=128):
    """(png bytes, scene) of a demo-style scene of shapes."""
    scene = shapes.random_scene(np.random.default_rng(seed), **{**shapes.DEMO_SCENE, "size": size})
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    return buffer.getvalue(), scene


@functools.cache
def long_answer_seed(scenes=(1, 2), max_tokens=200, temperature=2.0):
    """A seed whose sampled "caption en" answer runs to `max_tokens` (no EOS) on each of these
    scenes with the shipped demo model, found with `PaliGemma.generate` on each request alone,
    which the server's answers equal (tests/test_engine.py). Tests that need a long answer ask for
    it at this seed, so that a retrained demo model does not silently shorten them."""
    from paligemma import fast

    model = fast.PaliGemma.load(DEMO.checkpoint, DEMO.tokenizer)
    for seed in range(64):
        if not any(model.generate(scene_png(s)[0], "caption en", max_tokens, f"temperature({temperature})", seed).finished
                   for s in scenes):
            return seed
    raise AssertionError(f"no seed below 64 runs to {max_tokens} tokens at temperature {temperature}")


def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`paligemma serve` in a subprocess; `url`, `stop()` (SIGTERM, bounded wait, then kill)."""

    def __init__(self, *args, timeout=240, env=None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "paligemma.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--warm-up", "first", *args]  # the other prefill sizes compile when first needed
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
def live_server(*args, timeout=240, env=None):
    server = LiveServer(*args, timeout=timeout, env=env)
    try:
        yield server
    finally:
        server.kill()
