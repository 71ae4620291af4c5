"""kernels.flash_attention in Pallas interpret mode vs the pure-JAX reference and vs paligemma.ref (float64).

Hypothesis draws batch, heads, kv heads (MHA / GQA / MQA), head dims (72 padded to 128),
query and key lengths (extra keys: a KV cache's empty slots), prompt lengths, prefix lengths,
padding on either side, windows, softcaps, scales, dtypes and block sizes; forward and
gradients. The masks of paligemma.ref (NumPy, dense) are the independent statement of the rule.

Budget: every draw compiles the interpreted kernels anew (~2 s forward, ~4 s with gradients),
so each property has 6-12 examples (HYPOTHESIS_PROFILE=thorough scales them). Set PARITY_REPORT=path to append the
largest errors measured (JSON lines), as quoted in parity/tolerances.py.
"""

import json
import os
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import kernels
from paligemma.kernels import masking
from paligemma.kernels.flash_attention import BlockSizes, flash_attention, reference
from paligemma.parity.tolerances import (KERNEL_BFLOAT16, KERNEL_FLOAT32, KERNEL_GRADIENT_BFLOAT16,
                                         KERNEL_GRADIENT_FLOAT32, assert_close)
from paligemma.ref import gemma as ref_gemma
from paligemma.ref import mask as ref_mask

MEASURED = defaultdict(float)


def _budget(n):
    return max(1, round(n * settings.default.max_examples / 80))


def teardown_module():
    path = os.environ.get("PARITY_REPORT")
    if path and MEASURED:
        with open(path, "a") as f:
            f.write(json.dumps({"test_kernels_flash": dict(sorted(MEASURED.items()))}) + "\n")


def _check(actual, expected, tolerance, what):
    MEASURED[what] = max(MEASURED[what], assert_close(actual, expected, tolerance, what))


# --- Drawing problems -------------------------------------------------------------------------


@st.composite
def token_masks(draw, B, T):
    """(input_mask, mask_ar) [B, T] in big_vision's layout: a prefix (mask_ar 0) of at least one
    token, a causal suffix, padding on the right or the left carrying random mask_ar."""
    input_mask = np.zeros((B, T), bool)
    mask_ar = np.array(draw(st.lists(st.integers(0, 1), min_size=B * T, max_size=B * T))).reshape(B, T)
    for b in range(B):
        length = draw(st.integers(0 if b else 1, T))  # an all-padding example is allowed after the first
        prefix = draw(st.integers(min(1, length), max(1, length)))
        start = draw(st.sampled_from([0, T - length]))  # right or left padding
        input_mask[b, start:start + length] = True
        mask_ar[b, start:start + length] = np.arange(length) >= prefix
    return input_mask, mask_ar


@st.composite
def problems(draw, max_len=40, dtypes=("float32", "bfloat16")):
    """A dict describing one attention call (NumPy float64 inputs, to be cast)."""
    B = draw(st.integers(1, 2))
    K = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 3]))
    H = draw(st.sampled_from([4, 8, 16, 72]))
    T = draw(st.integers(1, max_len))
    extra = draw(st.sampled_from([0, 0, 5]))  # keys beyond the queries: empty cache slots
    dtype = draw(st.sampled_from(dtypes))
    blocks = [16, 32] if dtype == "bfloat16" else [8, 16, 32]
    input_mask, mask_ar = draw(token_masks(B, T))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return dict(
        q=rng.normal(size=(B, T, K * G, H)), k=rng.normal(size=(B, T + extra, K, H)),
        v=rng.normal(size=(B, T + extra, K, H)), input_mask=input_mask, mask_ar=mask_ar, extra=extra,
        window=draw(st.one_of(st.none(), st.integers(1, 12))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        scale=draw(st.sampled_from([1.0, H**-0.5, 0.3])), dtype=dtype,
        blocks=BlockSizes(block_q=draw(st.sampled_from(blocks)), block_k=draw(st.sampled_from(blocks))))


def _inputs(p):
    dtype = jnp.dtype(p["dtype"])
    cast = lambda x: jnp.asarray(x, jnp.float32).astype(dtype)  # noqa: E731
    mask = kernels.TokenMask.prefix_lm(p["input_mask"], p["mask_ar"]).pad_keys(p["k"].shape[1])
    return cast(p["q"]), cast(p["k"]), cast(p["v"]), mask


def _kernel_fn(p):
    kw = dict(window=p["window"], softcap=p["softcap"], scale=p["scale"])
    kernel = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, block_sizes=p["blocks"], **kw))
    plain = jax.jit(lambda q, k, v, m: reference(q, k, v, m, **kw))
    return kernel, plain


