"""Each component against an independent formula: explicit loops and textbook definitions."""

import math

import ml_dtypes
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from paligemma.ref import gemma, ops, siglip
from paligemma.ref.config import GemmaConfig

RNG = np.random.default_rng(0)


def test_patch_embed_is_a_strided_convolution():
    B, R, p, W = 2, 12, 4, 5
    images = RNG.normal(size=(B, R, R, 3))
    params = {"kernel": RNG.normal(size=(p, p, 3, W)), "bias": RNG.normal(size=W)}
    out = siglip.patch_embed(params, images, p)
    g = R // p
    for b in range(B):
        for row in range(g):
            for col in range(g):
                window = images[b, row * p:(row + 1) * p, col * p:(col + 1) * p, :]  # [p, p, 3]
                for w in range(W):
                    expected = np.sum(window * params["kernel"][..., w]) + params["bias"][w]
                    assert math.isclose(out[b, row * g + col, w], expected, rel_tol=1e-12, abs_tol=1e-12)


def test_layer_norm_matches_definition():
    x = RNG.normal(3.0, 2.0, size=(3, 4, 7))
    scale, bias = RNG.normal(size=7), RNG.normal(size=7)
    out = siglip.layer_norm(x, scale, bias, 1e-6)
    for idx in np.ndindex(*x.shape[:-1]):
        v = x[idx]
        mu = sum(v) / len(v)
        var = sum((vi - mu) ** 2 for vi in v) / len(v)
        expected = [(vi - mu) / math.sqrt(var + 1e-6) * s + c for vi, s, c in zip(v, scale, bias)]
        np.testing.assert_allclose(out[idx], expected, rtol=1e-12, atol=1e-12)


def test_rms_norm_matches_definition_with_one_plus_scale():
    x = RNG.normal(size=(2, 3, 6))
    scale = RNG.normal(size=6)
    out = gemma.rms_norm(x, scale)
    for idx in np.ndindex(*x.shape[:-1]):
        v = x[idx]
        rms = math.sqrt(sum(vi * vi for vi in v) / len(v) + 1e-6)
        np.testing.assert_allclose(out[idx], [vi / rms * (1 + s) for vi, s in zip(v, scale)], rtol=1e-12)


def test_rms_norm_forms_one_plus_scale_in_bfloat16():
    scale = np.array([0.0039, -0.3], dtype=ml_dtypes.bfloat16)
    x = np.ones((1, 2), np.float32)
    out = gemma.rms_norm(x, scale)
    expected = x * (1 + scale).astype(np.float32) / np.sqrt(np.float32(1 + 1e-6))
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == np.float32(1.0) / np.sqrt(np.float32(1 + 1e-6))  # 1.0039 rounds to 1 in bf16


def test_gelu_tanh_is_the_tanh_approximation_of_gelu():
    x = np.linspace(-6, 6, 101)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(ops.gelu_tanh(x), exact, atol=1e-3)
    tanh_formula = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in x]
    np.testing.assert_allclose(ops.gelu_tanh(x), tanh_formula, rtol=1e-9, atol=1e-14)


def test_embed_tokens_scales_by_sqrt_width_in_the_table_dtype():
    table = np.ones((5, 2048), dtype=ml_dtypes.bfloat16)
    out = gemma.embed_tokens({"input_embedding": table}, np.array([[1, 2]]), np.float32)
    assert out.dtype == np.float32 and np.all(out == 45.25)  # bf16(sqrt(2048)), not 45.2548
    table64 = RNG.normal(size=(5, 3))
    out64 = gemma.embed_tokens({"input_embedding": table64}, np.array([[4]]), np.float64)
    np.testing.assert_allclose(out64[0, 0], table64[4] * math.sqrt(3), rtol=1e-15)


