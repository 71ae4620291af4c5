"""paligemma.fast on quantized trees (fast/quant.py) against the reference on the dequantized weights.

The reference defines the formats (`ref.quant`): a quantized tree stands for
`ref.quant.dequantize_tree(qtree)`, so fast on the quantized tree (float32) must give ref's float64
logits on that tree within FAST_FLOAT32, the same bound as the float fast/ref parity: the int8
scale moved after the dot and int4's tile-wise dequantization are float32 reassociations, nothing
more. Every code path is exercised: the plain dot (as on a mesh or an accelerator), the tile
loop (`TILE_BYTES` shrunk so that tiny models have many tiles), and for decoding's few rows the
CPU kernel (`kernels.quant_cpu`) or, with `CPU_KERNEL` off, XLA's loop over row chunks.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma import fast, ref
from paligemma.fast import quant as fq
from paligemma.fast import sharding
from paligemma.fast.pipeline import PaliGemma
from paligemma.parity.strategies import configs, prompts
from paligemma.parity.tolerances import FAST_FLOAT32, FLOAT32_REORDERED, assert_close, relative_error
from paligemma.ref import quant as rq
from paligemma.ref.checkpoints import quantfile
from paligemma.ref.checkpoints.tensorfiles import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
KEEPS = (rq.Keep(), rq.Keep(vision=True), rq.Keep(embedding=True, end_layers=1))


# (TILE_BYTES, CPU_KERNEL): no tiles, or 64-byte tiles (many loop steps on tiny models), with
# decoding's products on `kernels.quant_cpu` (where it is built) or on XLA's tile loop.
TILE_CHOICES = {"plain": (1 << 40, True), "tiles": (64, True), "xla-tiles": (64, False)}


def _use_tiles(choice):
    """Sets `fast.quant.TILE_BYTES` and `CPU_KERNEL` to `choice` (a TILE_CHOICES name or a pair);
    jit caches are cleared since both are read while tracing. Returns the previous pair."""
    previous = (fq.TILE_BYTES, fq.CPU_KERNEL)
    fq.TILE_BYTES, fq.CPU_KERNEL = TILE_CHOICES.get(choice, choice)
    jax.clear_caches()
    return previous


def _f32(tree):
    """float64 leaves as float32; q (int8 / uint8) untouched."""
    return jax.tree_util.tree_map(lambda a: a.astype(np.float32) if a.dtype == np.float64 else a, tree)


# --- The matmuls, against NumPy on the dequantized weight --------------------------------------


@st.composite
def matmul_cases(draw):
    """(x [M, C], w [C, O], fmt, group): lengths that do and do not fill whole int4 groups."""
    M, C, O = draw(st.integers(1, 5)), draw(st.sampled_from([1, 6, 32, 48, 100])), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w = rng.standard_normal((C, O)) * rng.uniform(0.01, 10, (1, O))
    return rng.standard_normal((M, C)), w, draw(st.sampled_from(rq.FORMATS)), draw(st.sampled_from([2, 16, 128]))


@settings(max_examples=30)
@given(case=matmul_cases())
def test_matmul_and_logits_equal_numpy_on_the_dequantized_weight(case):
    x, w, fmt, group = case
    C, O = w.shape
    if fmt == "int8":
        q, scale = rq.quantize_int8(w, (-2,))
        deq = rq.dequantize_int8(q, scale, np.float64)
        qt, st_ = rq.quantize_int8(w.T, (-1,))  # the embedding's layout: [V, D], per row
    else:
        q, scale = rq.quantize_int4(w, (-2,), group)
        deq = rq.dequantize_int4(q, scale, w.shape, (-2,), np.float64)
        qt, st_ = rq.quantize_int4(w.T, (-1,), group)
    expected = x @ deq  # [M, O]
    x32 = jnp.asarray(x, jnp.float32)
    for choice in TILE_CHOICES.values():  # M <= FEW_ROWS: the CPU kernel, or XLA plain / tiles
        previous = (fq.TILE_BYTES, fq.CPU_KERNEL)
        fq.TILE_BYTES, fq.CPU_KERNEL = choice
        try:
            got = fq.matmul(x32, {"q": q, "scale": scale}, 1, tiles=True)
            assert_close(got, expected, FAST_FLOAT32, f"{fmt} matmul, (tile bytes, CPU kernel) {choice}")
            got = fq.logits(x32[None], {"q": qt, "scale": st_}, tiles=True)[0]
            assert_close(got, expected, FAST_FLOAT32, f"{fmt} logits, (tile bytes, CPU kernel) {choice}")
        finally:
            fq.TILE_BYTES, fq.CPU_KERNEL = previous
    rows = fq.embed_rows({"q": qt, "scale": st_}, jnp.arange(O)[None], C)[0]  # [O, C]
    np.testing.assert_allclose(np.asarray(rows), deq.T, rtol=1e-6, atol=1e-6 * np.abs(deq).max())


@st.composite
def grouped_cases(draw):
    """(x [G, M, C], w [G, C, O], fmt, group, tile bytes): prefill-sized M too, and tile sizes where
    one group's block fits but all G together do not (the loop over groups), or only part of one."""
    G, M = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3, fq.FEW_ROWS + 1, 40]))
    C, O = draw(st.sampled_from([6, 32, 48])), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    w = rng.standard_normal((G, C, O)) * rng.uniform(0.01, 10, (G, 1, O))
    tile = draw(st.sampled_from([1 << 40, 4 * 64 * O, 64]))  # plain / one group per block / tiles
    kernel = draw(st.booleans())  # M <= FEW_ROWS: the CPU kernel, or XLA's loop over row chunks
    return rng.standard_normal((G, M, C)), w, draw(st.sampled_from(rq.FORMATS)), 16, (tile, kernel)


