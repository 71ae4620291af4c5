"""The float32 few-row products of `kernels.quant_cpu` (`dense_columns`, `dense_rows`) and their use
by `fast.dense` in batched decoding.

Held to NumPy float64 products for hypothesis-drawn shapes that reach every edge of the loops:
contracted lengths off the 8 / 16-wide vectors and the 8-row passes, output ranges of several
64-channel work items split between threads, vocabulary rows off the 4-row quarters, 1 to 17 rows
of x. Then the model: `fast.decode.extend` at B = 8 with the kernel equals its XLA build, the
kernel is really in the compiled step, and what must not change (one row, bfloat16, no `tiles`,
gradients) keeps XLA's dot.

Under `make test` (PALIGEMMA_REQUIRE_CPU_KERNELS=1) a kernel that does not build fails here.
"""

import functools
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import ref
from paligemma.fast import decode, dense, gemma, layout
from paligemma.fast.policy import FLOAT32
from paligemma.kernels import quant_cpu
from paligemma.parity.tolerances import FAST_FLOAT32, assert_close


def _require_kernel():
    if quant_cpu.available():
        return
    if os.environ.get("PALIGEMMA_REQUIRE_CPU_KERNELS"):
        pytest.fail(f"the CPU kernels are unavailable: {quant_cpu.unavailable_reason()}")
    pytest.skip(f"the CPU kernels are unavailable: {quant_cpu.unavailable_reason()}")


