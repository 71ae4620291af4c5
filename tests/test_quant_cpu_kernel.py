"""paligemma.kernels.quant_cpu: the C++ int8 / int4 matrix-vector custom calls for XLA:CPU.

Held to NumPy in float64 on `ref.quant`'s dequantized weight (the formats' definition), for
hypothesis-drawn shapes that reach every edge of the loops: lengths that are not multiples of the
8-wide vectors or of the 8-row passes, int4 groups shorter than a pass, output ranges split
between threads inside one weight, one and many rows of x. Also: bad input, the build cache, and
the fallback when no compiler is there.

Under `make test` (PALIGEMMA_REQUIRE_CPU_KERNELS=1) a kernel that does not build fails here
instead of skipping, so CI cannot silently fall back to the XLA path.
"""

import json
import os
import platform
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma.kernels import quant_cpu
from paligemma.parity.tolerances import FAST_FLOAT32, assert_close
from paligemma.ref import quant as rq


def _require_kernel():
    if quant_cpu.available():
        return
    if os.environ.get("PALIGEMMA_REQUIRE_CPU_KERNELS"):
        pytest.fail(f"the CPU quantized-matmul kernel is unavailable: {quant_cpu.unavailable_reason()}")
    pytest.skip(f"the CPU quantized-matmul kernel is unavailable: {quant_cpu.unavailable_reason()}")


def test_the_kernel_builds_here():
    _require_kernel()
    assert quant_cpu.unavailable_reason() == ""
    isa = os.environ.get("PALIGEMMA_KERNEL_ISA")
    if isa in ("avx2", "baseline"):  # set by test_the_narrower_builds_hold_too
        assert quant_cpu.built_isa() == isa
    elif "avx512f" in quant_cpu._cpu_flags().split():
        assert quant_cpu.built_isa() == "avx512"


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_the_narrower_builds_hold_too(isa, tmp_path):
    """Machines without AVX-512 run quant_cpu.cc's AVX2 loops, and machines without AVX2 its portable
    ones: this file's build and parity tests again, in a process whose library is built for `isa`
    (`PALIGEMMA_KERNEL_ISA`), where this CPU has more (else the native build above is that build)."""
    _require_kernel()
    wider = {"avx2": "avx512f", "baseline": "avx2"}[isa]
    if platform.machine() not in ("x86_64", "AMD64") or wider not in quant_cpu._cpu_flags().split():
        pytest.skip(f"no {wider} here: the native build already is the {isa} one")
    env = {**os.environ, "PALIGEMMA_KERNEL_ISA": isa, "PALIGEMMA_KERNEL_CACHE": str(tmp_path),
           "PALIGEMMA_REQUIRE_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "builds_here or equal_numpy"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"^3 passed", out.stdout, re.M), out.stdout[-2000:]


def _quantized(w, fmt, group, axis):
    """(q, scale, float64 dequantized w) of `ref.quant` with the contracted `axis` (-2 or -1)."""
    if fmt == "int8":
        q, scale = rq.quantize_int8(w, (axis,))
        return q, scale, rq.dequantize_int8(q, scale, np.float64)
    q, scale = rq.quantize_int4(w, (axis,), group)
    return q, scale, rq.dequantize_int4(q, scale, w.shape, (axis,), np.float64)


def _padded(x, Cp):
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Cp - x.shape[-1])])


