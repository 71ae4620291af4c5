"""paligemma.fast (JAX, float32 / bfloat16) against paligemma.ref (NumPy, float64).

Hypothesis draws small but structurally complete models (`paligemma.parity.strategies`: heads,
kv heads, head dims including 72, depth, softcaps, post-norms, sliding window, image and patch
sizes) and inputs (random tokens, prefix / suffix masks, prompt lengths, padding). Every bound
is a named `paligemma.parity.tolerances` entry, where its reasoning lives; most scale with the
"sensitivity" of the drawn model on the drawn input (how far the reference's own logits move
when its weights are rounded to bfloat16), because tiny random models differ ~100x in how
much they amplify rounding.

Budget: each new config (and each new input shape) makes XLA compile the model again, 2-4 s
on CPU, while the arithmetic of these tiny models takes milliseconds. So every test draws only
a few configs (`@settings(max_examples=_budget(n))`, far below the profile's 80) and runs
several prompts per config, all padded to one shape [B_MAX, T_MAX] so that they share one
compilation. The file takes about 3 minutes on 2 cores (`-n 2`) and 5 on one;
HYPOTHESIS_PROFILE=thorough scales every budget by 300 / 80.

Set PARITY_REPORT=path to append the largest errors each test measured (JSON lines): that is
how the measured values quoted in parity/tolerances.py were obtained.
"""

import dataclasses
import functools
import json
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from paligemma import fast, ref
from paligemma.fast import decode as fast_decode
from paligemma.fast import gemma as fast_gemma
from paligemma.fast import model as fast_model
from paligemma.fast.policy import BFLOAT16, FLOAT32, Policy
from paligemma.parity.strategies import configs, prompts
from paligemma.parity.tolerances import (BFLOAT16_CACHE, BFLOAT16_FAST, FAST_FLOAT32, FLOAT32_REORDERED,
                                         GRADIENT_FLOAT32, SAME_ROUNDING_FLOAT32, assert_close,
                                         relative_error)
from paligemma.ref.decode import sampling_logits as ref_sampling_logits
from paligemma.ref.ops import log_softmax

B_MAX, T_MAX = 3, 8  # every prompt is padded to this shape: one compilation per config
MAX_NEW = 5  # generated tokens in the decoding tests

# --- Bookkeeping ----------------------------------------------------------------------------

MEASURED = defaultdict(float)  # name -> largest value seen in this process


def _record(name, value):
    MEASURED[name] = max(MEASURED[name], float(value))


def _check(actual, expected, tolerance, what, sensitivity):
    """`assert_close`, recording for the report the error and, where the bound scales with the
    sensitivity (above `rel / per_sensitivity`), the error's ratio to it."""
    err = assert_close(actual, expected, tolerance, what, sensitivity)
    _record(what, err)
    if tolerance.per_sensitivity and sensitivity > 0:
        _record("largest sensitivity", sensitivity)
        if tolerance.per_sensitivity * sensitivity > tolerance.rel:
            _record(f"{what} / sensitivity, where that sets the bound", err / sensitivity)
        else:
            _record(f"{what}, where the floor sets the bound", err)
    return err


def _count(name, n):
    """Counts events (near-ties) so a report can say how often a guard was used."""
    MEASURED[f"count: {name}"] += n


def teardown_module():
    path = os.environ.get("PARITY_REPORT")
    if path and MEASURED:
        with open(path, "a") as f:
            f.write(json.dumps(dict(sorted(MEASURED.items()))) + "\n")


def _budget(n):
    """`n` examples under the default profile (80), proportionally more under "thorough" (300)."""
    return max(1, round(n * settings.default.max_examples / 80))


# --- Drawing models and inputs ----------------------------------------------------------------


def _bucket(prompt, config):
    """A drawn prompt padded to [B_MAX, T_MAX]: more right padding (`input_mask` False, `mask_ar` 1,
    as big_vision pads) and the batch filled up by repeating its examples."""
    images, tokens, mask_ar, input_mask = prompt
    B, T = tokens.shape
    rows = np.arange(B_MAX) % B
    pad = ((0, 0), (0, T_MAX - T))
    return (images[rows], np.pad(tokens, pad, constant_values=config.pad_id)[rows],
            np.pad(mask_ar, pad, constant_values=1)[rows], np.pad(input_mask, pad)[rows])


@st.composite
def cases(draw, n_prompts=3, vocab_size=64):
    """(config, params seed, prompts): one model and several same-shaped prompts for it."""
    config = draw(configs(vocab_size=vocab_size))
    seed = draw(st.integers(0, 1000))
    batch = [_bucket(draw(prompts(config, max_batch=B_MAX, max_len=T_MAX)), config) for _ in range(n_prompts)]
    return config, seed, batch


def _params(config, seed):
    """float64 parameters with norms away from identity (a zero RMSNorm scale hides `1 + scale`)."""
    return ref.init_params(config, seed=seed, dtype=np.float64, random_norms=True)