@st.composite
def dense_cases(draw):
    """(x [G, M, C], w [G, C, O]): C around the vector widths and 8-row passes, O across work items."""
    G, M = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 16, 17]))
    C, O = draw(st.sampled_from([1, 3, 8, 9, 16, 17, 40, 130])), draw(st.sampled_from([1, 7, 16, 17, 65, 129, 300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w = rng.standard_normal((G, C, O)) * rng.uniform(0.01, 10, (G, 1, O))
    return rng.standard_normal((G, M, C)).astype(np.float32), w.astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(case=dense_cases())
def test_dense_columns_equal_numpy(case):
    _require_kernel()
    x, w = case
    got = jax.jit(quant_cpu.dense_columns)(jnp.asarray(x), jnp.asarray(w))  # [G, M, O]
    expected = np.einsum("GMC,GCO->GMO", x.astype(np.float64), w.astype(np.float64))
    assert_close(got, expected, FAST_FLOAT32, f"dense_columns {list(x.shape)} @ {list(w.shape)}")


@settings(max_examples=40, deadline=None)
@given(case=dense_cases(), V=st.sampled_from([1, 3, 4, 9, 64, 203]))
def test_dense_rows_equal_numpy(case, V):
    _require_kernel()
    x, w = case
    x, table = x[0], np.concatenate([w[0].T] * -(-V // w.shape[-1]))[:V]  # [M, C], [V, C]
    got = jax.jit(quant_cpu.dense_rows)(jnp.asarray(x), jnp.asarray(table))  # [M, V]
    assert_close(got, x.astype(np.float64) @ table.T.astype(np.float64), FAST_FLOAT32,
                 f"dense_rows {list(x.shape)} @ {list(table.shape)}^T")


def test_bad_dense_input_is_named():
    _require_kernel()
    x, w = jnp.ones((1, 2, 8)), jnp.ones((1, 9, 4))
    with pytest.raises(ValueError, match=r"dense_columns: expected x \[G, M, C\], w \[G, C, O\]; got x \[1, 2, 8\]"):
        quant_cpu.dense_columns(x, w)
    with pytest.raises(ValueError, match="must be float32, got float32 and bfloat16"):
        quant_cpu.dense_rows(jnp.ones((2, 8)), jnp.ones((5, 8), jnp.bfloat16))


def test_routing_keeps_xla_where_it_must():
    """One row, 17 rows, bfloat16 on either side, no `tiles` (a mesh, not the CPU): XLA's dot."""
    _require_kernel()
    w, w16 = jnp.ones((8, 4)), jnp.ones((8, 4), jnp.bfloat16)
    rows = lambda m, dtype=jnp.float32: jnp.ones((m, 1, 8), dtype)  # noqa: E731
    assert dense.applies(w, rows(8)) and dense.applies(w, rows(2)) and dense.applies(w, rows(16))
    assert not dense.applies(w, rows(1)) and not dense.applies(w, rows(17))
    assert not dense.applies(w16, rows(8)) and not dense.applies(w, rows(8, jnp.bfloat16))
    assert not dense.applies(w, rows(8), tiles=False)
    assert dense.applies(w, rows(8), logits=True) and not dense.applies(w, rows(9), logits=True)


def test_gradients_are_xlas():
    """Under `jax.grad` the forward and backward are XLA's dots (`custom_vjp`): the same numbers as
    differentiating the einsum itself."""
    _require_kernel()
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 2, 24), (3, 8, 40)))  # w [N, H, D]
    table = jnp.asarray(rng.standard_normal((50, 40)), jnp.float32)

    def loss(x, w, table, through_kernel):
        mm = dense.matmul(x, w, 2) if through_kernel else jnp.einsum("BTC,CD->BTD", x, w.reshape(24, 40))
        out = dense.logits(mm, table) if through_kernel else jnp.einsum("BTD,VD->BTV", mm, table)
        return jnp.sum(jnp.sin(out))

    got = jax.grad(loss, argnums=(0, 1, 2))(x, w, table, True)
    expected = jax.grad(loss, argnums=(0, 1, 2))(x, w, table, False)
    for g, e, name in zip(got, expected, ("x", "w", "table")):
        assert_close(g, e, FAST_FLOAT32, f"gradient wrt {name}")


@pytest.mark.parametrize("name", ["tiny-paligemma", "tiny-paligemma2"])
def test_extend_at_batch_8_equals_the_xla_path(name):
    """8 rows, each with its own cache contents and position: logits and the updated cache of the
    kernel build within FAST_FLOAT32 of the XLA build, and the kernel's custom calls in the HLO."""
    _require_kernel()
    config = ref.get_config(name)
    g, B, S = config.llm, 8, 32
    params = layout.unstack_layers(jax.tree_util.tree_map(jnp.asarray, ref.init_params(config, seed=0, dtype=np.float32,
                                                                                      random_norms=True)))
    rng = np.random.default_rng(1)
    kv = (g.depth, B, S, g.num_kv_heads, g.head_dim)
    lengths = rng.integers(3, S - 1, B)
    cache = decode.KVCache(jnp.asarray(rng.standard_normal(kv), jnp.float32), jnp.asarray(rng.standard_normal(kv), jnp.float32),
                           jnp.asarray(np.arange(S)[None] < lengths[:, None]),
                           jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
                           jnp.asarray(lengths, jnp.int32), jnp.asarray(lengths, jnp.int32))  # per-row slots
    tokens = jnp.asarray(rng.integers(0, g.vocab_size, B), jnp.int32)
    rope = gemma.rope_table(S, g.head_dim, g.rope_base)
    outs, hlo = {}, {}
    for kernel in (False, True):
        old, dense.CPU_KERNEL = dense.CPU_KERNEL, kernel
        try:  # a fresh jit: CPU_KERNEL is read while tracing
            step = jax.jit(functools.partial(decode.extend, config=config, policy=FLOAT32, rope=rope))
            lowered = step.lower(params, cache=cache, tokens=tokens)
            hlo[kernel] = lowered.as_text()
            outs[kernel] = lowered.compile()(params, cache=cache, tokens=tokens)
        finally:
            dense.CPU_KERNEL = old
    assert "PaligemmaF32Columns" in hlo[True] and "PaligemmaF32Rows" in hlo[True]
    assert "PaligemmaF32" not in hlo[False]
    (cache_k, logits_k), (cache_x, logits_x) = outs[True], outs[False]
    assert_close(logits_k, logits_x, FAST_FLOAT32, f"{name}: extend B=8 logits, kernel vs XLA")
    assert_close(cache_k.k, cache_x.k, FAST_FLOAT32, f"{name}: extend B=8 keys, kernel vs XLA")
    assert_close(cache_k.v, cache_x.v, FAST_FLOAT32, f"{name}: extend B=8 values, kernel vs XLA")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_the_narrower_builds_hold_too(isa, tmp_path):
    """The 8-lane loops (no AVX-512) and the portable ones, held to NumPy in a process whose library
    is built for `isa` (`PALIGEMMA_KERNEL_ISA`), where this CPU has more."""
    _require_kernel()
    wider = {"avx2": "avx512f", "baseline": "avx2"}[isa]
    if platform.machine() not in ("x86_64", "AMD64") or wider not in quant_cpu._cpu_flags().split():
        pytest.skip(f"no {wider} here: the native build already is the {isa} one")
    env = {**os.environ, "PALIGEMMA_KERNEL_ISA": isa, "PALIGEMMA_KERNEL_CACHE": str(tmp_path),
           "PALIGEMMA_REQUIRE_CPU_KERNELS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "equal_numpy"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"^2 passed", out.stdout, re.M), out.stdout[-2000:]
