"""`paligemma explain`: the maps are the reference's attention probabilities, mask.png is the mask.

The maps come from one teacher-forced forward pass (paligemma/viz/attention.py); the tests hold
them against what the KV-cached decoding records at each step (prefill, then `extend` per token),
a separate code path, and against the rule of which keys a query may see, written out here.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paligemma import ref
from paligemma.cli.main import main
from paligemma.parity.strategies import configs
from paligemma.ref import capture
from paligemma.ref.decode import extend, prefill
from paligemma.ref.demo import ASSETS
from paligemma.ref.tasks import shapes
from paligemma.viz.attention import explain_ids, shown_maps
from paligemma.viz.mask_picture import HIDDEN, VISIBLE, WINDOWED, draw_mask



def _probs_names(config):
    return [f"llm/block_{i:02d}/attn_probs" for i in range(config.llm.depth)]


def cached_decoding_rows(params, config, pixels, tokens, mask_ar, steps):
    """Greedy decoding with the KV cache, recording each step's attention row.

    Returns:
      (answer [steps'], rows [steps', L, N, S_cache]): S_cache = P + T + steps slots.
    """
    names = _probs_names(config)
    with capture.recording(names) as rec:
        cache, logits = prefill(params, config, pixels[None], tokens[None], mask_ar[None],
                                np.ones((1, len(tokens)), bool), steps)
    rows = [np.stack([rec.values[n][0, :, -1] for n in names])]  # [L, N, S]: the last prompt query
    answer = [int(np.argmax(logits[0]))]
    while len(answer) < steps and answer[-1] != config.eos_id:
        with capture.recording(names) as rec:
            logits = extend(params, config, cache, np.array([answer[-1]]))
        rows.append(np.stack([rec.values[n][0, :, 0] for n in names]))
        answer.append(int(np.argmax(logits[0])))
    return np.array(answer), np.stack(rows)


def may_see(config, ar, layer, q):
    """[S] bool: the keys query position q may see in `layer`, from the prefix-LM rule.

    ar: [S] mask_ar of the whole sequence (image tokens 0). Blocks: a 1 starts a new block;
    a query sees its own block and every earlier one. Sliding-window layers (even layers of a
    config with a window) also hide keys `window` or more positions behind, outside the block.
    """
    block = np.cumsum(ar)
    seen = block <= block[q]
    window = config.llm.sliding_window
    if window is not None and layer % 2 == 0:
        seen &= (q - np.arange(len(ar)) < window) | (block == block[q])
    return seen


@st.composite
def cases(draw):
    config = draw(configs(max_depth=2))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    prefix = draw(st.integers(1, 5))
    suffix = draw(st.integers(0, 2))  # a forced start of the answer (mask_ar 1)
    tokens = rng.integers(3, config.llm.vocab_size, prefix + suffix)
    mask_ar = np.array([0] * prefix + [1] * suffix)
    R = config.vision.image_size
    pixels = rng.uniform(-1, 1, (R, R, 3))
    return config, seed, pixels, tokens, mask_ar, draw(st.integers(1, 4))


@settings(max_examples=25)
@given(cases())
def test_maps_are_the_attention_the_cached_decoding_records(case):
    config, seed, pixels, tokens, mask_ar, steps = case
    params = ref.init_params(config, seed=seed % 1000, dtype=np.float64, random_norms=True)
    ex = explain_ids(params, config, pixels, tokens, mask_ar, max_new_tokens=steps)
    answer, cached = cached_decoding_rows(params, config, pixels, tokens, mask_ar, steps)
    np.testing.assert_array_equal(ex.answer, answer)
    A, L, N = len(answer), config.llm.depth, config.llm.num_heads
    P, T = config.vision.num_patches, len(tokens)
    S = P + T + A
    assert ex.rows.shape == (A, L, N, S) and ex.image_maps.shape == (A, L, N, P)
    np.testing.assert_allclose(ex.rows, cached[..., :S], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ex.image_maps, cached[..., :P], rtol=0, atol=1e-12)

    ar = np.concatenate([np.zeros(P, int), mask_ar, np.ones(A, int)])
    for a in range(A):
        q = P + T - 1 + a  # the query that chose answer token a
        assert ex.query_positions[a] == q
        for layer in range(L):
            seen = may_see(config, ar, layer, q)
            row = ex.rows[a, layer]  # [N, S]
            np.testing.assert_allclose(row[:, seen].sum(axis=1), 1.0, rtol=0, atol=1e-12)
            assert np.all(row[:, ~seen] == 0)

    g = config.vision.grid
    layer = L - 1
    mean = cached[:, layer, :, :P].mean(axis=1).reshape(A, 1, g, g)
    np.testing.assert_allclose(shown_maps(ex, (layer,), None, g), mean, rtol=0, atol=1e-12)
    head = N - 1
    every = np.stack([cached[:, i, head, :P] for i in range(L)], axis=1).reshape(A, L, g, g)
    np.testing.assert_allclose(shown_maps(ex, tuple(range(L)), head, g), every, rtol=0, atol=1e-12)


def read_cells(path, geometry):
    """The mask picture read back: [S, S] codes, 1 visible, 0 hidden, 2 windowed, -1 for a cell
    not painted whole in one of the three colours."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    x0, y0, cell = np.asarray(geometry["x0"]), np.asarray(geometry["y0"]), int(geometry["cell"])
    codes = np.full((len(y0), len(x0)), -1)
    for code, colour in ((0, HIDDEN), (1, VISIBLE), (2, WINDOWED)):
        whole = np.ones(codes.shape, bool)
        for dy in range(cell):
            for dx in range(cell):
                whole &= np.all(pixels[np.ix_(y0 + dy, x0 + dx)] == colour, axis=-1)
        codes[whole] = code
    return codes


