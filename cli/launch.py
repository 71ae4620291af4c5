"""`paligemma launch`: run one `paligemma` command as N JAX processes on this machine.

    paligemma launch --processes 2 --devices-per-process 4 -- finetune --mesh data=2,fsdp=4 ...
    paligemma launch --processes 2 --devices-per-process 4 -- generate --mesh data=2,model=4 ...

For trying and testing the multi-host path on one machine: every process gets the environment of
`paligemma.fast.distributed` (the coordinator on a free port of 127.0.0.1, its id, the process
count) and `--devices-per-process` virtual CPU devices, and they join into one program whose
mesh spans all N x D devices; CPU collectives go over gloo. The command is the one users run on
a pod slice, where each host starts it with the same variables instead (docs/scaling.md).

Output: process 0's stdout (the results alone) and stderr come through as they are; the other
processes print only errors, each line prefixed "[process i]" (gloo's "[Gloo] Rank ... connected
to ... peer ranks" lines, cut up by its threads, are left out). If a process fails, the others
are given `--grace` seconds to end on their own (JAX ends them within the heartbeat timeout
when a peer dies), then stopped; the status is the first failure's (128 + signal for a signal).
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from .common import positive_int

_GLOO = re.compile(r"\[Gloo\]|peer ranks|^\s*$")  # gloo's lines, whole or cut up by its threads
_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def add_parser(commands, usage_error):
    """Adds the `launch` subcommand to `commands` (argparse subparsers)."""
    p = commands.add_parser("launch", help="run a command as several JAX processes on this machine (CPU devices)",
                            description="Start COMMAND (a paligemma subcommand and its arguments, after --) "
                                        "as --processes JAX processes joined over 127.0.0.1, each with "
                                        "--devices-per-process virtual CPU devices.")
    p.add_argument("--processes", type=positive_int, required=True, metavar="N")
    p.add_argument("--devices-per-process", type=positive_int, default=1, metavar="D", help="virtual CPU devices")
    p.add_argument("--port", type=positive_int, metavar="PORT", help="coordinator port (default: a free one)")
    p.add_argument("--init-timeout", type=positive_int, default=120, metavar="S",
                   help="seconds for every process to join (default 120)")
    p.add_argument("--heartbeat-timeout", type=positive_int, default=30, metavar="S",
                   help="seconds after which a silent process counts as dead and the others stop (default 30)")
    p.add_argument("--grace", type=positive_int, metavar="S",
                   help="after a failure, seconds before the other processes are stopped (default heartbeat + 15)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="e.g. -- finetune --mesh ...")
    p.set_defaults(run=lambda args: run_launch(args, usage_error))
    return p


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base, index, count, port, devices, init_timeout, heartbeat_timeout):
    """The environment of process `index`: `paligemma.fast.distributed`'s variables, CPU devices."""
    env = dict(base)
    flags = _DEVICES.sub("", env.get("XLA_FLAGS", "")).strip()
    env.update(PALIGEMMA_COORDINATOR=f"127.0.0.1:{port}", PALIGEMMA_NUM_PROCESSES=str(count),
               PALIGEMMA_PROCESS_ID=str(index), PALIGEMMA_INIT_TIMEOUT=str(init_timeout),
               PALIGEMMA_HEARTBEAT_TIMEOUT=str(heartbeat_timeout), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
    return env


def _pump(stream, out, prefix):
    """Copies lines of `stream` to `out` with `prefix`, leaving out gloo's connection lines."""
    for line in iter(stream.readline, ""):
        if not _GLOO.search(line):
            out.write(prefix + line)
            out.flush()
    stream.close()


def _describe(code):
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def _stop(procs, wait=5.0):
    """SIGTERM to the processes still running, SIGKILL to those still running `wait` s later."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + wait
    for p in alive:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_launch(args, usage_error):
    """The `launch` command. Returns the exit status (the first failing process's)."""
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise usage_error("no command: give a paligemma subcommand after --, e.g. -- finetune --mesh data=2,fsdp=4 ...")
    if command[0] == "launch":
        raise usage_error("launch cannot start launch")
    port = args.port or free_port()
    grace = args.grace if args.grace is not None else args.heartbeat_timeout + 15
    argv = [sys.executable, "-m", "paligemma.cli", *command]
    procs, pumps = [], []
    # A SIGTERM to the launcher stops the processes too (the finally below).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i in range(args.processes):
            env = process_env(os.environ, i, args.processes, port, args.devices_per_process, args.init_timeout,
                              args.heartbeat_timeout)
            piped = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") if i else {}
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **piped))
            if i:
                pumps.append(threading.Thread(target=_pump, args=(procs[-1].stdout, sys.stderr, f"[process {i}] "),
                                              daemon=True))
                pumps[-1].start()
        failed, deadline = None, None
        while any(p.poll() is None for p in procs):
            if failed is None:
                failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                if failed is not None:
                    print(f"paligemma launch: process {failed} {_describe(procs[failed].returncode)}; waiting up to "
                          f"{grace} s for the others to stop", file=sys.stderr, flush=True)
                    deadline = time.monotonic() + grace
            elif time.monotonic() > deadline:
                print(f"paligemma launch: stopping the processes still running after {grace} s", file=sys.stderr,
                      flush=True)
                _stop(procs)
            time.sleep(0.1)
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, previous)
        for t in pumps:
            t.join(5)
    codes = [p.returncode for p in procs]
    first = failed if failed is not None else next((i for i, c in enumerate(codes) if c), None)
    if first is None:
        return 0
    for i, code in enumerate(codes):
        if code:
            print(f"paligemma launch: process {i} {_describe(code)}", file=sys.stderr)
    return 128 - codes[first] if codes[first] < 0 else codes[first]
