"""Helpers every `paligemma` subcommand shares: the option lists, the usage error, argument
types, file checks and the progress lines. Subcommand modules import this module, never `main`.
"""

import argparse
import contextlib
import os
import sys
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


def join_processes(args):
    """Several JAX processes (PALIGEMMA_COORDINATOR etc. set, `paligemma.fast.distributed`): joins
    them before the command touches a device; in every process but 0 the command then prints no
    progress and no results (process 0 does), errors still. Native libraries' prints (gloo, the
    CPU collectives, writes "[Gloo] Rank 0 is connected to 7 peer ranks ..." to file descriptor 1)
    go to stderr, so stdout carries the results alone. A no-op without the variables."""
    if not any(name in os.environ for name in ("PALIGEMMA_COORDINATOR", "PALIGEMMA_NUM_PROCESSES",
                                               "PALIGEMMA_PROCESS_ID")):
        return
    from paligemma.fast import distributed

    joining = distributed.settings()
    if joining and not getattr(args, "quiet", False):
        where = joining.get("coordinator_address", "the cluster's coordinator")
        print(f"paligemma: joining as process {joining.get('process_id', '(auto)')} of "
              f"{joining.get('num_processes', '(auto)')} at {where}, waiting up to "
              f"{joining['initialization_timeout']} s", file=sys.stderr, flush=True)
    if not distributed.initialize():
        return
    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)  # what C and C++ code print from now on goes to stderr
    if distributed.is_writer():
        encoding, errors = sys.stdout.encoding, sys.stdout.errors
        sys.stdout = open(results, "w", buffering=1, encoding=encoding, errors=errors)  # noqa: SIM115
    else:
        os.close(results)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        if hasattr(args, "quiet"):
            args.quiet = True


def demo_asset(name):
    """A file of the embedded demo model (`ref/demo/assets/`, installed with `paligemma.ref.demo`)."""
    from paligemma.ref.demo import asset

    return asset(name)


def model_files(args):
    """(checkpoint, tokenizer, vae) from --checkpoint / --tokenizer / --vae, the embedded demo
    model's files where none is given (its VAE only with the demo model).

    Raises:
      UsageError for only one of --checkpoint and --tokenizer, or a file that is missing.
    """
    if (args.checkpoint is None) != (args.tokenizer is None):
        raise UsageError("--checkpoint and --tokenizer go together (both default to the embedded demo model)")
    checkpoint = args.checkpoint or demo_asset("demo-model.npz")
    tokenizer = args.tokenizer or demo_asset("demo-tokenizer.model")
    vae = args.vae or (None if args.checkpoint else demo_asset("demo-vae.npz"))
    for path, flag in ((checkpoint, "--checkpoint"), (tokenizer, "--tokenizer"), (vae, "--vae")):
        if path is not None:
            check_file(path, flag, directory_ok=flag == "--checkpoint")
    return checkpoint, tokenizer, vae
