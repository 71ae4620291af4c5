"""Hugging Face transformers' PaliGemma layout: tensor names, transposes and config.json.

HF stores per-layer `torch.nn.Linear` weights as `[out, in]` under names like
`language_model.model.layers.3.self_attn.q_proj.weight`; big_vision stacks layers and keeps
heads as their own axis (`llm/layers/attn/q_einsum/w [L, N, D, H]`). This module converts
between the two, one tensor at a time, and between HF's `config.json` and `PaliGemmaConfig`.

Names accepted (every transformers version since 4.41, see docs/architecture.md):
`vision_tower.vision_model.*` or `vision_tower.*`; `language_model.model.*`,
`model.language_model.*` or `language_model.*`; `multi_modal_projector.*`; all optionally
under `model.`; optional `lm_head.weight` / `language_model.lm_head.weight` (tied).
Names written: the hub's legacy names, which every version loads.
"""

from ..config import GemmaConfig, PaliGemmaConfig, VisionConfig, uses_sliding_window

ENC = "img/Transformer/encoderblock"

# Canonical HF name (prefixes stripped) -> (big_vision key, how the tensor is transformed).
# `{i}` is the layer index; per-layer tensors are stacked on a leading axis.
_VISION = {
    "embeddings.patch_embedding.weight": ("img/embedding/kernel", "conv"),
    "embeddings.patch_embedding.bias": ("img/embedding/bias", "same"),
    "embeddings.position_embedding.weight": ("img/pos_embedding", "posemb"),
    "post_layernorm.weight": ("img/Transformer/encoder_norm/scale", "same"),
    "post_layernorm.bias": ("img/Transformer/encoder_norm/bias", "same"),
    "encoder.layers.{i}.layer_norm1.weight": (f"{ENC}/LayerNorm_0/scale", "same"),
    "encoder.layers.{i}.layer_norm1.bias": (f"{ENC}/LayerNorm_0/bias", "same"),
    "encoder.layers.{i}.layer_norm2.weight": (f"{ENC}/LayerNorm_1/scale", "same"),
    "encoder.layers.{i}.layer_norm2.bias": (f"{ENC}/LayerNorm_1/bias", "same"),
    "encoder.layers.{i}.mlp.fc1.weight": (f"{ENC}/MlpBlock_0/Dense_0/kernel", "linear"),
    "encoder.layers.{i}.mlp.fc1.bias": (f"{ENC}/MlpBlock_0/Dense_0/bias", "same"),
    "encoder.layers.{i}.mlp.fc2.weight": (f"{ENC}/MlpBlock_0/Dense_1/kernel", "linear"),
    "encoder.layers.{i}.mlp.fc2.bias": (f"{ENC}/MlpBlock_0/Dense_1/bias", "same"),
    "encoder.layers.{i}.self_attn.out_proj.weight": (f"{ENC}/MultiHeadDotProductAttention_0/out/kernel", "heads_in"),
    "encoder.layers.{i}.self_attn.out_proj.bias": (f"{ENC}/MultiHeadDotProductAttention_0/out/bias", "same"),
}
for _hf, _bv in (("q", "query"), ("k", "key"), ("v", "value")):
    _VISION[f"encoder.layers.{{i}}.self_attn.{_hf}_proj.weight"] = (
        f"{ENC}/MultiHeadDotProductAttention_0/{_bv}/kernel", "heads_out")
    _VISION[f"encoder.layers.{{i}}.self_attn.{_hf}_proj.bias"] = (
        f"{ENC}/MultiHeadDotProductAttention_0/{_bv}/bias", "heads_bias")

_PROJECTOR = {
    "linear.weight": ("img/head/kernel", "linear"),
    "linear.bias": ("img/head/bias", "same"),
}