@settings(max_examples=20)
@given(st.integers(1, 70), st.integers(1, 6), st.integers(0, 8), st.one_of(st.none(), st.integers(1, 10)))
def test_mask_picture_cells_are_the_mask(tmp_path_factory, P, prefix, answer, window):
    S = P + prefix + answer
    ar = np.array([0] * (P + prefix) + [1] * answer)[None]
    input_mask = np.ones((1, S), bool)
    attn = ref.make_attn_mask(input_mask, ar)[0]  # [S, S]
    local = None
    if window is not None:
        local = np.array([[may_see_window(i, j, ar[0], window) for j in range(S)] for i in range(S)]) & attn
    blocks = [("image", 0, P), ("prefix", P, P + prefix)] + ([("answer", P + prefix, S)] if answer else [])
    picture, geometry = draw_mask(attn, blocks, local, window)
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    picture.save(path)
    codes = read_cells(path, geometry)
    assert np.all(np.diff(geometry["x0"]) >= int(geometry["cell"]))  # cells never overlap
    expected = np.where(attn, 1, 0) if local is None else np.where(attn & ~local, 2, np.where(attn, 1, 0))
    np.testing.assert_array_equal(codes, expected)


def may_see_window(i, j, ar, window):
    block = np.cumsum(ar)
    return i - j < window or block[i] == block[j]


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """`paligemma explain` on a demo scene with the embedded model, a segment prompt."""
    folder = tmp_path_factory.mktemp("explain")
    scene = shapes.random_scene(np.random.default_rng(3), **shapes.DEMO_SCENE)
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)
    out = folder / "out"
    assert main(["explain", "--image", str(image), "--prompt", "segment triangle", "--out", str(out),
                 "--layer", "all", "--max-new-tokens", "24"]) == 0
    return image, out


def test_explain_cli_writes_the_mask_and_maps_of_the_reference(explained):
    image, out = explained
    tok = ref.Tokenizer(str(ASSETS / "demo-tokenizer.model"))
    prompt = tok.prompt("segment triangle")
    arrays = np.load(out / "attention.npz")
    answer = arrays["answer"]
    config, params = ref.load(str(ASSETS / "demo-model.npz"))
    T, A, P, g = len(prompt.tokens), len(answer), config.vision.num_patches, config.vision.grid
    assert A >= 2 and tok.decode(answer).endswith("triangle")
    np.testing.assert_array_equal(arrays["tokens"], np.concatenate([prompt.tokens, answer]))

    # mask.png against make_attn_mask of the same sequence.
    ar = np.concatenate([np.zeros(P, int), prompt.mask_ar, np.ones(A, int)])[None]
    attn = ref.make_attn_mask(np.ones_like(ar, bool), ar)[0]
    codes = read_cells(out / "mask.png", np.load(out / "mask.npz"))
    np.testing.assert_array_equal(codes, attn.astype(int))

    # The maps against the reference's own recording of the same forward pass.
    params = ref.cast_params(params, np.float64)
    pixels = ref.preprocess(str(image), config.vision.image_size).astype(np.float64)
    names = _probs_names(config)
    seq = np.concatenate([prompt.tokens, answer])[None]
    with capture.recording(names) as rec:
        ref.forward(params, config, pixels[None], seq, ar[:, P:])
    q = P + T - 1 + np.arange(A)
    probs = np.stack([rec.values[n][0][:, q, :P] for n in names], axis=1)  # [N, L, A, P]
    np.testing.assert_allclose(arrays["image_maps"], probs.transpose(2, 1, 0, 3), rtol=0, atol=1e-12)
    shown = probs.mean(axis=0).transpose(1, 0, 2).reshape(A, len(names), g, g)
    np.testing.assert_allclose(arrays["shown"], shown, rtol=0, atol=1e-12)
    for a in range(A):
        assert Image.open(out / f"token_{a:02d}.png").size[0] > 3 * 256  # a panel per layer
    assert not (out / f"token_{A:02d}.png").exists()
    objects = np.load(out / "objects.npz")
    assert objects["boxes"].shape == (1, 4) and objects["masks"].shape == (1, 256, 256)
    assert objects["masks"].sum() > 0  # the demo VAE drew a mask


@pytest.mark.parametrize("extra, message", [
    (["--layer", "3"], "--layer 3: the model has 3 layers"),
    (["--layer", "x"], "--layer: expected a layer number or 'all'"),
    (["--head", "4"], "--head 4: the model has 4 query heads"),
    (["--head", "-1"], "--head: expected a head number or 'mean'"),
    (["--checkpoint", "x.npz"], "--checkpoint and --tokenizer go together"),
])
def test_explain_errors_name_the_problem(explained, tmp_path, capsys, extra, message):
    image, _ = explained
    assert main(["explain", "--image", str(image), "--prompt", "caption en", "--out", str(tmp_path)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "index.html").exists()


def test_explain_missing_image(tmp_path, capsys):
    assert main(["explain", "--image", str(tmp_path / "none.png"), "--prompt", "caption en"]) == 2
    assert f"--image {tmp_path / 'none.png'}: no such file" in capsys.readouterr().err
