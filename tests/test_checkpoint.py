import dataclasses
import json
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from safetensors.numpy import load_file, save_file

from paligemma import ref
from paligemma.parity.strategies import configs
from paligemma.ref.checkpoints import hf_layout
from paligemma.ref.checkpoints.checkpoint import CheckpointError

TINY = ["tiny-paligemma", "tiny-paligemma2", "tiny-paligemma2-28b"]
# Shapes cannot tell the tiny 28B-style model's query scaling: pass it, as a user would.
HINTS = {"tiny-paligemma2-28b": dict(query_scaling="rsqrt_emb_per_head")}


def _params(config, dtype=np.float32, seed=0):
    return ref.init_params(config, seed=seed, dtype=dtype, random_norms=True)


def _assert_same(a, b):
    fa, fb = ref.flatten(a), ref.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]).view(np.uint8), np.asarray(fb[k]).view(np.uint8), err_msg=k)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_npz_roundtrip_is_exact_and_infers_the_config(tmp_path, name, dtype):
    config = ref.get_config(name)
    params = _params(config, dtype)
    ref.save(tmp_path / "m.npz", config, params)
    loaded_config, loaded = ref.load(tmp_path / "m.npz", name=name, **HINTS.get(name, {}))
    assert loaded_config == config
    _assert_same(params, loaded)


def test_npz_stores_bfloat16_as_void_like_big_vision(tmp_path):
    config = ref.get_config("tiny-paligemma")
    ref.save(tmp_path / "m.npz", config, _params(config, ml_dtypes.bfloat16))
    with np.load(tmp_path / "m.npz", allow_pickle=False) as raw:
        assert raw["llm/final_norm/scale"].dtype == np.dtype("V2")


def test_npz_members_are_memory_mapped_read_only(tmp_path):
    config = ref.get_config("tiny-paligemma")
    ref.save(tmp_path / "m.npz", config, _params(config))
    _, params = ref.load(tmp_path / "m.npz")
    w = params["llm"]["layers"]["mlp"]["linear"]
    assert isinstance(w, np.memmap) and not w.flags.writeable