def _f32(params):
    return ref.cast_params(params, np.float32)


def _bf16(params):
    return ref.cast_params(params, ml_dtypes.bfloat16)


def _sensitivity(params, config, prompt, gold):
    """How far ref's logits move when its weights are rounded to bfloat16 (float32 activations),
    relative to its float64 logits `gold` [B, T, V]: see parity/tolerances.py."""
    input_mask = prompt[3]
    rounded = ref.forward(_bf16(params), config, *prompt)
    return relative_error(rounded[input_mask], gold[input_mask])


# --- Forward ---------------------------------------------------------------------------------


@settings(max_examples=_budget(8))
@given(cases())
def test_float32_logits_match_the_float64_reference(case):
    config, seed, batch = case
    params = _params(config, seed)
    params32 = _f32(params)
    for prompt in batch:
        input_mask = prompt[3]
        gold = ref.forward(params, config, *prompt)
        got = np.asarray(fast.forward(params32, config, *prompt))
        assert got.dtype == np.float32 and got.shape == gold.shape
        # Padding positions carry no prediction; every real position is compared.
        _check(got[input_mask], gold[input_mask], FAST_FLOAT32, "forward: fast float32 vs ref float64",
               _sensitivity(params, config, prompt, gold))


@settings(max_examples=_budget(6))
@given(cases())
def test_bfloat16_policy_stays_within_its_bound(case):
    config, seed, batch = case
    params = _params(config, seed)
    params16 = _bf16(params)
    for prompt in batch:
        input_mask = prompt[3]
        gold = ref.forward(params, config, *prompt)
        got = np.asarray(fast.forward(params16, config, *prompt, policy=BFLOAT16))
        _check(got[input_mask], gold[input_mask], BFLOAT16_FAST, "forward: fast BFLOAT16 policy vs ref float64",
               _sensitivity(params, config, prompt, gold))


def test_bfloat16_policy_really_rounds():
    # The bound above would also hold for a policy that silently computed in float32.
    config = ref.get_config("tiny-paligemma2")
    params = _params(config, 0)
    images, tokens, mask_ar, input_mask = _fixed_prompt(config)
    gold = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    f32 = np.asarray(fast.forward(_f32(params), config, images, tokens, mask_ar, input_mask))
    bf16 = np.asarray(fast.forward(_bf16(params), config, images, tokens, mask_ar, input_mask, policy=BFLOAT16))
    assert relative_error(bf16, gold) > 30 * relative_error(f32, gold)
    assert relative_error(bf16, gold) > 1e-4


@settings(max_examples=_budget(5))
@given(cases(n_prompts=2), st.booleans())
def test_bfloat16_params_with_float32_compute_round_where_the_reference_does(case, legacy):
    # big_vision's default: bfloat16 checkpoint, float32 activations, with two bfloat16 cast
    # points (sqrt(D) embedding scale, `1 + scale`) and optionally HF's legacy image rounding.
    # Both sides start from the same rounded weights, so they must agree to float32 accuracy.
    config, seed, batch = case
    config = config.replace(legacy_image_scaling=legacy)
    params = _params(config, seed)
    params16 = _bf16(params)
    for prompt in batch:
        input_mask = prompt[3]
        gold = ref.forward(params16, config, *prompt)  # float32 activations
        got = np.asarray(fast.forward(params16, config, *prompt, policy=FLOAT32))
        exact = ref.forward(params, config, *prompt)
        _check(got[input_mask], gold[input_mask], SAME_ROUNDING_FLOAT32,
               "forward: fast vs ref, both bfloat16 weights and float32 activations",
               relative_error(gold[input_mask], exact[input_mask]))


# --- Prefill + extend ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_new_tokens"))
def _prefill(params, images, tokens, mask_ar, input_mask, config, policy, max_new_tokens):
    rope = fast_gemma.rope_table(config.vision.num_patches + tokens.shape[1] + max_new_tokens,
                                 config.llm.head_dim, config.llm.rope_base)
    return fast_decode.prefill(params, config, images, tokens, mask_ar, input_mask, max_new_tokens, policy, rope)


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def _extend(params, cache, tokens, config, policy):
    rope = fast_gemma.rope_table(cache.valid.shape[1], config.llm.head_dim, config.llm.rope_base)
    return fast_decode.extend(params, config, cache, tokens, policy, rope)


def _int32(prompt):
    """A prompt as the jitted functions take it (int32 ids and masks)."""
    images, tokens, mask_ar, input_mask = prompt
    return images, tokens.astype(np.int32), mask_ar.astype(np.int32), input_mask


def _fast_cached_logits(params, config, prompt, continuation, policy):
    """fast prefill, then one extend per continuation token: (logits [B, steps + 1, V], cache)."""
    steps = continuation.shape[1]
    cache, logits = _prefill(params, *_int32(prompt), config=config, policy=policy, max_new_tokens=steps)
    out = [logits]
    for s in range(steps):
        cache, logits = _extend(params, cache, jnp.asarray(continuation[:, s], jnp.int32), config=config,
                                policy=policy)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], axis=1), cache


