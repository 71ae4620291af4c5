"""Parameter trees: shapes, a seeded initialiser, and flatten / unflatten helpers.

Parameters are plain nested dicts of NumPy arrays in big_vision's layout, so a released
`.npz` maps onto them key for key. Per-layer tensors are stacked on a leading depth axis
(big_vision's `scan=True`), which is also what `fast/` scans over.

Axis names used in the shape comments: L layers, D width, F mlp width, N heads, K kv heads,
H head dim, V vocabulary, P image tokens, W vision width, M vision mlp width.
"""

import numpy as np

from .config import PaliGemmaConfig

ENCODER = "Transformer/encoderblock"


def param_shapes(config: PaliGemmaConfig):
    """The nested dict of parameter shapes for `config` (no arrays are allocated)."""
    v, g = config.vision, config.llm
    L, W, M, Nv, Hv = v.depth, v.width, v.mlp_dim, v.num_heads, v.head_dim
    dense = lambda i, o: {"kernel": (L, i, o), "bias": (L, o)}  # noqa: E731
    norm = {"scale": (L, W), "bias": (L, W)}
    qkv = {"kernel": (L, W, Nv, Hv), "bias": (L, Nv, Hv)}
    img = {
        "embedding": {"kernel": (v.patch_size, v.patch_size, 3, W), "bias": (W,)},
        "pos_embedding": (1, v.num_patches, W),
        "Transformer": {
            "encoderblock": {
                "LayerNorm_0": dict(norm),
                "LayerNorm_1": dict(norm),
                "MlpBlock_0": {"Dense_0": dense(W, M), "Dense_1": dense(M, W)},
                "MultiHeadDotProductAttention_0": {
                    "query": dict(qkv), "key": dict(qkv), "value": dict(qkv),
                    "out": {"kernel": (L, Nv, Hv, W), "bias": (L, W)},
                },
            },
            "encoder_norm": {"scale": (W,), "bias": (W,)},
        },
        "head": {"kernel": (W, g.width), "bias": (g.width,)},
    }
    Lg, D, F, N, K, H = g.depth, g.width, g.mlp_dim, g.num_heads, g.num_kv_heads, g.head_dim
    layers = {
        "attn": {
            "q_einsum": {"w": (Lg, N, D, H)},
            "kv_einsum": {"w": (Lg, 2, K, D, H)},
            "attn_vec_einsum": {"w": (Lg, N, H, D)},
        },
        "mlp": {"gating_einsum": (Lg, 2, D, F), "linear": (Lg, F, D)},
        "pre_attention_norm": {"scale": (Lg, D)},
        "pre_ffw_norm": {"scale": (Lg, D)},
    }
    if g.post_norms:
        layers["post_attention_norm"] = {"scale": (Lg, D)}
        layers["post_ffw_norm"] = {"scale": (Lg, D)}
    llm = {
        "embedder": {"input_embedding": (g.vocab_size, D)},
        "layers": layers,
        "final_norm": {"scale": (D,)},
    }
    return {"img": img, "llm": llm}


def flatten(tree, prefix=""):
    """`{"a": {"b": x}}` -> `{"a/b": x}` (big_vision's '/'-joined checkpoint keys)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat):
    """Inverse of `flatten`."""
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# Axes each weight sums over (its inputs); every other weight is [..., in, out].
_INPUT_AXES = {
    "img/embedding/kernel": (-4, -3, -2),  # patch pixels [p, p, 3, W]
    "query/kernel": (-3,), "key/kernel": (-3,), "value/kernel": (-3,),  # [L, W, N, H]
    "out/kernel": (-3, -2),  # [L, N, H, W]
    "attn_vec_einsum/w": (-3, -2),  # [L, N, H, D]
}


def fan_in(path, shape):
    """How many inputs the weight at `path` sums over (its contracted axes): `init_params` draws N(0, 1/fan_in)."""
    axes = next((a for suffix, a in _INPUT_AXES.items() if path.endswith(suffix)), (-2,))
    return int(np.prod([shape[a] for a in axes]))


def init_params(config: PaliGemmaConfig, seed=0, dtype=np.float32, random_norms=False):
    """Random parameters for any config, reproducible from `seed`.

    Weights are N(0, 1/fan_in), biases N(0, 0.02^2), the embedding N(0, 1/D) so that
    `x sqrt(D)` has unit scale. Norms start as identities (LayerNorm scale 1, RMSNorm scale 0)
    unless `random_norms=True`, which draws them away from identity: a zero RMSNorm scale
    would hide a missing `(1 + scale)`.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in flatten(param_shapes(config)).items():
        if path.endswith("input_embedding"):
            value = rng.normal(0.0, shape[-1] ** -0.5, shape)
        elif path.endswith("pos_embedding"):
            value = rng.normal(0.0, shape[-1] ** -0.5, shape)
        elif "LayerNorm" in path or "encoder_norm" in path:
            is_scale = path.endswith("scale")
            spread = rng.normal(0.0, 0.2, shape) if random_norms else np.zeros(shape)
            value = (1.0 + spread) if is_scale else spread
        elif path.endswith("norm/scale"):  # Gemma RMSNorm, applied as (1 + scale)
            value = rng.normal(0.0, 0.3, shape) if random_norms else np.zeros(shape)
        elif path.endswith("bias"):
            value = rng.normal(0.0, 0.02, shape)
        else:
            value = rng.normal(0.0, fan_in(path, shape) ** -0.5, shape)
        flat[path] = value.astype(dtype)
    return unflatten(flat)


def tree_map(fn, tree):
    """Apply `fn` to every array of a nested dict."""
    return {k: tree_map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def layer_slice(stacked, i):
    """Layer `i` of a tree whose arrays are stacked on a leading depth axis."""
    return tree_map(lambda x: x[i], stacked)


def cast_params(params, dtype):
    """The same tree with every array in `dtype` (e.g. `ml_dtypes.bfloat16`)."""
    return tree_map(lambda x: np.asarray(x).astype(dtype), params)


def num_params(params) -> int:
    """Total number of elements of a parameter tree."""
    return sum(int(np.prod(np.shape(x))) for x in flatten(params).values())
