"""What the benchmark scripts measure about this process and this machine (Linux /proc), and
the worker processes they measure in.

Imported by the scripts in this folder (`python bench/x.py` puts `bench/` on sys.path).
"""

import json
import subprocess
import time

# A worker answers each command with one stdout line that starts with this; other output is noise.
MARK = "@@bench@@ "


def peak_rss():
    """Peak RSS of this process (VmHWM). Not `ru_maxrss`: a child started by posix_spawn/vfork
    inherits its parent's peak in `ru_maxrss` at exec, which would charge every worker with
    the parent's memory."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak():
    """Resets this process's VmHWM to its current RSS; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_fraction(seconds=1.0):
    """Share of all cores busy over `seconds` (the caller is idle while this runs)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_until_quiet(threshold, max_wait):
    """Waits (up to max_wait s) until other processes use less than `threshold` of the CPU;
    returns the last busy fraction seen."""
    start = time.perf_counter()
    busy = busy_fraction()
    while busy > threshold and time.perf_counter() - start < max_wait:
        busy = busy_fraction(2.0)
    return busy


class WorkerProcess:
    """A benchmark worker: a child that reads one JSON command per line on stdin and answers each
    with one `MARK` line of JSON (`{"error": ...}` on failure); its stderr goes to `log_path`.

        w = WorkerProcess("int8", [sys.executable, "bench/x.py", "--worker"], "out/worker-int8.log")
        w.call("load", dtype="bfloat16")     # the answer as a dict; RuntimeError if it failed
    """

    def __init__(self, name, argv, log_path, env=None):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)

    def call(self, op, **kw):
        self.proc.stdin.write(json.dumps({"op": op, "kw": kw}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                result = json.loads(line[len(MARK):])
                if "error" in result:
                    raise RuntimeError(f"worker {self.name}, {op}: {result['error']}")
                return result
        raise RuntimeError(f"worker {self.name} exited during {op}; see {self.log_path}")
