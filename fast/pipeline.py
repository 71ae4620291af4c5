"""A user-level API: load a checkpoint and a tokenizer once, then generate text from images.

    from paligemma.fast import PaliGemma
    model = PaliGemma.load("paligemma2-3b-pt-224/", "paligemma_tokenizer.model", dtype="bfloat16")
    model.generate("cat.jpg", "caption en").text                   # one image, one prompt: one Result
    model.generate("cat.jpg", ["caption en", "ocr"])               # one image, several prompts: a list
    model.generate(["a.jpg", "b.jpg"], ["caption en", "ocr"])      # pairs: a list
    model.generate(["a.jpg", "b.jpg"], "caption en")               # one prompt for every image: a list

`impl="fast"` runs the compiled `paligemma.fast.generate` (float32 or bfloat16 policy, the
parameters put on the device once); `impl="ref"` runs the NumPy reference (float32, bfloat16
parameters computed in float32 with big_vision's cast points, or float64).

    model = PaliGemma.load("paligemma2-28b-pt-224.npz", tok, dtype="bfloat16", mesh="data=2,model=4")

`mesh` (fast only; a description or a `jax.sharding.Mesh`, see `paligemma.fast.sharding`) splits
the model over devices: each device's shards are read straight from the memory-mapped checkpoint
(`sharding.place_params`), so neither the host nor any device ever holds the whole model.

Vocabulary: the tokenizer decides it. A checkpoint with more embedding rows than the tokenizer
has pieces (Hugging Face pads 257152 to 257216) is sliced to the tokenizer's `vocab_size`
in memory (a view, no copy), so generation can never emit an id the tokenizer cannot decode;
log-probabilities are then normalised over the real pieces only. Fewer rows than pieces, or
special ids that differ from the tokenizer's, are a wrong pairing and raise ValueError.
"""

import contextlib
import dataclasses
import os

import jax
import ml_dtypes
import numpy as np

from paligemma import ref
from paligemma.options import FAST_DTYPES, IMPLS, PREPROCESS
from paligemma.ref import quant as ref_quant
from paligemma.ref.inputs.media import load_item, stack_examples
from paligemma.ref.params import flatten, tree_map

from . import sharding
from .decode import generate as fast_generate
from .engine import Engine, Request
from .layout import to_device, unstack_layers
from .quant import check_tree
from .policy import BFLOAT16, FLOAT32

PREPROCESS_METHODS = PREPROCESS
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64}  # keys: options.DTYPES
_FAST_DTYPES = FAST_DTYPES  # float64 is the reference's gold standard only
_FAST_POLICIES = {"float32": FLOAT32, "bfloat16": BFLOAT16}
_TEXT_BUCKET = 16  # fast: prompts padded to a multiple of this, so new lengths rarely recompile
# fast: the static arguments `generate` has compiled for in this process (jit's cache is global,
# so a second model with the same config and shapes compiles nothing); only labels progress.
_COMPILED = set()


@dataclasses.dataclass(frozen=True)
class Result:
    """One generation.

    text: the decoded text before EOS.
    tokens: [n] int64 generated ids before EOS (EOS and padding left out).
    logprobs: [n] float64 log-probabilities of those ids under the model.
    finished: True if the model produced EOS within `max_new_tokens`.
    """

    text: str
    tokens: np.ndarray
    logprobs: np.ndarray
    finished: bool


