"""The model config a checkpoint's tensor shapes describe, for files that come without one.

    config = config_from_bv_shapes({"llm/layers/attn/q_einsum/w": (18, 8, 2048, 256), ...}, "pt-224.npz")
    config = config_from_hf_shapes({("llm", "embed_tokens.weight"): (257216, 2048), ...}, "model.safetensors", {})
    config = apply_overrides(config, {"final_logits_softcap": None, "vision_num_heads": 16})

Shapes tell the sizes (width, depth, heads, head dim, MLP width, vocabulary, patch grid) but not
softcaps, the query scaling or the sliding window: those default to the released model with the
same sizes. A size the config refuses (an odd head dim, heads that do not divide the width, ...)
means a damaged or mislabelled file, so the error names the file, the tensor each refused size
was read from, and any other tensor that carries the same size and disagrees:

    pt.npz: cannot infer the model config from the tensor shapes (GemmaConfig: head_dim must be even
    for RoPE, got 23): head_dim 23 is read from llm/layers/attn/q_einsum/w [18, 8, 2048, 23] (axis 3);
    llm/layers/attn/kv_einsum/w [18, 2, 1, 2048, 256] has 256 there
"""

import contextlib
import dataclasses
import math
import os
import re

from ..config import GEMMA2_27B, GemmaConfig, PaliGemmaConfig, VisionConfig
from .tensorfiles import CheckpointError

# (width, heads, head dim) of released towers, for HF files that come without config.json.
_KNOWN_LLM_HEADS = {2048: (8, 256), 2304: (8, 256), 3584: (16, 256), 4608: (32, 128)}
_KNOWN_VISION_HEADS = {1152: 16}

# Where each size comes from: config class -> field -> [(tensor, axis), ...], the first the one
# it is read from, the rest other tensors that carry the same size.
_ENC = "img/Transformer/encoderblock"
_BV_SOURCES = {
    "VisionConfig": {
        "patch_size": [("img/embedding/kernel", 0)],
        "image_size": [("img/pos_embedding", 1), ("img/embedding/kernel", 0)],
        "width": [("img/embedding/kernel", 3), (f"{_ENC}/MultiHeadDotProductAttention_0/query/kernel", 1),
                  ("img/pos_embedding", 2)],
        "depth": [(f"{_ENC}/MultiHeadDotProductAttention_0/query/kernel", 0), (f"{_ENC}/MlpBlock_0/Dense_0/kernel", 0)],
        "num_heads": [(f"{_ENC}/MultiHeadDotProductAttention_0/query/kernel", 2)],
        "mlp_dim": [(f"{_ENC}/MlpBlock_0/Dense_0/kernel", -1)],
    },
    "GemmaConfig": {
        "width": [("llm/embedder/input_embedding", 1), ("llm/layers/attn/q_einsum/w", 2),
                  ("llm/layers/attn/kv_einsum/w", 3)],
        "depth": [("llm/layers/attn/q_einsum/w", 0), ("llm/layers/attn/kv_einsum/w", 0)],
        "num_heads": [("llm/layers/attn/q_einsum/w", 1)],
        "num_kv_heads": [("llm/layers/attn/kv_einsum/w", 2)],
        "head_dim": [("llm/layers/attn/q_einsum/w", 3), ("llm/layers/attn/kv_einsum/w", 4)],
        "mlp_dim": [("llm/layers/mlp/gating_einsum", -1)],
        "vocab_size": [("llm/embedder/input_embedding", 0)],
    },
    "PaliGemmaConfig": {"vocabulary": [("llm/embedder/input_embedding", 0)]},
}
_HF_SOURCES = {
    "VisionConfig": {
        "patch_size": [(("vision", "embeddings.patch_embedding.weight"), 2)],
        "width": [(("vision", "embeddings.patch_embedding.weight"), 0),
                  (("vision", "embeddings.position_embedding.weight"), 1)],
        "mlp_dim": [(("vision", "encoder.layers.0.mlp.fc1.weight"), 0)],
    },
    "GemmaConfig": {
        "width": [(("llm", "embed_tokens.weight"), 1), (("llm", "layers.0.self_attn.q_proj.weight"), 1)],
        "num_kv_heads": [(("llm", "layers.0.self_attn.k_proj.weight"), 0)],
        "mlp_dim": [(("llm", "layers.0.mlp.gate_proj.weight"), 0)],
        "vocab_size": [(("llm", "embed_tokens.weight"), 0)],
    },
    "PaliGemmaConfig": {"vocabulary": [(("llm", "embed_tokens.weight"), 0)]},
}


