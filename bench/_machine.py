"""What the benchmark scripts measure about this process and this machine (Linux /proc), and
the worker processes they measure in, and the machine's decode floors (`ReadFloor`,
`copy_bandwidth`, `weights_read_seconds`).

Imported by the scripts in this folder (`python bench/x.py` puts `bench/` on sys.path).
"""

import json
import subprocess
import time

import numpy as np

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


# --- The decode floors: the language model's weights read once --------------------------------
#
# Decoding reads every weight once per step, so a step costs at least the weights' bytes over
# the memory bandwidth. Two measures of that bandwidth: the copy floor (a 1 GiB `np.copyto`,
# bytes read + written: what bench/generate_speed.py has always printed) and the read floor
# (a float32 matrix-vector product over ~1 GiB, bytes read). A copy's writes cost more than
# reads, so the copy floor is the more lenient one; `fast` at batch 1 decodes below it.


class ReadFloor:
    """The best read bandwidth of this machine: `y = A @ x` for a float32 A of ~1 GiB (one pass
    over A, x and y negligible), timed as NumPy (BLAS sgemv) and as XLA (`jax.jit(jnp.dot)`), best
    of `repeats` runs of each; the faster of the two is the floor (`measure` says which).

        floor = ReadFloor()
        bw, how = floor.measure()          # e.g. (33.1e9, "numpy")
        seconds = weights_read_seconds(params, bw)
    """

    def __init__(self, gib=1.0, cols=4096, matrix=None):
        """`matrix`: a float32 array of ~gib to read (e.g. a copy benchmark's source), else new ones."""
        import jax
        import jax.numpy as jnp
        rows = int(gib * (1 << 30)) // (4 * cols)
        self.a = np.ones((rows, cols), np.float32) if matrix is None else matrix.reshape(-1, cols)
        self.x = np.ones(cols, np.float32)
        self.ja, self.jx = jnp.asarray(self.a), jnp.asarray(self.x)
        self.jdot = jax.jit(jnp.dot)
        self.jdot(self.ja, self.jx).block_until_ready()
        self.nbytes = self.a.nbytes

    def measure(self, repeats=3):
        """(bytes per second, "numpy" or "xla"): the faster product's best run."""
        numpy = _best(lambda: self.a @ self.x, repeats)
        xla = _best(lambda: self.jdot(self.ja, self.jx).block_until_ready(), repeats)
        return (self.nbytes / numpy, "numpy") if numpy <= xla else (self.nbytes / xla, "xla")

    def close(self):
        del self.a, self.ja


def copy_bandwidth(gib=1.0, repeats=3):
    """Bytes read + written per second by a `np.copyto` of ~1 GiB of float32, best of `repeats`."""
    src = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    dst = np.zeros_like(src)
    return 2 * src.nbytes / _best(lambda: np.copyto(dst, src), repeats)


def llm_weight_bytes(params):
    """Bytes of the language model's weights in a params tree (`params["llm"]`: layers in either
    layout, final norm, the tied embedding, which the logits read): what one decoding step reads."""
    import jax
    return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(params["llm"]))


def weights_read_seconds(params, bandwidth):
    """The language model's weights read once at `bandwidth` bytes/s: the decode step's floor."""
    return llm_weight_bytes(params) / bandwidth


def _best(fn, repeats):
    fn()  # first touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
