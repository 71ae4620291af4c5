"""Quantized matrix-vector products for XLA:CPU: a C++ XLA FFI kernel, with its JAX reference beside it.

XLA:CPU does not fuse an int8 -> float32 convert into a dot (docs/quantization.md), so on the CPU a
quantized weight costs at least a float32 weight's memory traffic however the HLO is written. The
loops in `quant_cpu.cc` read each quantized byte once and convert it in registers; `columns` and
`rows` call them as XLA custom calls (`jax.ffi.ffi_call`), usable under `jit`.

    out = columns(x, q, scale)   # x [G, M, Cp] @ dequantize(q [G, Cq, O], scale [G, S, O]) -> [G, M, O]
    out = rows(x, q, scale)      # x [M, Cp] @ dequantize(q [V, Cq], scale [V, S])^T   -> [M, V]
    out = dense_columns(x, w)    # float32: x [G, M, C] @ w [G, C, O] -> [G, M, O]
    out = dense_rows(x, w)       # float32: x [M, C] @ w [V, C]^T     -> [M, V]

The float32 pair (`quant_cpu_f32.h`) is for batched decoding: XLA:CPU multiplies 2-16 rows of x
by a weight as a GEMM that packs (copies) panels of the weight first, while these loops read each
weight element once for all rows (docs/kernels.md). Each output is a float32 sum of float32
products, XLA's up to reassociation (`reference_dense_columns` / `reference_dense_rows`).

int8: Cq = Cp, S = 1 (one scale per output channel / vocabulary row). int4 (q uint8): Cq = Cp / 2,
byte b holds elements 2b (low nibble) and 2b + 1 (high), sign-extended; S groups of Cp / S
elements along the contracted axis. `reference_columns` / `reference_rows` are the same products
in plain JAX on the dequantized weight (the tests hold the kernel to them).

Building: the first call compiles `quant_cpu.cc` with the C++ compiler (`$CXX`, else g++ / c++),
`-O3 -march=native`, against jaxlib's FFI headers (`jax.ffi.include_dir()`), into a cache
(`$PALIGEMMA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/paligemma` or `~/.cache/paligemma`) keyed by the
source, jaxlib's version, the compiler and the CPU's flags; later processes load it. Written to a
temporary file and renamed, so concurrent builds never see half a library. With no compiler, a
failed build, or `PALIGEMMA_CPU_KERNELS=0`, `available()` is False (the reason in
`unavailable_reason()`) and callers use their XLA path.

Instruction sets: `quant_cpu.cc` has portable loops for every shape, AVX2 loops, and AVX-512 ones
(`quant_cpu_avx512.h`: int4 through a 16-entry table of floats, see there) for the shapes decoding
uses; the build takes the widest the machine has (`built_isa()`). `PALIGEMMA_KERNEL_ISA=avx2` or
`baseline` builds a narrower library, so the tests can hold every path to NumPy on one machine.

Block sizes are compile-time constants of the C++ (`kRows`, `kBlock`, `kAhead`, `kShortRow`, with the reason
for each beside it), not a dataclass as in the Pallas kernels: the row loops unroll on them.

Axes: G independent weights, M rows of x, Cp contracted length, O output channels, V vocabulary
rows, S scale rows.
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name("quant_cpu.cc")
PARTS = (SOURCE, *(SOURCE.with_name(f"quant_cpu_{part}.h") for part in ("rows", "lanes", "avx512", "f32")))  # what the build reads
TARGETS = {("int8", "columns"): "PaligemmaInt8Columns", ("int4", "columns"): "PaligemmaInt4Columns",
           ("int8", "rows"): "PaligemmaInt8Rows", ("int4", "rows"): "PaligemmaInt4Rows",
           ("float32", "columns"): "PaligemmaF32Columns", ("float32", "rows"): "PaligemmaF32Rows"}
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")
# `PALIGEMMA_KERNEL_ISA` builds for less than the machine has, so that one machine can test each
# path of quant_cpu.cc: "native" (the default: AVX-512 where there is one), "avx2" (the AVX2 loops,
# as on a machine without AVX-512), "baseline" (the portable loops). The last two: x86 only.
ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",), "baseline": ("-mno-avx2",)}
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "baseline"}  # what `PaligemmaQuantIsa` returns -> `built_isa()`


def cache_dir():
    """Where built libraries are kept (see the module doc)."""
    if os.environ.get("PALIGEMMA_KERNEL_CACHE"):
        return pathlib.Path(os.environ["PALIGEMMA_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "paligemma"


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _flags():
    isa = os.environ.get("PALIGEMMA_KERNEL_ISA", "native")
    if isa not in ISA_FLAGS:
        raise RuntimeError(f"PALIGEMMA_KERNEL_ISA={isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    return FLAGS + ISA_FLAGS[isa]


def _build(compiler):
    """Path of the compiled library, building it if the cache lacks it."""
    import jaxlib  # its version keys the cache: the FFI ABI comes from its headers

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    flags = _flags()
    parts = [*(part.read_text() for part in PARTS), jaxlib.__version__, version, _cpu_flags(), " ".join(flags)]
    key = hashlib.sha256("\n".join(parts).encode())
    target = cache_dir() / f"quant_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build renames an identical file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _load():
    """(library, "") once it is built and its targets registered, else (None, reason)."""
    if os.environ.get("PALIGEMMA_CPU_KERNELS", "1") == "0":
        return None, "disabled by PALIGEMMA_CPU_KERNELS=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler ($CXX, g++ or c++) on PATH"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for name in TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} failed: {e}"
    return lib, ""


def available():
    """Whether the kernels can run: the default backend is the CPU and the library is built."""
    return jax.default_backend() == "cpu" and _load()[0] is not None


def built_isa():
    """The widest instruction set the library's loops use: "avx512", "avx2" or "baseline"."""
    if not available():
        raise RuntimeError(f"quant_cpu: the CPU kernels are unavailable: {unavailable_reason()}")
    return ISA_NAMES[_load()[0].PaligemmaQuantIsa()]