def config_from_bv_shapes(shapes, path):
    """A `PaliGemmaConfig` from big_vision keys -> shapes (`params/` prefix removed)."""
    def shape(key):
        if key not in shapes:
            raise CheckpointError(f"{path}: missing key {key!r}; cannot infer the model config without it")
        return shapes[key]

    p, _, _, W = shape("img/embedding/kernel")
    P = shape("img/pos_embedding")[1]
    grid = math.isqrt(P)
    if grid * grid != P:
        raise CheckpointError(f"{path}: img/pos_embedding has {P} rows, not a square number of patches")
    L_v, _, N_v, _ = shape(f"{_ENC}/MultiHeadDotProductAttention_0/query/kernel")
    M = shape(f"{_ENC}/MlpBlock_0/Dense_0/kernel")[-1]
    V, D = shape("llm/embedder/input_embedding")
    L, N, _, H = shape("llm/layers/attn/q_einsum/w")
    K = shape("llm/layers/attn/kv_einsum/w")[2]
    F = shape("llm/layers/mlp/gating_einsum")[-1]
    gemma2 = "llm/layers/post_attention_norm/scale" in shapes
    with _naming_sources(path, shapes, _BV_SOURCES):
        vision = VisionConfig(image_size=grid * p, patch_size=p, width=W, depth=L_v, num_heads=N_v, mlp_dim=M)
        return PaliGemmaConfig(vision, _gemma_defaults(D, L, F, N, K, H, V, gemma2), name=os.path.basename(path))


def config_from_hf_shapes(shapes, path, overrides):
    """A `PaliGemmaConfig` from HF `(tower, canonical name)` -> shapes, for a file without config.json.

    The head split cannot be read from HF's merged projections: it comes from the released
    model of the same width, or from `overrides` (num_heads, head_dim, vision_num_heads).
    """
    def shape(tower, name):
        if (tower, name) not in shapes:
            raise CheckpointError(f"{path}: missing tensor {name!r} ({tower}); cannot infer the model config")
        return shapes[(tower, name)]

    def depth(tower):
        layers = [re.search(r"layers\.(\d+)\.", n) for (t, n) in shapes if t == tower]
        return 1 + max((int(m.group(1)) for m in layers if m), default=-1)

    W, _, p, _ = shape("vision", "embeddings.patch_embedding.weight")
    P = shape("vision", "embeddings.position_embedding.weight")[0]
    N_v = overrides.get("vision_num_heads", _KNOWN_VISION_HEADS.get(W))
    V, D = shape("llm", "embed_tokens.weight")
    N, H = overrides.get("num_heads"), overrides.get("head_dim")
    if N is None or H is None:
        N, H = _KNOWN_LLM_HEADS.get(D, (N, H))
    if N_v is None or N is None or H is None:
        raise CheckpointError(f"{path}: without config.json the head split cannot be read from shapes; "
                              "pass num_heads=, head_dim= and vision_num_heads= to load()")
    M = shape("vision", "encoder.layers.0.mlp.fc1.weight")[0]
    K = shape("llm", "layers.0.self_attn.k_proj.weight")[0] // H
    F = shape("llm", "layers.0.mlp.gate_proj.weight")[0]
    gemma2 = ("llm", "layers.0.pre_feedforward_layernorm.weight") in shapes
    with _naming_sources(path, shapes, _HF_SOURCES):
        vision = VisionConfig(image_size=math.isqrt(P) * p, patch_size=p, width=W, num_heads=N_v,
                              depth=depth("vision"), mlp_dim=M)
        llm = _gemma_defaults(D, depth("llm"), F, N, K, H, V, gemma2)
        return PaliGemmaConfig(vision, llm, name=os.path.basename(path.rstrip("/")))