@settings(max_examples=30)
@given(case=grouped_cases())
def test_grouped_dot_equals_numpy_on_the_dequantized_weight(case):
    x, w, fmt, group, tile = case
    if fmt == "int8":
        q, scale = rq.quantize_int8(w, (-2,))
        deq = rq.dequantize_int8(q, scale, np.float64)
    else:
        q, scale = rq.quantize_int4(w, (-2,), group)
        deq = rq.dequantize_int4(q, scale, w.shape, (-2,), np.float64)
    previous = (fq.TILE_BYTES, fq.CPU_KERNEL)
    fq.TILE_BYTES, fq.CPU_KERNEL = tile
    try:
        got = fq.grouped_dot(jnp.asarray(x, jnp.float32), q, scale, tiles=True)  # [G, M, O]
    finally:
        fq.TILE_BYTES, fq.CPU_KERNEL = previous
    assert_close(got, np.einsum("GMC,GCO->GMO", x, deq), FAST_FLOAT32,
                 f"{fmt} grouped dot, (tile bytes, CPU kernel) {tile}")


def _abstract_quantized_tree(config, fmt):
    """`quantize_tree`'s layout (nothing kept) as `jax.ShapeDtypeStruct`s, per-layer (`fast.unstack_layers`)."""
    from paligemma.ref.params import flatten, param_shapes, unflatten
    shapes, stacked = flatten(param_shapes(config)), {}
    for entry in rq.layout(config, fmt):
        for key, (shape, dtype) in rq.stored_shapes(entry, shapes[entry.source]).items():
            stacked[key] = jax.ShapeDtypeStruct(shape, dtype or np.float32)
    return jax.eval_shape(fast.unstack_layers, unflatten(stacked))