_LLM_COMMON = {
    "embed_tokens.weight": ("llm/embedder/input_embedding", "same"),
    "norm.weight": ("llm/final_norm/scale", "same"),
    "layers.{i}.self_attn.q_proj.weight": ("llm/layers/attn/q_einsum/w", "q"),
    "layers.{i}.self_attn.k_proj.weight": ("llm/layers/attn/kv_einsum/w", "k"),
    "layers.{i}.self_attn.v_proj.weight": ("llm/layers/attn/kv_einsum/w", "v"),
    "layers.{i}.self_attn.o_proj.weight": ("llm/layers/attn/attn_vec_einsum/w", "o"),
    "layers.{i}.mlp.gate_proj.weight": ("llm/layers/mlp/gating_einsum", "gate"),
    "layers.{i}.mlp.up_proj.weight": ("llm/layers/mlp/gating_einsum", "up"),
    "layers.{i}.mlp.down_proj.weight": ("llm/layers/mlp/linear", "linear"),
    "layers.{i}.input_layernorm.weight": ("llm/layers/pre_attention_norm/scale", "same"),
}
# The same HF name means different norms in Gemma 1 and Gemma 2.
_GEMMA1_NORMS = {"layers.{i}.post_attention_layernorm.weight": ("llm/layers/pre_ffw_norm/scale", "same")}
_GEMMA2_NORMS = {
    "layers.{i}.post_attention_layernorm.weight": ("llm/layers/post_attention_norm/scale", "same"),
    "layers.{i}.pre_feedforward_layernorm.weight": ("llm/layers/pre_ffw_norm/scale", "same"),
    "layers.{i}.post_feedforward_layernorm.weight": ("llm/layers/post_ffw_norm/scale", "same"),
}

HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
_SAVE_PREFIX = {"vision": "vision_tower.vision_model.", "projector": "multi_modal_projector.",
                "llm": "language_model.model."}


def canonical_name(name):
    """`(tower, rest)` for an HF tensor name, tower in vision/projector/llm/lm_head, or None."""
    if name in HEAD_NAMES:
        return "lm_head", ""
    if name.startswith("model."):  # transformers >= 4.52 in-memory names
        name = name[len("model."):]
    for prefix, tower in (("vision_tower.vision_model.", "vision"), ("vision_tower.", "vision"),
                          ("multi_modal_projector.", "projector"), ("language_model.model.", "llm"),
                          ("language_model.", "llm")):
        if name.startswith(prefix):
            return tower, name[len(prefix):]
    return None


def unused_by_paligemma(canonical):
    """True for a `canonical_name` that an HF folder may hold but PaliGemma never uses: SigLIP's
    attention-pooling head (`vision_tower.vision_model.head.*`, 11 tensors), which transformers'
    `SiglipVisionConfig` builds by default (`vision_use_head=True`); PaliGemma takes every patch."""
    return canonical is not None and canonical[0] == "vision" and canonical[1].startswith("head.")


def name_table(config: PaliGemmaConfig):
    """Every `(tower, canonical HF name) -> (big_vision key, transform, layer or None)`."""
    llm = {**_LLM_COMMON, **(_GEMMA2_NORMS if config.llm.post_norms else _GEMMA1_NORMS)}
    table = {}
    for tower, names, depth in (("vision", _VISION, config.vision.depth), ("projector", _PROJECTOR, 0),
                                ("llm", llm, config.llm.depth)):
        for pattern, (key, how) in names.items():
            if "{i}" in pattern:
                for i in range(depth):
                    table[(tower, pattern.format(i=i))] = (key, how, i)
            else:
                table[(tower, pattern)] = (key, how, None)
    return table


def _heads(config, key):
    """(num heads, head dim) of the attention a big_vision key belongs to."""
    if key.startswith("img/"):
        return config.vision.num_heads, config.vision.head_dim
    return config.llm.num_heads, config.llm.head_dim


