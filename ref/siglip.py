"""SigLIP So400m/14 image tower and the projection into the language model's width.

Axes: B batch, P image tokens (patches), W vision width, M vision mlp width, N heads,
H head dim, D language-model width. Parameters are the `img/...` subtree of big_vision.

    images [B, R, R, 3] in [-1, 1]
      -> patch_embed            [B, P, W]   (conv 14x14 stride 14 == matmul over patches)
      -> + pos_embedding        [B, P, W]
      -> L x encoder_block      [B, P, W]   (pre-LN: x + MHA(LN(x)); x + MLP(LN(x)))
      -> encoder_norm           [B, P, W]
      -> head                   [B, P, D]   (no pooling: every patch becomes a token)
"""

import numpy as np

from .capture import block_name, record, scope
from .config import VisionConfig
from .ops import cast, einsum, gelu_tanh, softmax
from .params import layer_slice


def patch_embed(params, images, patch_size):
    """Non-overlapping patches times a [p, p, 3, W] kernel, plus bias.

    Args:
      params: `img/embedding` with `kernel` [p, p, 3, W] (HWIO) and `bias` [W].
      images: [B, R, R, 3].
    Returns:
      [B, P, W] with P = (R / p)^2, tokens in row-major patch order (row * grid + col).
    """
    B, R, _, C = images.shape
    g, p = R // patch_size, patch_size
    patches = images.reshape(B, g, p, g, p, C)  # [B, gy, py, gx, px, C]
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, p, p, C)  # [B, P, p, p, C]
    x = einsum("BPijc,ijcW->BPW", patches, cast(params["kernel"], images))  # [B, P, W]
    return x + cast(params["bias"], x)  # [B, P, W]


def add_position_embedding(x, pos_embedding):
    """Learned absolute position embedding `[1, P, W]`, one row per patch (no class token)."""
    return x + cast(pos_embedding, x)  # [B, P, W]


def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias."""
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # [..., 1]
    return (x - mean) / np.sqrt(var + eps) * cast(scale, x) + cast(bias, x)


def attention(params, x):
    """Multi-head self-attention with biases, no mask (every patch sees every patch).

    Args:
      params: `MultiHeadDotProductAttention_0` of one block: query/key/value kernels
        [W, N, H] and biases [N, H]; out kernel [N, H, W] and bias [W].
      x: [B, P, W].
    Returns:
      [B, P, W].
    """
    q = einsum("BPW,WNH->BPNH", x, cast(params["query"]["kernel"], x)) + cast(params["query"]["bias"], x)
    k = einsum("BSW,WNH->BSNH", x, cast(params["key"]["kernel"], x)) + cast(params["key"]["bias"], x)
    v = einsum("BSW,WNH->BSNH", x, cast(params["value"]["kernel"], x)) + cast(params["value"]["bias"], x)
    H = q.shape[-1]
    logits = einsum("BPNH,BSNH->BNPS", q * H**-0.5, k)  # [B, N, P, S]
    probs = record("attn_probs", softmax(logits, axis=-1))  # [B, N, P, S]
    enc = einsum("BNPS,BSNH->BPNH", probs, v)  # [B, P, N, H]
    out = einsum("BPNH,NHW->BPW", enc, cast(params["out"]["kernel"], x))  # [B, P, W]
    return out + cast(params["out"]["bias"], x)


def mlp(params, x):
    """Dense W->M, tanh-GELU, Dense M->W (both with bias)."""
    h = einsum("BPW,WM->BPM", x, cast(params["Dense_0"]["kernel"], x)) + cast(params["Dense_0"]["bias"], x)
    h = gelu_tanh(h)  # [B, P, M]
    out = einsum("BPM,MW->BPW", h, cast(params["Dense_1"]["kernel"], x))  # [B, P, W]
    return out + cast(params["Dense_1"]["bias"], x)


def encoder_block(params, x, eps):
    """One pre-LN ViT block. `params` is one layer's slice of `encoderblock`."""
    y = layer_norm(x, params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"], eps)
    x = x + record("attn_out", attention(params["MultiHeadDotProductAttention_0"], y))  # [B, P, W]
    y = layer_norm(x, params["LayerNorm_1"]["scale"], params["LayerNorm_1"]["bias"], eps)
    return record("out", x + record("mlp_out", mlp(params["MlpBlock_0"], y)))  # [B, P, W]


def encode(params, config: VisionConfig, images):
    """Patch tokens after the last block and the final LayerNorm (big_vision `pre_logits`).

    Args:
      params: the `img` subtree.
      images: [B, R, R, 3] in [-1, 1], already in the compute dtype.
    Returns:
      [B, P, W].
    """
    x = patch_embed(params["embedding"], images, config.patch_size)  # [B, P, W]
    x = record("img/embed", add_position_embedding(x, params["pos_embedding"]))  # [B, P, W]
    blocks = params["Transformer"]["encoderblock"]
    for i in range(config.depth):
        with scope(block_name("img", i)):
            x = encoder_block(layer_slice(blocks, i), x, config.layer_norm_eps)  # [B, P, W]
    norm = params["Transformer"]["encoder_norm"]
    return record("img/encoder_norm", layer_norm(x, norm["scale"], norm["bias"], config.layer_norm_eps))


def head(params, x):
    """The projection into the language model: Dense W->D with bias, per token."""
    return einsum("BPW,WD->BPD", x, cast(params["kernel"], x)) + cast(params["bias"], x)  # [B, P, D]


def embed_image(params, config: VisionConfig, images):
    """Image tokens as the language model sees them: [B, R, R, 3] -> [B, P, D]."""
    return record("img/head", head(params["head"], encode(params, config, images)))  # [B, P, D]