def _reference_cache(params, config, prompt, continuation, cache_dtype=None):
    """ref's KV cache after prefill and one extend per continuation token (as `_fast_cached_logits`)."""
    cache, _ = ref.prefill(params, config, *prompt, max_new_tokens=continuation.shape[1], cache_dtype=cache_dtype)
    for s in range(continuation.shape[1]):
        ref.extend(params, config, cache, continuation[:, s])
    return cache


def _check_bookkeeping(got, expected):
    """Same slots valid, same positions, lengths and next slot."""
    np.testing.assert_array_equal(np.asarray(got.valid), expected.valid)
    np.testing.assert_array_equal(np.asarray(got.positions), expected.positions)
    np.testing.assert_array_equal(np.asarray(got.lengths), expected.lengths)
    assert int(got.next_slot) == expected.next_slot


def _reference_full_forward(params, config, prompt, continuation):
    """ref's uncached forward over prompt + continuation: logits [B, steps + 1, V] predicting each
    continuation token and the one after.

    The continuation is appended after the prompt's padding, which the reference allows (padding
    starts no block and takes no position), so the whole batch runs in one call.
    """
    images, tokens, mask_ar, input_mask = prompt
    B, T = tokens.shape
    steps = continuation.shape[1]
    logits = ref.forward(params, config, images, np.concatenate([tokens, continuation], axis=1),
                         np.concatenate([mask_ar, np.ones((B, steps), np.int64)], axis=1),
                         np.concatenate([input_mask, np.ones((B, steps), bool)], axis=1))
    last = T - 1 - np.argmax(input_mask[:, ::-1], axis=1)  # [B] last real prompt token
    return np.concatenate([logits[np.arange(B), last][:, None], logits[:, T:]], axis=1)


@settings(max_examples=_budget(5))
@given(cases(n_prompts=2), st.integers(0, 2**31 - 1))
def test_prefill_and_extend_reproduce_the_reference_full_forward(case, seed):
    config, seed_params, batch = case
    params = _params(config, seed_params)
    rng = np.random.default_rng(seed)
    for prompt in batch:
        continuation = rng.integers(0, config.llm.vocab_size, (B_MAX, MAX_NEW))
        gold = _reference_full_forward(params, config, prompt, continuation)
        sensitivity = relative_error(_reference_full_forward(_bf16(params), config, prompt, continuation), gold)
        got, cache = _fast_cached_logits(_f32(params), config, prompt, continuation, FLOAT32)
        assert cache.k.dtype == jnp.float32
        _check(got, gold, FAST_FLOAT32, "prefill + extend: fast float32 vs ref float64 uncached forward", sensitivity)
        # The cache itself: same layout (layer, example, slot, kv head), same keys and values.
        expected = _reference_cache(params, config, prompt, continuation)
        _check_bookkeeping(cache, expected)
        for name in ("k", "v"):
            _check(np.asarray(getattr(cache, name)), getattr(expected, name), FAST_FLOAT32,
                   f"KV cache {name}: fast float32 vs ref float64", sensitivity)


@settings(max_examples=_budget(4))
@given(cases(n_prompts=2), st.integers(0, 2**31 - 1))
def test_bfloat16_kv_cache_stays_within_its_bound(case, seed):
    config, seed_params, batch = case
    params = _params(config, seed_params)
    rng = np.random.default_rng(seed)
    policy = Policy(cache_dtype="bfloat16")  # float32 compute, big_vision's bfloat16 cache
    for prompt in batch:
        continuation = rng.integers(0, config.llm.vocab_size, (B_MAX, MAX_NEW))
        gold = _reference_full_forward(params, config, prompt, continuation)
        sensitivity = relative_error(_reference_full_forward(_bf16(params), config, prompt, continuation), gold)
        got, cache = _fast_cached_logits(_f32(params), config, prompt, continuation, policy)
        assert cache.k.dtype == jnp.bfloat16 and cache.v.dtype == jnp.bfloat16
        _check(got, gold, BFLOAT16_CACHE, "prefill + extend: fast float32 with bfloat16 KV cache vs ref float64",
               sensitivity)
        # Prefill attention must read its keys and values back through the cache (rounded), as
        # big_vision does, not use the unrounded ones it just computed.
        _, unrounded = _prefill(_f32(params), *_int32(prompt), config=config, policy=FLOAT32, max_new_tokens=MAX_NEW)
        assert np.any(got[:, 0] != np.asarray(unrounded)), "prefill logits ignore the bfloat16 cache"
        # The rounding happened where the reference's bfloat16 cache puts it (prefill included):
        # the stored keys and values are the reference's, rounded alike, except where a float32
        # value sits within its error of a rounding boundary (then one bfloat16 step, at most
        # 2^-7 relative, apart, plus that float32 error, which matters for values near zero).
        expected = _reference_cache(params, config, prompt, continuation, ml_dtypes.bfloat16)
        _check_bookkeeping(cache, expected)
        for name in ("k", "v"):
            # Layer 0 only: deeper layers read the rounded cache, so one flipped value below
            # nudges everything above it; layer 0's keys and values come from the embeddings.
            a = np.asarray(getattr(cache, name)[0]).astype(np.float64)
            e = getattr(expected, name)[0].astype(np.float64)
            differ = a != e
            near = np.abs(a - e) <= 2**-7 * np.abs(e) + 2 * FAST_FLOAT32.bound(sensitivity) * np.abs(e).max()
            assert near.all(), f"cache {name}: {(~near).sum()} values more than a bfloat16 step from the reference's"
            assert differ.sum() <= max(3, 0.02 * differ.size), f"cache {name}: {differ.sum()} of {differ.size} differ"
            _record(f"bfloat16 KV cache {name} (layer 0): fraction of values one step from ref's", differ.mean())