def _rope_by_pairs(x, pos, base=10_000.0):
    """RoPE as complex rotation of the pairs (i, i + H/2)."""
    H = len(x)
    out = np.empty(H)
    for i in range(H // 2):
        theta = pos / base ** (2 * i / H)
        z = complex(x[i], x[i + H // 2]) * complex(math.cos(theta), math.sin(theta))
        out[i], out[i + H // 2] = z.real, z.imag
    return out


@given(st.integers(0, 5000), st.sampled_from([2, 8, 16, 72]), st.integers(0, 2**31 - 1))
def test_rope_is_rotate_half_rotation(position, H, seed):
    x = np.random.default_rng(seed).normal(size=(1, 1, 1, H))
    out = gemma.apply_rope(x, np.array([[position]]))
    np.testing.assert_allclose(out[0, 0, 0], _rope_by_pairs(x[0, 0, 0], position), rtol=1e-9, atol=1e-9)


@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(-500, 500),
       st.sampled_from([4, 16, 256]), st.integers(0, 2**31 - 1))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, H, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(1, 1, 1, H)), rng.normal(size=(1, 1, 1, H))

    def score(pq, pk):
        return np.sum(gemma.apply_rope(q, np.array([[pq]])) * gemma.apply_rope(k, np.array([[pk]])))

    shift = max(shift, -min(m, n))  # keep positions non-negative
    assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-7, abs_tol=1e-7)


def test_rope_preserves_norm_and_is_identity_at_zero():
    x = RNG.normal(size=(2, 3, 4, 16))
    pos = RNG.integers(0, 1000, size=(2, 3))
    np.testing.assert_allclose(np.linalg.norm(gemma.apply_rope(x, pos), axis=-1), np.linalg.norm(x, axis=-1))
    np.testing.assert_array_equal(gemma.apply_rope(x, np.zeros((2, 3), int)), x)


def _attend_by_loops(q, k, v, mask, softcap):
    """Per query head: repeat kv head n // G, softmax over visible keys (zeros if none)."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            for t in range(T):
                logits = k[b, :, n // G] @ q[b, t, n]  # [S]
                if softcap:
                    logits = softcap * np.tanh(logits / softcap)
                visible = mask[b, t]
                if not visible.any():
                    out[b, t, n] = v[b, :, n // G].mean(axis=0)  # big_neg everywhere: uniform
                    continue
                w = np.exp(logits[visible] - logits[visible].max())
                out[b, t, n] = (w / w.sum()) @ v[b, visible, n // G]
    return out


@given(st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (6, 2)]), st.sampled_from([None, 2.0, 50.0]),
       st.integers(0, 2**31 - 1))
def test_attend_gqa_softcap_mask_against_loops(heads, cap, seed):
    N, K = heads
    rng = np.random.default_rng(seed)
    B, T, S, H = 2, 3, 5, 4
    q, k, v = rng.normal(size=(B, T, N, H)), rng.normal(size=(B, S, K, H)), rng.normal(size=(B, S, K, H))
    mask = rng.random((B, T, S)) < 0.6
    mask[0, 0] = False  # a query with no visible key
    config = GemmaConfig(width=8, num_heads=N, num_kv_heads=K, head_dim=H, attn_logits_softcap=cap)
    np.testing.assert_allclose(gemma.attend(q, k, v, mask, config), _attend_by_loops(q, k, v, mask, cap),
                               rtol=1e-10, atol=1e-12)


def test_siglip_attention_against_loops():
    B, P, W, N = 2, 5, 6, 3
    H = W // N
    x = RNG.normal(size=(B, P, W))
    dense = lambda: {"kernel": RNG.normal(size=(W, N, H)), "bias": RNG.normal(size=(N, H))}  # noqa: E731
    params = {"query": dense(), "key": dense(), "value": dense(),
              "out": {"kernel": RNG.normal(size=(N, H, W)), "bias": RNG.normal(size=W)}}
    out = siglip.attention(params, x)
    for b in range(B):
        expected = params["out"]["bias"].copy()[None].repeat(P, 0)
        for n in range(N):
            q = x[b] @ params["query"]["kernel"][:, n] + params["query"]["bias"][n]  # [P, H]
            k = x[b] @ params["key"]["kernel"][:, n] + params["key"]["bias"][n]
            v = x[b] @ params["value"]["kernel"][:, n] + params["value"]["bias"][n]
            s = q @ k.T / math.sqrt(H)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            expected = expected + (p / p.sum(axis=1, keepdims=True)) @ v @ params["out"]["kernel"][n]
        np.testing.assert_allclose(out[b], expected, rtol=1e-10)


def test_geglu_mlp_against_loops():
    D, F = 4, 6
    x = RNG.normal(size=(1, 2, D))
    params = {"gating_einsum": RNG.normal(size=(2, D, F)), "linear": RNG.normal(size=(F, D))}
    out = gemma.mlp(params, x)
    for t in range(2):
        hidden = [ops.gelu_tanh(x[0, t] @ params["gating_einsum"][0, :, f]) * (x[0, t] @ params["gating_einsum"][1, :, f])
                  for f in range(F)]
        np.testing.assert_allclose(out[0, t], np.array(hidden) @ params["linear"], rtol=1e-12)


def test_softcap_bounds_and_identity():
    x = np.linspace(-1000, 1000, 11)
    assert np.all(np.abs(ops.softcap(x, 30.0)) <= 30.0)
    np.testing.assert_allclose(ops.softcap(x, 30.0), 30.0 * np.tanh(x / 30.0), rtol=1e-15)
    np.testing.assert_array_equal(ops.softcap(x, None), x)
    np.testing.assert_allclose(ops.softcap(np.array([1e-3]), 50.0), [1e-3], rtol=1e-9)


def test_tied_logits_and_final_softcap_against_loops():
    V, D = 7, 4
    table = RNG.normal(size=(V, D))
    x = RNG.normal(size=(1, 2, D)) * 10
    for cap in (None, 3.0):
        config = GemmaConfig(width=D, num_heads=1, num_kv_heads=1, head_dim=2, vocab_size=V, final_logits_softcap=cap)
        out = gemma.logits({"embedder": {"input_embedding": table}}, x, config)
        for t in range(2):
            raw = [sum(x[0, t, d] * table[v, d] for d in range(D)) for v in range(V)]
            expected = [cap * math.tanh(r / cap) for r in raw] if cap else raw
            np.testing.assert_allclose(out[0, t], expected, rtol=1e-12)


@given(st.booleans(), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_post_norms_make_each_branch_scale_free(post_norms, factor, seed):
    # RMSNorm ignores the scale of its input, so with Gemma 2's post-norms rescaling a branch's
    # output weights changes nothing; without them (Gemma 1) it changes the block's output.
    from paligemma import ref

    # norm_eps = 0 makes RMSNorm exactly scale invariant (eps 1e-6 would blur it at ~1e-6).
    config = ref.get_config("tiny-paligemma2" if post_norms else "tiny-paligemma", norm_eps=0.0)
    params = ref.params.layer_slice(ref.init_params(config, seed=seed % 100, dtype=np.float64,
                                                    random_norms=True)["llm"]["layers"], 0)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, 4, config.llm.width))
    positions = np.arange(4)[None]
    mask = np.tril(np.ones((1, 4, 4), bool))
    base = gemma.block(params, x, positions, mask, config.llm)
    scaled = {**params, "attn": {**params["attn"], "attn_vec_einsum": {"w": params["attn"]["attn_vec_einsum"]["w"] * factor}},
              "mlp": {**params["mlp"], "linear": params["mlp"]["linear"] * factor}}
    out = gemma.block(scaled, x, positions, mask, config.llm)
    if post_norms:
        np.testing.assert_allclose(out, base, rtol=1e-9, atol=1e-9)
    elif abs(factor - 1) > 1e-3:
        assert np.abs(out - base).max() > 1e-6