@st.composite
def cases(draw):
    """(x [G, M, C], w [G, C, O], fmt, group): C and O off the 8-wide vectors, int4 groups of 2-128
    elements (1-64 bytes: shorter than, equal to and longer than one 8-row pass; 32 and 64 bytes
    take `rows`' whole-chunk path), O up to 300
    (several 64-channel work items, split between threads mid-weight), M from 1 to 16."""
    G, M = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    C, O = draw(st.sampled_from([2, 6, 17, 32, 48, 130])), draw(st.sampled_from([1, 7, 8, 65, 129, 300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w = rng.standard_normal((G, C, O)) * rng.uniform(0.01, 10, (G, 1, O))
    return rng.standard_normal((G, M, C)), w, draw(st.sampled_from(rq.FORMATS)), draw(st.sampled_from([2, 6, 16, 64, 128]))


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_columns_equal_numpy_on_the_dequantized_weight(case):
    _require_kernel()
    x, w, fmt, group = case
    q, scale, deq = _quantized(w, fmt, group, -2)  # q [G, Cq, O]
    xp = _padded(x, deq.shape[-2] if fmt == "int8" else 2 * q.shape[-2])  # [G, M, Cp]
    got = jax.jit(quant_cpu.columns)(jnp.asarray(xp, jnp.float32), q, scale)  # [G, M, O]
    expected = np.einsum("GMC,GCO->GMO", x, deq)
    assert_close(got, expected, FAST_FLOAT32, f"{fmt} columns, group {group}")
    assert_close(got, quant_cpu.reference_columns(jnp.asarray(xp, jnp.float32), q, scale), FAST_FLOAT32,
                 "columns vs reference_columns")


@settings(max_examples=60, deadline=None)
@given(case=cases(), V=st.sampled_from([1, 9, 64, 200]))
def test_rows_equal_numpy_on_the_dequantized_weight(case, V):
    _require_kernel()
    x, w, fmt, group = case
    x, table = x[0], np.concatenate([w[0].T] * -(-V // w.shape[-1]))[:V]  # [M, C], [V, C]
    q, scale, deq = _quantized(table, fmt, group, -1)  # q [V, Cq], per row / per group along C
    xp = _padded(x, deq.shape[-1] if fmt == "int8" else 2 * q.shape[-1])  # [M, Cp]
    got = jax.jit(quant_cpu.rows)(jnp.asarray(xp, jnp.float32), q, scale)  # [M, V]
    assert_close(got, x @ deq.T, FAST_FLOAT32, f"{fmt} rows, group {group}")
    assert_close(got, quant_cpu.reference_rows(jnp.asarray(xp, jnp.float32), q, scale), FAST_FLOAT32,
                 "rows vs reference_rows")


def test_bfloat16_scales_and_vmap():
    _require_kernel()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 64, 40))
    q, scale = rq.quantize_int4(w, (-2,), 32)
    scale16 = jnp.asarray(scale, jnp.bfloat16)  # both sides read the same rounded scales
    x = jnp.asarray(rng.standard_normal((2, 3, 1, 64)), jnp.float32)  # a batch axis for vmap
    got = jax.vmap(quant_cpu.columns, in_axes=(0, None, None))(x, q, scale16)  # [2, 3, 1, 40]
    expected = jax.vmap(quant_cpu.reference_columns, in_axes=(0, None, None))(x, q, scale16)
    assert_close(got, expected, FAST_FLOAT32, "vmap over x with bfloat16 scales")


@pytest.mark.parametrize("args, message", [
    (((1, 2, 8), (1, 8, 4), np.int8, (1, 1, 4)), None),
    (((1, 2, 8), (1, 8, 4), np.int16, (1, 1, 4)), "q has dtype int16"),
    (((1, 2, 8), (1, 6, 4), np.int8, (1, 1, 4)), "got x [1, 2, 8], q [1, 6, 4]"),
    (((1, 2, 8), (1, 8, 4), np.int8, (1, 2, 4)), "S = 1"),
    (((1, 2, 8), (1, 4, 4), np.uint8, (1, 3, 4)), "S dividing Cq"),
    (((2, 8), (1, 8, 4), np.int8, (1, 1, 4)), "expected x [G, M, Cp]"),
])
def test_bad_columns_input_is_named(args, message):
    xs, qs, qdtype, ss = args
    call = lambda: quant_cpu.columns(jnp.zeros(xs, jnp.float32), jnp.zeros(qs, qdtype), jnp.ones(ss, jnp.float32))  # noqa: E731
    if message is None:
        _require_kernel()
        assert call().shape == (1, 2, 4)
        return
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_bad_rows_input_is_named():
    with pytest.raises(ValueError, match=r"quant_cpu.rows \(int4\).*got x \[1, 8\], q \[5, 3\]"):
        quant_cpu.rows(jnp.zeros((1, 8)), jnp.zeros((5, 3), jnp.uint8), jnp.ones((5, 1)))


_SUBPROCESS = textwrap.dedent("""
    import json, os, sys
    import numpy as np, jax.numpy as jnp
    from paligemma.kernels import quant_cpu
    from paligemma.fast import quant as fq
    from paligemma.ref import quant as rq
    w = np.random.default_rng(0).standard_normal((40, 24))
    q, scale = rq.quantize_int8(w, (-2,))
    x = np.random.default_rng(1).standard_normal((1, 40))
    got = np.asarray(fq.matmul(jnp.asarray(x, jnp.float32), {"q": q, "scale": scale}))
    expected = x @ rq.dequantize_int8(q, scale, np.float64)
    print(json.dumps({"available": quant_cpu.available(), "reason": quant_cpu.unavailable_reason(),
                      "error": float(np.abs(got - expected).max() / np.abs(expected).max()),
                      "cache": sorted(os.listdir(sys.argv[1])) if os.path.isdir(sys.argv[1]) else []}))
""")


def _run(env_changes, cache):
    env = {**os.environ, "PALIGEMMA_KERNEL_CACHE": str(cache), **env_changes}
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS, str(cache)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_cache_and_fallbacks(tmp_path):
    """A fresh cache gets exactly one library (no temporary file left) and the next process loads
    it; with the kernels disabled or a compiler that fails, `available()` says why and
    `fast.quant` still gives the right numbers on its XLA path."""
    _require_kernel()
    first = _run({}, tmp_path / "cache")
    assert first["available"] and len(first["cache"]) == 1 and first["cache"][0].endswith(".so"), first
    assert first["error"] < 1e-5
    again = _run({}, tmp_path / "cache")
    assert again["cache"] == first["cache"] and again["available"]
    off = _run({"PALIGEMMA_CPU_KERNELS": "0"}, tmp_path / "off")
    assert not off["available"] and "PALIGEMMA_CPU_KERNELS=0" in off["reason"] and off["error"] < 1e-5, off
    broken = _run({"CXX": "false"}, tmp_path / "broken")
    assert not broken["available"] and "failed" in broken["reason"] and broken["error"] < 1e-5, broken
    assert not [n for n in broken["cache"] if n.endswith(".so")], broken