# --- Greedy decoding ------------------------------------------------------------------------


def _reference_logits_along(params, config, prompt, generated):
    """ref's logits at every step of a given continuation (teacher forcing through its own
    prefill / extend): [B, steps, V], row t predicting `generated[:, t]`."""
    steps = generated.shape[1]
    cache, logits = ref.prefill(params, config, *prompt, max_new_tokens=steps)
    out = [logits]
    for t in range(steps - 1):
        out.append(ref.extend(params, config, cache, generated[:, t]))
    return np.stack(out, axis=1)


def _forced(params, config, prompt, generated):
    """(ref's float64 logits along `generated` [B, steps, V], their sensitivity)."""
    forced = _reference_logits_along(params, config, prompt, generated)
    rounded = _reference_logits_along(_bf16(params), config, prompt, generated)
    return forced, relative_error(rounded, forced)


def _slack(logits, sensitivity):
    """Largest plausible |fast - ref| of a difference of two float32 logits (a top-2 gap, a
    log-probability): twice the FAST_FLOAT32 bound, which is relative to the largest |logit|."""
    return 2 * FAST_FLOAT32.bound(sensitivity) * np.abs(logits).max()


def _check_logprobs(config, got, forced, sensitivity):
    """fast's log-probabilities are the reference's log-softmax of the chosen tokens, and 0 after EOS."""
    for b, n in enumerate(got.lengths(config.eos_id)):
        expected = log_softmax(forced[b, :n])[np.arange(n), got.tokens[b, :n]]
        np.testing.assert_allclose(got.logprobs[b, :n], expected, rtol=0, atol=_slack(forced[b, :n], sensitivity))
        assert np.all(got.tokens[b, n:] == config.pad_id) and np.all(got.logprobs[b, n:] == 0.0)


def _check_greedy(config, got, expected, forced, sensitivity):
    """`got` (fast) against `expected` (ref), both greedy; `forced`: ref logits along got's tokens.

    Every token fast chose must be the reference's argmax, unless the reference's best logit
    beats it by no more than float32 noise (a near-tie). Up to the first step where the
    reference's top two logits are that close, the tokens must be identical, and with no such
    step the whole outputs are (tokens, EOS position, padding). Returns the near-tie count.
    """
    ties = 0
    for b, n in enumerate(got.lengths(config.eos_id)):
        rows = forced[b, :n]  # [n, V]
        slack = _slack(rows, sensitivity)
        chosen = rows[np.arange(n), got.tokens[b, :n]]
        behind = rows.max(axis=-1) - chosen
        assert np.all(behind <= slack), (
            f"example {b}: fast chose tokens {got.tokens[b, :n]} but the reference's best logit beats them by "
            f"{behind} (slack {slack:.3g}); reference greedy gives {expected.tokens[b]}")
        top2 = np.sort(rows, axis=-1)[:, -2:]  # [n, 2]
        near = np.flatnonzero(top2[:, 1] - top2[:, 0] <= slack)
        if near.size:
            ties += 1
            np.testing.assert_array_equal(got.tokens[b, :near[0]], expected.tokens[b, :near[0]])
        else:
            np.testing.assert_array_equal(got.tokens[b], expected.tokens[b])
            np.testing.assert_allclose(got.logprobs[b], expected.logprobs[b], rtol=0, atol=slack)
    return ties


@settings(max_examples=_budget(6))
@given(cases(vocab_size=8))  # a small vocabulary: EOS comes often, so stopping is exercised
def test_greedy_tokens_are_identical(case):
    config, seed, batch = case
    params = _params(config, seed)
    params32 = _f32(params)
    for prompt in batch:
        got = fast.generate(params32, config, *prompt, max_new_tokens=MAX_NEW)
        expected = ref.generate(params, config, *prompt, max_new_tokens=MAX_NEW)
        forced, sensitivity = _forced(params, config, prompt, got.tokens)
        _check_logprobs(config, got, forced, sensitivity)
        _count("greedy near-tie examples", _check_greedy(config, got, expected, forced, sensitivity))
        _count("greedy examples", B_MAX)