def _ref_mask(p):
    """paligemma.ref's dense mask [B, T, S] (extra keys invalid), sliding window included."""
    attn = ref_mask.make_attn_mask(p["input_mask"], p["mask_ar"])  # [B, T, T]
    if p["window"] is not None:
        positions = ref_mask.positions_from_mask(p["input_mask"])
        attn = ref_mask.sliding_window(attn, positions, positions, p["window"],
                                       ref_mask.same_block(p["input_mask"], p["mask_ar"]))
    return np.pad(attn, ((0, 0), (0, 0), (0, p["extra"])))


# --- Properties -------------------------------------------------------------------------------


@settings(max_examples=_budget(12))
@given(problems())
def test_forward_matches_the_reference_and_the_float64_model(p):
    q, k, v, mask = _inputs(p)
    kernel, plain = _kernel_fn(p)
    out = np.asarray(kernel(q, k, v, mask).astype(jnp.float32))  # [B, T, N, H]
    assert np.isfinite(out).all()
    expected = np.asarray(plain(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask))
    if p["dtype"] == "float32":
        _check(out, expected, KERNEL_FLOAT32, "flash float32 vs pure-JAX reference")
    else:
        _check(out, expected, KERNEL_BFLOAT16, "flash bfloat16 vs float32 reference")

    visible = _ref_mask(p)  # [B, T, S]
    np.testing.assert_array_equal(np.asarray(masking.dense(mask, p["window"])), visible)
    seen = visible.any(-1)  # [B, T] rows with a visible key
    assert not out[~seen].any(), "rows with no visible key must be exactly 0"
    if p["dtype"] == "float32":
        q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))  # the kernel's inputs, exactly
        gold = ref_gemma.attend(q64 * p["scale"], k64, v64, visible,
                                types.SimpleNamespace(attn_logits_softcap=p["softcap"]))
        _check(out[seen], gold[seen], KERNEL_FLOAT32, "flash float32 vs ref float64")


@settings(max_examples=_budget(6))
@given(problems(max_len=24))
def test_gradients_match_the_reference(p):
    q, k, v, mask = _inputs(p)
    kernel, plain = _kernel_fn(p)
    rng = np.random.default_rng(0)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # [B, T, N, H]

    def grads(fn, *args):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(*args)

    got = grads(kernel, q, k, v)
    want = grads(plain, *(x.astype(jnp.float32) for x in (q, k, v)))
    tol = KERNEL_GRADIENT_FLOAT32 if p["dtype"] == "float32" else KERNEL_GRADIENT_BFLOAT16
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        a = np.asarray(a.astype(jnp.float32))
        assert np.isfinite(a).all(), name
        # Relative to max(|expected|, 1): dq is exactly 0 where each query sees one key (softmax of one).
        what = f"flash {p['dtype']} {name} vs reference"
        err = float(np.abs(a - np.asarray(b)).max()) / max(float(np.abs(b).max()), 1.0)
        MEASURED[what] = max(MEASURED[what], err)
        assert err <= tol.bound(), f"{what}: error {err:.3g} (relative to max(|expected|, 1)) exceeds {tol.name}"


@settings(max_examples=_budget(25))
@given(st.integers(1, 2), st.integers(1, 48), st.integers(0, 8), st.sampled_from([8, 16]), st.sampled_from([8, 16]),
       st.one_of(st.none(), st.integers(1, 10)), st.data())
