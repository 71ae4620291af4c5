"""The segmentation mask VQ-VAE in JAX (mirrors `paligemma.ref.vqvae`; see it for the model).

    vae = load_vae("vae-oid.npz")          # the same tree as the reference, on the device
    masks = decode(vae, codes)             # [B, 16] -> [B, 64, 64], jit-compiled
    codes = encode(vae, crops)             # [B, 64, 64] in [0, 1] -> [B, 16]

Convolutions run as XLA convolutions: the transposed one as a convolution of the input dilated
by 2 with the spatially flipped kernel and padding k - 1 - p = 2 (PyTorch's ConvTranspose2d k=4,
s=2, p=1), where the reference scatters tap by tap. Loading, saving, random initialisation and
pasting masks into images are the reference's (NumPy and Pillow, no compute worth compiling).
Axes: B batch, Y / X rows / columns, C / O input / output channels, E code width, P the 16 grid
cells, Q codebook entries.
"""

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.ref import vqvae as ref_vqvae
from paligemma.ref.vqvae import GRID, MASK_SIZE, NUM_DOWN, NUM_RES, NUM_UP, check_codes

_DIMS = ("NHWC", "HWIO", "NHWC")
# The VAE is tiny: full float32 products everywhere (GPUs would otherwise use TF32, ~1e-3).
_HIGHEST = jax.lax.Precision.HIGHEST


def load_vae(path, dtype=jnp.float32):
    """`paligemma.ref.vqvae.load_vae`, the arrays put on the default device in `dtype`."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), ref_vqvae.load_vae(path, np.float32))


def conv2d(x, p, stride=1):
    """Convolution with TF "SAME" padding: [B, Y, X, C] -> [B, ceil(Y / s), ceil(X / s), O]."""
    out = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), "SAME", dimension_numbers=_DIMS,
                                       precision=_HIGHEST)
    return out + p["bias"]  # [B, Y', X', O]


def conv_transpose2d(x, p):
    """PyTorch `ConvTranspose2d(kernel_size=4, stride=2, padding=1)`: [B, Y, X, C] -> [B, 2Y, 2X, O]."""
    k = p["kernel"].shape[0]
    out = jax.lax.conv_general_dilated(x, p["kernel"][::-1, ::-1], (1, 1), ((k - 2, k - 2), (k - 2, k - 2)),
                                       lhs_dilation=(2, 2), dimension_numbers=_DIMS, precision=_HIGHEST)
    return out + p["bias"]  # [B, 2Y, 2X, O]


def res_block(p, x):
    """x + conv_2(ReLU(conv_1(ReLU(conv_0(x))))): 3x3, 3x3, 1x1 convs; no activation after the sum."""
    h = jax.nn.relu(conv2d(x, p["conv_0"]))  # [B, Y, X, C]
    h = jax.nn.relu(conv2d(h, p["conv_1"]))  # [B, Y, X, C]
    return x + conv2d(h, p["conv_2"])  # [B, Y, X, C]


def decode_latents(params, x):
    """The decoder on (quantised) latents [B, 4, 4, E] -> [B, 64, 64]; differentiable, for training."""
    d = params["decoder"]
    x = jax.nn.relu(conv2d(x, d["in"]))  # [B, 4, 4, 8h]
    for i in range(NUM_RES):
        x = res_block(d[f"res_{i}"], x)  # [B, 4, 4, 8h]
    for i in range(NUM_UP):
        x = jax.nn.relu(conv_transpose2d(x, d[f"up_{i}"]))  # [B, 2Y, 2X, O]: 8 .. 64
    return conv2d(x, d["out"])[..., 0]  # [B, 64, 64]


@jax.jit
def _decode(params, codes):
    x = params["codebook"][codes]  # [B, 16, E]
    return decode_latents(params, x.reshape(codes.shape[0], GRID, GRID, -1))  # [B, 64, 64]


def decode(params, codes):
    """16 codes per mask -> [B, 64, 64] float masks (~[-1, 1], > 0 inside); see the reference."""
    codes = check_codes(codes, params["codebook"].shape[0])
    return _decode(params, jnp.asarray(codes, jnp.int32))


@jax.jit
def _encode_latents(params, masks):
    e = params["encoder"]
    x = (2.0 * (masks - 0.5)).astype(params["codebook"].dtype)[..., None]  # [B, 64, 64, 1]
    for i in range(NUM_DOWN):
        x = jax.nn.relu(conv2d(x, e[f"down_{i}"], stride=2))  # [B, Y/2, X/2, O]: 32 .. 4
    for i in range(NUM_RES):
        x = res_block(e[f"res_{i}"], x)  # [B, 4, 4, 8h]
    return conv2d(x, e["out"])  # [B, 4, 4, E]


def encode_latents(params, masks):
    """Masks [B, 64, 64] in [0, 1] -> the encoder's output [B, 4, 4, E], before quantisation."""
    if "encoder" not in params:
        raise ValueError("encode: this VAE has no encoder weights (a decoder-only file)")
    if np.ndim(masks) != 3 or np.shape(masks)[1:] != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"masks: expected [B, {MASK_SIZE}, {MASK_SIZE}] in [0, 1], got {list(np.shape(masks))}")
    return _encode_latents(params, jnp.asarray(masks))


@jax.jit
def quantize(codebook, z):
    """Index of the nearest codebook row (L2; the first of ties): [B, 4, 4, E] -> [B, 16]."""
    z = z.reshape(z.shape[0], GRID * GRID, -1)  # [B, 16, E]
    dist = (jnp.sum(z**2, -1, keepdims=True) + jnp.sum(codebook**2, -1)
            - 2 * jnp.einsum("BPE,QE->BPQ", z, codebook, precision=_HIGHEST))  # [B, 16, Q]
    return jnp.argmin(dist, axis=-1)


def encode(params, masks):
    """Masks [B, 64, 64] in [0, 1] -> [B, 16] codes (training targets for `segment` prompts)."""
    return quantize(params["codebook"], encode_latents(params, masks))