# --- Beam search ----------------------------------------------------------------------------


def _reference_beam_margins(params, config, prompt, beams, max_new):
    """Replays the reference's beam search (ref/decode.py `beam_search`, same steps) and returns
    `(tokens [B, max_new], margins [B], scale)`: for each example the smallest score gap at any
    decision the search took (which finished hypothesis wins, whether it beats the best so far,
    which candidates survive the cut to `beams`, whether to stop), and the largest |logit| seen.

    A decision closer than float32 noise may go either way in float32 and change everything
    after it; with larger margins fast must reproduce the reference exactly.
    """
    cache, logits = ref.prefill(params, config, *prompt, max_new_tokens=max_new)
    B, V = logits.shape
    eos = config.eos_id
    cache = cache.select(np.repeat(np.arange(B), beams))
    logits = np.repeat(logits, beams, axis=0)
    scores = np.full((B, beams), -np.inf)
    scores[:, 0] = 0.0
    live = np.zeros((B, beams, 0), np.int64)
    best = np.full(B, -np.inf)
    best_tokens = np.full((B, max_new), config.pad_id, np.int64)
    margins, scale = np.full(B, np.inf), 0.0
    rows = np.arange(B)[:, None]

    def gap(a, b):  # |a - b|, where a comparison involving -inf is never close
        with np.errstate(invalid="ignore"):
            d = np.abs(a - b)
        return np.where(np.isfinite(a) & np.isfinite(b), d, np.inf)

    for step in range(max_new):
        scale = max(scale, float(np.abs(logits).max()))
        logp = log_softmax(logits).reshape(B, beams, V)
        finished = scores + logp[..., eos]  # [B, beams]
        ranked = np.sort(finished, axis=1)[:, ::-1]  # [B, beams]
        margins = np.minimum(margins, gap(ranked[:, 0], best))  # does the winner beat the best so far?
        # Which one wins matters only if the runner-up beats the best too (otherwise a close
        # runner-up means a winner close to `best`, caught just above).
        if beams > 1:
            contested = ranked[:, 1] > best
            margins = np.minimum(margins, np.where(contested, gap(ranked[:, 0], ranked[:, 1]), np.inf))
        w = np.argmax(finished, axis=1)
        for b in np.flatnonzero(finished[np.arange(B), w] > best):
            best[b] = finished[b, w[b]]
            best_tokens[b] = config.pad_id
            best_tokens[b, :step], best_tokens[b, step] = live[b, w[b]], eos
        if step + 1 == max_new:
            break
        candidates = scores[..., None] + logp
        candidates[..., eos] = -np.inf
        flat = candidates.reshape(B, beams * V)
        order = np.argsort(-flat, axis=1, kind="stable")
        margins = np.minimum(margins, gap(flat[rows[:, 0], order[:, beams - 1]], flat[rows[:, 0], order[:, beams]]))
        top = order[:, :beams]
        parent, token = top // V, top % V
        scores = np.take_along_axis(flat, top, axis=1)
        live = np.concatenate([live[rows, parent], token[..., None]], axis=-1)
        margins = np.minimum(margins, gap(scores.max(axis=1), best))
        if np.all(scores.max(axis=1) < best):
            break
        cache = cache.select((rows * beams + parent).reshape(-1))
        logits = ref.extend(params, config, cache, token.reshape(-1))
    return best_tokens, margins, scale


def _confident(params, factor=3.0):
    """The same model with its (tied) embedding scaled up: logits `factor` times larger.

    Random tiny models are unsure of every token, so beam search (which sums log-probabilities
    without length normalisation) nearly always ends at the first step with EOS: 70 of 75
    results had length 1. Sharper logits, as trained models have, spread the lengths over the
    whole range, so the search, its cache reordering and its stopping rule are all exercised.
    """
    llm = dict(params["llm"], embedder={"input_embedding": params["llm"]["embedder"]["input_embedding"] * factor})
    return dict(params, llm=llm)


