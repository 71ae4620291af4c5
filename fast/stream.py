"""One request's answer as it is produced: iterate it from a thread, await it from asyncio.

    for event in stream: ...                 # blocks until each token arrives
    async for event in stream.aiter(): ...   # the same without blocking the event loop
    stream.result(timeout=10)                # the whole answer: Completion(tokens, logprobs, finish_reason)
    stream.cancel()                          # the engine frees the slot at its next step

The engine's thread pushes; any number of readers, each from the first token.
"""

import asyncio
import threading
import time
from typing import NamedTuple

import numpy as np


class Token(NamedTuple):
    token: int
    logprob: float  # log-probability of the token under the model (before temperature and cuts)


class Completion(NamedTuple):
    tokens: np.ndarray  # [n] int64, the stop token (EOS or a stop id) included
    logprobs: np.ndarray  # [n] float64
    finish_reason: str  # "eos", "stop" (a stop id), "length" (max_new_tokens) or "cancelled"

    @staticmethod
    def empty(reason):
        return Completion(np.zeros(0, np.int64), np.zeros(0, np.float64), reason)


class Stream:
    """Tokens of one request, in order, then its end (a finish reason or an error)."""

    def __init__(self):
        self._events, self._reason, self._error = [], None, None
        self._cond = threading.Condition()
        self._listeners = []  # (event loop, asyncio.Queue) of each `aiter`
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at = None  # monotonic time of the first token
        self.finished_at = None  # ... and of the end

    @property
    def done(self):
        return self._reason is not None or self._error is not None

    def cancel(self):
        """Asks the engine to stop this request; the stream then ends with "cancelled"."""
        self.cancelled = True

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._events) > i or self.done)
                new, ended = self._events[i:], self.done
            yield from new
            i += len(new)
            if ended and i == len(self._events):
                self._raise_error()
                return

    async def aiter(self):
        """`async for event in stream.aiter()`: tokens without blocking the event loop."""
        queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._cond:
            for event in self._events:
                queue.put_nowait(event)
            if self.done:
                queue.put_nowait(None)
            else:
                self._listeners.append((loop, queue))
        while (event := await queue.get()) is not None:
            yield event
        self._raise_error()

    def result(self, timeout=None):
        """The whole answer once the request ends. Raises TimeoutError, or the engine's error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"Stream: not finished after {timeout} s")
        self._raise_error()
        return Completion(np.array([e.token for e in self._events], np.int64),
                          np.array([e.logprob for e in self._events], np.float64), self._reason)

    def _raise_error(self):
        if self._error is not None:
            raise RuntimeError(f"engine failed: {self._error}") from self._error

    # The engine's side.

    def _push(self, event):
        with self._cond:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._events.append(event)
            self._notify(event)

    def _finish_with(self, reason):
        with self._cond:
            self._reason, self.finished_at = reason, time.monotonic()
            self._notify(None)

    def _fail(self, error):
        with self._cond:
            self._error = error
            self._notify(None)

    def _notify(self, item):
        self._cond.notify_all()
        for loop, queue in self._listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # that reader's event loop is closed: nobody is listening there
                pass
        if item is None:
            self._listeners.clear()
