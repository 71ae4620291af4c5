import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paligemma import ref
from paligemma.parity.strategies import configs, prompts
from paligemma.ref.decode import sample, sampling_logits
from paligemma.ref.ops import log_softmax

TINY = ["tiny-paligemma", "tiny-paligemma2", "tiny-paligemma2-28b"]


def _params(config, seed=0):
    return ref.init_params(config, seed=seed, dtype=np.float64, random_norms=True)


def _example(prompt, b):
    """Example b alone, without its padding."""
    images, tokens, mask_ar, input_mask = prompt
    n = int(input_mask[b].sum())
    return images[b:b + 1], tokens[b:b + 1, :n], mask_ar[b:b + 1, :n]


def _full_forward_logits(params, config, prompt, b, continuation):
    """Logits predicting each continuation token of example b, by one uncached forward."""
    images, tokens, mask_ar = _example(prompt, b)
    n = tokens.shape[1]
    seq = np.concatenate([tokens, continuation[None]], axis=1)
    ar = np.concatenate([mask_ar, np.ones((1, len(continuation)), np.int64)], axis=1)
    return ref.forward(params, config, images, seq, ar)[0, n - 1:]  # [len(continuation) + 1, V]


def _check_cache_against_forward(config, params, prompt, steps, seed):
    images, tokens, mask_ar, input_mask = prompt
    B = len(tokens)
    continuation = np.random.default_rng(seed).integers(0, config.llm.vocab_size, (B, steps))
    cache, logits = ref.prefill(params, config, images, tokens, mask_ar, input_mask, steps)
    cached = [logits]
    for s in range(steps):
        cached.append(ref.extend(params, config, cache, continuation[:, s]))
    cached = np.stack(cached, axis=1)  # [B, steps + 1, V]
    for b in range(B):
        full = _full_forward_logits(params, config, prompt, b, continuation[b])
        np.testing.assert_allclose(cached[b], full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("window", [None, 3])
def test_cached_decoding_reproduces_full_forward(name, window):
    config = ref.get_config(name, sliding_window=window)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 300, (3, 7))
    input_mask = np.array([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2], bool)
    mask_ar = np.array([[0] * 4 + [1] * 3, [0] * 2 + [1] * 5, [0] * 5 + [1] * 2])
    prompt = (rng.uniform(-1, 1, (3, 28, 28, 3)), tokens, mask_ar, input_mask)
    _check_cache_against_forward(config, _params(config), prompt, steps=6, seed=1)