@settings(max_examples=_budget(5))
# Many prompts per model: they are cheap (one compilation per config and beam size), and a
# beam-search bug often shows only in the few results that descend from a non-leading beam
# (a cache reordering bug changed 3% of the results), so the test needs volume to see it.
@given(cases(n_prompts=16, vocab_size=8), st.integers(2, 3))
def test_beam_search_results_are_identical(case, beams):
    config, seed, batch = case
    params = _confident(_params(config, seed))
    params32 = _f32(params)
    sampler, max_new = f"beam({beams})", MAX_NEW + 1
    for prompt in batch:
        got = fast.generate(params32, config, *prompt, max_new_tokens=max_new, sampler=sampler)
        expected = ref.generate(params, config, *prompt, max_new_tokens=max_new, sampler=sampler)
        replayed, margins, scale = _reference_beam_margins(params, config, prompt, beams, max_new)
        np.testing.assert_array_equal(replayed, expected.tokens)  # the replay is faithful
        # fast's logprobs must be the reference's for fast's own tokens, near-ties or not.
        forced, sensitivity = _forced(params, config, prompt, got.tokens)
        _check_logprobs(config, got, forced, sensitivity)
        # A score sums up to max_new log-probabilities, each off by up to one slack; two scores
        # closer than twice that may be ordered either way.
        slack = _slack(np.array([scale]), sensitivity)
        clear = margins > 2 * max_new * slack
        _count("beam examples", B_MAX)
        _count("beam near-tie examples", int((~clear).sum()))
        _count("beam results longer than one token", int((expected.lengths(config.eos_id) > 1).sum()))
        np.testing.assert_array_equal(got.tokens[clear], expected.tokens[clear])
        np.testing.assert_allclose(got.logprobs[clear], expected.logprobs[clear], rtol=0, atol=slack)


def test_wide_beam_search_matches_the_reference():
    # More beams than the vocabulary: with as many beams as live sequences ((V - 1)^(steps - 1)
    # = 64) the search is exhaustive, and the reference then returns the most likely
    # EOS-terminated sequence (tests/test_decode.py). Seed picked for results 2 and 4 long.
    config = ref.get_config("tiny-paligemma2", vocab_size=5)
    params = _confident(_params(config, 1), 2.0)
    prompt = (np.full((2, 28, 28, 3), 0.3), np.array([[2, 3, 4], [2, 4, 0]]), np.array([[0, 0, 1], [0, 1, 1]]),
              np.array([[True, True, True], [True, True, False]]))
    beams, max_new = 64, 4
    got = fast.generate(_f32(params), config, *prompt, max_new_tokens=max_new, sampler=f"beam({beams})")
    expected = ref.generate(params, config, *prompt, max_new_tokens=max_new, sampler=f"beam({beams})")
    _, margins, scale = _reference_beam_margins(params, config, prompt, beams, max_new)
    _, sensitivity = _forced(params, config, prompt, got.tokens)
    slack = _slack(np.array([scale]), sensitivity)
    assert np.all(margins > 2 * max_new * slack)  # no near-ties in these fixed cases
    assert np.all(expected.lengths(config.eos_id) > 1)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=0, atol=slack)


# --- Remat ----------------------------------------------------------------------------------


def _cross_entropy_np(logits, targets, weights):
    """Mean next-token cross-entropy over real positions, float64 NumPy."""
    nll = -np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return float((nll * weights).sum() / weights.sum())


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def _loss_and_grad(params, images, tokens, mask_ar, input_mask, targets, config, policy):
    def loss(p):
        logits = fast_model._forward(p, images, tokens, mask_ar, input_mask, config, policy)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        w = input_mask.astype(jnp.float32)
        return (nll * w).sum() / w.sum()

    return jax.value_and_grad(loss)(params)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


@settings(max_examples=_budget(3))
@given(cases(n_prompts=1), st.integers(0, 2**31 - 1))
def test_remat_changes_neither_outputs_nor_gradients(case, seed):
    config, seed_params, (prompt,) = case
    images, tokens, mask_ar, input_mask = prompt
    params = _params(config, seed_params)
    params32 = _f32(params)
    remat = Policy(remat="full")  # jax.checkpoint around every layer of both towers

    targets = np.random.default_rng(seed).integers(0, config.llm.vocab_size, tokens.shape)
    args = (images, tokens.astype(np.int32), mask_ar.astype(np.int32), input_mask, targets.astype(np.int32))
    loss, grads = _loss_and_grad(params32, *args, config=config, policy=FLOAT32)
    loss_r, grads_r = _loss_and_grad(params32, *args, config=config, policy=remat)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(grads_r)
    gold = ref.forward(params, config, *prompt)
    sensitivity = _sensitivity(params, config, prompt, gold)
    g, g_r = _flat(grads), _flat(grads_r)
    _check(g_r, g, FLOAT32_REORDERED, "remat: gradient vs plain", sensitivity)
    _check(np.array([loss_r]), np.array([loss]), FLOAT32_REORDERED, "remat: loss vs plain", sensitivity)

    # Both could be wrong the same way: check the gradient itself against a float64 finite
    # difference of the reference, along the gradient's own direction (where d loss = |g|).
    # Fourth-order stencil with a small step: tiny models can be so curved along g that a plain
    # central difference at 1e-4 is off by 3e-4; here truncation is ~1e-20 x the fifth
    # derivative and float64 rounding ~1e-10 absolute.
    gold_loss = _cross_entropy_np(gold, targets, input_mask)
    _check(np.array([loss]), np.array([gold_loss]), FAST_FLOAT32, "loss: fast float32 vs ref float64", sensitivity)
    norm = np.linalg.norm(g)
    step = 1e-5
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = np.cumsum([0] + [x.size for x in leaves])
    direction = [(g[a:b] / norm).reshape(x.shape) for a, b, x in zip(sizes[:-1], sizes[1:], leaves)]
    moved = lambda t: jax.tree_util.tree_unflatten(treedef, [x + t * d for x, d in zip(leaves, direction)])  # noqa: E731
    loss_at = {k: _cross_entropy_np(ref.forward(moved(k * step), config, *prompt), targets, input_mask)
               for k in (-2, -1, 1, 2)}
    slope = (8 * (loss_at[1] - loss_at[-1]) - (loss_at[2] - loss_at[-2])) / (12 * step)
    _check(np.array([norm]), np.array([slope]), GRADIENT_FLOAT32,
           "gradient: |fast float32 gradient| vs ref float64 slope along it", sensitivity)