def unavailable_reason():
    """Why `available()` is False ("" when it is True)."""
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    return _load()[1]


def _check(kind, x, q, scale):
    """The format ("int8" / "int4") of one call, or a ValueError naming what disagrees."""
    rank = 3 if kind == "columns" else 2
    names = "x [G, M, Cp], q [G, Cq, O], scale [G, S, O]" if kind == "columns" else "x [M, Cp], q [V, Cq], scale [V, S]"
    shapes = f"got x {list(x.shape)}, q {list(q.shape)}, scale {list(scale.shape)}"
    if (x.ndim, q.ndim, scale.ndim) != (rank,) * 3:
        raise ValueError(f"quant_cpu.{kind}: expected {names}; {shapes}")
    fmt = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.uint8): "int4"}.get(jnp.dtype(q.dtype))
    if fmt is None:
        raise ValueError(f"quant_cpu.{kind}: q has dtype {q.dtype}, expected int8 (int8) or uint8 (int4)")
    Cp, Cq, S = x.shape[-1], q.shape[-2 if kind == "columns" else -1], scale.shape[-2 if kind == "columns" else -1]
    lead_ok = kind == "rows" or x.shape[0] == q.shape[0] == scale.shape[0]
    out_ok = scale.shape[-1] == q.shape[-1] if kind == "columns" else scale.shape[0] == q.shape[0]
    if fmt == "int8":
        fmt_ok = Cq == Cp and S == 1
    else:
        fmt_ok = Cq * 2 == Cp and S >= 1 and Cq % S == 0
    if not (lead_ok and out_ok and fmt_ok):
        raise ValueError(f"quant_cpu.{kind} ({fmt}): expected {names} with Cq = {'Cp, S = 1' if fmt == 'int8' else 'Cp / 2, S dividing Cq'}; {shapes}")
    return fmt


