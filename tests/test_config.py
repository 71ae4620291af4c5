import dataclasses

import numpy as np
import pytest
from hypothesis import given

from paligemma import ref
from paligemma.parity.strategies import configs
from paligemma.ref.config import count_llm_params, count_vision_params


# Published totals: PaliGemma 3B is 2.923B (paper, HF model card); PaliGemma 2 3B/10B/28B are
# 3.03B / 9.66B / 27.65B (HF's meta-device listing of 728 tensors gives 3.032B for 3B).
@pytest.mark.parametrize("name, billions", [
    ("paligemma-3b-224", 2.923), ("paligemma2-3b-224", 3.032),
    ("paligemma2-10b-224", 9.66), ("paligemma2-28b-224", 27.65),
])
def test_preset_parameter_counts_match_published_totals(name, billions):
    digits = len(str(billions).split(".")[1])
    assert round(ref.count_params(ref.get_config(name)) / 1e9, digits) == billions


def test_paligemma_3b_split_between_towers():
    # big_vision notebook overview: ViT + head 414.8M, LLM 2.509B.
    config = ref.get_config("paligemma-3b-224")
    assert round(count_vision_params(config.vision, config.llm.width) / 1e6, 1) == 414.8
    assert round(count_llm_params(config.llm) / 1e9, 3) == 2.509


def test_higher_resolutions_only_add_position_embeddings():
    for family in ("paligemma-3b", "paligemma2-3b", "paligemma2-10b", "paligemma2-28b"):
        base = ref.count_params(ref.get_config(f"{family}-224"))
        for res, tokens in ((448, 1024), (896, 4096)):
            assert ref.count_params(ref.get_config(f"{family}-{res}")) - base == (tokens - 256) * 1152


def test_released_architectures():
    pg1 = ref.get_config("paligemma-3b-448")
    assert (pg1.vision.num_patches, pg1.vision.head_dim, pg1.llm.num_kv_heads) == (1024, 72, 1)
    assert pg1.llm.attn_logits_softcap is None and not pg1.llm.post_norms
    assert pg1.llm.query_scale == 1 / 16
    pg2 = ref.get_config("paligemma2-10b-896")
    assert (pg2.vision.num_patches, pg2.llm.num_heads, pg2.llm.num_kv_heads) == (4096, 16, 8)
    assert (pg2.llm.attn_logits_softcap, pg2.llm.final_logits_softcap) == (50.0, 30.0)
    big = ref.get_config("paligemma2-28b-224")
    assert big.llm.head_dim == 128 and big.llm.query_scale == pytest.approx(1 / 12)
    for config in ref.PRESETS.values():
        assert config.llm.sliding_window is None  # big_vision: global attention everywhere
        assert config.name in ref.PRESETS


@given(configs())
def test_closed_form_count_equals_shapes(config):
    shapes = ref.flatten(ref.param_shapes(config)).values()
    assert ref.count_params(config) == sum(int(np.prod(s)) for s in shapes)


def test_init_params_follow_shapes_and_seed():
    config = ref.get_config("tiny-paligemma2")
    a = ref.init_params(config, seed=3, dtype=np.float64)
    b = ref.init_params(config, seed=3, dtype=np.float64)
    c = ref.init_params(config, seed=4, dtype=np.float64)
    flat_a, flat_b, flat_c = ref.flatten(a), ref.flatten(b), ref.flatten(c)
    assert {k: v.shape for k, v in flat_a.items()} == ref.flatten(ref.param_shapes(config))
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    assert not np.array_equal(flat_a["llm/layers/mlp/linear"], flat_c["llm/layers/mlp/linear"])
    assert ref.num_params(a) == ref.count_params(config)
    # Norms are identities by default and random on request.
    assert np.all(flat_a["llm/final_norm/scale"] == 0)
    noisy = ref.flatten(ref.init_params(config, seed=3, random_norms=True))
    assert np.all(noisy["llm/final_norm/scale"] != 0)
    assert np.all(noisy["img/Transformer/encoder_norm/scale"] != 1)


def test_flatten_roundtrip_uses_big_vision_keys():
    config = ref.get_config("tiny-paligemma")
    flat = ref.flatten(ref.init_params(config))
    assert "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel" in flat
    assert "llm/layers/attn/kv_einsum/w" in flat and "llm/layers/mlp/gating_einsum" in flat
    assert ref.flatten(ref.unflatten(flat)).keys() == flat.keys()


@pytest.mark.parametrize("build, match", [
    (lambda: ref.VisionConfig(image_size=30, patch_size=7), "image_size 30 is not a multiple of patch_size 7"),
    (lambda: ref.GemmaConfig(num_heads=6, num_kv_heads=4), "num_heads 6 is not a multiple of num_kv_heads 4"),
    (lambda: ref.GemmaConfig(head_dim=7), "head_dim must be even"),
    (lambda: ref.GemmaConfig(query_scaling="rsqrt"), "query_scaling must be one of"),
    (lambda: ref.GemmaConfig(attn_logits_softcap=0.0), "attn_logits_softcap must be None or > 0"),
    (lambda: ref.get_config("paligemma-7b"), "unknown preset 'paligemma-7b'"),
    (lambda: ref.PaliGemmaConfig(llm=ref.GemmaConfig(vocab_size=2)), "bos_id 2 is outside the vocabulary"),
])
def test_bad_configs_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_configs_are_frozen_and_overridable():
    config = ref.get_config("paligemma2-3b-224", final_logits_softcap=None)
    assert config.llm.final_logits_softcap is None and config.llm.attn_logits_softcap == 50.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.llm.width = 1
