"""The int8 / int4 weight formats (ref/quant.py) and the quantized file (ref/checkpoints/quantfile.py)."""

import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from paligemma import ref
from paligemma.cli.main import main as cli_main
from paligemma.parity.strategies import configs, prompts
from paligemma.parity.tolerances import QUANT_INT4_LOGITS, QUANT_INT8_LOGITS, assert_close, relative_error
from paligemma.ref import quant
from paligemma.ref.checkpoints import quantfile
from paligemma.ref.checkpoints.tensorfiles import CheckpointError

SCALE_DTYPES = [np.float32, ml_dtypes.bfloat16]


@st.composite
def weights(draw):
    """`(w, axes)`: a weight of rank 1-4 with adjacent contracted axes, each output channel at its own
    magnitude (1e-4 to 1e4), with outliers and all-zero channels."""
    ndim = draw(st.integers(1, 4))
    n_axes = draw(st.integers(1, min(2, ndim)))
    first = draw(st.integers(0, ndim - n_axes))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[first] = draw(st.sampled_from([1, 2, 3, 5, 48, 128, 130, 300]))  # groups: none, one, several, padded
    axes = tuple(a - ndim for a in range(first, first + n_axes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.normal(size=shape)
    channel = [1 if i - ndim in axes else n for i, n in enumerate(shape)]
    w = w * 10.0 ** rng.uniform(-4, 4, channel)  # each channel its own scale
    w = np.where(rng.random(shape) < 0.01, w * 1e3, w)  # outliers
    w = np.where(rng.random(channel) < 0.2, 0.0, w)  # whole channels of zeros
    dtype = draw(st.sampled_from([np.float64, np.float32, ml_dtypes.bfloat16]))
    return w.astype(dtype), axes


def _steps_error(w, deq_scale, q_values):
    """max |w - q s| / s over the elements, computed in float64 (0/0 for a zero channel counts as 0)."""
    w = w.astype(np.float64)
    s = deq_scale.astype(np.float64)
    err = np.abs(w - q_values.astype(np.float64) * s)
    assert np.all(err[s == 0] == 0), "a zero scale must mean an exactly zero channel"
    return float(np.max(np.where(s > 0, err / np.where(s > 0, s, 1), 0), initial=0))


# float32 arithmetic may round w / s to the other side of a half-integer: |q| <= 127 times 2^-24.
SLACK = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5, np.dtype(ml_dtypes.bfloat16): 1e-5}


@given(weights(), st.sampled_from(SCALE_DTYPES))
def test_int8_is_within_half_a_step_of_every_element(case, scale_dtype):
    w, axes = case
    q, scale = quant.quantize_int8(w, axes, scale_dtype)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == scale_dtype
    assert scale.shape == tuple(1 if i - w.ndim in axes else n for i, n in enumerate(w.shape))
    assert np.all(np.abs(q) <= 127)
    s = np.broadcast_to(scale, w.shape)
    assert _steps_error(w, s, q) <= 0.5 + SLACK[w.dtype]
    # Every nonzero channel reaches +-127 (the documented scale max|w| / 127); a zero one has scale 0.
    peak = np.max(np.abs(q).astype(np.int64), axis=axes, keepdims=True)
    nonzero = np.max(np.abs(w.astype(np.float64)), axis=axes, keepdims=True) > 0
    assert np.all(peak[nonzero] == 127) and np.all(scale[~nonzero] == 0)
    np.testing.assert_array_equal(quant.dequantize_int8(q, scale, np.float64), q.astype(np.float64) * s)


def _group_scale(scale, w_shape, axes, group_size):
    """Each element's group scale, built by repeating scales (independently of dequantize_int4)."""
    pre, C = len(w_shape) + min(axes), int(np.prod([w_shape[a] for a in axes]))
    post = w_shape[len(w_shape) + max(axes) + 1:]
    per_element = np.repeat(scale, group_size, axis=pre)  # [pre, Cp, post]
    per_element = np.take(per_element, np.arange(C), axis=pre)
    return per_element.reshape(w_shape[:pre] + tuple(w_shape[a] for a in axes) + tuple(post))


@given(weights(), st.sampled_from([2, 4, 8, 128]), st.sampled_from(SCALE_DTYPES))
def test_int4_is_within_half_a_step_of_every_element(case, group_size, scale_dtype):
    w, axes = case
    q, scale = quant.quantize_int4(w, axes, group_size, scale_dtype)
    C = int(np.prod([w.shape[a] for a in axes]))
    groups = -(-C // group_size)
    pre = w.shape[:w.ndim + min(axes)]
    assert q.dtype == np.uint8 and q.shape[len(pre)] == groups * group_size // 2
    assert scale.shape[len(pre)] == groups and scale.dtype == scale_dtype
    values = quant.unpack_int4(q, len(pre))  # [pre, Cp, post]
    assert np.all(np.abs(values) <= 7)
    assert np.all(np.take(values, np.arange(C, groups * group_size), axis=len(pre)) == 0), "padding must be 0"
    real = np.take(values, np.arange(C), axis=len(pre)).reshape(w.shape)
    s = _group_scale(scale, w.shape, axes, group_size)
    assert _steps_error(w, s, real) <= 0.5 + SLACK[w.dtype]
    # Every group with a nonzero value reaches +-7 (the documented scale max|w| / 7).
    grouped = values.reshape(pre + (groups, group_size) + values.shape[len(pre) + 1:])
    peak = np.max(np.abs(grouped.astype(np.int64)), axis=len(pre) + 1)  # [pre, groups, post]
    assert np.all(peak[scale.astype(np.float64) > 0] == 7) and np.all(peak[scale.astype(np.float64) == 0] == 0)
    deq = quant.dequantize_int4(q, scale, w.shape, axes, np.float64)
    np.testing.assert_array_equal(deq, real.astype(np.float64) * s.astype(np.float64))


def test_hand_worked_examples():
    # int8, per row: s = 127 / 127 = 1; -63.5 rounds half to even (-64); 0.4 rounds to 0.
    q, s = quant.quantize_int8(np.array([[127.0, -63.5, 0.4], [0.0, 0.0, 0.0]]), (-1,))
    np.testing.assert_array_equal(q, [[127, -64, 0], [0, 0, 0]])
    np.testing.assert_array_equal(s, [[1.0], [0.0]])
    # int4, C = 3 in groups of 2: [7, -3.5 | 1, pad 0] -> scales 1 and 1/7, q [7, -4 | 7, 0].
    q, s = quant.quantize_int4(np.array([[7.0], [-3.5], [1.0]]), (-2,), group_size=2)
    np.testing.assert_array_equal(q, [[0xC7], [0x07]])  # -4 = 0xC in the high nibble
    np.testing.assert_allclose(s, [[1.0], [1 / 7]], rtol=1e-7)
    # Packing: element 2j in the low nibble of byte j.
    np.testing.assert_array_equal(quant.pack_int4(np.array([1, -1, -8, 7], np.int8), 0), [0xF1, 0x78])
    np.testing.assert_array_equal(quant.pack_int4(np.array([[0, 1], [2, 3]], np.int8), 0), [[0x20, 0x31]])


@given(st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0),
       st.integers(1, 3), st.integers(0, 2))
def test_packing_round_trips(values, copies, axis):
    q = np.array(values, np.int8).reshape(-1, 1, 1).repeat(copies, axis=1)  # [2n, copies, 1]
    q = np.moveaxis(q, 0, axis)
    packed = quant.pack_int4(q, axis)
    assert packed.shape[axis] == len(values) // 2
    np.testing.assert_array_equal(quant.unpack_int4(packed, axis), q)


def test_non_finite_weights_are_refused_by_name():
    config = ref.get_config("tiny-paligemma")
    params = ref.flatten(ref.init_params(config))
    params["llm/layers/mlp/linear"][0, 3, 4] = np.nan
    with pytest.raises(ValueError, match="llm/layers/mlp/linear: .*NaN"):
        quant.quantize_tree(ref.unflatten(params), config, "int8")


# --- The tree, keep options, bytes ---------------------------------------------------------


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_kept_weights_are_untouched_and_end_layers_are_stored_apart(fmt):
    config = ref.get_config("tiny-paligemma2")  # 3 layers: first, one quantized, last
    params = ref.init_params(config, seed=1, dtype=ml_dtypes.bfloat16, random_norms=True)
    keep = quant.Keep(vision=True, embedding=True, end_layers=1)
    flat_q, flat_p = ref.flatten(quant.quantize_tree(params, config, fmt, keep)), ref.flatten(params)
    for key in flat_p:
        if key.startswith("img/") or key == "llm/embedder/input_embedding":
            np.testing.assert_array_equal(flat_q[key].view(np.uint16), flat_p[key].view(np.uint16))
    first, last = flat_q["llm/layers_first/mlp/linear"], flat_q["llm/layers_last/mlp/linear"]
    np.testing.assert_array_equal(first.view(np.uint16), flat_p["llm/layers/mlp/linear"][:1].view(np.uint16))
    np.testing.assert_array_equal(last.view(np.uint16), flat_p["llm/layers/mlp/linear"][2:].view(np.uint16))
    assert flat_q["llm/layers/mlp/linear/q"].shape[0] == 1
    back = ref.flatten(quant.dequantize_tree(quant.quantize_tree(params, config, fmt, keep), config))
    for layer in (0, 2):  # the kept end layers come back exactly, in their place
        np.testing.assert_array_equal(back["llm/layers/mlp/linear"][layer], flat_p["llm/layers/mlp/linear"][layer])


@pytest.mark.parametrize("spec, expected", [
    ("none", quant.Keep()), ("vision,ends", quant.Keep(vision=True, end_layers=1)),
    ("embedding, ends=3", quant.Keep(embedding=True, end_layers=3))])
def test_keep_parses(spec, expected):
    assert quant.Keep.parse(spec) == expected


def test_bytes_follow_from_shapes():
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config)
    for fmt in quant.FORMATS:
        for keep in (quant.Keep(), quant.Keep(vision=True, end_layers=1)):
            assert quant.tree_bytes(quant.quantize_tree(params, config, fmt, keep)) == \
                quant.entries_bytes(config, fmt, keep)
    # PaliGemma 2 28B: int8 is ~1 byte and int4 ~0.5 byte (+ a 4-byte scale per 128) per weight.
    big = ref.get_config("paligemma2-28b-224")
    n = ref.count_params(big)
    int8, int4 = quant.entries_bytes(big, "int8"), quant.entries_bytes(big, "int4")
    assert n < int8 < 1.01 * n and 0.5 * n < int4 < (0.5 + 4 / 128 + 0.01) * n
    costs = quant.keep_costs(big, "int4")
    assert costs["none"] < costs["vision"] < costs["ends=1"] < costs["embedding"] < costs["vision,embedding,ends=1"]


