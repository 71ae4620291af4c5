"""The segmentation mask VQ-VAE (Ning et al. 2023, "All in Tokens"): 16 codes <-> a 64 x 64 mask.

    vae = load_vae("vae-oid.npz")                  # big_vision's released file, float32
    masks = decode(vae, codes)                     # [B, 16] codes 0..127 -> [B, 64, 64], ~[-1, 1]
    codes = encode(vae, crops)                     # [B, 64, 64] masks in [0, 1] -> [B, 16]
    full = tasks.paste_mask(masks[0], box, height, width)   # [H, W] in the image (ref/tasks/answers.py)

Decoder (as big_vision's segmentation evaluator; all convs "SAME", NHWC):
  codes -> codebook rows [B, 4, 4, E] (code i at row i // 4, column i % 4) -> 1x1 conv to 8h + ReLU
  -> 2 residual blocks x + 1x1(ReLU(3x3(ReLU(3x3(x))))) -> 4 x (ConvTranspose 4x4 stride 2 + ReLU):
  channels 8h, 4h, 2h, h and size 4 -> 8 -> 16 -> 32 -> 64 -> 1x1 conv to 1 channel (no activation).
Encoder (big_vision's pp for training targets): 2 (m - 0.5) -> 4 x (4x4 conv stride 2 + ReLU):
  channels h, 2h, 4h, 8h -> 2 residual blocks -> 1x1 conv to E -> nearest codebook row (L2) per cell.
The released model: h = 16, E = 512, 128 codes.

File layout (`vae-oid.npz`): a PyTorch state dict saved as .npz. `_vq_vae._embedding` [128, E];
`encoder.{0,2,4,6}`, `encoder.{8,9}.net.{0,2,4}`, `encoder.10`, `decoder.0`, `decoder.{2,3}.net.{0,2,4}`,
`decoder.12`: Conv2d `.weight` [out, in, kh, kw] and `.bias` [out]; `decoder.{4,6,8,10}`:
ConvTranspose2d(k=4, s=2, p=1) `.weight` [in, out, kh, kw]. The numbers are positions in a torch
nn.Sequential whose odd entries are ReLUs. Other keys (the EMA codebook statistics) are ignored.

Parameter tree (what `decode` / `encode` take; `paligemma.fast.vqvae` uses the same): kernels
[kh, kw, in, out] for both conv kinds, biases [out], `codebook` [Q, E]:
  {"codebook", "encoder": {"down_0".."down_3", "res_0", "res_1" (each {"conv_0", "conv_1",
   "conv_2"}), "out"}, "decoder": {"in", "res_0", "res_1", "up_0".."up_3", "out"}}, leaves {"kernel", "bias"}.
Axes in einsum strings: B batch, Y / X rows / columns, C input and O output channels, E code
width, P the 16 grid cells, Q codebook entries.
"""

import dataclasses
import os

import numpy as np

from .checkpoints.tensorfiles import CheckpointError, NpzReader, atomic_write
from .params import flatten, unflatten

GRID, MASK_SIZE = 4, 64  # 16 codes on a 4 x 4 grid; masks of 64 x 64
NUM_DOWN = NUM_UP = 4
NUM_RES = 2


