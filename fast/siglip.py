"""SigLIP So400m/14 image tower and projection, in JAX (mirrors `paligemma.ref.siglip`).

Axes: B batch, P image tokens, W vision width, M vision mlp width, N heads, H head dim,
D language-model width. The 27 blocks run under `lax.scan` over the stacked parameters.
LayerNorm statistics and the attention softmax are computed in float32.
"""

import jax
import jax.numpy as jnp

from paligemma import kernels
from paligemma.ref import capture
from paligemma.ref.capture import record
from paligemma.ref.config import VisionConfig

from . import linear
from .attention import attend
from .ops import cast
from .policy import Policy


def _dense(x, w, spec, policy=None):
    """`einsum(spec, x, w)` for a weight of any kind (`linear.einsum`)."""
    return linear.einsum(spec, x, w, None if policy is None else policy.mesh)


def patch_embed(params, images, patch_size):
    """[B, R, R, 3] -> [B, P, W]: non-overlapping patches times a [p, p, 3, W] kernel, plus bias."""
    B, R, _, C = images.shape
    g, p = R // patch_size, patch_size
    patches = images.reshape(B, g, p, g, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, p, p, C)
    x = jnp.einsum("BPijc,ijcW->BPW", patches, cast(params["kernel"], images))  # [B, P, W]
    return x + cast(params["bias"], x)


def add_position_embedding(x, pos_embedding):
    return x + cast(pos_embedding, x)  # [B, P, W]


def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis, statistics in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)  # [..., 1]
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)  # [..., 1]
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def attention(params, x, policy: Policy = None):
    """Multi-head self-attention with biases and no mask: [B, P, W] -> [B, P, W].

    With a `policy` that uses the Pallas kernels, the attention itself runs there (head dim 72
    padded to 128 inside the kernel)."""
    q = _dense(x, params["query"]["kernel"], "BPW,WNH->BPNH", policy) + cast(params["query"]["bias"], x)
    k = _dense(x, params["key"]["kernel"], "BSW,WNH->BSNH", policy) + cast(params["key"]["bias"], x)
    v = _dense(x, params["value"]["kernel"], "BSW,WNH->BSNH", policy) + cast(params["value"]["bias"], x)
    B, P, _, H = q.shape
    if policy is not None and policy.uses_kernels:
        everything = kernels.TokenMask.full(B, P)
        enc = attend(q * jnp.asarray(H**-0.5, x.dtype), k, v, None, None, policy, everything)  # [B, P, N, H]
    else:
        logits = jnp.einsum("BPNH,BSNH->BNPS", q * jnp.asarray(H**-0.5, x.dtype), k).astype(jnp.float32)
        probs = record("attn_probs", jax.nn.softmax(logits, axis=-1).astype(x.dtype))  # [B, N, P, S]
        enc = jnp.einsum("BNPS,BSNH->BPNH", probs, v)  # [B, P, N, H]
    out = _dense(enc, params["out"]["kernel"], "BPNH,NHW->BPW", policy)  # [B, P, W]
    return out + cast(params["out"]["bias"], x)


def mlp(params, x, policy: Policy = None):
    """Dense W->M, tanh-GELU, Dense M->W (both with bias)."""
    h = _dense(x, params["Dense_0"]["kernel"], "BPW,WM->BPM", policy) + cast(params["Dense_0"]["bias"], x)
    h = jax.nn.gelu(h, approximate=True)  # [B, P, M]
    out = _dense(h, params["Dense_1"]["kernel"], "BPM,MW->BPW", policy)  # [B, P, W]
    return out + cast(params["Dense_1"]["bias"], x)


def encoder_block(params, x, eps, policy: Policy = None):
    """One pre-LN ViT block; `params` is one layer's slice of `encoderblock`."""
    y = layer_norm(x, params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"], eps)
    x = x + record("attn_out", attention(params["MultiHeadDotProductAttention_0"], y, policy))  # [B, P, W]
    y = layer_norm(x, params["LayerNorm_1"]["scale"], params["LayerNorm_1"]["bias"], eps)
    return record("out", x + record("mlp_out", mlp(params["MlpBlock_0"], y, policy)))  # [B, P, W]


def encode(params, config: VisionConfig, images, policy: Policy):
    """[B, R, R, 3] -> [B, P, W] after the last block and the final LayerNorm."""
    x = patch_embed(params["embedding"], images.astype(policy.dtype), config.patch_size)  # [B, P, W]
    x = record("img/embed", add_position_embedding(x, params["pos_embedding"]))

    def step(x, layer):
        return encoder_block(layer, x, config.layer_norm_eps, policy), None

    if policy.remat == "full":
        step = jax.checkpoint(step)
    blocks = params["Transformer"]["encoderblock"]
    if capture.active():  # named activations (fast/capture.py): a scan body cannot report them out
        for i in range(config.depth):
            with capture.scope(capture.block_name("img", i)):
                x, _ = step(x, jax.tree_util.tree_map(lambda w: w[i], blocks))  # noqa: B023
    else:
        x, _ = jax.lax.scan(step, x, blocks)  # [B, P, W]
    norm = params["Transformer"]["encoder_norm"]
    return record("img/encoder_norm", layer_norm(x, norm["scale"], norm["bias"], config.layer_norm_eps))


def head(params, x, policy: Policy = None):
    """Dense W->D with bias, per token."""
    return _dense(x, params["kernel"], "BPW,WD->BPD", policy) + cast(params["bias"], x)  # [B, P, D]


def embed_image(params, config: VisionConfig, images, policy: Policy):
    """Image tokens as the language model sees them: [B, R, R, 3] -> [B, P, D]."""
    return record("img/head", head(params["head"], encode(params, config, images, policy), policy))  # [B, P, D]