# --- The model on dequantized weights ------------------------------------------------------


@settings(max_examples=8)
@given(st.data())
def test_forward_on_dequantized_weights_stays_close(data):
    config = data.draw(configs(max_depth=2))
    images, tokens, mask_ar, input_mask = data.draw(prompts(config, max_batch=2, max_len=6))
    params = ref.init_params(config, seed=data.draw(st.integers(0, 99)), dtype=np.float64, random_norms=True)
    expected = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    rounded = ref.forward(ref.cast_params(params, ml_dtypes.bfloat16), config, images, tokens, mask_ar, input_mask)
    sensitivity = relative_error(rounded, expected)
    for fmt, tolerance in (("int8", QUANT_INT8_LOGITS), ("int4", QUANT_INT4_LOGITS)):
        deq = quant.dequantize_tree(quant.quantize_tree(params, config, fmt), config, np.float64)
        got = ref.forward(deq, config, images, tokens, mask_ar, input_mask)
        assert_close(got, expected, tolerance, f"ref on {fmt}-dequantized weights", sensitivity)


# --- The file ------------------------------------------------------------------------------


def _assert_trees_equal(a, b):
    fa, fb = ref.flatten(a), ref.flatten(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
        np.testing.assert_array_equal(np.asarray(fa[key]).view(np.uint8), np.asarray(fb[key]).view(np.uint8), key)


@pytest.mark.parametrize("fmt, keep, layout", [
    ("int8", quant.Keep(), "npz"), ("int4", quant.Keep(vision=True, end_layers=1), "npz"),
    ("int4", quant.Keep(embedding=True), "hf"), ("int8", quant.Keep(end_layers=1), "hf")])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_file_round_trip_equals_the_in_memory_tree(tmp_path, fmt, keep, layout, dtype):
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=2, dtype=dtype, random_norms=True)
    source = tmp_path / ("m.npz" if layout == "npz" else "hf")
    ref.save(source, config, params, format=layout)
    out = tmp_path / "q.safetensors"
    quantfile.quantize_file(source, out, fmt, keep, chunk_bytes=1 << 10)  # many slices per tensor
    loaded_config, qtree, header = quantfile.load_quantized(out)
    assert loaded_config == config and (header.format, header.keep) == (fmt, keep)
    _assert_trees_equal(qtree, quant.quantize_tree(params, config, fmt, keep))
    # Any safetensors reader opens it, and the metadata says what the docs say.
    plain = load_file(out)
    assert set(plain) == set(ref.flatten(qtree))
    with safe_open(out, framework="numpy") as f:
        meta = json.loads(f.metadata()[quantfile.HEADER_KEY])
    assert meta["version"] == 1 and meta["format"] == fmt and meta["config_name"] == loaded_config.name
    assert meta["group_size"] == (128 if fmt == "int4" else None) and meta["scale_dtype"] == "float32"
    assert all(f"{k}/q" in plain for k in meta["quantized"]) and "llm/layers/mlp/linear" in meta["quantized"]
    assert not [k for k in os.listdir(tmp_path) if k.startswith(".tmp")], "the temporary file must be gone"