class VAEError(CheckpointError):
    """A VQ-VAE file is unreadable, incomplete or has the wrong shapes."""


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes of a mask VQ-VAE. The released `vae-oid.npz`: the defaults."""

    num_codes: int = 128  # Q: the <seg000>..<seg127> tokens
    embed_dim: int = 512  # E: width of a codebook row
    hidden: int = 16  # h: the first encoder conv's (and last decoder up-conv's) channels

    @property
    def widths(self):
        """Channels after each encoder down-conv: h, 2h, 4h, 8h (the decoder runs them backwards)."""
        return tuple(self.hidden * 2**i for i in range(NUM_DOWN))


# --------------------------------------------------------------------------- the file layout

def _layout(config):
    """[(torch key, tree path, kind, torch shape)] of a VAE; kind "conv", "convT" or "codebook"."""
    w, E, Q = config.widths, config.embed_dim, config.num_codes
    top = w[-1]
    rows = [("_vq_vae._embedding", "codebook", "codebook", (Q, E))]

    def conv(torch_name, path, out, inp, k, kind="conv"):
        shape = (inp, out, k, k) if kind == "convT" else (out, inp, k, k)
        rows.append((f"{torch_name}.weight", f"{path}/kernel", kind, shape))
        rows.append((f"{torch_name}.bias", f"{path}/bias", "bias", (out,)))

    def res(torch_name, path):
        for j, k in enumerate((3, 3, 1)):
            conv(f"{torch_name}.net.{2 * j}", f"{path}/conv_{j}", top, top, k)

    for i in range(NUM_DOWN):
        conv(f"encoder.{2 * i}", f"encoder/down_{i}", w[i], w[i - 1] if i else 1, 4)
    for i in range(NUM_RES):
        res(f"encoder.{2 * NUM_DOWN + i}", f"encoder/res_{i}")
    conv(f"encoder.{2 * NUM_DOWN + NUM_RES}", "encoder/out", E, top, 1)
    conv("decoder.0", "decoder/in", top, E, 1)
    for i in range(NUM_RES):
        res(f"decoder.{2 + i}", f"decoder/res_{i}")
    ups = (top,) + tuple(reversed(w))  # 8h -> 8h -> 4h -> 2h -> h
    for i in range(NUM_UP):
        conv(f"decoder.{2 + NUM_RES + 2 * i}", f"decoder/up_{i}", ups[i + 1], ups[i], 4, kind="convT")
    conv(f"decoder.{2 + NUM_RES + 2 * NUM_UP}", "decoder/out", 1, w[0], 1)
    return rows


def _to_tree(kind, array):
    """A torch-layout array in the tree's layout: conv [O, C, kh, kw] and convT [C, O, kh, kw] -> [kh, kw, C, O]."""
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    if kind == "convT":
        return array.transpose(2, 3, 0, 1)
    return array


def _to_torch(kind, array):
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    if kind == "convT":
        return array.transpose(2, 3, 0, 1)
    return array


def _infer_config(reader, path):
    """Sizes from the codebook and the first encoder / last decoder conv."""
    needed = {"_vq_vae._embedding": 2, "decoder.12.weight": 4}
    for key, ndim in needed.items():
        if key not in reader.keys():
            raise VAEError(f"{path}: missing key {key!r}: not a mask VQ-VAE state dict like vae-oid.npz "
                           f"(found {len(reader.keys())} keys, e.g. {sorted(reader.keys())[:3]})")
        if len(reader.shape(key)) != ndim:
            raise VAEError(f"{path}: {key} has shape {list(reader.shape(key))}, expected {ndim} dimensions")
    Q, E = reader.shape("_vq_vae._embedding")
    return VAEConfig(num_codes=Q, embed_dim=E, hidden=reader.shape("decoder.12.weight")[1])


