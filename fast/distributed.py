"""Several JAX processes as one program: the environment every `paligemma` command reads first.

    PALIGEMMA_COORDINATOR=10.0.0.1:8476 PALIGEMMA_NUM_PROCESSES=4 PALIGEMMA_PROCESS_ID=2 paligemma finetune ...
    PALIGEMMA_COORDINATOR=auto paligemma finetune ...     # Cloud TPU pod slice, SLURM, Open MPI: JAX finds the rest
    paligemma launch --processes 2 --devices-per-process 4 -- finetune ...   # on this machine (cli/launch.py)

JAX's multi-controller runtime runs the same program in every process; after
`jax.distributed.initialize` `jax.devices()` lists every process's devices, a `Mesh` spans them,
and jit-compiled steps run their collectives across processes (NCCL on GPUs, ICI/DCN on TPUs,
gloo over TCP on CPUs, which this module selects). `initialize()` must run before anything
touches a device; the command line calls it before every command when PALIGEMMA_COORDINATOR is
set, and a Python program calls it at its top.

Variables:
  PALIGEMMA_COORDINATOR        host:port of process 0's coordination service, or "auto"
  PALIGEMMA_NUM_PROCESSES      N (with host:port)
  PALIGEMMA_PROCESS_ID         0 .. N-1 (with host:port)
  PALIGEMMA_INIT_TIMEOUT       seconds to wait for every process to join (default 300)
  PALIGEMMA_HEARTBEAT_TIMEOUT  seconds of silence after which a process counts as dead (default 100)

A process that dies is noticed by the others within the heartbeat timeout (at once if it was
process 0, the coordinator): JAX then ends each of them with "Terminating process because the
JAX distributed service detected fatal errors ... another task died" (status 134, SIGABRT)
instead of leaving them blocked in a collective. Who writes what: process 0 writes logs,
checkpoints, exported weights and command output (`is_writer`); every process reads the
inputs it feeds to its own devices.
"""

import os
import sys

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "PALIGEMMA_COORDINATOR", "PALIGEMMA_NUM_PROCESSES", "PALIGEMMA_PROCESS_ID"
INIT_TIMEOUT, HEARTBEAT_TIMEOUT = "PALIGEMMA_INIT_TIMEOUT", "PALIGEMMA_HEARTBEAT_TIMEOUT"


def _int(environ, name, low, default=None):
    text = environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"{name} is not set; with {COORDINATOR}=host:port give {NUM_PROCESSES} and {PROCESS_ID} "
                             "too (or PALIGEMMA_COORDINATOR=auto where JAX detects the cluster)")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an integer >= {low}") from None
    if value < low:
        raise ValueError(f"{name}={text!r}: expected an integer >= {low}")
    return value


def settings(environ=None):
    """The keyword arguments of `jax.distributed.initialize` the environment asks for, or None.

    Reads only `environ` (default `os.environ`) and imports nothing, so a bad setting fails at once.

    >>> settings({"PALIGEMMA_COORDINATOR": "127.0.0.1:8476", "PALIGEMMA_NUM_PROCESSES": "2",
    ...           "PALIGEMMA_PROCESS_ID": "1"})["process_id"]
    1
    >>> settings({}) is None
    True

    Raises:
      ValueError naming the variable that is missing or wrong.
    """
    environ = os.environ if environ is None else environ
    address = environ.get(COORDINATOR, "").strip()
    if not address:
        stray = [n for n in (NUM_PROCESSES, PROCESS_ID) if n in environ]
        if stray:
            raise ValueError(f"{', '.join(stray)} set without {COORDINATOR} (host:port of process 0, or auto)")
        return None
    timeouts = dict(initialization_timeout=_int(environ, INIT_TIMEOUT, 1, 300),
                    heartbeat_timeout_seconds=_int(environ, HEARTBEAT_TIMEOUT, 1, 100))
    if address == "auto":
        return timeouts
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{COORDINATOR}={address!r}: expected host:port (e.g. 10.0.0.1:8476) or auto")
    count = _int(environ, NUM_PROCESSES, 1)
    index = _int(environ, PROCESS_ID, 0)
    if index >= count:
        raise ValueError(f"{PROCESS_ID}={index} with {NUM_PROCESSES}={count}: expected 0 .. {count - 1}")
    return dict(coordinator_address=address, num_processes=count, process_id=index, **timeouts)


def initialize(environ=None):
    """Joins this process to the others if the environment asks for it (`settings`); a no-op
    otherwise, or when already joined. Call it before anything touches a JAX device.

    Returns:
      True if this process runs as one of several.
    """
    kwargs = settings(environ)
    if kwargs is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    # CPU devices of different processes need a collectives library; GPUs and TPUs have their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def is_writer():
    """True in the process that writes files and prints results (process 0; the only one alone)."""
    if "jax" not in sys.modules:  # the NumPy reference alone: one process
        return True
    import jax

    return jax.process_index() == 0