def _call(kind, x, q, scale, out_shape):
    fmt = _check(kind, x, q, scale)
    if not available():
        raise RuntimeError(f"quant_cpu.{kind}: the CPU kernels are unavailable: {unavailable_reason()}")
    call = jax.ffi.ffi_call(TARGETS[fmt, kind], jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), q, scale.astype(jnp.float32))


def _dense_call(kind, x, w, out_shape):
    rank = 3 if kind == "columns" else 2
    names = "x [G, M, C], w [G, C, O]" if kind == "columns" else "x [M, C], w [V, C]"
    contracted = w.shape[-2] if kind == "columns" else w.shape[-1]
    if (x.ndim, w.ndim) != (rank, rank) or x.shape[-1] != contracted or (kind == "columns" and x.shape[0] != w.shape[0]):
        raise ValueError(f"quant_cpu.dense_{kind}: expected {names}; got x {list(x.shape)}, w {list(w.shape)}")
    if jnp.dtype(x.dtype) != jnp.float32 or jnp.dtype(w.dtype) != jnp.float32:
        raise ValueError(f"quant_cpu.dense_{kind}: x and w must be float32, got {x.dtype} and {w.dtype}")
    if not available():
        raise RuntimeError(f"quant_cpu.dense_{kind}: the CPU kernels are unavailable: {unavailable_reason()}")
    call = jax.ffi.ffi_call(TARGETS["float32", kind], jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")
    return call(x, w)


def dense_columns(x, w):
    """float32 x [G, M, C] @ w [G, C, O] -> [G, M, O], each weight element read once for all M rows."""
    return _dense_call("columns", x, w, (x.shape[0], x.shape[1], w.shape[-1]))


def dense_rows(x, w):
    """float32 x [M, C] @ w [V, C]^T -> [M, V] (the tied embedding's logits), w read once for all M rows."""
    return _dense_call("rows", x, w, (x.shape[0], w.shape[0]))


def columns(x, q, scale):
    """x [G, M, Cp] @ dequantize(q, scale) [G, Cp, O] -> [G, M, O] float32 (see the module doc)."""
    return _call("columns", x, q, scale, (x.shape[0], x.shape[1], q.shape[-1]))


def rows(x, q, scale):
    """x [M, Cp] @ dequantize(q, scale)^T, q [V, Cq] -> [M, V] float32 (see the module doc)."""
    return _call("rows", x, q, scale, (x.shape[0], q.shape[0]))


# --- The same products in plain JAX -----------------------------------------------------------


def dequantize(q, scale, axis):
    """q [..., Cq, ...] (contracted `axis`) with scale [..., S, ...] -> float32 [..., Cp, ...]."""
    if q.dtype == jnp.int8:
        return q.astype(jnp.float32) * scale.astype(jnp.float32)
    byte = q.astype(jnp.int8)
    low, high = jnp.left_shift(byte, 4) >> 4, byte >> 4  # elements 2b and 2b + 1, sign-extended
    values = jnp.stack([low, high], axis=axis + 1).astype(jnp.float32)  # [..., Cq, 2, ...]
    values = values.reshape(q.shape[:axis] + (2 * q.shape[axis],) + q.shape[axis + 1:])  # [..., Cp, ...]
    return values * jnp.repeat(scale.astype(jnp.float32), values.shape[axis] // scale.shape[axis], axis=axis)


def reference_columns(x, q, scale):
    """`columns` in plain JAX: [G, M, O] float32."""
    return jnp.einsum("GMC,GCO->GMO", x.astype(jnp.float32), dequantize(q, scale, 1))


def reference_rows(x, q, scale):
    """`rows` in plain JAX: [M, V] float32."""
    return jnp.einsum("MC,VC->MV", x.astype(jnp.float32), dequantize(q, scale, 1))


def reference_dense_columns(x, w):
    """`dense_columns` in plain JAX: [G, M, O] float32."""
    return jnp.einsum("GMC,GCO->GMO", x, w)


def reference_dense_rows(x, w):
    """`dense_rows` in plain JAX: [M, V] float32."""
    return jnp.einsum("MC,VC->MV", x, w)