def load_vae(path, dtype=np.float32):
    """Reads a VQ-VAE in the released `vae-oid.npz` layout (never unpickles anything).

    Args:
      path: the .npz file.
      dtype: the parameters' dtype (float64 for reference comparisons).
    Returns:
      the parameter tree (see the module doc). Without encoder keys (a decoder-only file) the
      tree has no "encoder" and `encode` raises.
    Raises:
      VAEError (a ValueError) naming the file and the key: unreadable file, missing keys,
      wrong shapes (expected vs got), non-float arrays, a partial encoder.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VAEError(f"{path}: no such file (expected a mask VQ-VAE .npz such as vae-oid.npz)")
    try:
        return _read(NpzReader(path), path, dtype)
    except VAEError:
        raise
    except CheckpointError as e:  # the reader's (unreadable zip, pickled members): one error type
        raise VAEError(str(e)) from None


def _read(reader, path, dtype):
    """The tree from an open `NpzReader`, checked key by key; see `load_vae`."""
    try:
        config = _infer_config(reader, path)
        rows = _layout(config)
        have = set(reader.keys())
        encoder_keys = [r[0] for r in rows if r[0].startswith("encoder.")]
        with_encoder = any(k in have for k in encoder_keys)
        flat = {}
        for key, tree_path, kind, shape in rows:
            if key.startswith("encoder.") and not with_encoder:
                continue
            if key not in have:
                part = "encoder (present in part)" if key.startswith("encoder.") else "decoder"
                raise VAEError(f"{path}: missing key {key!r} of the {part}")
            got = reader.shape(key)
            if got != shape:
                raise VAEError(f"{path}: {key} has shape {list(got)}, expected {list(shape)} "
                               f"(sizes read from the file: {config})")
            if not np.issubdtype(reader.dtype(key), np.floating):
                raise VAEError(f"{path}: {key} has dtype {reader.dtype(key)}, expected a float type")
            flat[tree_path] = np.ascontiguousarray(_to_tree(kind, np.asarray(reader.get(key)).astype(dtype)))
    finally:
        reader.close()
    return unflatten(flat)


def config_of(params):
    """The `VAEConfig` of a parameter tree."""
    Q, E = np.shape(params["codebook"])
    return VAEConfig(num_codes=Q, embed_dim=E, hidden=np.shape(params["decoder"]["out"]["kernel"])[2])


def init_vae(config=VAEConfig(), seed=0, dtype=np.float32):
    """A randomly initialised VAE tree: kernels N(0, 2 / fan_in) (He, for ReLU), biases N(0, 0.01^2),
    codebook N(0, 1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for _, tree_path, kind, shape in _layout(config):
        if kind == "bias":
            value = rng.normal(0.0, 0.01, shape)
        elif kind == "codebook":
            value = rng.normal(0.0, 1.0, shape)
        else:
            fan_in = shape[0 if kind == "convT" else 1] * shape[2] * shape[3]
            value = _to_tree(kind, rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape))
        flat[tree_path] = value.astype(dtype)
    return unflatten(flat)


def save_vae(path, params):
    """Writes `params` in the released torch layout (atomically: a temporary file, then a rename)."""
    config = config_of(params)
    flat = flatten(params)
    tensors = {key: np.ascontiguousarray(_to_torch(kind, np.asarray(flat[tree_path])))
               for key, tree_path, kind, _ in _layout(config) if tree_path in flat}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **tensors)

    atomic_write(os.fspath(path), write)


def write_random_vae(path, config=VAEConfig(), seed=0):
    """A random float32 VAE saved in the released layout at `path`; returns its tree."""
    params = init_vae(config, seed, np.float32)
    save_vae(path, params)
    return params


# --------------------------------------------------------------------------- layers

