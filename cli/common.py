"""Helpers every `paligemma` subcommand shares: the option lists, the usage error, argument
types, file checks and the progress lines. Subcommand modules import this module, never `main`.
"""

import argparse
import contextlib
import os
import time

# paligemma.fast (and so jax) is imported only when a command runs, so `--help` stays instant;
# the option lists come from paligemma.options, which imports nothing.
from paligemma.options import DTYPES, IMPLS, PREPROCESS

__all__ = ["DTYPES", "IMPLS", "PREPROCESS", "Parser", "StatusLines", "UsageError", "check_file", "positive_int"]


class UsageError(ValueError):
    """A bad command line found after parsing (conflicting flags, missing files)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (status 2), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class StatusLines:
    """Timed progress on a stream, used as `with status("loading checkpoint"): ...`.

    Args:
      stream: where to write (stderr).
      enabled: False writes nothing.
    On a terminal a stage shows as "stage ..." while it runs and is completed in place with
    its time; elsewhere (a log, a pipe) only one line per finished stage is written.
    """

    def __init__(self, stream, enabled=True):
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()

    @contextlib.contextmanager
    def __call__(self, stage):
        if not self.enabled:
            yield
            return
        if self.tty:
            self._write(f"{stage} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.tty:
                self._write(" failed\n")
            raise
        elapsed = time.perf_counter() - start
        self._write(f" done in {elapsed:.2f} s\n" if self.tty else f"paligemma: {stage}: {elapsed:.2f} s\n")

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def check_file(path, flag, directory_ok=False):
    """Raises UsageError unless `path` is a readable file (or a directory, if allowed)."""
    if directory_ok and os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, expected a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