def test_npz_with_params_prefix_and_compression(tmp_path):
    # The released Kaggle file prefixes every key with "params/"; compressed members are read too.
    config = ref.get_config("tiny-paligemma2")
    params = _params(config, ml_dtypes.bfloat16)
    flat = {f"params/{k}": v for k, v in ref.flatten(params).items()}
    np.savez_compressed(tmp_path / "kaggle.npz", **flat)
    loaded_config, loaded = ref.load(tmp_path / "kaggle.npz", name=config.name)
    assert loaded_config == config
    _assert_same(params, loaded)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_npz_to_hf_to_npz_is_bit_exact(tmp_path, name, dtype):
    config = ref.get_config(name)
    params = _params(config, dtype)
    ref.save(tmp_path / "a.npz", config, params)
    c1, p1 = ref.load(tmp_path / "a.npz", name=name, **HINTS.get(name, {}))
    ref.save(tmp_path / "hf", c1, p1, format="hf")
    c2, p2 = ref.load(tmp_path / "hf", name=name)
    assert c2 == config  # config.json carries everything shapes cannot
    ref.save(tmp_path / "b.npz", c2, p2)
    _assert_same(p1, ref.load(tmp_path / "b.npz", name=name, **HINTS.get(name, {}))[1])
    with zipfile.ZipFile(tmp_path / "a.npz") as a, zipfile.ZipFile(tmp_path / "b.npz") as b:
        assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_hf_layout_matches_hf_names_and_transposes(tmp_path):
    # Independent of our mapping code: the HF formulas from the reference notes.
    config = ref.get_config("tiny-paligemma2")
    params = _params(config)
    ref.save(tmp_path / "hf", config, params, format="hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    g, layers = config.llm, params["llm"]["layers"]
    N, K, H, D = g.num_heads, g.num_kv_heads, g.head_dim, g.width
    q = hf["language_model.model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, layers["attn"]["q_einsum"]["w"][1].transpose(0, 2, 1).reshape(N * H, D))
    v = hf["language_model.model.layers.2.self_attn.v_proj.weight"]
    np.testing.assert_array_equal(v, layers["attn"]["kv_einsum"]["w"][2, 1].transpose(0, 2, 1).reshape(K * H, D))
    o = hf["language_model.model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(o, layers["attn"]["attn_vec_einsum"]["w"][0].reshape(N * H, D).T)
    np.testing.assert_array_equal(hf["language_model.model.layers.0.mlp.up_proj.weight"],
                                  layers["mlp"]["gating_einsum"][0, 1].T)
    np.testing.assert_array_equal(hf["language_model.model.layers.2.pre_feedforward_layernorm.weight"],
                                  layers["pre_ffw_norm"]["scale"][2])
    np.testing.assert_array_equal(hf["vision_tower.vision_model.embeddings.patch_embedding.weight"],
                                  params["img"]["embedding"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(hf["multi_modal_projector.linear.weight"], params["img"]["head"]["kernel"].T)
    assert "language_model.lm_head.weight" not in hf  # tied: HF drops it too
    assert sum(v.size for v in hf.values()) == ref.num_params(params)


def _rename(tensors, old, new):
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()}


@pytest.mark.parametrize("variant", ["flat_vision", "v5_memory_names", "with_lm_head"])
def test_every_hf_naming_variant_loads(tmp_path, variant):
    config = ref.get_config("tiny-paligemma2")
    params = _params(config)
    ref.save(tmp_path / "hf", config, params, format="hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    if variant == "flat_vision":  # transformers >= 5.6, freshly built models
        tensors = _rename(tensors, "vision_tower.vision_model.", "vision_tower.")
    elif variant == "v5_memory_names":
        tensors = _rename(tensors, "language_model.model.", "model.language_model.")
        tensors = _rename(tensors, "vision_tower.vision_model.", "model.vision_tower.vision_model.")
        tensors = _rename(tensors, "multi_modal_projector.", "model.multi_modal_projector.")
    else:
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    loaded_config, loaded = ref.load(tmp_path / "hf")
    assert loaded_config.llm == config.llm
    _assert_same(params, loaded)


def test_hub_embedding_rows_load_and_trim(tmp_path):
    # The hub pads the table to 257216 rows (<image> + padding); big_vision has 257152.
    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    ref.save(tmp_path / "hf", config, params, format="hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    table = tensors["language_model.model.embed_tokens.weight"]
    tensors["language_model.model.embed_tokens.weight"] = np.concatenate([table, np.ones((64, table.shape[1]), table.dtype)])
    save_file(tensors, path)
    wide_config, wide = ref.load(tmp_path / "hf")
    assert wide_config.llm.vocab_size == 364 and wide["llm"]["embedder"]["input_embedding"].shape[0] == 364
    narrow_config, narrow = ref.load(tmp_path / "hf", vocab_size=300)
    assert narrow_config.llm.vocab_size == 300
    _assert_same(params, narrow)
    with pytest.raises(CheckpointError, match="vocab_size 400 requested, but the embedding has only 364 rows"):
        ref.load(tmp_path / "hf", vocab_size=400)


def test_sharded_hf_directory(tmp_path):
    config = ref.get_config("tiny-paligemma2")
    params = _params(config)
    ref.save(tmp_path / "hf", config, params, format="hf", max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _assert_same(params, ref.load(tmp_path / "hf")[1])


def test_single_safetensors_without_config_needs_head_split(tmp_path):
    config = ref.get_config("tiny-paligemma")
    params = _params(config)
    ref.save(tmp_path / "hf", config, params, format="hf")
    single = tmp_path / "model.safetensors"
    os.replace(tmp_path / "hf" / "model.safetensors", single)
    with pytest.raises(CheckpointError, match="pass num_heads=, head_dim= and vision_num_heads="):
        ref.load(single)
    loaded_config, loaded = ref.load(single, num_heads=4, head_dim=16, vision_num_heads=4, name=config.name)
    assert loaded_config == config
    _assert_same(params, loaded)


@given(configs())
def test_config_json_roundtrip(config):
    g = config.llm
    if not g.post_norms and (g.query_scaling != "rsqrt_head_dim" or g.attn_logits_softcap
                             or g.final_logits_softcap or g.sliding_window):
        with pytest.raises(ValueError, match="HF cannot express this config"):
            hf_layout.config_to_hf(config)
        return
    back = hf_layout.config_from_hf(hf_layout.config_to_hf(config), name=config.name)
    # When head_dim == width // heads the two scalings are one number; HF keeps only the number.
    assert back.llm.query_scale == g.query_scale
    assert back.replace(llm=dataclasses.replace(back.llm, query_scaling=g.query_scaling)) == config


# --- bad files ----------------------------------------------------------------------------


def _saved_npz(tmp_path, name="tiny-paligemma"):
    config = ref.get_config(name)
    params = _params(config)
    ref.save(tmp_path / "m.npz", config, params)
    return config, ref.flatten(params)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _, flat = _saved_npz(tmp_path)
    del flat["llm/final_norm/scale"]
    flat["llm/extra/thing"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(CheckpointError, match=r"bad.npz: keys do not match the model \(missing 1: \['llm/final_norm/scale'\]; "
                                              r"unexpected 1: \['llm/extra/thing'\]\)"):
        ref.load(tmp_path / "bad.npz")


def test_wrong_shape_names_key_expected_and_actual(tmp_path):
    _, flat = _saved_npz(tmp_path)
    flat["llm/layers/mlp/linear"] = flat["llm/layers/mlp/linear"][:, :-1]
    np.savez(tmp_path / "bad.npz", **flat)
    with pytest.raises(CheckpointError, match=r"bad.npz: llm/layers/mlp/linear has shape \[2, 95, 48\], expected \[2, 96, 48\]"):
        ref.load(tmp_path / "bad.npz")


def test_truncated_files_are_reported(tmp_path):
    config = ref.get_config("tiny-paligemma")
    _saved_npz(tmp_path)
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.npz: not a readable .npz archive"):
        ref.load(tmp_path / "cut.npz")
    ref.save(tmp_path / "hf", config, _params(config), format="hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' ends at byte \d+ of the data section"):
        ref.load(tmp_path / "hf")


def test_pickles_are_refused(tmp_path):
    _, flat = _saved_npz(tmp_path)
    flat["llm/final_norm/scale"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "pickle.npz", **flat)
    with pytest.raises(CheckpointError, match=r"pickle.npz: member 'llm/final_norm/scale' holds Python objects"):
        ref.load(tmp_path / "pickle.npz")


def test_untied_lm_head_is_refused(tmp_path):
    config = ref.get_config("tiny-paligemma")
    ref.save(tmp_path / "hf", config, _params(config), format="hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"] + 1
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'lm_head.weight' differs from the input embedding"):
        ref.load(tmp_path / "hf")


def test_unknown_hf_tensor_is_listed(tmp_path):
    config = ref.get_config("tiny-paligemma")
    ref.save(tmp_path / "hf", config, _params(config), format="hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["something.else.weight"] = np.zeros(2, np.float32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1: \['something.else.weight'\]"):
        ref.load(tmp_path / "hf")


@pytest.mark.parametrize("content, match", [
    (b"", r"unknown checkpoint format"),
    (b"\x00" * 64, r"unknown checkpoint format"),
])
def test_unknown_files(tmp_path, content, match):
    (tmp_path / "weights.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        ref.load(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match=r"nope.npz: no such file or directory"):
        ref.load(tmp_path / "nope.npz")
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"x.safetensors: not a safetensors file"):
        ref.load(tmp_path / "x.safetensors")


def test_unknown_override_is_named(tmp_path):
    _saved_npz(tmp_path)
    with pytest.raises(ValueError, match=r"load: unknown overrides \['softcap'\]"):
        ref.load(tmp_path / "m.npz", softcap=30.0)


def test_save_never_overwrites_silently_and_is_atomic(tmp_path, monkeypatch):
    config, flat = _saved_npz(tmp_path)
    before = (tmp_path / "m.npz").read_bytes()
    params = ref.unflatten(flat)
    with pytest.raises(ValueError, match=r"m.npz: already exists; pass overwrite=True"):
        ref.save(tmp_path / "m.npz", config, params)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        ref.save(tmp_path / "m.npz", config, params, overwrite=True)
    assert (tmp_path / "m.npz").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]  # no temporary file left behind


def test_save_checks_the_tree(tmp_path):
    config = ref.get_config("tiny-paligemma")
    flat = ref.flatten(_params(config))
    flat["llm/layers/mlp/linear"] = flat["llm/layers/mlp/linear"][:1]
    with pytest.raises(CheckpointError, match=r"llm/layers/mlp/linear has shape \[1, 96, 48\], expected \[2, 96, 48\]"):
        ref.save(tmp_path / "x.npz", config, ref.unflatten(flat))
    assert not os.listdir(tmp_path)