def hf_to_bv(w, how, key, config):
    """One HF tensor in big_vision's per-layer layout (no layer axis)."""
    N, H = _heads(config, key)
    K = config.llm.num_kv_heads
    if how == "same":
        return w
    if how == "conv":  # torch [W, 3, p, p] -> HWIO [p, p, 3, W]
        return w.transpose(2, 3, 1, 0)
    if how == "posemb":  # [P, W] -> [1, P, W]
        return w[None]
    if how in ("linear", "gate", "up"):  # [out, in] -> [in, out]
        return w.T
    if how == "heads_out":  # [N*H, W] -> [W, N, H]
        return w.T.reshape(w.shape[1], N, H)
    if how == "heads_bias":  # [N*H] -> [N, H]
        return w.reshape(N, H)
    if how == "heads_in":  # [W, N*H] -> [N, H, W]
        return w.T.reshape(N, H, w.shape[0])
    if how == "q":  # [N*H, D] -> [N, D, H]
        return w.reshape(N, H, w.shape[1]).transpose(0, 2, 1)
    if how in ("k", "v"):  # [K*H, D] -> [K, D, H]
        return w.reshape(K, H, w.shape[1]).transpose(0, 2, 1)
    if how == "o":  # [D, N*H] -> [N, H, D]
        return w.T.reshape(N, H, w.shape[0])
    raise AssertionError(how)


def bv_to_hf(w, how, key, config):
    """Inverse of `hf_to_bv` for one layer's big_vision tensor."""
    if how == "same":
        return w
    if how == "conv":
        return w.transpose(3, 2, 0, 1)
    if how == "posemb":
        return w[0]
    if how in ("linear", "gate", "up"):
        return w.T
    if how == "heads_out":  # [W, N, H] -> [N*H, W]
        return w.reshape(w.shape[0], -1).T
    if how == "heads_bias":
        return w.reshape(-1)
    if how == "heads_in":  # [N, H, W] -> [W, N*H]
        return w.reshape(-1, w.shape[-1]).T
    if how in ("q", "k", "v"):  # [N, D, H] -> [N*H, D]
        return w.transpose(0, 2, 1).reshape(-1, w.shape[1])
    if how == "o":  # [N, H, D] -> [D, N*H]
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(how)


def bv_slice(how):
    """Where inside a stacked big_vision tensor one layer's piece lives (after the layer index)."""
    return {"k": (0,), "v": (1,), "gate": (0,), "up": (1,)}.get(how, ())


def hf_names_for_save(config: PaliGemmaConfig):
    """`HF name -> (big_vision key, transform, layer)` with the hub's legacy names."""
    return {_SAVE_PREFIX[tower] + name: spec for (tower, name), spec in name_table(config).items()}


# --- config.json ------------------------------------------------------------------------


def config_from_hf(hf: dict, name="hf") -> PaliGemmaConfig:
    """`PaliGemmaConfig` from a parsed HF `config.json` (model_type "paligemma")."""
    vc, tc = hf.get("vision_config", {}), hf.get("text_config", {})
    gemma2 = tc.get("model_type", "gemma") == "gemma2"
    width = tc.get("hidden_size", 2048)
    heads = tc.get("num_attention_heads", 8)
    head_dim = tc.get("head_dim", width // heads)
    scalar = tc.get("query_pre_attn_scalar", head_dim if gemma2 else None)
    if scalar is None or scalar == head_dim:
        scaling = "rsqrt_head_dim"
    elif scalar == width // heads:
        scaling = "rsqrt_emb_per_head"
    else:
        raise ValueError(f"config.json: query_pre_attn_scalar {scalar} is neither head_dim {head_dim} nor "
                         f"hidden_size / num_attention_heads {width // heads}; only those two are supported")
    rope = (tc.get("rope_parameters") or {}).get("rope_theta", tc.get("rope_theta", 10_000.0))
    window = _sliding_window_from_hf(tc) if gemma2 else None
    llm = GemmaConfig(
        width=width, depth=tc.get("num_hidden_layers", 18), mlp_dim=tc.get("intermediate_size", 16384),
        num_heads=heads, num_kv_heads=tc.get("num_key_value_heads", heads), head_dim=head_dim,
        vocab_size=tc.get("vocab_size", hf.get("vocab_size", 257152)), query_scaling=scaling,
        attn_logits_softcap=(tc.get("attn_logit_softcapping", 50.0) or None) if gemma2 else None,
        final_logits_softcap=(tc.get("final_logit_softcapping", 30.0) or None) if gemma2 else None,
        post_norms=gemma2, sliding_window=window,
        rope_base=float(rope), norm_eps=tc.get("rms_norm_eps", 1e-6),
    )
    vision = VisionConfig(
        image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 14),
        width=vc.get("hidden_size", 1152), depth=vc.get("num_hidden_layers", 27),
        mlp_dim=vc.get("intermediate_size", 4304), num_heads=vc.get("num_attention_heads", 16),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
    )
    ids = {k: hf[f"{k}_token_id"] for k in ("pad", "eos", "bos") if isinstance(hf.get(f"{k}_token_id"), int)}
    return PaliGemmaConfig(vision, llm, name=name, **{f"{k}_id": v for k, v in ids.items()})


