"""kernels.decode_attention in Pallas interpret mode vs the pure-JAX reference and vs paligemma.ref (float64).

A cache is drawn the way `paligemma.fast.decode` fills it: a prompt with padding holes, then
generated tokens, then empty slots; the query is the next token (its own block, positions
skipping the holes). Hypothesis draws batch, heads, kv heads, cache lengths, fill levels,
windows, softcaps, dtypes, tile sizes and split counts; forward and gradients.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import kernels
from paligemma.kernels.decode_attention import DecodeBlockSizes, decode_attention
from paligemma.kernels.flash_attention import reference
from paligemma.parity.tolerances import (KERNEL_BFLOAT16, KERNEL_FLOAT32, KERNEL_GRADIENT_FLOAT32,
                                         assert_close)
from paligemma.ref import gemma as ref_gemma


def _budget(n):
    return max(1, round(n * settings.default.max_examples / 80))


@st.composite
def caches(draw):
    """(TokenMask with T = 1, dense visibility [B, 1, S] by direct enumeration, q, k, v float64)."""
    B = draw(st.integers(1, 3))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4]))
    H = draw(st.sampled_from([8, 16, 72]))
    S = draw(st.integers(2, 70))
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    valid = np.zeros((B, S), bool)
    for b in range(B):
        prompt = draw(st.integers(1, S - 1))
        valid[b, :prompt] = draw(st.lists(st.booleans(), min_size=prompt, max_size=prompt))
        valid[b, 0] = True
        valid[b, prompt:prompt + draw(st.integers(0, S - prompt))] = True  # generated so far
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)  # [B, S]
    q_pos = valid.sum(axis=1)  # [B] the next token's position
    mask = kernels.TokenMask(jnp.ones((B, 1), jnp.int32), jnp.zeros((B, S), jnp.int32), jnp.ones((B, 1), bool),
                             jnp.asarray(valid), jnp.asarray(q_pos[:, None], jnp.int32),
                             jnp.asarray(positions, jnp.int32))
    # The rule written out: a valid slot, fewer than `window` positions behind the query.
    visible = valid & ((q_pos[:, None] - positions < window) if window else True)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    qkv = rng.normal(size=(B, 1, K * G, H)), rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    sizes = DecodeBlockSizes(block_k=draw(st.sampled_from([16, 32])), num_splits=draw(st.sampled_from([0, 1, 2, 3])))
    return dict(mask=mask, visible=visible[:, None, :], qkv=qkv, window=window, dtype=dtype, sizes=sizes,
                softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))), scale=draw(st.sampled_from([1.0, 0.25])))


def _run(c, fn):
    dtype = jnp.dtype(c["dtype"])
    q, k, v = (jnp.asarray(x, jnp.float32).astype(dtype) for x in c["qkv"])
    kw = dict(window=c["window"], softcap=c["softcap"], scale=c["scale"])
    return (q, k, v), jax.jit(lambda q, k, v, m: fn(q, k, v, m, **kw))


@settings(max_examples=_budget(8))
@given(caches())
def test_decode_matches_the_reference_and_the_float64_model(c):
    (q, k, v), kernel = _run(c, lambda *a, **kw: decode_attention(*a, block_sizes=c["sizes"], **kw))
    _, plain = _run(c, reference)
    out = np.asarray(kernel(q, k, v, c["mask"]).astype(jnp.float32))  # [B, 1, N, H]
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = np.asarray(plain(*f32, c["mask"]))
    assert_close(out, expected, KERNEL_FLOAT32 if c["dtype"] == "float32" else KERNEL_BFLOAT16,
                 f"decode {c['dtype']} vs pure-JAX reference")
    np.testing.assert_array_equal(np.asarray(kernels.dense(c["mask"], c["window"])), c["visible"])
    seen = c["visible"].any(-1)  # [B, 1]: the drawn window may leave a query nothing to see
    assert not out[~seen].any(), "rows with no visible key must be exactly 0"
    if c["dtype"] == "float32":
        q64, k64, v64 = (np.asarray(x, np.float64) for x in f32)
        gold = ref_gemma.attend(q64 * c["scale"], k64, v64, c["visible"],
                                types.SimpleNamespace(attn_logits_softcap=c["softcap"]))
        assert_close(out[seen], gold[seen], KERNEL_FLOAT32, "decode float32 vs ref float64")


@settings(max_examples=_budget(4))
@given(caches())
def test_decode_gradients_match_the_reference(c):
    c = dict(c, dtype="float32")
    (q, k, v), kernel = _run(c, lambda *a, **kw: decode_attention(*a, block_sizes=c["sizes"], **kw))
    _, plain = _run(c, reference)
    cotangent = jnp.asarray(np.random.default_rng(0).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, c["mask"]) * cotangent), argnums=(0, 1, 2))(q, k, v)

    for name, a, b in zip(("dq", "dk", "dv"), grads(kernel), grads(plain)):
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / max(float(np.abs(b).max()), 1.0)
        assert err <= KERNEL_GRADIENT_FLOAT32.bound(), f"decode {name}: error {err:.3g}"


def test_empty_cache_blocks_are_not_visited():
    """A cache of 1024 slots holding 5 tokens: only the first tile is in the kernel's range, so
    garbage (NaN) in the unwritten slots cannot reach the result."""
    B, S, H = 1, 1024, 8
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, 1, 2, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, 1, H)), jnp.float32).at[:, 64:].set(jnp.nan)
    v = jnp.asarray(rng.normal(size=(B, S, 1, H)), jnp.float32).at[:, 64:].set(jnp.nan)
    valid = jnp.arange(S)[None] < 5
    mask = kernels.TokenMask(jnp.ones((B, 1), jnp.int32), jnp.zeros((B, S), jnp.int32), jnp.ones((B, 1), bool),
                             valid, jnp.full((B, 1), 5, jnp.int32), jnp.minimum(jnp.arange(S)[None], 4))
    out = decode_attention(q, k, v, mask, block_sizes=DecodeBlockSizes(block_k=64, num_splits=4))
    expected = reference(q, k[:, :5], v[:, :5], mask._replace(kv_blocks=mask.kv_blocks[:, :5],
                                                              kv_valid=valid[:, :5], kv_positions=mask.kv_positions[:, :5]))
    assert_close(out, expected, KERNEL_FLOAT32, "decode over a mostly empty cache")


def test_decode_validation():
    q, kv = jnp.zeros((1, 2, 2, 8)), jnp.zeros((1, 16, 1, 8))
    with pytest.raises(ValueError, match="one query per example"):
        decode_attention(q, kv, kv)
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_attention(q[:, :1], kv, kv, block_sizes=DecodeBlockSizes(block_k=12))
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        decode_attention(jnp.zeros((1, 1, 3, 8)), jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 16, 2, 8)))


def test_split_count_divides_the_blocks():
    sizes = DecodeBlockSizes()
    assert sizes.splits("tpu", 8, 9) == 3
    assert sizes.splits("gpu", 1, 64) == 64 and sizes.splits("gpu", 128, 64) == 2
    assert DecodeBlockSizes(num_splits=5).splits("tpu", 1, 12) == 4