# --- Sampling -------------------------------------------------------------------------------

SAMPLERS = ["temperature(1.5)", "top_k(3)", "top_k(5, 0.7)", "nucleus(0.8)", "nucleus(0.5, 2.0)"]


@settings(max_examples=_budget(60))
# The boundary: one certain token (probability exactly 1 in float32) and p = 1. The cut keeps
# tokens whose cumulative probability *before* them is below p, so the impossible ones go.
@example(values=[[0] + [-400] * 11], kind="nucleus", k=1, p=1.0, temperature=1.0)
@given(st.lists(st.lists(st.integers(-8, 8), min_size=12, max_size=12), min_size=1, max_size=4),
       st.sampled_from(["temperature", "top_k", "nucleus"]), st.integers(1, 14), st.floats(0.01, 1.0),
       st.sampled_from([0.5, 1.0, 1.7]))
def test_sampling_logits_follow_the_reference_rules(values, kind, k, p, temperature):
    # Integer halves in float32: ties happen (top-k and nucleus keep every tied token) and every
    # probability is a float32 the two sides compute alike, up to summation order.
    logits = (np.array(values, np.float32) / 2)
    sampler = ref.Sampler(kind, temperature=temperature, top_k=k, top_p=p)
    expected = ref_sampling_logits(logits, sampler)
    got = np.asarray(fast_decode.sampling_logits(jnp.asarray(logits), sampler))
    if kind == "nucleus":
        # A cumulative probability within float32 rounding of p (but not exactly p) may be cut
        # either way; exact cases, like the example above, must agree.
        ordered = np.sort(logits.astype(np.float64) / temperature, axis=-1)[:, ::-1]
        cumulative = np.cumsum(np.exp(ordered - ordered[:, :1]), axis=-1)
        cumulative /= cumulative[:, -1:]
        if np.any((np.abs(cumulative - p) < 1e-6) & (cumulative != p)):
            return
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    # Equal up to an ulp or two: XLA may divide by the temperature as a multiplication by 1/t.
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)


@pytest.mark.parametrize("spec", ["temperature(2.0)", "top_k(3, 0.7)", "nucleus(0.8)", "nucleus(0.6, 1.5)"])
def test_fast_sampler_draws_from_the_truncated_softmax(spec):
    sampler = ref.parse_sampler(spec)
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5, 1.0]], np.float32)
    n = 40_000
    draws = np.asarray(fast_decode.sample(jnp.tile(jnp.asarray(logits), (n, 1)), sampler, jax.random.PRNGKey(0)))
    freq = np.bincount(draws, minlength=6) / n
    cut = ref_sampling_logits(logits.astype(np.float64), sampler)[0]
    p = np.exp(cut - cut.max())
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)
    assert np.all(freq[~np.isfinite(cut)] == 0)


def _fixed_prompt(config, B=B_MAX, T=T_MAX, seed=3):
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    tokens = rng.integers(3, config.llm.vocab_size, (B, T))
    input_mask = np.arange(T)[None] < np.array([T, 3, 5][:B])[:, None]
    mask_ar = np.where(np.arange(T)[None] < np.array([4, 2, 5][:B])[:, None], 0, 1)
    return rng.uniform(-1, 1, (B, R, R, 3)), np.where(input_mask, tokens, config.pad_id), mask_ar, input_mask


def _allowed(logits, sampler, slack):
    """[B, V] bool: tokens the reference's sampler may pick, widened by float32 noise: any token
    within `slack` (absolute logit error) of the cut, with nucleus' p raised to match."""
    if sampler.kind == "top_k":
        kth = np.sort(logits, axis=-1)[:, -min(sampler.top_k, logits.shape[-1])][:, None]
        return logits >= kth - slack
    if sampler.kind == "nucleus":
        wider = dataclasses.replace(sampler, top_p=min(1.0, sampler.top_p + 2 * slack / sampler.temperature))
        cut = ref_sampling_logits(logits, wider)
        floor = np.where(np.isfinite(cut), logits, np.inf).min(axis=-1, keepdims=True)
        return logits >= floor - slack
    return np.ones(logits.shape, bool)


