"""The CPU-motivated layouts of `paligemma.fast` compute what the plain ones do.

- Per-layer weight buffers (`fast.unstack_layers`, an unrolled layer loop) vs the stacked
  layers under `lax.scan`: forward logits, greedy and beam tokens, the KV cache.
- Vocabulary slabs for a non-float32 embedding table in `gemma.logits` vs float64 NumPy.
- Compiling without weight hoisting for bfloat16 weights (`fast.model.jit_model`): XLA's
  planned temporaries stay far below a float32 copy of the weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import fast, ref
from paligemma.fast import decode as fast_decode
from paligemma.fast import gemma as fast_gemma
from paligemma.fast import linear as fast_linear
from paligemma.fast.model import converts_weights
from paligemma.parity.strategies import configs, prompts
from paligemma.parity.tolerances import FLOAT32_REORDERED, assert_close


def _params32(config, seed):
    return ref.cast_params(ref.init_params(config, seed=seed, dtype=np.float64, random_norms=True), np.float32)


@settings(max_examples=5, deadline=None)
@given(st.data())
def test_per_layer_buffers_compute_what_the_stacked_layers_compute(data):
    config = data.draw(configs(vocab_size=32))
    prompt = data.draw(prompts(config, max_batch=2, max_len=6))
    stacked = _params32(config, data.draw(st.integers(0, 1000)))
    per_layer = fast.unstack_layers(stacked)
    assert isinstance(per_layer["llm"]["layers"], tuple) and len(per_layer["llm"]["layers"]) == config.llm.depth

    with fast.layout.as_given():  # the entry points would otherwise pick one layout for both
        want = np.asarray(fast.forward(stacked, config, *prompt))
        got = np.asarray(fast.forward(per_layer, config, *prompt))
        assert_close(got, want, FLOAT32_REORDERED, "forward: per-layer vs stacked", 0.0)

        sampler = data.draw(st.sampled_from(["greedy", "beam(2)"]))
        want = fast.generate(stacked, config, *prompt, max_new_tokens=4, sampler=sampler)
        got = fast.generate(per_layer, config, *prompt, max_new_tokens=4, sampler=sampler)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)


def test_per_layer_cache_equals_the_stacked_cache():
    config = ref.get_config("tiny-paligemma2")  # sliding window on alternate layers
    stacked = _params32(config, 3)
    per_layer = fast.unstack_layers(stacked)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 28, 28, 3))
    tokens = rng.integers(3, 300, (2, 5)).astype(np.int32)
    mask_ar = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    input_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
    rope = fast_gemma.rope_table(config.vision.num_patches + 5 + 3, config.llm.head_dim, config.llm.rope_base)
    caches = []
    for params in (stacked, per_layer):
        cache, _ = fast_decode.prefill(params, config, images, tokens, mask_ar, input_mask, 3, fast.FLOAT32, rope)
        cache, logits = fast_decode.extend(params, config, cache, jnp.array([7, 9]), fast.FLOAT32, rope)
        caches.append((cache, logits))
    (c0, l0), (c1, l1) = caches
    assert c1.k.shape == c0.k.shape == (config.llm.depth, 2, config.vision.num_patches + 8, config.llm.num_kv_heads,
                                        config.llm.head_dim)
    for a, b in ((c1.k, c0.k), (c1.v, c0.v), (l1, l0)):
        assert_close(np.asarray(a), np.asarray(b), FLOAT32_REORDERED, "cache: per-layer vs stacked", 0.0)
    np.testing.assert_array_equal(c1.valid, c0.valid)
    np.testing.assert_array_equal(c1.positions, c0.positions)


def test_stack_layers_inverts_unstack_layers():
    config = ref.get_config("tiny-paligemma")
    params = _params32(config, 0)
    back = fast.stack_layers(fast.unstack_layers(params))
    want, got = ref.flatten(params), ref.flatten(back)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
    assert fast.unstack_layers(fast.unstack_layers(params))["llm"]["layers"].__class__ is tuple  # idempotent


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([16384, 24576, 257152 // 16]), st.integers(1, 3), st.sampled_from([None, 30.0]),
       st.integers(0, 2**31 - 1))
def test_logits_in_vocabulary_slabs_equal_one_product(V, T, cap, seed):
    # A bfloat16 table on CPU goes through `gemma.logits` slab by slab (V divisible by a slab
    # of at least 1024 rows); the result must be the one product, computed here in float64.
    rng = np.random.default_rng(seed)
    D = 64
    table = rng.standard_normal((V, D)).astype(ml_dtypes.bfloat16)
    pre = rng.standard_normal((2, T, D)).astype(np.float32)
    config = dataclasses.replace(ref.get_config("tiny-paligemma").llm, width=D, vocab_size=V,
                                 final_logits_softcap=cap)
    assert V % fast_linear.vocab_slab(V) == 0 and 1024 <= fast_linear.vocab_slab(V) <= 8192
    got = np.asarray(jax.jit(fast_gemma.logits, static_argnums=2)(
        {"embedder": {"input_embedding": jnp.asarray(table)}}, jnp.asarray(pre), config))
    want = np.einsum("btd,vd->btv", pre.astype(np.float64), table.astype(np.float64))
    if cap:
        want = cap * np.tanh(want / cap)
    assert got.shape == (2, T, V)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@given(st.integers(1, 300_000))
def test_vocab_slab_is_the_largest_divisor_up_to_8192(V):
    slab = fast_linear.vocab_slab(V)
    assert V % slab == 0 and slab <= 8192
    assert not any(V % d == 0 for d in range(slab + 1, min(V, 8192) + 1))


def test_bfloat16_weights_are_not_converted_all_at_once():
    # XLA:CPU converts bfloat16 weights to float32 for every dot; hoisted out of the loops
    # those conversions are a float32 copy of the model. Compiled through `jit_model`, the
    # planned temporaries stay far below that copy's size.
    base = ref.get_config("tiny-paligemma")
    config = base.replace(llm=dataclasses.replace(base.llm, width=256, mlp_dim=2048, depth=8, num_heads=4,
                                                  num_kv_heads=1, head_dim=64, vocab_size=8192))
    shapes = ref.flatten(ref.param_shapes(config))
    params = ref.unflatten({k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()})
    assert converts_weights(params) == (jax.default_backend() == "cpu")
    f32_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    B, T = 1, 8
    i32 = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = fast_decode._generate.lower(
        params, jax.ShapeDtypeStruct((B, 28, 28, 3), jnp.float32), i32, i32, jax.ShapeDtypeStruct((B, T), bool),
        jax.random.PRNGKey(0), config=config, policy=fast.BFLOAT16, max_new_tokens=4,
        sampler=ref.decode.Sampler()).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * f32_bytes, (temp, f32_bytes)  # measured: 0.24 (with hoisting: 1.11)


@settings(max_examples=6, deadline=None)
@given(st.data())
def test_outputs_from_computes_the_rows_the_whole_transformer_computes(data):
    """Training asks only the text's pre-logits (`outputs_from`): the last layer then skips the
    other rows' queries and MLP. Values and gradients equal the full transformer's, sliced."""
    config = data.draw(configs(vocab_size=32))
    g = config.llm
    B, T = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 9))
    start = data.draw(st.integers(1, T - 1))
    params = _params32(config, data.draw(st.integers(0, 1000)))
    if data.draw(st.booleans(), label="per-layer buffers"):
        params = fast.unstack_layers(params)
    policy = fast.Policy(remat=data.draw(st.sampled_from(["none", "full"])))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    x = jnp.asarray(rng.normal(size=(B, T, g.width)), jnp.float32)
    mask_ar = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.int32)
    attn_mask, local_mask, positions = fast.model.prefix_lm_masks(config, jnp.ones((B, T), bool), mask_ar)
    rope = fast_gemma.rope_table(T, g.head_dim, g.rope_base)
    weights = jnp.asarray(rng.normal(size=(B, T - start, g.width)), jnp.float32)

    def loss(llm, x, outputs_from):
        pre, _ = fast_gemma.transformer(llm, x, positions, attn_mask, g, policy, rope, local_mask,
                                        outputs_from=outputs_from)
        pre = pre[:, start - outputs_from:]  # [B, T - start, D] either way
        return (pre * weights).sum(), pre

    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params["llm"], x, 0)
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params["llm"], x, start)
    assert got.shape == (B, T - start, g.width)
    assert_close(np.asarray(got), np.asarray(want), FLOAT32_REORDERED, "outputs_from: pre-logits", 0.0)
    for (path, w), (_, v) in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                                 jax.tree_util.tree_leaves_with_path(got_grads)):
        np.testing.assert_allclose(np.asarray(v), np.asarray(w), rtol=2e-4, atol=2e-5 * float(np.abs(w).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_lora_outputs_from_equals_the_sliced_lora_transformer():
    from paligemma.fast import lora

    config = ref.get_config("tiny-paligemma2")
    g, B, T, start = config.llm, 2, 7, 3
    params = _params32(config, 5)
    adapters = jax.tree_util.tree_map(lambda a: a + 0.05, lora.init_adapters(params["llm"]["layers"], 2, seed=1))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(B, T, g.width)), jnp.float32)
    attn_mask, local_mask, positions = fast.model.prefix_lm_masks(config, jnp.ones((B, T), bool),
                                                                  jnp.asarray([[0, 0, 0, 1, 1, 1, 1]] * B))
    rope = fast_gemma.rope_table(T, g.head_dim, g.rope_base)
    run = lambda outputs_from: lora.transformer(params["llm"], adapters, 0.5, x, positions, attn_mask, g,  # noqa: E731
                                                fast.Policy(), rope, local_mask, outputs_from=outputs_from)
    want, got = np.asarray(run(0))[:, start:], np.asarray(run(start))
    assert got.shape == want.shape
    assert_close(got, want, FLOAT32_REORDERED, "lora outputs_from", 0.0)


def test_outputs_from_refuses_a_kv_cache():
    config = ref.get_config("tiny-paligemma")
    params = _params32(config, 0)
    g, B, T = config.llm, 1, 4
    x = jnp.zeros((B, T, g.width), jnp.float32)
    attn_mask, local_mask, positions = fast.model.prefix_lm_masks(config, jnp.ones((B, T), bool), jnp.ones((B, T), jnp.int32))
    cache = jnp.zeros((g.depth, B, T, g.num_kv_heads, g.head_dim), jnp.float32)
    with pytest.raises(ValueError, match="outputs_from"):
        fast_gemma.transformer(params["llm"], x, positions, attn_mask, g, fast.Policy(),
                               fast_gemma.rope_table(T, g.head_dim, g.rope_base), local_mask,
                               kv_cache=(cache, cache, 0), outputs_from=2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's layout choice")
def test_entry_points_convert_to_the_platform_layout_once():
    """`ref.load`'s tree (NumPy, stacked) reaches the per-layer layout on the CPU by itself, converted
    once while the caller's arrays live; bfloat16 layers stay stacked (as `fast.PaliGemma` keeps them)."""
    import gc

    config = ref.get_config("tiny-paligemma")
    params = _params32(config, 1)
    placed = fast.layout.for_platform(params)
    assert isinstance(placed["llm"]["layers"], tuple) and len(placed["llm"]["layers"]) == config.llm.depth
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(placed))
    assert fast.layout.for_platform(params) is placed  # the conversion is kept
    assert fast.layout.for_platform(placed) is placed  # already in place: nothing to do
    with fast.layout.as_given():
        assert fast.layout.for_platform(params) is params
    del params
    gc.collect()
    assert not fast.layout._converted  # the caller's arrays are gone, and so is the copy
    bf16 = ref.cast_params(_params32(config, 1), ml_dtypes.bfloat16)
    assert not isinstance(fast.layout.for_platform(bf16)["llm"]["layers"], tuple)


def _rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
@pytest.mark.parametrize("how", ["to_device", "unstack_layers", "for_platform"])
def test_a_placed_weight_is_not_held_twice_by_the_first_program_that_reads_it(how):
    """`jax.device_put` alone left the first program run on XLA:CPU holding a weight's bytes twice
    until the next run (+2.1 GB for PaliGemma's embedding at the engine's warm-up). Placed by the
    library, a 256 MB weight's first read adds nothing near its size to the resident set."""
    from paligemma.fast import layout

    host = np.ones((2, 8192, 4096), np.float32)  # 2 x 128 MB
    nbytes = host.nbytes
    if how == "to_device":
        placed = layout.to_device(host)
    elif how == "unstack_layers":
        placed = layout.unstack_layers({"llm": {"layers": {"w": host}}})["llm"]["layers"]
    else:
        placed = layout.for_platform({"llm": {"embedder": {"input_embedding": host}}})
    del host
    before = _rss_bytes()
    jax.block_until_ready(jax.jit(lambda tree: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)))(placed))
    grew = _rss_bytes() - before
    assert grew < nbytes / 4, f"the first run grew the resident set by {grew / 2**20:.0f} MiB for {nbytes / 2**20:.0f} MiB of weights"