def test_quantize_refuses_to_overwrite_and_bad_options(tmp_path):
    config = ref.get_config("tiny-paligemma")
    ref.save(tmp_path / "m.npz", config, ref.init_params(config))
    out = tmp_path / "q.safetensors"
    with pytest.raises(ValueError, match="unknown quantization format 'int3'.*int8"):
        quantfile.quantize_file(tmp_path / "m.npz", out, "int3")
    with pytest.raises(ValueError, match="ends=2: the model has 2 layers"):
        quantfile.quantize_file(tmp_path / "m.npz", out, "int8", quant.Keep(end_layers=2))
    assert not out.exists()
    quantfile.quantize_file(tmp_path / "m.npz", out, "int8")
    with pytest.raises(ValueError, match="already exists"):
        quantfile.quantize_file(tmp_path / "m.npz", out, "int8")


def _streaming_config():
    """A tiny model with a 16 MiB float32 embedding (16384 x 256) that dwarfs everything else."""
    return ref.get_config("tiny-paligemma", vocab_size=16384, width=256)


@pytest.mark.parametrize("layout", ["npz", "hf"])
def test_quantizing_streams_slices_not_whole_tensors(tmp_path, layout, monkeypatch):
    config = _streaming_config()
    params = ref.init_params(config, seed=0, dtype=ml_dtypes.bfloat16)
    source = tmp_path / ("m.npz" if layout == "npz" else "hf")
    ref.save(source, config, params, format=layout)
    embedding_f32 = 16384 * 256 * 4
    del params
    # Every read is a slice of at most chunk_bytes as float32 (or one row), each read once.
    reads = []
    opened = quantfile.open_source

    def counting_open(path, **overrides):
        config, src = opened(path, **overrides)
        rows = src.rows

        def counted(key, start, stop):
            block = rows(key, start, stop)
            reads.append((key, start, stop, block.size * 4))
            return block

        src.rows = counted
        return config, src

    monkeypatch.setattr(quantfile, "open_source", counting_open)
    chunk = 1 << 20
    tracemalloc.start()
    quantfile.quantize_file(source, tmp_path / "q.safetensors", "int8", chunk_bytes=chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    embedding_reads = [r for r in reads if r[0] == "llm/embedder/input_embedding"]
    assert len(embedding_reads) == embedding_f32 // chunk and all(r[3] <= chunk for r in embedding_reads)
    assert sorted((r[1], r[2]) for r in embedding_reads)[-1][1] == 16384
    assert len({(r[0], r[1]) for r in reads}) == len(reads), "a slice was read twice"
    # numpy reports its buffers to tracemalloc: a few float32 slices, never the 16 MiB tensor.
    assert peak < embedding_f32 / 2, f"peak {peak / 2**20:.1f} MiB while quantizing"
    tracemalloc.start()
    whole = np.asarray(ref.load(source)[1]["llm"]["embedder"]["input_embedding"]).astype(np.float32)
    _, control = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert control >= whole.nbytes, "tracemalloc must see a whole-tensor read (the measurement's control)"


# --- Bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    config = ref.get_config("tiny-paligemma")
    ref.save(folder / "m.npz", config, ref.init_params(config))
    quantfile.quantize_file(folder / "m.npz", folder / "q.safetensors", "int4")
    return folder / "q.safetensors"


def _rewrite(src, dst, change_tensors=None, change_meta=None):
    tensors = load_file(src)
    with safe_open(src, framework="numpy") as f:
        meta = json.loads(f.metadata()[quantfile.HEADER_KEY])
    (change_tensors or (lambda t: None))(tensors)
    (change_meta or (lambda m: None))(meta)
    save_file(tensors, dst, metadata={quantfile.HEADER_KEY: json.dumps(meta)})
    return dst


@pytest.mark.parametrize("change_meta, message", [
    (lambda m: m.update(format="int3"), r"format: expected one of \['int8', 'int4'\], got 'int3'"),
    (lambda m: m.update(version=2), r"version: expected 1 .* got 2"),
    (lambda m: m.update(group_size=3), r"group_size: expected an even integer >= 2 for int4, got 3"),
    (lambda m: m.update(scale_dtype="float8"), r"scale_dtype: expected one of .* got 'float8'"),
    (lambda m: m.pop("config"), r"lacks \['config'\]"),
    (lambda m: m.update(quantized=["llm/layers/mlp/linear"]), r"quantized: expected the keys format int4"),
    (lambda m: m.update(format="int8"), r"/q has shape \[2, 64, 64\], expected \[2, 32, 64\] \(int8, "),
])
def test_bad_headers_are_named(good_file, tmp_path, change_meta, message):
    bad = _rewrite(good_file, tmp_path / "bad.safetensors", change_meta=change_meta)
    with pytest.raises(CheckpointError, match=message):
        quantfile.load_quantized(bad)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (_set("llm/layers/mlp/linear/scale", np.ones((2, 2, 48), np.float32)),
     r"llm/layers/mlp/linear/scale has shape \[2, 2, 48\], expected \[2, 1, 48\]"),
    (_set("llm/layers/mlp/linear/scale", np.ones((2, 1, 48), np.float16)),
     r"llm/layers/mlp/linear/scale has dtype float16, expected float32"),
    (_set("llm/layers/mlp/linear/q", np.full((2, 64, 48), 0x88, np.uint8)), r"linear/q holds the nibble -8"),
    (lambda t: t.pop("llm/final_norm/scale"), r"missing 1: \['llm/final_norm/scale'\]"),
    (_set("llm/extra", np.zeros(3, np.float32)), r"unexpected 1: \['llm/extra'\]"),
])
def test_bad_tensors_are_named(good_file, tmp_path, change, message):
    bad = _rewrite(good_file, tmp_path / "bad.safetensors", change_tensors=change)
    with pytest.raises(CheckpointError, match=message):
        quantfile.load_quantized(bad)