def _gemma_defaults(D, L, F, N, K, H, V, gemma2):
    """Gemma 1: no softcaps. Gemma 2: softcaps 50/30; (D/N)^-1/2 query scale only for the 27B."""
    if not gemma2:
        return GemmaConfig(width=D, depth=L, mlp_dim=F, num_heads=N, num_kv_heads=K, head_dim=H, vocab_size=V)
    is_27b = (D, L, F, N, K, H) == (GEMMA2_27B.width, GEMMA2_27B.depth, GEMMA2_27B.mlp_dim,
                                    GEMMA2_27B.num_heads, GEMMA2_27B.num_kv_heads, GEMMA2_27B.head_dim)
    return GemmaConfig(width=D, depth=L, mlp_dim=F, num_heads=N, num_kv_heads=K, head_dim=H, vocab_size=V,
                       attn_logits_softcap=50.0, final_logits_softcap=30.0, post_norms=True,
                       query_scaling="rsqrt_emb_per_head" if is_27b else "rsqrt_head_dim")


@contextlib.contextmanager
def _naming_sources(path, shapes, sources):
    """Turns a config's ValueError into a CheckpointError that names the file and, for each field
    the message names, the tensor it was read from and the other tensors that disagree with it."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        message = str(e)
        fields = sources.get(message.split(":")[0], {})
        notes = [_provenance(shapes, field, carriers) for field, carriers in fields.items()
                 if re.search(rf"\b{field}\b", message) and carriers[0][0] in shapes]
        raise CheckpointError(f"{path}: cannot infer the model config from the tensor shapes ({message})"
                              + (": " + "; ".join(notes) if notes else "")) from None


def _provenance(shapes, field, carriers):
    """"head_dim 23 is read from <tensor> [shape] (axis 3); <other tensor> [shape] has 256 there"."""
    (key, axis), *others = carriers
    value = shapes[key][axis]
    note = f"{field} {value} is read from {_label(key)} {list(shapes[key])} (axis {axis % len(shapes[key])})"
    for other, other_axis in others:
        if other in shapes and shapes[other][other_axis] != value:
            note += f"; {_label(other)} {list(shapes[other])} has {shapes[other][other_axis]} there"
    return note


def _label(key):
    return key if isinstance(key, str) else f"{key[0]} tensor {key[1]}"


def apply_overrides(config: PaliGemmaConfig, overrides):
    """Replaces fields by name: GemmaConfig fields, `vision_<field>`, name and special ids."""
    llm_fields = {f.name for f in dataclasses.fields(GemmaConfig)}
    vision_fields = {f"vision_{f.name}" for f in dataclasses.fields(VisionConfig)}
    top_fields = {"name", "pad_id", "eos_id", "bos_id"}
    unknown = sorted(set(overrides) - llm_fields - vision_fields - top_fields)
    if unknown:
        raise ValueError(f"load: unknown overrides {unknown}; expected fields of GemmaConfig "
                         f"{sorted(llm_fields)}, VisionConfig as vision_<field>, or {sorted(top_fields)}")
    llm = dataclasses.replace(config.llm, **{k: v for k, v in overrides.items() if k in llm_fields})
    vision = dataclasses.replace(config.vision, **{k[7:]: v for k, v in overrides.items() if k in vision_fields})
    return dataclasses.replace(config, vision=vision, llm=llm,
                               **{k: v for k, v in overrides.items() if k in top_fields})