@pytest.mark.parametrize("fmt", rq.FORMATS)
def test_generate_holds_one_layer_of_temporaries_at_a_time(fmt):
    """XLA's plan for `generate` on PaliGemma 2 10B-224's widths (no weights in memory): two more
    layers may add their KV cache, not a dequantized weight or a layer-sized buffer each (they
    did: 150 MB per layer, whole float32 q/out projections and early-scheduled loop buffers)."""
    from paligemma.fast import decode
    from paligemma.fast.policy import FLOAT32
    from paligemma.ref.decode import parse_sampler
    config = ref.get_config("paligemma2-10b-224")
    R, T, N = config.vision.image_size, 16, 4
    inputs = (jax.ShapeDtypeStruct((1, R, R, 3), jnp.float32), jax.ShapeDtypeStruct((1, T), jnp.int32),
              jax.ShapeDtypeStruct((1, T), jnp.int32), jax.ShapeDtypeStruct((1, T), jnp.bool_),
              jax.ShapeDtypeStruct((2,), jnp.uint32))
    temp = {}
    for depth in (2, 4):
        cfg = dataclasses.replace(config, llm=dataclasses.replace(config.llm, depth=depth))
        tree = _abstract_quantized_tree(cfg, fmt)
        compiled = decode._generate.lower(tree, *inputs, config=cfg, policy=FLOAT32, max_new_tokens=N,
                                          sampler=parse_sampler("greedy")).compile()
        temp[depth] = compiled.memory_analysis().temp_size_in_bytes
    L = config.llm
    cache = 2 * L.num_kv_heads * L.head_dim * (config.vision.num_patches + T + N) * 4  # one layer, float32
    layer_bytes = sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                      for a in jax.tree_util.tree_leaves(tree["llm"]["layers"][0]))
    per_layer = (temp[4] - temp[2]) / 2
    assert per_layer < cache + layer_bytes / 8, (fmt, per_layer, cache, layer_bytes)


def test_unpacking_matches_the_reference_and_a_hand_worked_byte():
    packed = np.array([[0xF1, 0x78]], np.uint8)  # docs/quantization.md: [1, -1, -8, 7]
    np.testing.assert_array_equal(np.asarray(fq.unpack_int4(packed, 1)), [[1, -1, -8, 7]])
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for axis in (0, 1):
        np.testing.assert_array_equal(np.asarray(fq.unpack_int4(every, axis)), rq.unpack_int4(every, axis))



@pytest.mark.parametrize("axis", [0, 1])
def test_nibble_planes_are_the_even_and_odd_dequantized_elements(axis):
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every byte once
    values = rq.unpack_int4(every, axis).astype(np.float64)  # [32, 16] or [16, 32]
    groups = values.shape[axis] // 8  # group size 8
    scale = np.random.default_rng(axis).uniform(0.5, 2, np.insert(np.delete(values.shape, axis), axis, groups))
    want = values * np.repeat(scale, 8, axis=axis)  # the dequantized weight, element by element
    even, odd = fq.nibble_planes(every, jnp.asarray(scale, jnp.float32), axis)
    np.testing.assert_allclose(np.asarray(even), np.take(want, np.arange(0, want.shape[axis], 2), axis), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(odd), np.take(want, np.arange(1, want.shape[axis], 2), axis), rtol=1e-6)

# --- Whole models ------------------------------------------------------------------------------


@st.composite
def model_cases(draw):
    config = draw(configs(vocab_size=40))
    return (config, draw(st.integers(0, 1000)), draw(st.sampled_from(rq.FORMATS)), draw(st.sampled_from(KEEPS)),
            draw(prompts(config, max_batch=2, max_len=6)))


def _sensitivity(params, config, prompt, gold):
    """How far ref's logits move when its weights are rounded to bfloat16 (as tests/test_fast_parity.py)."""
    rounded = ref.forward(ref.cast_params(params, __import__("ml_dtypes").bfloat16), config, *prompt)
    return relative_error(rounded[prompt[3]], gold[prompt[3]])


@pytest.mark.parametrize("tiles", TILE_CHOICES)
def test_fast_on_the_quantized_tree_equals_ref_on_the_dequantized_weights(tiles):
    previous = _use_tiles(tiles)
    try:
        _fast_equals_ref()
    finally:
        _use_tiles(previous)