NO_WINDOW = 1 << 30


def hf_layer_types(config: GemmaConfig):
    """HF's `layer_types`: "sliding_attention" where `uses_sliding_window`, else "full_attention"."""
    return ["sliding_attention" if uses_sliding_window(config, i) else "full_attention" for i in range(config.depth)]


def _sliding_window_from_hf(tc):
    """Gemma 2's window: HF's default windows even layers; `layer_types` may say otherwise."""
    window = tc.get("sliding_window", 4096)
    types = tc.get("layer_types")
    depth = tc.get("num_hidden_layers", len(types or []))
    if types is not None:
        if all(t == "full_attention" for t in types):
            return None
        even = hf_layer_types(GemmaConfig(depth=depth, sliding_window=1))  # any window: where it applies
        if list(types) != even:
            raise ValueError(f"layer_types {types} is not Gemma 2's pattern (sliding on even layers)")
    return None if window is None or window >= NO_WINDOW else window


def config_to_hf(config: PaliGemmaConfig, dtype_name="float32") -> dict:
    """An HF `config.json` dict that transformers' `PaliGemmaForConditionalGeneration` loads."""
    v, g = config.vision, config.llm
    gemma2_only = {"query_scaling": g.query_scaling != "rsqrt_head_dim", "attn_logits_softcap": g.attn_logits_softcap,
                   "final_logits_softcap": g.final_logits_softcap, "sliding_window": g.sliding_window}
    unsupported = [k for k, v in gemma2_only.items() if v]
    if not g.post_norms and unsupported:
        raise ValueError(f"config_to_hf: {config.name} has no post-norms, so HF sees it as Gemma 1, which has no "
                         f"{unsupported}; HF cannot express this config")
    text = {
        "model_type": "gemma2" if g.post_norms else "gemma",
        "hidden_size": g.width, "num_hidden_layers": g.depth, "intermediate_size": g.mlp_dim,
        "num_attention_heads": g.num_heads, "num_key_value_heads": g.num_kv_heads, "head_dim": g.head_dim,
        "vocab_size": g.vocab_size, "rms_norm_eps": g.norm_eps, "rope_theta": g.rope_base,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "attention_bias": False, "torch_dtype": dtype_name,
    }
    if g.post_norms:
        text.update(
            query_pre_attn_scalar=g.head_dim if g.query_scaling == "rsqrt_head_dim" else g.width // g.num_heads,
            attn_logit_softcapping=g.attn_logits_softcap, final_logit_softcapping=g.final_logits_softcap,
            # transformers >= 4.53 reads layer_types; older versions window every even layer,
            # so "no window" is also written as a window longer than any sequence.
            sliding_window=g.sliding_window or NO_WINDOW,
            layer_types=hf_layer_types(g),
        )
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
        "image_size": v.image_size, "num_image_tokens": v.num_patches, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "gelu_pytorch_tanh", "projection_dim": g.width, "vision_use_head": False,
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "text_config": text, "vision_config": vision, "hidden_size": g.width, "projection_dim": g.width,
        "image_token_index": g.vocab_size, "image_token_id": g.vocab_size,
        "pad_token_id": config.pad_id, "eos_token_id": config.eos_id, "bos_token_id": config.bos_id,
        "tie_word_embeddings": True, "torch_dtype": dtype_name,
    }