def test_plain_safetensors_is_not_taken_for_a_quantized_file(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no 'paligemma_quant' entry"):
        quantfile.load_quantized(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 20)
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        quantfile.load_quantized(tmp_path / "junk.safetensors")


# --- The command ---------------------------------------------------------------------------


def test_cli_quantize(tmp_path, capsys):
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=3)
    ref.save(tmp_path / "m.npz", config, params)
    out = tmp_path / "q.safetensors"
    argv = ["quantize", "--checkpoint", str(tmp_path / "m.npz"), "--out", str(out), "--format", "int4",
            "--keep", "vision,ends", "--scale-dtype", "bfloat16", "--group-size", "16"]
    assert cli_main(argv) == 0
    assert "wrote" in capsys.readouterr().err
    _, qtree, header = quantfile.load_quantized(out)
    assert (header.group_size, header.scale_dtype, header.keep) == (16, "bfloat16", quant.Keep(True, False, 1))
    _assert_trees_equal(qtree, quant.quantize_tree(params, config, "int4", header.keep, 16, ml_dtypes.bfloat16))
    assert cli_main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert cli_main(argv[:-4] + ["--keep", "eyes"]) == 2 and "unknown part 'eyes'" in capsys.readouterr().err
    assert cli_main(argv[:5] + ["--format", "int2"]) == 2 and "invalid choice" in capsys.readouterr().err