def test_skipped_blocks_hold_no_visible_pair(B, T, extra, block_q, block_k, window, data):
    """Block skipping is conservative (a skipped tile is fully masked) and does skip."""
    input_mask, mask_ar = data.draw(token_masks(B, T))
    mask = kernels.TokenMask.prefix_lm(input_mask, mask_ar).pad_keys(T + extra)
    Tp, Sp = -(-T // block_q) * block_q, -(-(T + extra) // block_k) * block_k
    q_ids, kv_ids = masking.kernel_ids(mask)
    pad = lambda x, n, value: jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)  # noqa: E731
    q_ids, kv_ids = pad(q_ids, Tp, -1), pad(kv_ids, Sp, masking.INVALID_KEY)
    q_pos, kv_pos = pad(mask.q_positions, Tp, 0), pad(mask.kv_positions, Sp, 0)
    tiles = np.asarray(masking.block_visibility(q_ids, kv_ids, q_pos, kv_pos, window, block_q, block_k))
    dense = np.pad(_ref_mask(dict(input_mask=input_mask, mask_ar=mask_ar, window=window, extra=extra)),
                   ((0, 0), (0, Tp - T), (0, Sp - T - extra)))
    per_tile = dense.reshape(B, Tp // block_q, block_q, Sp // block_k, block_k).any(axis=(2, 4))
    assert not (per_tile & ~tiles).any(), "a tile with a visible pair was skipped"
    lo, hi = (np.asarray(x) for x in masking.visible_range(jnp.asarray(tiles)))
    for b in range(B):
        for i in range(tiles.shape[1]):
            visible = np.flatnonzero(tiles[b, i])
            assert (lo[b, i], hi[b, i]) == ((visible[0], visible[-1] + 1) if visible.size else (0, 0))


def test_causal_prompt_skips_tiles():
    """A causal 64-token suffix in 8 x 8 tiles: the upper triangle of tiles is skipped."""
    mask = kernels.TokenMask.prefix_lm(np.ones((1, 64), bool), np.ones((1, 64), int))
    q_ids, kv_ids = masking.kernel_ids(mask)
    tiles = np.asarray(masking.block_visibility(q_ids, kv_ids, mask.q_positions, mask.kv_positions, None, 8, 8))[0]
    np.testing.assert_array_equal(tiles, np.tril(np.ones((8, 8), bool)))


# --- Validation -------------------------------------------------------------------------------


def test_clear_errors():
    q = jnp.zeros((1, 8, 4, 8))
    kv = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        flash_attention(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)))
    with pytest.raises(ValueError, match="disagree"):
        flash_attention(q, kv, jnp.zeros((1, 9, 2, 8)))
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, kv.astype(jnp.bfloat16), kv)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q.astype(jnp.float16), kv.astype(jnp.float16), kv.astype(jnp.float16))
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_attention(q, kv, kv, block_sizes=BlockSizes(block_q=12, block_k=8))
    with pytest.raises(ValueError, match="multiple of 16"):
        b16 = (q.astype(jnp.bfloat16), kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16))
        flash_attention(*b16, block_sizes=BlockSizes(block_q=8, block_k=8))
    with pytest.raises(ValueError, match="power-of-two"):
        flash_attention(jnp.zeros((1, 96, 4, 8)), jnp.zeros((1, 96, 2, 8)), jnp.zeros((1, 96, 2, 8)),
                        backend="gpu", block_sizes=BlockSizes(block_q=48, block_k=16))
    with pytest.raises(ValueError, match=r"mask.kv_valid has shape \(1, 6\), expected \(1, 8\)"):
        flash_attention(q, kv, kv, kernels.TokenMask.prefix_lm(np.ones((1, 8), bool), np.zeros((1, 8), int))
                        ._replace(kv_valid=jnp.ones((1, 6), bool)))
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_attention(q, kv, kv, backend="cpu")
    with pytest.raises(ValueError, match="no Pallas backend"):
        kernels.attention(q, kv, kv)  # the CPU has none: interpret mode must be asked for


def test_bfloat16_inputs_stay_bfloat16_and_values_are_exact_for_one_visible_key():
    """A query that sees exactly one key returns that key's value row (softmax of one score = 1)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in ((1, 16, 2, 8), (1, 16, 2, 8), (1, 16, 2, 8)))
    mask = kernels.TokenMask.prefix_lm(np.ones((1, 16), bool), np.ones((1, 16), int))
    out = flash_attention(q, k, v, mask, window=1, block_sizes=BlockSizes(16, 16))  # each query sees itself only
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(v, np.float32))
    assert ml_dtypes.bfloat16 == np.asarray(out).dtype
