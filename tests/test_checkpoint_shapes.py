"""Checkpoints that say more, or something else, than PaliGemma needs (ref/checkpoints/checkpoint.py,
ref/checkpoints/inferconfig.py): SigLIP's pooling head in an HF folder is ignored with one warning; a config
inferred from impossible shapes is refused naming the file, the tensors and the sizes."""

import json
import re
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from paligemma import ref
from paligemma.ref.checkpoints.checkpoint import CheckpointError

# transformers' SiglipMultiheadAttentionPoolingHead, as a `vision_use_head=True` checkpoint stores it.
HEAD = ["probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
        "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias"]


def _hf_with_head(tmp_path, name="tiny-paligemma2"):
    config = ref.get_config(name)
    params = ref.init_params(config, seed=0, random_norms=True)
    ref.save(tmp_path / "hf", config, params, format="hf")
    W, M = config.vision.width, config.vision.mlp_dim
    shapes = {"probe": (1, 1, W), "attention.in_proj_weight": (3 * W, W), "attention.in_proj_bias": (3 * W,),
              "attention.out_proj.weight": (W, W), "attention.out_proj.bias": (W,), "layernorm.weight": (W,),
              "layernorm.bias": (W,), "mlp.fc1.weight": (M, W), "mlp.fc1.bias": (M,), "mlp.fc2.weight": (W, M),
              "mlp.fc2.bias": (W,)}
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    for i, key in enumerate(HEAD):
        tensors[f"vision_tower.vision_model.head.{key}"] = np.full(shapes[key], i, np.float32)
    save_file(tensors, path)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hf["vision_config"]["vision_use_head"]  # transformers' default: True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    return config, params


def test_siglip_pooling_head_is_ignored_with_one_warning(tmp_path):
    config, params = _hf_with_head(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded_config, loaded = ref.load(tmp_path / "hf")
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "ignoring 11 tensors" in message and str(tmp_path / "hf") in message
    assert all(f"vision_tower.vision_model.head.{key}" in message for key in HEAD)
    assert loaded_config == config
    for key, value in ref.flatten(params).items():
        np.testing.assert_array_equal(ref.flatten(loaded)[key], value, err_msg=key)


def test_other_unknown_vision_tensors_are_still_refused(tmp_path):
    _hf_with_head(tmp_path)
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["vision_tower.vision_model.headless.weight"] = np.zeros(2, np.float32)
    save_file(tensors, path)
    with pytest.warns(UserWarning, match="ignoring 11 tensors"):
        with pytest.raises(CheckpointError, match=r"unexpected 1: \['vision_tower.vision_model.headless.weight'\]"):
            ref.load(tmp_path / "hf")


def _npz_with(tmp_path, name, key, shape):
    """A saved tiny model whose tensor `key` is replaced by zeros of `shape`."""
    config = ref.get_config(name)
    flat = ref.flatten(ref.init_params(config, seed=0))
    flat[key] = np.zeros(shape, np.float32)
    np.savez(tmp_path / "bad.npz", **flat)
    return config, {k: list(np.shape(v)) for k, v in flat.items()}


@pytest.mark.parametrize("read", [ref.load, ref.checkpoints.checkpoint.read_config])
def test_odd_head_dim_names_the_file_the_tensor_and_the_disagreeing_shape(tmp_path, read):
    config, shapes = _npz_with(tmp_path, "tiny-paligemma2", "llm/layers/attn/q_einsum/w", (3, 4, 48, 15))
    q, kv = shapes["llm/layers/attn/q_einsum/w"], shapes["llm/layers/attn/kv_einsum/w"]
    assert kv[4] == 16
    expected = (f"bad.npz: cannot infer the model config from the tensor shapes (GemmaConfig: head_dim must be "
                f"even for RoPE, got 15): head_dim 15 is read from llm/layers/attn/q_einsum/w {q} (axis 3); "
                f"llm/layers/attn/kv_einsum/w {kv} has 16 there")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        read(tmp_path / "bad.npz")


def test_heads_that_do_not_divide_the_vision_width_name_both_tensors(tmp_path):
    config, shapes = _npz_with(tmp_path, "tiny-paligemma", "img/Transformer/encoderblock/"
                               "MultiHeadDotProductAttention_0/query/kernel", (2, 32, 3, 8))
    with pytest.raises(CheckpointError) as info:
        ref.load(tmp_path / "bad.npz")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'bad.npz'}: cannot infer the model config from the tensor shapes "
                              "(VisionConfig: width 32 is not a multiple of num_heads 3)")
    assert f"width 32 is read from img/embedding/kernel {shapes['img/embedding/kernel']} (axis 3)" in message
    assert ("num_heads 3 is read from img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel "
            "[2, 32, 3, 8] (axis 2)") in message


def test_kv_heads_that_do_not_divide_the_heads_are_named(tmp_path):
    _, shapes = _npz_with(tmp_path, "tiny-paligemma2", "llm/layers/attn/kv_einsum/w", (3, 2, 3, 48, 16))
    with pytest.raises(CheckpointError, match=re.escape(
            "(GemmaConfig: num_heads 4 is not a multiple of num_kv_heads 3): num_heads 4 is read from "
            f"llm/layers/attn/q_einsum/w {shapes['llm/layers/attn/q_einsum/w']} (axis 1); num_kv_heads 3 is read "
            "from llm/layers/attn/kv_einsum/w [3, 2, 3, 48, 16] (axis 2)")):
        ref.load(tmp_path / "bad.npz")