@given(configs(), st.data(), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cached_decoding_reproduces_full_forward_any_config(config, data, steps, seed):
    prompt = data.draw(prompts(config))
    _check_cache_against_forward(config, _params(config, seed % 1000), prompt, steps, seed)


def _greedy_without_cache(params, config, prompt, b, max_new):
    out = []
    for _ in range(max_new):
        token = int(np.argmax(_full_forward_logits(params, config, prompt, b, np.array(out, np.int64))[-1]))
        out.append(token)
        if token == config.eos_id:
            break
    return out


@given(configs(vocab_size=6), st.data())
def test_greedy_equals_uncached_argmax_and_stops_at_eos(config, data):
    prompt = data.draw(prompts(config))
    params = _params(config)
    gen = ref.generate(params, config, *prompt, max_new_tokens=4)
    lengths = gen.lengths(config.eos_id)
    for b in range(len(prompt[1])):
        expected = _greedy_without_cache(params, config, prompt, b, 4)
        assert list(gen.tokens[b, :lengths[b]]) == expected
        assert np.all(gen.tokens[b, lengths[b]:] == config.pad_id)
        assert np.all(gen.logprobs[b, lengths[b]:] == 0.0)


@pytest.mark.parametrize("sampler", ["greedy", "beam(3)"])
@pytest.mark.parametrize("name", TINY)
def test_batch_of_different_lengths_equals_each_alone(name, sampler):
    config = ref.get_config(name, vocab_size=8)
    params = _params(config)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 8, (3, 6))
    input_mask = np.array([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2], bool)
    mask_ar = np.array([[0] * 6, [0] * 2 + [1] * 4, [0] * 3 + [1] * 3])
    prompt = (rng.uniform(-1, 1, (3, 28, 28, 3)), tokens, mask_ar, input_mask)
    batched = ref.generate(params, config, *prompt, max_new_tokens=5, sampler=sampler)
    for b in range(3):
        alone = ref.generate(params, config, *_example(prompt, b), max_new_tokens=5, sampler=sampler)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(batched.logprobs[b], alone.logprobs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler", ["temperature(1.5)", "top_k(3)", "nucleus(0.8)", "greedy"])
def test_logprobs_are_the_model_log_softmax_of_each_token(sampler):
    config = ref.get_config("tiny-paligemma2", vocab_size=5)
    params = _params(config)
    prompt = (np.zeros((2, 28, 28, 3)), np.array([[2, 4, 3], [2, 3, 0]]), np.array([[0, 0, 1], [0, 0, 1]]),
              np.array([[1, 1, 1], [1, 1, 0]], bool))
    gen = ref.generate(params, config, *prompt, max_new_tokens=6, sampler=sampler, seed=7)
    lengths = gen.lengths(config.eos_id)
    for b in range(2):
        produced = gen.tokens[b, :lengths[b]]
        logits = _full_forward_logits(params, config, prompt, b, produced)[:-1]  # [n, V]
        expected = log_softmax(logits)[np.arange(len(produced)), produced]
        np.testing.assert_allclose(gen.logprobs[b, :lengths[b]], expected, rtol=1e-10)


def test_sampling_is_seeded():
    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    prompt = (np.zeros((2, 28, 28, 3)), np.array([[2, 7, 108]] * 2), np.zeros((2, 3), np.int64))
    runs = [ref.generate(params, config, *prompt, max_new_tokens=6, sampler="temperature(2.0)", seed=s).tokens
            for s in (11, 11, 12)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_temperature_sampling_follows_the_softmax():
    logits = np.tile(np.array([[2.0, 1.0, 0.0, -1.0, 0.5]]), (40_000, 1))
    rng = np.random.default_rng(0)
    for t in (0.5, 1.0, 2.0):
        draws = sample(logits, ref.parse_sampler(f"temperature({t})"), rng)
        freq = np.bincount(draws, minlength=5) / len(draws)
        p = np.exp(logits[0] / t) / np.exp(logits[0] / t).sum()
        np.testing.assert_allclose(freq, p, atol=0.01)


def _nucleus_by_definition(logits, p):
    """Smallest set of most likely tokens whose probability reaches p (ties with its last kept)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    kept, total = set(), 0.0
    for i in sorted(range(len(logits)), key=lambda i: -logits[i]):
        if total >= p:
            break
        kept.add(i)
        total += probs[i]
    floor = min(logits[i] for i in kept)
    return {i for i in range(len(logits)) if logits[i] >= floor}


@given(st.lists(st.integers(-8, 8), min_size=2, max_size=12), st.floats(0.01, 1.0))
def test_nucleus_keeps_the_smallest_set_reaching_p(values, p):
    logits = np.array(values, dtype=np.float64) / 2  # integer halves: ties happen
    cut = sampling_logits(logits[None], ref.parse_sampler(f"nucleus({p})"))[0]
    assert set(np.flatnonzero(np.isfinite(cut))) == _nucleus_by_definition(logits, p)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12, unique=True), st.integers(1, 12))
def test_top_k_keeps_the_k_largest(values, k):
    logits = np.array(values)
    cut = sampling_logits(logits[None], ref.parse_sampler(f"top_k({k})"))[0]
    assert set(np.flatnonzero(np.isfinite(cut))) == set(np.argsort(-logits)[:k])


def test_beam_search_finds_the_best_sequence_exhaustively():
    # With beams >= every live sequence, beam search is exhaustive: it must find the most
    # likely EOS-terminated sequence, which we enumerate with full forwards.
    config = ref.get_config("tiny-paligemma2", vocab_size=4)
    params = _params(config, seed=4)
    prompt = (np.full((1, 28, 28, 3), 0.3), np.array([[2, 3, 0]]), np.array([[0, 0, 0]]))
    max_new = 4
    best, best_seq = -np.inf, None
    for n in range(max_new):
        for body in itertools.product([0, 2, 3], repeat=n):  # every non-EOS token
            seq = np.array(body + (config.eos_id,), np.int64)
            logits = _full_forward_logits(params, config, (*prompt, np.ones((1, 3), bool)), 0, seq)[:-1]
            score = log_softmax(logits)[np.arange(len(seq)), seq].sum()
            if score > best:
                best, best_seq = score, list(seq)
    gen = ref.generate(params, config, *prompt, max_new_tokens=max_new, sampler=f"beam({3 ** (max_new - 1)})")
    n = gen.lengths(config.eos_id)[0]
    assert list(gen.tokens[0, :n]) == best_seq
    assert gen.logprobs[0].sum() == pytest.approx(best, rel=1e-10)


def test_bfloat16_cache_rounds_keys_and_values():
    config = ref.get_config("tiny-paligemma2")
    params = _params(config)
    prompt = (np.zeros((1, 28, 28, 3)), np.array([[2, 7, 108]]), np.zeros((1, 3), np.int64))
    _, exact = ref.prefill(params, config, *prompt, np.ones((1, 3), bool), 1)
    _, rounded = ref.prefill(params, config, *prompt, np.ones((1, 3), bool), 1, cache_dtype=ml_dtypes.bfloat16)
    diff = np.abs(rounded - exact).max()
    assert 0 < diff < 0.05 * np.abs(exact).max()


GOOD = (np.zeros((1, 28, 28, 3)), np.array([[2, 5, 108]]), np.zeros((1, 3), np.int64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), r"max_new_tokens: expected an integer >= 1, got 0"),
    (dict(max_new_tokens=2.5), r"max_new_tokens: expected an integer >= 1, got 2.5"),
    (dict(sampler="topp(0.9)"), r"sampler: expected one of greedy, .*got 'topp\(0.9\)'"),
    (dict(sampler="nucleus(1.5)"), r"0 < p <= 1"),
    (dict(sampler="temperature(0)"), r"temperature > 0"),
    (dict(sampler="beam(x)"), r"sampler: expected numeric arguments in 'beam\(x\)'"),
    (dict(input_mask=np.zeros((1, 3), bool)), r"input_mask: expected at least one real token per example, got none in examples \[0\]"),
])
def test_bad_generate_arguments_are_named(kwargs, match):
    config = ref.get_config("tiny-paligemma")
    with pytest.raises(ValueError, match=match):
        ref.generate(_params(config), config, *GOOD, **kwargs)


def test_extend_rejects_bad_tokens_and_a_full_cache():
    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    cache, _ = ref.prefill(params, config, *GOOD, np.ones((1, 3), bool), 1)
    with pytest.raises(ValueError, match=r"tokens: expected 1 integer ids in \[0, 300\), got int64 \[1\] with values 300..300"):
        ref.extend(params, config, cache, np.array([300]))
    with pytest.raises(ValueError, match=r"tokens: expected 1 integer ids"):
        ref.extend(params, config, cache, np.array([1, 2]))
    ref.extend(params, config, cache, np.array([5]))
    with pytest.raises(ValueError, match=r"extend: the cache holds 20 slots and all are used"):
        ref.extend(params, config, cache, np.array([5]))
