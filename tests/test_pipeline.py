"""`paligemma.fast.PaliGemma`: the user-level API, against the reference driven by hand.

Everything is built in a temporary folder: a tiny tokenizer, a tiny PaliGemma 2 saved as .npz
(and as an HF directory with extra embedding rows), PNG images. Compiles are the cost (~3 s
each), so models are module-scoped and the fast tests reuse a few shapes.
"""

import dataclasses
import types

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from paligemma import fast, ref
from paligemma.fast import PaliGemma
from paligemma.fast.pipeline import Result
from paligemma.ref.checkpoints.tensorfiles import CheckpointError
from paligemma.ref.inputs.image import ImageError
from paligemma.ref.params import flatten

PROMPTS = ["caption en", "ocr", "detect cat ; dog"]
MAX_NEW = 8
EXTRA_ROWS = 64  # HF pads PaliGemma's 257152 pieces to 257216 rows


def make_image(i):
    """A small, distinct uint8 image per index (not square, so resizing does work)."""
    a = np.zeros((40, 50, 3), np.uint8)
    a[..., i % 3] = 255
    a[:20, :, (i + 1) % 3] = 128
    return a


def make_params(config, eos_id):
    """Random tiny parameters where EOS wins for some inputs, so the EOS cut is exercised."""
    params = ref.init_params(config, seed=0, random_norms=True)
    params["llm"]["embedder"]["input_embedding"][eos_id] *= 5
    return params


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    tok = ref.train_tiny_tokenizer(d / "tok.model")
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    params = make_params(config, tok.eos_id)
    ref.save(d / "model.npz", config, params)
    # HF layout with rows the tokenizer lacks; large ones, so an uncut model would pick them.
    wide = config.replace(llm=dataclasses.replace(config.llm, vocab_size=tok.vocab_size + EXTRA_ROWS))
    extra = np.random.default_rng(1).normal(0, 30, (EXTRA_ROWS, config.llm.width)).astype(np.float32)
    table = np.concatenate([params["llm"]["embedder"]["input_embedding"], extra])
    wide_params = {**params, "llm": {**params["llm"], "embedder": {"input_embedding": table}}}
    ref.save(d / "hf", wide, wide_params, format="hf")
    images = []
    for i in range(3):
        Image.fromarray(make_image(i)).save(d / f"image{i}.png")
        images.append(str(d / f"image{i}.png"))
    return types.SimpleNamespace(dir=d, tok=str(d / "tok.model"), npz=str(d / "model.npz"), hf=str(d / "hf"),
                                 images=images, vocab=tok.vocab_size)


@pytest.fixture(scope="module")
def ref_model(files):
    return PaliGemma.load(files.npz, files.tok, impl="ref")


@pytest.fixture(scope="module")
def fast_model(files):
    return PaliGemma.load(files.npz, files.tok, impl="fast")


@pytest.fixture(scope="module")
def ref_results(ref_model, files):
    return ref_model.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)


def by_hand(checkpoint, tok_path, images, prompts, **load_overrides):
    """The independent path: ref.load, preprocess, batch_prompts, ref.generate, decode."""
    config, params = ref.load(checkpoint, **load_overrides)
    tok = ref.Tokenizer(tok_path)
    pixels = ref.preprocess(images, config.vision.image_size)
    out = ref.generate(params, config, pixels, *tok.batch_prompts(prompts), max_new_tokens=MAX_NEW)
    return out, tok.decode_generations(out.tokens), tok.eos_id


def test_ref_pipeline_equals_reference_by_hand(files, ref_results):
    out, texts, eos = by_hand(files.npz, files.tok, files.images, PROMPTS)
    assert [r.text for r in ref_results] == texts
    for r, row, logp, n in zip(ref_results, out.tokens, out.logprobs, out.lengths(eos)):
        finished = row[n - 1] == eos
        kept = n - 1 if finished else n
        assert r.finished == finished
        np.testing.assert_array_equal(r.tokens, row[:kept])
        np.testing.assert_array_equal(r.logprobs, logp[:kept])
    # The fixture is meant to cover both endings (EOS after some tokens, and none at all).
    assert any(r.finished and len(r.tokens) for r in ref_results)
    assert not all(r.finished for r in ref_results)


def test_fast_greedy_equals_ref(fast_model, ref_results, files):
    got = fast_model.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.text for r in got] == [r.text for r in ref_results]
    for g, r in zip(got, ref_results):
        np.testing.assert_array_equal(g.tokens, r.tokens)
        np.testing.assert_allclose(g.logprobs, r.logprobs, atol=1e-3)


def test_single_calls_equal_the_batch_and_progress_names_each_stage(ref_results, files):
    stages = []

    def record(stage):
        stages.append(stage)
        return fast.pipeline.no_progress(stage)

    model = PaliGemma.load(files.npz, files.tok, impl="fast", progress=record)
    assert stages == ["loading tokenizer", "loading checkpoint", "preparing parameters"]
    leaves = jax.tree_util.tree_leaves(model.params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)  # on the device once
    # float32 on CPU: per-layer buffers, the same weights as the checkpoint's stacked arrays.
    _, stored = ref.load(files.npz)
    layers = model.params["llm"]["layers"]
    assert isinstance(layers, tuple) and len(layers) == len(stored["llm"]["layers"]["mlp"]["linear"])
    np.testing.assert_array_equal(np.stack([np.asarray(l["mlp"]["linear"]) for l in layers]),
                                  stored["llm"]["layers"]["mlp"]["linear"])
    for image, prompt, expected in zip(files.images, PROMPTS, ref_results):
        got = model.generate(image, prompt, max_new_tokens=MAX_NEW)
        assert isinstance(got, Result)
        assert got.text == expected.text
        np.testing.assert_array_equal(got.tokens, expected.tokens)
    # Only this test generates one float32 example at a time; every prompt pads to the same shape.
    assert stages[3:] == ["compiling", "generating", "generating"]