@settings(max_examples=5)
@given(case=model_cases())
def _fast_equals_ref(case):
    config, seed, fmt, keep, prompt = case
    tiles = ("tiles" if fq.TILE_BYTES < 1 << 20 else "plain") + ("" if fq.CPU_KERNEL else ", no CPU kernel")
    keep = dataclasses.replace(keep, end_layers=min(keep.end_layers, config.llm.depth // 2))
    params = ref.init_params(config, seed=seed, dtype=np.float64, random_norms=True)
    qtree = rq.quantize_tree(params, config, fmt, keep, group_size=16)
    deq = rq.dequantize_tree(qtree, config, np.float64)
    gold = ref.forward(deq, config, *prompt)  # [B, T, V]
    sensitivity = _sensitivity(deq, config, prompt, gold)
    for layout in (_f32(qtree), fast.unstack_layers(_f32(qtree))):
        with fast.layout.as_given():  # each layout as given (forward would pick one for both)
            got = np.asarray(fast.forward(layout, config, *prompt))
        mask = prompt[3]
        assert_close(got[mask], gold[mask], FAST_FLOAT32, f"{fmt} keep={keep.label()} {tiles}", sensitivity)
    # Greedy decoding: the same tokens, up to the first step where the reference has a near tie.
    expected = ref.generate(deq, config, *prompt, max_new_tokens=4)
    got = fast.generate(_f32(qtree), config, *prompt, max_new_tokens=4)
    for b, clear in enumerate(_clear_steps(deq, config, prompt, expected.tokens)):
        np.testing.assert_array_equal(got.tokens[b, :clear], expected.tokens[b, :clear])


def _clear_steps(params, config, prompt, new):
    """Per example, how many of the greedy steps `new` [B, n] the reference takes with a clear winner:
    its logits along them (prompt, then the tokens as a causal suffix) have top two further apart than
    float32 noise up to that step."""
    images, tokens, mask_ar, input_mask = prompt
    rows = []
    for b in range(len(tokens)):  # real tokens first, the new ones right after, the padding last
        n = int(input_mask[b].sum())
        rows.append((np.concatenate([tokens[b, :n], new[b], tokens[b, n:]]),
                     np.concatenate([mask_ar[b, :n], np.ones(new.shape[1], int), mask_ar[b, n:]]),
                     np.concatenate([input_mask[b, :n], np.ones(new.shape[1], bool), input_mask[b, n:]])))
    logits = ref.forward(params, config, images, *(np.stack(r) for r in zip(*rows)))  # [B, T + n, V]
    out = []
    for b in range(len(tokens)):
        n = int(input_mask[b].sum())
        steps = logits[b, n - 1:n - 1 + new.shape[1]]  # [n_new, V]: row i predicts new token i
        top2 = np.sort(steps, axis=-1)[:, -2:]
        near = np.flatnonzero(top2[:, 1] - top2[:, 0] <= 1e-4 * max(1.0, np.abs(steps).max()))
        out.append(int(near[0]) if near.size else new.shape[1])
    return out


def test_bad_quantized_trees_are_named():
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=0, dtype=np.float32)
    qtree = rq.quantize_tree(params, config, "int4", group_size=16)
    fq.check_tree(qtree, config)
    with pytest.raises(ValueError, match="not a quantized tree"):
        fq.check_tree(params, config)
    bad = rq.quantize_tree(params, config, "int4", group_size=16)
    bad["llm"]["layers"]["mlp"]["linear"]["scale"] = bad["llm"]["layers"]["mlp"]["linear"]["scale"][:, :1]
    with pytest.raises(ValueError, match=r"llm/layers/mlp/linear/scale has shape \[3, 1, 48\], expected \[3, 6, 48\]"):
        fq.check_tree(bad, config)
    bad = rq.quantize_tree(params, config, "int8")
    bad["llm"]["layers"]["mlp"]["linear"]["q"] = bad["llm"]["layers"]["mlp"]["linear"]["q"].astype(np.int16)
    with pytest.raises(ValueError, match="expected int8 .int8. or uint8 .int4."):
        fq.format_of(bad["llm"]["layers"]["mlp"]["linear"])
    with pytest.raises(ValueError, match="quantize: expected one of"):
        PaliGemma.load("unused.npz", "unused.model", quantize="int3")
    with pytest.raises(ValueError, match="keep=.vision. applies only with quantize"):
        PaliGemma.load("unused.npz", "unused.model", keep="vision")


# --- Loading: ref.load, PaliGemma, the CLI -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny PaliGemma 2 checkpoint, its int4 file and a tiny tokenizer that fits it."""
    folder = tmp_path_factory.mktemp("quant_fast")
    tokenizer = ref.train_tiny_tokenizer(folder / "tok.model")
    config = ref.get_config("tiny-paligemma2")
    config = config.replace(llm=dataclasses.replace(config.llm, vocab_size=tokenizer.vocab_size))
    params = ref.init_params(config, seed=3, dtype=np.float32)
    ref.save(folder / "model.npz", config, params)
    quantfile.quantize_file(folder / "model.npz", folder / "int4.safetensors", "int4",
                            keep=rq.Keep(end_layers=1), group_size=16)
    return folder, tokenizer


def test_ref_load_returns_the_quantized_tree(tiny_files):
    folder, _ = tiny_files
    config, qtree, _ = quantfile.load_quantized(folder / "int4.safetensors")
    config2, qtree2 = ref.load(folder / "int4.safetensors")
    assert config2 == config == ref.checkpoints.checkpoint.read_config(folder / "int4.safetensors")
    flat, flat2 = ref.flatten(qtree), ref.flatten(qtree2)
    assert sorted(flat) == sorted(flat2) and "llm/layers_first/mlp/linear" in flat
    for key in flat:
        np.testing.assert_array_equal(flat[key], flat2[key])
    _, trimmed = ref.load(folder / "int4.safetensors", vocab_size=200)
    assert trimmed["llm"]["embedder"]["input_embedding"]["q"].shape[0] == 200
    with pytest.raises(CheckpointError, match="vocab_size 999999 requested"):
        ref.load(folder / "int4.safetensors", vocab_size=999999)


def test_pipeline_runs_quantized_files_and_quantizes_on_load(tiny_files):
    folder, tokenizer = tiny_files
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    fast_model = PaliGemma.load(folder / "int4.safetensors", tokenizer)
    ref_model = PaliGemma.load(folder / "int4.safetensors", tokenizer, impl="ref")
    a, b = fast_model.generate(image, "caption en", 6), ref_model.generate(image, "caption en", 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    on_load = PaliGemma.load(folder / "model.npz", tokenizer, quantize="int4", keep="ends")
    assert on_load.params["llm"]["layers"][0]["mlp"]["linear"]["q"].dtype == jnp.uint8  # per-layer buffers
    # quantize_file and quantize_tree are the same numbers (ref.quant's tests); group 128 here.
    c = on_load.generate(image, "caption en", 6)
    with pytest.raises(ValueError, match="quantized already"):
        PaliGemma.load(folder / "int4.safetensors", tokenizer, quantize="int8")
    assert c.tokens.dtype == np.int64


def test_cli_generate_quantize(tiny_files, tmp_path):
    folder, _ = tiny_files
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    tok = folder / "tok.model"
    base = [sys.executable, "-m", "paligemma.cli", "generate", "--checkpoint", str(folder / "model.npz"),
            "--tokenizer", str(tok), "--image", str(tmp_path / "a.png"), "--prompt", "caption en",
            "--max-new-tokens", "4", "--json", "--show-tokens", "--quiet"]
    run = lambda *extra: subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    out = run("--quantize", "int8")
    assert out.returncode == 0, out.stderr
    cli_tokens = json.loads(out.stdout)["tokens"]
    model = PaliGemma.load(folder / "model.npz", str(tok), quantize="int8")
    from paligemma.ref import load_image
    expected = model.generate(load_image(str(tmp_path / "a.png")), "caption en", 4)
    assert cli_tokens == expected.tokens.tolist()
    bad = run("--quantize", "int8", "--keep", "everything")
    assert bad.returncode == 2 and "keep: unknown part 'everything'" in bad.stderr


# --- On a mesh ---------------------------------------------------------------------------------


def test_quantized_rules_by_hand():
    spec = sharding.param_spec
    P = sharding.PartitionSpec
    # q and scale follow their weight's rule; int8's scale axis of length 1 is replicated.
    assert spec("llm/layers/mlp/gating_einsum/q", (2, 2, 48, 96), 1, 4) == P(None, None, None, "model")
    assert spec("llm/layers/mlp/gating_einsum/scale", (2, 2, 1, 96), 1, 4) == P(None, None, None, "model")
    assert spec("llm/layers/mlp/linear/scale", (2, 1, 48), 1, 4) == P()
    # int4's merged (N, H) axis: the output width, never the layer axis.
    assert spec("llm/layers/attn/attn_vec_einsum/w/q", (4, 64, 48), 1, 4) == P(None, None, "model")
    assert spec("llm/layers/attn/attn_vec_einsum/w/q", (4, 4, 16, 48), 1, 4) == P(None, None, None, "model")
    # Kept end layers: the layers' rules, and their layer axis is never split over fsdp.
    assert spec("llm/layers_first/attn/q_einsum/w", (1, 4, 48, 16), 1, 4) == P(None, "model", None, None)
    assert spec("llm/layers_last/pre_attention_norm/scale", (2, 48), 2, 1) == P(None, "fsdp")
    assert spec("llm/embedder/input_embedding/q", (256, 24), 1, 8) == P("model", None)


SHARDED = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from paligemma import fast, ref
    from paligemma.ref import quant as rq
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=1, dtype=np.float32)
    rng = np.random.default_rng(0)
    R = config.vision.image_size
    images = rng.uniform(-1, 1, (2, R, R, 3)).astype(np.float32)
    tokens = rng.integers(0, config.llm.vocab_size, (2, 5)); mask_ar = np.zeros((2, 5), int)
    out = {}
    cases = (("int8", rq.Keep(), "data=2,model=4"), ("int4", rq.Keep(end_layers=1), "data=2,fsdp=2,model=2"))
    for fmt, keep, mesh in cases:
        qtree = rq.quantize_tree(params, config, fmt, keep, group_size=16)
        one = np.asarray(fast.forward(qtree, config, images, tokens, mask_ar))
        gen1 = fast.generate(qtree, config, images, tokens, mask_ar, max_new_tokens=4).tokens
        placed = fast.sharding.place_params(qtree, fast.sharding.mesh_from(mesh))
        many = np.asarray(fast.forward(placed, config, images, tokens, mask_ar, mesh=mesh))
        gen = fast.generate(placed, config, images, tokens, mask_ar, max_new_tokens=4, mesh=mesh).tokens
        q = placed["llm"]["layers"]["mlp"]["gating_einsum"]["q"]
        out[f"{fmt} {mesh}"] = [float(np.abs(many - one).max() / np.abs(one).max()),
                                bool((gen == gen1).all()), str(q.sharding.spec), str(q.dtype)]
    print(json.dumps(out))
""")


def test_quantized_trees_run_on_an_8_device_mesh():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 2
    for name, (err, same_tokens, spec, dtype) in results.items():
        assert err <= FLOAT32_REORDERED.rel, f"{name}: logits differ from one device by {err}"
        assert same_tokens, name
        assert "model" in spec and dtype in ("int8", "uint8"), (name, spec, dtype)
