"""Shared by the server tests: scenes as PNG data URLs, the embedded demo model, and a running
`paligemma serve` subprocess on 127.0.0.1 (a free port, bounded waits, killed at the end).
"""

import base64
import contextlib
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