def no_progress(stage):
    """The default progress hook: `with progress("loading checkpoint"): ...` does nothing."""
    del stage
    return contextlib.nullcontext()


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def fit_vocab(config, params, tokenizer):
    """`(config, params)` with the embedding cut to the tokenizer's vocabulary.

    Args:
      config, params: a loaded model (params in big_vision's tree layout; not modified).
      tokenizer: a `paligemma.ref.Tokenizer`.
    Returns:
      `(config, params)`: the embedding sliced (a view) to `tokenizer.vocab_size` rows.
    Raises:
      ValueError if the embedding has fewer rows than the tokenizer has pieces, or if the
      config's pad/eos/bos ids differ from the tokenizer's.
    """
    table = params["llm"]["embedder"]["input_embedding"]  # [V, D], or quantized: q and scale [V, ...]
    rows, vocab = (table["q"] if isinstance(table, dict) else table).shape[0], tokenizer.vocab_size
    if rows < vocab:
        raise ValueError(f"tokenizer {tokenizer.name} has {vocab} pieces but the checkpoint's embedding has "
                         f"only {rows} rows: the tokenizer does not belong to this checkpoint")
    ours = {"pad_id": config.pad_id, "eos_id": config.eos_id, "bos_id": config.bos_id}
    theirs = {"pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id}
    if ours != theirs:
        raise ValueError(f"special ids differ: checkpoint {ours}, tokenizer {tokenizer.name} {theirs}; "
                         "pass pad_id=, eos_id=, bos_id= to load() if the checkpoint's are wrong")
    cut = {k: v[:vocab] for k, v in table.items()} if isinstance(table, dict) else table[:vocab]
    embedder = {**params["llm"]["embedder"], "input_embedding": cut}
    params = {**params, "llm": {**params["llm"], "embedder": embedder}}
    return config.replace(llm=dataclasses.replace(config.llm, vocab_size=vocab)), params


def _place_quantized(params, config, impl, dtype, mesh=None):
    """`_place` for a quantized tree (`ref.quant`): ref computes on `quant.dequantize_tree` in `dtype`
    (the formats' definition); fast keeps q and scale as stored and casts the float leaves (norms,
    biases, kept weights) to `dtype`, with per-layer buffers for every layer segment on CPU."""
    check_tree(params, config)
    np_dtype = DTYPES[dtype]
    if impl == "ref":
        return ref_quant.dequantize_tree(params, config, np_dtype)
    flat = flatten(params)
    floats = {k: np.asarray(v).astype(np_dtype, copy=False) if not k.endswith(("/q", "/scale")) else v
              for k, v in flat.items()}
    params = ref.unflatten(floats)
    if mesh is not None:
        return sharding.place_params(params, mesh)
    placed = tree_map(to_device, params)
    return unstack_layers(placed) if jax.default_backend() == "cpu" else placed


def _place(params, impl, dtype, mesh=None):
    """Parameters in `dtype`, as NumPy arrays (ref) or device arrays (fast; on `mesh` if given).

    Leaf by leaf (layer by layer for per-layer buffers): for fast, the host holds at most one
    cast leaf at a time on its way to the device; a leaf already in `dtype` (e.g. a
    memory-mapped .npz member) is not copied on the host. On CPU with float32 weights the
    language model's layers become per-layer buffers (`paligemma.fast.unstack_layers`), which
    decoding reads in place; with bfloat16 weights XLA:CPU converts every weight to float32
    where it is used anyway, so they stay stacked (fewer buffers live at once). On a mesh the
    layers stay stacked and each device's shard is cast on its own (`sharding.place_params`).
    """
    np_dtype = DTYPES[dtype]
    cast = lambda x: np.asarray(x).astype(np_dtype, copy=False)  # noqa: E731
    if impl == "ref":
        return tree_map(cast, params)
    if mesh is not None:
        return sharding.place_params(params, mesh, np_dtype)
    put = lambda x: to_device(cast(x))  # noqa: E731
    if dtype != "float32" or jax.default_backend() != "cpu":
        return tree_map(put, params)
    layers = params["llm"]["layers"]
    depth = len(next(iter(flatten(layers).values())))
    placed = tree_map(put, {**params, "llm": {k: v for k, v in params["llm"].items() if k != "layers"}})
    placed["llm"]["layers"] = tuple(tree_map(lambda w: put(np.asarray(w)[i]), layers) for i in range(depth))
    return placed


def _check_mesh(mesh, impl):
    """The mesh as a `Mesh` (or None); raises ValueError for a bad one or for impl="ref"."""
    if mesh is not None and impl != "fast":
        raise ValueError(f"mesh: only impl='fast' runs on a device mesh, got impl={impl!r}")
    return sharding.mesh_from(mesh)


def _as_list(value, name):
    """(items, was_a_list): a list/tuple stays a list, anything else is one item."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name}: empty list, expected at least one")
        return list(value), True
    return [value], False


def _pair(images, prompts):
    """Images and prompts matched one to one: (image list, prompt list, shared image?, batched?)."""
    image_list, images_batched = _as_list(images, "images")
    prompt_list, prompts_batched = _as_list(prompts, "prompts")
    bad = [type(p).__name__ for p in prompt_list if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts: expected str or a list of str, got {bad[0]}")
    if images_batched and prompts_batched and len(image_list) != len(prompt_list):
        raise ValueError(f"got {len(image_list)} images and {len(prompt_list)} prompts; expected equal-length "
                         "lists, one image with a list of prompts, or a list of images with one prompt")
    if not prompts_batched:
        prompt_list = prompt_list * len(image_list)
    return image_list, prompt_list, not images_batched, images_batched or prompts_batched


def _pad_prompts(prompt, multiple, pad_id):
    """A batch of prompts right-padded to a multiple of `multiple` tokens (padding is masked)."""
    extra = -prompt.tokens.shape[1] % multiple
    pad = lambda a, value: np.pad(a, ((0, 0), (0, extra)), constant_values=value)  # noqa: E731
    return ref.Prompt(pad(prompt.tokens, pad_id), pad(prompt.mask_ar, 1), pad(prompt.input_mask, False))


def _result(tokenizer, tokens, logprobs, eos_id):
    """A `Result` from one generated row (cut at the first EOS)."""
    is_eos = tokens == eos_id
    n = int(np.argmax(is_eos)) if is_eos.any() else len(tokens)
    kept = np.asarray(tokens[:n], dtype=np.int64)
    return Result(tokenizer.decode(kept, stop_at_eos=False), kept, np.asarray(logprobs[:n], np.float64),
                  bool(is_eos.any()))


class PaliGemma:
    """A model and its tokenizer, ready to generate text from images.

    Args:
      config, params: a loaded model (`paligemma.ref.load`), params in big_vision's layout.
      tokenizer: a `paligemma.ref.Tokenizer` or the path of a SentencePiece `.model` file.
      impl: "fast" (JAX, compiled) or "ref" (NumPy reference).
      dtype: "float32" or "bfloat16" (both impls), or "float64" (ref only).
      preprocess: image convention, "big_vision" or "hf" (see `paligemma.ref.preprocess`).
      progress: `progress(stage)` returning a context manager, entered around each slow stage
        ("preparing parameters", "compiling", "generating"); see `no_progress`. "compiling" is
        the fast impl's first call at new shapes: the compilation and that call's generation.
      mesh: None (one device), a `jax.sharding.Mesh` or a description such as "data=2,model=4"
        (fast only): the devices the model is split over (`paligemma.fast.sharding`).
    Raises:
      ValueError for an unknown impl/dtype/preprocess, a bad mesh or a tokenizer that does not fit.
    """

    def __init__(self, config, params, tokenizer, impl="fast", dtype="float32", preprocess="big_vision",
                 progress=no_progress, mesh=None):
        _check_choice("impl", impl, IMPLS)
        _check_choice("dtype", dtype, _FAST_DTYPES if impl == "fast" else tuple(DTYPES))
        _check_choice("preprocess", preprocess, PREPROCESS_METHODS)
        self.mesh = _check_mesh(mesh, impl)
        self.tokenizer = tokenizer if isinstance(tokenizer, ref.Tokenizer) else ref.Tokenizer(tokenizer)
        self.impl, self.dtype, self.preprocess, self.progress = impl, dtype, preprocess, progress
        self.config, params = fit_vocab(config, params, self.tokenizer)
        with progress("preparing parameters"):
            quantized = any(k.endswith("/q") for k in flatten(params))
            self.params = (_place_quantized(params, self.config, impl, dtype, self.mesh) if quantized
                           else _place(params, impl, dtype, self.mesh))

    @classmethod
    def load(cls, checkpoint, tokenizer, impl="fast", dtype="float32", preprocess="big_vision",
             progress=no_progress, mesh=None, quantize=None, keep="", **load_overrides):
        """Reads a tokenizer and a checkpoint (`.npz`, `.safetensors` or an HF directory).

        Args:
          checkpoint: path for `paligemma.ref.load`.
          tokenizer: path of the SentencePiece `.model` file (or a `Tokenizer`).
          impl, dtype, preprocess, progress, mesh: see the class.
          quantize: None, "int8" or "int4": quantize the weights on load (`ref.quant.quantize_tree`,
            one tensor at a time; a quick try: `paligemma quantize` streams and saves the result).
            A file `paligemma quantize` wrote loads quantized without it.
          keep: with `quantize`, what stays in float (`ref.quant.Keep` or "vision,embedding,ends").
          **load_overrides: config fields for `paligemma.ref.load`, e.g. `final_logits_softcap=None`.
        Returns:
          `PaliGemma`.
        Raises:
          ValueError (CheckpointError, tokenizer errors) for unreadable or mismatched files.
        """
        # Check the cheap arguments before reading gigabytes.
        _check_choice("impl", impl, IMPLS)
        _check_choice("dtype", dtype, _FAST_DTYPES if impl == "fast" else tuple(DTYPES))
        _check_choice("preprocess", preprocess, PREPROCESS_METHODS)
        mesh = _check_mesh(mesh, impl)
        if keep and quantize is None:
            raise ValueError(f"keep={keep!r} applies only with quantize='int8' or 'int4'")
        if quantize is not None:
            _check_choice("quantize", quantize, ref_quant.FORMATS)
            keep = keep if isinstance(keep, ref_quant.Keep) else ref_quant.Keep.parse(keep)
        if not isinstance(tokenizer, ref.Tokenizer):
            with progress("loading tokenizer"):
                tokenizer = ref.Tokenizer(os.fspath(tokenizer))
        with progress("loading checkpoint"):
            config, params = ref.load(checkpoint, **load_overrides)
        if quantize is not None:
            if any(k.endswith("/q") for k in flatten(params)):
                raise ValueError(f"quantize={quantize!r}: {checkpoint} is quantized already")
            with progress(f"quantizing to {quantize}"):
                params = ref_quant.quantize_tree(params, config, quantize, keep)
        return cls(config, params, tokenizer, impl, dtype, preprocess, progress, mesh)

    def __repr__(self):
        mesh = "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}"
        return (f"PaliGemma({self.config.name}, impl={self.impl!r}, dtype={self.dtype!r}, "
                f"preprocess={self.preprocess!r}, vocab_size={self.config.llm.vocab_size}{mesh})")

    def generate(self, images, prompts, max_new_tokens=32, sampler="greedy", seed=0):
        """Generates text for each (image, prompt) pair, as one batch.

        Args:
          images: one image (path, bytes, file object, PIL image or uint8 array; see
            `paligemma.ref.load_image`) or a list (or tuple) of them. Several images in ONE
            prompt: an inner list, `[["a.jpg", "b.jpg"]]`; a video: its frames, float
            [F, R, R, 3] from `paligemma.ref.load_video`. Each gives F x P image tokens; every
            example of a call needs the same F.
          prompts: one prompt (e.g. "caption en") or a list of them. One image with a list of
            prompts pairs the image with each; a list of images with one prompt likewise.
          max_new_tokens: at most this many tokens per answer (EOS included).
          sampler: "greedy", "temperature(t)", "top_k(k[, t])", "nucleus(p[, t])" or "beam(n)".
          seed: seeds sampling (ref and fast draw from different generators).
        Returns:
          one `Result` if both arguments are single, else a list of `Result`, one per pair.
        Raises:
          ValueError for mismatched counts, unreadable images (ImageError) or bad arguments.
        """
        image_list, prompt_list, shared, batched = _pair(images, prompts)
        # Fail before the images are decoded.
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
        sampler = ref.parse_sampler(sampler)
        size, method = self.config.vision.image_size, self.preprocess
        # A single image keeps the plain error messages (a list's say "image i: ...").
        if shared:  # decoded once, then one copy per prompt
            pixels = load_item(image_list[0], size, method)  # [R, R, 3] or [F, R, R, 3]
            pixels = np.repeat(pixels[None], len(prompt_list), axis=0)  # [B, (F,) R, R, 3]
        elif any(isinstance(x, (list, tuple, np.ndarray)) and np.ndim(x) != 3 for x in image_list):
            pixels = stack_examples([load_item(x, size, method) for x in image_list])  # [B, (F,) R, R, 3]
        else:
            pixels = ref.preprocess(image_list, size, method)  # [B, R, R, 3]
        prompt = self.tokenizer.batch_prompts(prompt_list)
        out = self._run(pixels, prompt, max_new_tokens, sampler, seed)
        results = [_result(self.tokenizer, t, lp, self.config.eos_id) for t, lp in zip(out.tokens, out.logprobs)]
        return results if batched else results[0]

    def request(self, images, prompt, max_new_tokens=32, sampler="greedy", seed=0, stop_ids=()):
        """One `fast.engine.Request`: the image(s) preprocessed and the prompt tokenised as
        `generate` does them (an inner list of images, or frames, make ONE multi-image prompt)."""
        pixels = load_item(images, self.config.vision.image_size, self.preprocess)  # [R, R, 3] or [F, R, R, 3]
        prompt = self.tokenizer.prompt(prompt)
        return Request(pixels, prompt.tokens, prompt.mask_ar, max_new_tokens, sampler, seed, tuple(stop_ids))

    def engine(self, slots=8, max_seq=None, **options):
        """A continuous-batching `fast.engine.Engine` over this model (its parameters, dtype and
        mesh); `options`: the Engine's other arguments (image_cache, max_queue, prefill_sizes)."""
        if self.impl != "fast":
            raise ValueError("engine: needs impl='fast' (the engine runs the compiled JAX model)")
        return Engine(self.params, self.config, slots, max_seq, _FAST_POLICIES[self.dtype], self.mesh, **options)

    def _run(self, pixels, prompt, max_new_tokens, sampler, seed):
        """One batched `generate` call of the chosen implementation: a `Generation`."""
        if self.impl == "ref":
            with self.progress("generating"):
                return ref.generate(self.params, self.config, pixels, *prompt, max_new_tokens=max_new_tokens,
                                    sampler=sampler, seed=seed)
        prompt = _pad_prompts(prompt, _TEXT_BUCKET, self.tokenizer.pad_id)
        # A new static shape compiles on its first call; say so, since it takes far longer.
        policy = _FAST_POLICIES[self.dtype]
        key = (self.config, policy, pixels.shape, prompt.tokens.shape, max_new_tokens, sampler, self.mesh)
        with self.progress("generating" if key in _COMPILED else "compiling"):
            out = fast_generate(self.params, self.config, pixels, *prompt, max_new_tokens=max_new_tokens,
                                sampler=sampler, seed=seed, policy=policy, mesh=self.mesh)
        _COMPILED.add(key)
        return out