SAMPLING_CONFIG = ref.get_config("tiny-paligemma2", vocab_size=16)


@pytest.mark.parametrize("spec", SAMPLERS)
@settings(max_examples=_budget(4))
@given(seed=st.integers(0, 2**31 - 1), params_seed=st.integers(0, 1000))
def test_sampling_is_seeded_and_stays_in_the_allowed_set(spec, seed, params_seed):
    config = SAMPLING_CONFIG
    params = _params(config, params_seed)
    params32 = _f32(params)
    prompt = _fixed_prompt(config, seed=params_seed)
    sampler = ref.parse_sampler(spec)
    got = fast.generate(params32, config, *prompt, max_new_tokens=MAX_NEW, sampler=spec, seed=seed)
    again = fast.generate(params32, config, *prompt, max_new_tokens=MAX_NEW, sampler=spec, seed=seed)
    np.testing.assert_array_equal(got.tokens, again.tokens)
    np.testing.assert_array_equal(got.logprobs, again.logprobs)
    forced, sensitivity = _forced(params, config, prompt, got.tokens)
    _check_logprobs(config, got, forced, sensitivity)
    for b, n in enumerate(got.lengths(config.eos_id)):
        allowed = _allowed(forced[b, :n], sampler, _slack(forced[b, :n], sensitivity))  # [n, V]
        picked = allowed[np.arange(n), got.tokens[b, :n]]
        assert picked.all(), f"{spec}: example {b} drew tokens {got.tokens[b, :n]} outside the allowed sets"


@pytest.mark.parametrize("spec", SAMPLERS)
def test_different_seeds_give_different_samples(spec):
    config = SAMPLING_CONFIG
    params32 = _f32(_params(config, 0))
    prompt = _fixed_prompt(config)
    runs = [fast.generate(params32, config, *prompt, max_new_tokens=MAX_NEW, sampler=spec, seed=s).tokens
            for s in range(4)]
    assert any(not np.array_equal(runs[0], r) for r in runs[1:])


# --- Input validation -----------------------------------------------------------------------

CONFIG = ref.get_config("tiny-paligemma")
GOOD = dict(images=np.zeros((1, 28, 28, 3)), tokens=np.array([[2, 5, 108]]), mask_ar=np.array([[0, 0, 0]]))

BAD_FORWARD = [
    dict(images=np.zeros((1, 32, 32, 3))),
    dict(images=np.zeros((28, 28, 3))),
    dict(images=np.full((1, 28, 28, 3), 255.0)),
    dict(images=np.full((1, 28, 28, 3), np.nan)),
    dict(images=np.zeros((1, 28, 28, 3), np.uint8)),
    dict(tokens=np.array([[2, 300, 108]])),
    dict(tokens=np.array([[2, -1, 108]])),
    dict(tokens=np.array([2, 5, 108])),
    dict(tokens=np.array([[2.0, 5.0, 108.0]])),
    dict(tokens=np.array([[2, 5, 108]] * 2), mask_ar=np.zeros((2, 3))),
    dict(mask_ar=np.array([[0, 0]])),
    dict(input_mask=np.ones((1, 4), bool)),
]

BAD_GENERATE = [
    dict(max_new_tokens=0),
    dict(max_new_tokens=2.5),
    dict(max_new_tokens=True),
    dict(sampler="topp(0.9)"),
    dict(sampler="nucleus(1.5)"),
    dict(sampler="temperature(0)"),
    dict(sampler="top_k(0)"),
    dict(sampler="beam(x)"),
    dict(input_mask=np.zeros((1, 3), bool)),
    dict(tokens=np.array([[2, 300, 108]])),
]


def _error(fn, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(**kwargs)
    return str(info.value)


@pytest.mark.parametrize("change", BAD_FORWARD)
def test_forward_rejects_bad_input_as_the_reference_does(change):
    kwargs = {**GOOD, **change}
    params = _params(CONFIG, 0)
    expected = _error(lambda **kw: ref.forward(params, CONFIG, **kw), **kwargs)
    assert _error(lambda **kw: fast.forward(_f32(params), CONFIG, **kw), **kwargs) == expected


@pytest.mark.parametrize("change", BAD_GENERATE)
def test_generate_rejects_bad_arguments_as_the_reference_does(change):
    kwargs = {**GOOD, **change}
    params = _params(CONFIG, 0)
    expected = _error(lambda **kw: ref.generate(params, CONFIG, **kw), **kwargs)
    assert _error(lambda **kw: fast.generate(_f32(params), CONFIG, **kw), **kwargs) == expected


@pytest.mark.parametrize("field, value", [("compute_dtype", "float16"), ("cache_dtype", "int8"),
                                          ("attention_impl", "flash"), ("remat", "dots")])
def test_policy_rejects_unknown_choices(field, value):
    with pytest.raises(ValueError, match=rf"Policy: {field} must be one of .*, got '{value}'"):
        Policy(**{field: value})