def test_shared_image_and_shared_prompt_broadcast(fast_model, files):
    one_image = fast_model.generate(files.images[0], PROMPTS, max_new_tokens=MAX_NEW)
    repeated = fast_model.generate([files.images[0]] * 3, PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.text for r in one_image] == [r.text for r in repeated]
    one_prompt = fast_model.generate(files.images, "caption en", max_new_tokens=MAX_NEW)
    prompts = fast_model.generate(files.images, ["caption en"] * 3, max_new_tokens=MAX_NEW)
    assert isinstance(one_prompt, list) and len(one_prompt) == 3
    assert [r.text for r in one_prompt] == [r.text for r in prompts]


def test_every_image_source_gives_the_same_answer(ref_model, files):
    path = files.images[1]
    with open(path, "rb") as f:
        data = f.read()
    sources = [path, make_image(1), Image.open(path), data]
    tokens = [ref_model.generate(s, "ocr", max_new_tokens=MAX_NEW).tokens.tolist() for s in sources]
    assert all(t == tokens[0] for t in tokens)


def test_extra_embedding_rows_are_cut_to_the_tokenizer(files):
    config, params = ref.load(files.hf)
    assert config.llm.vocab_size == files.vocab + EXTRA_ROWS
    tok = ref.Tokenizer(files.tok)
    uncut = ref.generate(params, config, ref.preprocess(files.images, 28), *tok.batch_prompts(PROMPTS),
                         max_new_tokens=MAX_NEW)
    assert (uncut.tokens >= files.vocab).any()  # the trap is real: these ids cannot be decoded

    model = PaliGemma.load(files.hf, files.tok, impl="ref")
    assert model.config.llm.vocab_size == files.vocab
    assert model.params["llm"]["embedder"]["input_embedding"].shape[0] == files.vocab
    results = model.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)
    assert all((r.tokens < files.vocab).all() for r in results)
    _, texts, _ = by_hand(files.hf, files.tok, files.images, PROMPTS, vocab_size=files.vocab)
    assert [r.text for r in results] == texts


def test_from_loaded_model_equals_load(files, ref_results):
    config, params = ref.load(files.npz)
    model = PaliGemma(config, params, ref.Tokenizer(files.tok), impl="ref")
    assert [r.text for r in model.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)] == \
        [r.text for r in ref_results]


def test_tokenizer_larger_than_embedding_raises(files):
    config = ref.get_config("tiny-paligemma2", vocab_size=files.vocab - 1)
    with pytest.raises(ValueError, match=r"only \d+ rows"):
        PaliGemma(config, ref.init_params(config), files.tok, impl="ref")


def test_special_ids_that_differ_from_the_tokenizer_raise(files):
    config, params = ref.load(files.npz)
    with pytest.raises(ValueError, match="special ids differ"):
        PaliGemma(config.replace(eos_id=7), params, files.tok, impl="ref")


@pytest.mark.parametrize("images, prompts, match", [
    (lambda f: f.images[:2], PROMPTS, "2 images and 3 prompts"),
    (lambda f: [], "caption en", "images: empty"),
    (lambda f: f.images[0], [], "prompts: empty"),
    (lambda f: f.images[0], 3, "prompts: expected str"),
    (lambda f: f.images[:2], ["ocr", None], "prompts: expected str"),
])
def test_mismatched_inputs_raise(ref_model, files, images, prompts, match):
    with pytest.raises(ValueError, match=match):
        ref_model.generate(images(files), prompts)


def test_unreadable_image_and_bad_arguments_raise(ref_model, files):
    with pytest.raises(ImageError, match="tok.model"):
        ref_model.generate(files.tok, "caption en")
    with pytest.raises(ValueError, match="sampler"):
        ref_model.generate(files.images[0], "caption en", sampler="top_k(0)")
    for bad in (0, 2.0, [4], True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            ref_model.generate(files.images[0], "caption en", max_new_tokens=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="jax"), "impl"), (dict(impl="fast", dtype="float64"), "dtype"),
    (dict(impl="ref", dtype="float16"), "dtype"), (dict(preprocess="tf"), "preprocess"),
])
def test_bad_choices_raise_before_any_file_is_read(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PaliGemma.load("/nonexistent/model.npz", "/nonexistent/tok.model", **kwargs)


def test_missing_checkpoint_raises_checkpoint_error(files):
    with pytest.raises(CheckpointError, match="no such file"):
        PaliGemma.load(str(files.dir / "missing.npz"), files.tok)


def test_dtypes(files, ref_results):
    leaves = lambda m: list(flatten(m.params).values())  # noqa: E731
    f64 = PaliGemma.load(files.npz, files.tok, impl="ref", dtype="float64")
    assert all(x.dtype == np.float64 for x in leaves(f64))
    assert [r.text for r in f64.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)] == \
        [r.text for r in ref_results]
    bf16 = PaliGemma.load(files.npz, files.tok, impl="ref", dtype="bfloat16")
    assert all(x.dtype == ml_dtypes.bfloat16 for x in leaves(bf16))
    assert len(bf16.generate(files.images, PROMPTS, max_new_tokens=MAX_NEW)) == 3
    fast_bf16 = PaliGemma.load(files.npz, files.tok, impl="fast", dtype="bfloat16")
    assert all(isinstance(x, jax.Array) and x.dtype == jax.numpy.bfloat16 for x in leaves(fast_bf16))
    result = fast_bf16.generate(files.images[0], "caption en", max_new_tokens=MAX_NEW)
    assert (result.tokens < files.vocab).all()