def same_padding(size, k, stride):
    """TF "SAME" padding (before, after) of one axis; for the VAE's kernels it equals torch's padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x, p, stride=1):
    """Convolution with "SAME" padding, tap by tap.

    Args:
      x: [B, Y, X, C].
      p: {"kernel": [kh, kw, C, O], "bias": [O]}.
    Returns:
      [B, ceil(Y / stride), ceil(X / stride), O].
    """
    kh, kw = p["kernel"].shape[:2]
    (B, Y, X, _), O = x.shape, p["kernel"].shape[3]
    x = np.pad(x, ((0, 0), same_padding(Y, kh, stride), same_padding(X, kw, stride), (0, 0)))
    oy, ox = -(-Y // stride), -(-X // stride)
    out = np.zeros((B, oy, ox, O), x.dtype)  # [B, Y', X', O]
    for i in range(kh):
        for j in range(kw):
            window = x[:, i:i + stride * oy:stride, j:j + stride * ox:stride]  # [B, Y', X', C]
            out += np.einsum("BYXC,CO->BYXO", window, p["kernel"][i, j])
    return out + p["bias"]


def conv_transpose2d(x, p):
    """PyTorch `ConvTranspose2d(kernel_size=4, stride=2, padding=1)`, in scatter form.

    Input pixel (y, x) adds `x[y, x] @ kernel[i, j]` to output pixel (2y + i - 1, 2x + j - 1);
    outputs that fall outside [0, 2Y) x [0, 2X) are dropped (that is the padding of 1).

    Args:
      x: [B, Y, X, C].
      p: {"kernel": [4, 4, C, O], "bias": [O]}.
    Returns:
      [B, 2Y, 2X, O].
    """
    (B, Y, X, _), (kh, kw, _, O) = x.shape, p["kernel"].shape
    full = np.zeros((B, 2 * (Y - 1) + kh, 2 * (X - 1) + kw, O), x.dtype)  # [B, 2Y + 2, 2X + 2, O]
    for i in range(kh):
        for j in range(kw):
            full[:, i:i + 2 * Y:2, j:j + 2 * X:2] += np.einsum("BYXC,CO->BYXO", x, p["kernel"][i, j])
    return full[:, 1:1 + 2 * Y, 1:1 + 2 * X] + p["bias"]


def relu(x):
    return np.maximum(x, 0)


def res_block(p, x):
    """x + conv_2(ReLU(conv_1(ReLU(conv_0(x))))): 3x3, 3x3, 1x1 convs; no activation after the sum."""
    h = relu(conv2d(x, p["conv_0"]))  # [B, Y, X, C]
    h = relu(conv2d(h, p["conv_1"]))  # [B, Y, X, C]
    return x + conv2d(h, p["conv_2"])  # [B, Y, X, C]


# --------------------------------------------------------------------------- the model

def check_codes(codes, num_codes):
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != GRID * GRID or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes: expected integers [B, {GRID * GRID}], got {codes.dtype} {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
        raise ValueError(f"codes: expected values in [0, {num_codes - 1}], got {codes.min()}..{codes.max()}")
    return codes


def decode(params, codes):
    """16 codes per mask -> the decoder's float masks.

    Args:
      params: a VAE tree (`load_vae`, `init_vae`).
      codes: [B, 16] ints in [0, Q) (the `<segNNN>` values).
    Returns:
      [B, 64, 64] in the parameters' dtype; the trained model gives ~[-1, 1], > 0 inside the mask.
    """
    codes = check_codes(codes, params["codebook"].shape[0])
    x = params["codebook"][codes]  # [B, 16, E]
    return decode_latents(params, x.reshape(len(codes), GRID, GRID, -1))  # [B, 64, 64]


def decode_latents(params, x):
    """The decoder on (quantised) latents [B, 4, 4, E] -> [B, 64, 64]."""
    d = params["decoder"]
    x = relu(conv2d(x, d["in"]))  # [B, 4, 4, 8h]
    for i in range(NUM_RES):
        x = res_block(d[f"res_{i}"], x)  # [B, 4, 4, 8h]
    for i in range(NUM_UP):
        x = relu(conv_transpose2d(x, d[f"up_{i}"]))  # [B, 2Y, 2X, O]: 8 .. 64
    return conv2d(x, d["out"])[..., 0]  # [B, 64, 64]


def encode_latents(params, masks):
    """Masks [B, 64, 64] in [0, 1] -> the encoder's output [B, 4, 4, E], before quantisation."""
    if "encoder" not in params:
        raise ValueError("encode: this VAE has no encoder weights (a decoder-only file)")
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"masks: expected [B, {MASK_SIZE}, {MASK_SIZE}] in [0, 1], got {list(masks.shape)}")
    e = params["encoder"]
    x = (2.0 * (masks - 0.5)).astype(params["codebook"].dtype)[..., None]  # [B, 64, 64, 1]
    for i in range(NUM_DOWN):
        x = relu(conv2d(x, e[f"down_{i}"], stride=2))  # [B, Y/2, X/2, O]: 32 .. 4
    for i in range(NUM_RES):
        x = res_block(e[f"res_{i}"], x)  # [B, 4, 4, 8h]
    return conv2d(x, e["out"])  # [B, 4, 4, E]


def quantize(codebook, z):
    """Index of the nearest codebook row (L2; the first of ties) for each latent.

    Args:
      codebook: [Q, E].
      z: [B, 4, 4, E].
    Returns:
      [B, 16] int64 codes, row-major over the grid.
    """
    z = z.reshape(len(z), GRID * GRID, -1)  # [B, 16, E]
    dist = (np.sum(z**2, -1, keepdims=True) + np.sum(codebook**2, -1)
            - 2 * np.einsum("BPE,QE->BPQ", z, codebook))  # [B, 16, Q]
    return np.argmin(dist, axis=-1)


def encode(params, masks):
    """Masks [B, 64, 64] in [0, 1] -> [B, 16] codes (training targets for `segment` prompts)."""
    return quantize(params["codebook"], encode_latents(params, masks))
