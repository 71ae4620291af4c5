"""The mask VQ-VAE: ref vs fast, against explicit loops and torch.nn, the released file layout,
pasting conventions, and clear errors for broken files."""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma.fast import vqvae as fast_vqvae
from paligemma.parity.tolerances import FLOAT64_EXACT, VQVAE_FLOAT32, assert_close
from paligemma.ref import vqvae
from paligemma.ref.params import flatten
from paligemma.ref.tasks import answers

SMALL = vqvae.VAEConfig(num_codes=128, embed_dim=8, hidden=2)

# The released vae-oid.npz layout, written out by hand: torch key -> shape.
RELEASED = {
    "_vq_vae._embedding": (128, 512),
    "encoder.0.weight": (16, 1, 4, 4), "encoder.2.weight": (32, 16, 4, 4), "encoder.4.weight": (64, 32, 4, 4),
    "encoder.6.weight": (128, 64, 4, 4), "encoder.10.weight": (512, 128, 1, 1),
    **{f"{p}.{b}.net.{i}.weight": (128, 128, k, k) for p, b in (("encoder", 8), ("encoder", 9), ("decoder", 2),
                                                              ("decoder", 3)) for i, k in ((0, 3), (2, 3), (4, 1))},
    "decoder.0.weight": (128, 512, 1, 1), "decoder.4.weight": (128, 128, 4, 4), "decoder.6.weight": (128, 64, 4, 4),
    "decoder.8.weight": (64, 32, 4, 4), "decoder.10.weight": (32, 16, 4, 4), "decoder.12.weight": (1, 16, 1, 1),
}
RELEASED.update({k.replace("weight", "bias"): (s[1] if k.split(".")[1] in ("4", "6", "8", "10") and
                                               k.startswith("decoder") else s[0],)
                 for k, s in list(RELEASED.items()) if k.endswith("weight")})


def conv_transpose_loops(x, weight, bias):
    """torch ConvTranspose2d(k=4, s=2, p=1) by its definition. x [B, C, Y, X], weight [C, O, 4, 4]."""
    B, C, Y, X = x.shape
    O = weight.shape[1]
    out = np.zeros((B, O, 2 * Y, 2 * X)) + bias[None, :, None, None]
    for b in range(B):
        for c in range(C):
            for y in range(Y):
                for xx in range(X):
                    for i in range(4):
                        for j in range(4):
                            oy, ox = 2 * y + i - 1, 2 * xx + j - 1
                            if 0 <= oy < 2 * Y and 0 <= ox < 2 * X:
                                out[b, :, oy, ox] += x[b, c, y, xx] * weight[c, :, i, j]
    return out


def conv_loops(x, weight, bias, stride, pad):
    """torch Conv2d by its definition (cross-correlation, zero padding `pad`). x [B, C, Y, X], weight [O, C, k, k]."""
    B, C, Y, X = x.shape
    O, _, k, _ = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oy, ox = (Y + 2 * pad - k) // stride + 1, (X + 2 * pad - k) // stride + 1
    out = np.zeros((B, O, oy, ox))
    for y in range(oy):
        for xx in range(ox):
            patch = xp[:, :, y * stride:y * stride + k, xx * stride:xx * stride + k]  # [B, C, k, k]
            out[:, :, y, xx] = np.einsum("bcij,ocij->bo", patch, weight) + bias
    return out


@settings(max_examples=15)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_transposed_conv_matches_explicit_loops(B, C, O, Y, X, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.normal(size=(B, C, Y, X)), rng.normal(size=(C, O, 4, 4)), rng.normal(size=O)
    expected = conv_transpose_loops(x, w, b).transpose(0, 2, 3, 1)  # [B, 2Y, 2X, O]
    p = {"kernel": w.transpose(2, 3, 0, 1), "bias": b}  # the tree's [kh, kw, C, O]
    assert_close(vqvae.conv_transpose2d(x.transpose(0, 2, 3, 1), p), expected, FLOAT64_EXACT, "ref convT vs loops")
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    got = fast_vqvae.conv_transpose2d(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), p32)
    assert_close(got, expected, VQVAE_FLOAT32, "fast convT vs loops")


@pytest.mark.parametrize("k, stride, pad", [(1, 1, 0), (3, 1, 1), (4, 2, 1)])  # the VAE's convs (torch padding)
def test_conv_matches_explicit_loops(k, stride, pad):
    rng = np.random.default_rng(k)
    x, w, b = rng.normal(size=(2, 3, 8, 8)), rng.normal(size=(2, 3, k, k)), rng.normal(size=2)
    expected = conv_loops(x, w, b, stride, pad).transpose(0, 2, 3, 1)
    p = {"kernel": w.transpose(2, 3, 1, 0), "bias": b}
    assert_close(vqvae.conv2d(x.transpose(0, 2, 3, 1), p, stride), expected, FLOAT64_EXACT, "ref conv vs loops")
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    got = fast_vqvae.conv2d(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), p32, stride)
    assert_close(got, expected, VQVAE_FLOAT32, "fast conv vs loops")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random VAE with the released sizes, written in the released layout, and read back."""
    path = tmp_path_factory.mktemp("vae") / "vae-random.npz"
    written = vqvae.write_random_vae(path, seed=3)
    return path, written


def test_random_vae_has_the_released_layout_and_loads_bit_exactly(released):
    path, written = released
    with np.load(path, allow_pickle=False) as f:
        assert {k: f[k].shape for k in f.files} == RELEASED and all(f[k].dtype == np.float32 for k in f.files)
    loaded = vqvae.load_vae(path)
    a, b = flatten(written), flatten(loaded)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert vqvae.config_of(loaded) == vqvae.VAEConfig()


def test_ref_and_fast_agree(released):
    path, _ = released
    p64, p32 = vqvae.load_vae(path, np.float64), fast_vqvae.load_vae(path)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 128, (3, 16))
    assert_close(fast_vqvae.decode(p32, codes), vqvae.decode(p64, codes), VQVAE_FLOAT32, "fast vs ref decoder")
    masks = (rng.uniform(size=(2, 64, 64)) > 0.5).astype(np.float32)
    z64, z32 = vqvae.encode_latents(p64, masks), fast_vqvae.encode_latents(p32, masks)
    assert_close(z32, z64, VQVAE_FLOAT32, "fast vs ref encoder latents")
    # Quantisation on the same latents: both equal a brute-force nearest neighbour.
    cb = np.asarray(p64["codebook"])
    brute = np.argmin(np.linalg.norm(z64.reshape(2, 16, 1, -1) - cb, axis=-1), axis=-1)
    assert np.array_equal(vqvae.quantize(cb, z64), brute)
    assert np.array_equal(np.asarray(fast_vqvae.quantize(jnp.asarray(cb, jnp.float32), jnp.asarray(z64, jnp.float32))),
                          brute)


def test_decoder_and_encoder_match_torch(released):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    path, _ = released

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                     nn.ReLU(), nn.Conv2d(c, c, 1))

        def forward(self, x):
            return x + self.net(x)

    up = lambda i, o: [nn.ConvTranspose2d(i, o, 4, stride=2, padding=1), nn.ReLU()]  # noqa: E731
    down = lambda i, o: [nn.Conv2d(i, o, 4, stride=2, padding=1), nn.ReLU()]  # noqa: E731
    decoder = nn.Sequential(nn.Conv2d(512, 128, 1), nn.ReLU(), Res(128), Res(128), *up(128, 128), *up(128, 64),
                            *up(64, 32), *up(32, 16), nn.Conv2d(16, 1, 1)).double()
    encoder = nn.Sequential(*down(1, 16), *down(16, 32), *down(32, 64), *down(64, 128), Res(128), Res(128),
                            nn.Conv2d(128, 512, 1)).double()
    with np.load(path, allow_pickle=False) as f:
        state = {k: torch.from_numpy(f[k].astype(np.float64)) for k in f.files}
    decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
    encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    p64 = vqvae.load_vae(path, np.float64)
    codes = np.random.default_rng(1).integers(0, 128, (2, 16))
    with torch.no_grad():
        grid = state["_vq_vae._embedding"][torch.from_numpy(codes)].reshape(2, 4, 4, 512).permute(0, 3, 1, 2)
        expected = decoder(grid)[:, 0].numpy()
        masks = np.random.default_rng(2).uniform(size=(2, 64, 64))
        latents = encoder(torch.from_numpy(2 * (masks - 0.5))[:, None]).permute(0, 2, 3, 1).numpy()
    assert_close(vqvae.decode(p64, codes), expected, FLOAT64_EXACT, "ref decoder vs torch.nn")
    assert_close(vqvae.encode_latents(p64, masks), latents, FLOAT64_EXACT, "ref encoder vs torch.nn")


def test_encode_then_decode_shapes_and_ranges():
    params = vqvae.init_vae(SMALL, seed=0, dtype=np.float64)
    mask = np.zeros((40, 50), bool)
    mask[5:30, 10:45] = True
    crop = answers.crop_mask(mask, (5, 10, 30, 45))
    assert crop.shape == (64, 64) and np.all(crop == 1.0)  # the box is the mask's own rectangle
    crops = np.stack([crop, np.zeros((64, 64)), answers.crop_mask(mask, (0, 0, 40, 50))])  # [3, 64, 64]
    codes = vqvae.encode(params, crops)
    assert codes.shape == (3, 16) and np.issubdtype(codes.dtype, np.integer) and codes.min() >= 0 and codes.max() < 128
    masks = vqvae.decode(params, codes)
    assert masks.shape == (3, 64, 64) and masks.dtype == np.float64 and np.all(np.isfinite(masks))
    for convention in ("big_vision", "demo"):
        full = answers.paste_mask(masks[0], (5, 10, 30, 45), 40, 50, convention)
        assert full.shape == (40, 50) and full.min() >= 0 and full.max() <= 1 and not full[:5].any()
    with pytest.raises(ValueError, match=r"values in \[0, 127\]"):
        vqvae.decode(params, np.full((1, 16), 128))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        vqvae.decode(params, np.zeros((1, 15), int))
    with pytest.raises(ValueError, match=r"\[B, 64, 64\]"):
        vqvae.encode(params, np.zeros((1, 32, 32)))


def test_paste_mask_conventions_hand_worked():
    # Box rows 10..41, columns 20..83 (32 x 64) in a 50 x 100 image. Left half of the 64 x 64
    # mask +1, right half -1: the width is unchanged and every column is constant, so the
    # resized mask keeps exactly columns 0..31 positive -> image columns 20..51.
    m = np.where(np.arange(64) < 32, 1.0, -1.0)[None, :].repeat(64, 0)
    bv = answers.paste_mask(m, (10, 20, 42, 84), 50, 100, "big_vision")
    expected = np.zeros((50, 100), np.float32)
    expected[10:42, 20:52] = 1
    assert np.array_equal(bv, expected)
    # demo: clip(0.5 m + 0.5) -> uint8(x 255): +1 -> 255 -> 1.0; 0 -> 127.5 truncated -> 127 -> 127/255.
    demo = answers.paste_mask(np.zeros((64, 64)), (10, 20, 42, 84), 50, 100, "demo")
    assert np.allclose(demo[10:42, 20:84], 127 / 255) and demo[:10].sum() == 0 and demo[:, 84:].sum() == 0
    assert np.all(answers.paste_mask(np.ones((64, 64)), (0, 0, 5, 5), 8, 8, "demo")[:5, :5] == 1.0)
    assert not answers.paste_mask(m, (10, 20, 10, 84), 50, 100).any()  # an empty box pastes nothing
    with pytest.raises(ValueError, match="convention"):
        answers.paste_mask(m, (0, 0, 1, 1), 2, 2, "hf")


def _rewrite(src, dst, drop=(), change=None):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k not in drop}
    arrays.update(change or {})
    np.savez(dst, **arrays)


def test_broken_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.npz"
    vqvae.write_random_vae(good, SMALL)
    cases = [
        (dict(drop=["decoder.4.bias"]), r"missing key 'decoder.4.bias' of the decoder"),
        (dict(change={"decoder.6.weight": np.zeros((16, 8, 3, 3), np.float32)}),
         r"decoder.6.weight has shape \[16, 8, 3, 3\], expected \[16, 8, 4, 4\]"),
        (dict(drop=["encoder.10.bias"]), r"missing key 'encoder.10.bias' of the encoder \(present in part\)"),
        (dict(drop=["_vq_vae._embedding"]), r"missing key '_vq_vae._embedding': not a mask VQ-VAE"),
        (dict(change={"decoder.0.bias": np.zeros(16, np.int32)}), r"decoder.0.bias has dtype int32"),
        (dict(change={"decoder.0.bias": np.array([{}] * 16, dtype=object)}), r"Python objects"),
    ]
    for i, (how, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.npz"
        _rewrite(good, bad, **how)  # np.savez pickles the object array: what load_vae must refuse
        with pytest.raises(vqvae.VAEError, match=message) as e:
            vqvae.load_vae(bad)
        assert str(bad) in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        vqvae.load_vae(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="no such file"):
        vqvae.load_vae(tmp_path / "none.npz")
    # A decoder-only file loads; encoding then says why it cannot.
    decoder_only = tmp_path / "decoder.npz"
    with zipfile.ZipFile(good) as z:
        names = [n[:-4] for n in z.namelist()]
    _rewrite(good, decoder_only, drop=[n for n in names if n.startswith("encoder.")])
    params = vqvae.load_vae(decoder_only)
    assert "encoder" not in params and vqvae.decode(params, np.zeros((1, 16), int)).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="no encoder weights"):
        vqvae.encode(params, np.zeros((1, 64, 64)))
