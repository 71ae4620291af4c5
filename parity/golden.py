"""Golden files: the exact inputs and every named activation of `paligemma.ref` in float64.

    golden = make_golden(params, config, images, tokens, mask_ar, input_mask)
    write("golden.npz", golden)
    golden = read("golden.npz")             # Activations(arrays, manifest, source)

A golden `.npz` holds, under these keys:
  inputs/images [B, R, R, 3] float32 (after preprocessing, in [-1, 1]), inputs/tokens [B, T]
  int32, inputs/mask_ar [B, T] int32, inputs/input_mask [B, T] bool;
  every stage of `paligemma.ref.capture.stage_names(config)` in float64;
  manifest: uint8, the UTF-8 bytes of a JSON object (format, names, shapes, dtypes, config,
  versions, the relative-error definition, the tolerance profile and each stage's sensitivity).

Sensitivity (see parity/tolerances.py): how far each stage moves, relative to its own scale,
when every weight is multiplied by (1 + u * U(-1, 1)) with u = 2^-8, bfloat16's unit roundoff
(seeded). That is the size of rounding the weights to bfloat16, but defined for weights that
already are bfloat16, as released checkpoints often are. Tolerances scale with it.

The file is byte-for-byte reproducible: members in a fixed order, stored uncompressed with a
fixed timestamp, each written by `np.lib.format.write_array`, and written to a temporary file
renamed into place. Nothing is ever unpickled on reading.
"""

import dataclasses
import io
import json
import os
import platform
import zipfile
from importlib import metadata

import numpy as np

from paligemma.ref import capture
from paligemma.ref.checkpoints.tensorfiles import CheckpointError, NpzReader, atomic_write
from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.model import forward, validate_inputs
from paligemma.ref.params import cast_params, tree_map

from . import tolerances

FORMAT = "paligemma-golden/1"
INPUTS = ("inputs/images", "inputs/tokens", "inputs/mask_ar", "inputs/input_mask")
MANIFEST = "manifest"
PERTURBATION = 2.0**-8  # bfloat16's unit roundoff
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip header can say: no clock in the bytes


class GoldenError(ValueError):
    """An activation file that cannot be read (not an .npz, damaged, a bad manifest)."""


@dataclasses.dataclass(frozen=True)
class Activations:
    """Named arrays (stages and `inputs/...`), the manifest (None if there is none) and where they came from."""

    arrays: dict
    manifest: dict | None = None
    source: str = "<memory>"

    @property
    def stages(self):
        """The stage names present, inputs and manifest left out."""
        return [k for k in self.arrays if not k.startswith("inputs/")]


def record_stages(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask, probs=False):
    """Every named activation of `paligemma.ref.forward`, as recorded (the compute dtype follows `params`).

    Returns:
      dict name -> np.ndarray, in pipeline order.
    """
    with capture.recording(probs=probs) as recorder:
        forward(params, config, images, tokens, mask_ar, input_mask)
    return recorder.values


def perturb_in_place(params64, seed=0, size=PERTURBATION):
    """Multiplies every float64 weight by (1 + size * U(-1, 1)), drawn from `seed` leaf by leaf.

    In place, so that a full-size model needs no second copy of its float64 weights.
    """
    rng = np.random.default_rng(seed)

    def scale(w):
        w *= 1.0 + size * rng.uniform(-1.0, 1.0, w.shape)
        return w

    tree_map(scale, params64)


def stage_sensitivity(params64, config, inputs, stages, probs=False, seed=0):
    """`tolerances.relative_error` of each stage once `params64` is perturbed (in place): name -> float."""
    perturb_in_place(params64, seed)
    moved = record_stages(params64, config, *inputs, probs=probs)
    return {name: tolerances.relative_error(moved[name], value) for name, value in stages.items()}


def _versions():
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        versions["paligemma"] = metadata.version("paligemma")
    except metadata.PackageNotFoundError:
        versions["paligemma"] = "unknown"
    return versions


def config_dict(config: PaliGemmaConfig):
    """The config as plain JSON values (`name` included, although it does not count for equality)."""
    return {**dataclasses.asdict(config), "name": config.name}


def make_golden(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None, probs=False,
                source=None):
    """The golden activations of `paligemma.ref` in float64 for these inputs.

    Args:
      params: any float dtype (cast to float64 here; a bfloat16 checkpoint is exact in float64).
      config, images, tokens, mask_ar, input_mask: as `paligemma.ref.forward`.
      probs: include the `.../attn_probs` stages.
      source: a JSON-able description of where the inputs came from, for the manifest.
    Returns:
      `Activations` with the inputs, every stage and the manifest.
    """
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    inputs = (images.astype(np.float32), tokens.astype(np.int32), mask_ar.astype(np.int32), input_mask)
    params64 = cast_params(params, np.float64)  # a copy, always: perturbed in place below
    stages = record_stages(params64, config, *inputs, probs=probs)
    sensitivity = stage_sensitivity(params64, config, inputs, stages, probs)
    del params64
    arrays = {**dict(zip(INPUTS, inputs)), **stages}
    manifest = {
        "format": FORMAT,
        "names": list(stages),
        "inputs": list(INPUTS),
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
        "config": config_dict(config),
        "versions": _versions(),
        "source": source or {"kind": "arrays"},
        "relative_error": tolerances.relative_error.__doc__.splitlines()[0],
        "sensitivity": {k: float(v) for k, v in sensitivity.items()},
        "sensitivity_definition": f"relative error of each stage with every weight times (1 + {PERTURBATION:g} "
                                  "* U(-1, 1)), seed 0",
        "tolerances": {dtype: dataclasses.asdict(t) for dtype, t in tolerances.STAGE_TOLERANCES.items()},
    }
    return Activations(arrays, manifest, "<memory>")


def random_inputs(config: PaliGemmaConfig, seed=0, batch=2, text_len=8):
    """Seeded inputs with no padding: `(images, tokens, mask_ar, input_mask)`.

    Example b has a prefix of `text_len - 2 - b` tokens (at least 1) and a causal suffix after it,
    so the examples of a batch see different prefix-LM masks.
    """
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    images = rng.uniform(-1.0, 1.0, (batch, R, R, 3)).astype(np.float32)  # [B, R, R, 3]
    tokens = rng.integers(0, config.llm.vocab_size, (batch, text_len)).astype(np.int32)  # [B, T]
    prefix = np.maximum(1, text_len - 2 - np.arange(batch))  # [B]
    mask_ar = (np.arange(text_len)[None, :] >= prefix[:, None]).astype(np.int32)  # [B, T]
    return images, tokens, mask_ar, np.ones((batch, text_len), dtype=bool)


def from_checkpoint(checkpoint, tokenizer, image, prompt, suffix="", preprocess="big_vision", probs=False,
                    **overrides):
    """The golden of a checkpoint on one image and one prompt, through this project's own I/O.

    Args:
      checkpoint: big_vision `.npz`, `.safetensors` or HF directory (`paligemma.ref.load`).
      tokenizer: the SentencePiece `.model`; the embedding is cut to its vocabulary.
      image: an image file, preprocessed with `paligemma.ref.preprocess(image, R, preprocess)`.
      prompt, suffix: the prefix and an optional forced suffix (`Tokenizer.prompt`).
      overrides: config fields for `paligemma.ref.load` (e.g. final_logits_softcap=None).
    Returns:
      `Activations`. Needs 8 bytes of memory per parameter (float64): ~23 GB at 3B.
    """
    from paligemma.fast.pipeline import fit_vocab
    from paligemma.ref.checkpoints.checkpoint import load
    from paligemma.ref.inputs.image import preprocess as preprocess_image
    from paligemma.ref.inputs.tokenizer import Tokenizer

    tok = Tokenizer(os.fspath(tokenizer))
    config, params = fit_vocab(*load(checkpoint, **overrides), tok)
    images = preprocess_image(os.fspath(image), config.vision.image_size, preprocess)[None]  # [1, R, R, 3]
    p = tok.prompt(prompt, suffix)
    source = {"kind": "checkpoint", "checkpoint": os.path.basename(os.path.normpath(os.fspath(checkpoint))),
              "image": os.path.basename(os.fspath(image)), "prompt": prompt, "suffix": suffix,
              "preprocess": preprocess}
    return make_golden(params, config, images, p.tokens[None], p.mask_ar[None], p.input_mask[None], probs, source)


def from_random(config=None, checkpoint=None, seed=0, batch=2, text_len=8, probs=False):
    """The golden on seeded random inputs (`random_inputs`), for a checkpoint's weights or a preset's
    seeded random weights (norms drawn away from identity: `init_params(random_norms=True)`).

    Args:
      config: a preset name (with no checkpoint) or None.
      checkpoint: a checkpoint path, or None.
    Returns:
      `Activations`.
    """
    from paligemma.ref.checkpoints.checkpoint import load
    from paligemma.ref.config import get_config
    from paligemma.ref.params import init_params

    if (config is None) == (checkpoint is None):
        raise ValueError("from_random: give exactly one of config (a preset name) or checkpoint")
    if checkpoint is not None:
        cfg, params = load(checkpoint)
        where = {"checkpoint": os.path.basename(os.path.normpath(os.fspath(checkpoint)))}
    else:
        cfg = get_config(config)
        params = init_params(cfg, seed=seed, dtype=np.float64, random_norms=True)
        where = {"config": config}
    source = {"kind": "random", "seed": seed, **where}
    return make_golden(params, cfg, *random_inputs(cfg, seed, batch, text_len), probs=probs, source=source)


# --- the file -----------------------------------------------------------------------------


def _member(zf, name, array):
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    zf.writestr(info, buf.getvalue())


def write(path, activations: Activations, overwrite=False):
    """Writes `activations` (arrays in their order, then the manifest) as an `.npz`, atomically.

    Raises:
      ValueError if `path` exists and `overwrite` is False.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    def write_zip(tmp):
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w") as zf:
            for name, array in activations.arrays.items():
                _member(zf, name, array)
            if activations.manifest is not None:
                text = json.dumps(activations.manifest, indent=1, sort_keys=True)
                _member(zf, MANIFEST, np.frombuffer(text.encode(), dtype=np.uint8))

    atomic_write(path, write_zip)


def read(path):
    """An activation file (a golden, or a port's `.npz` of the same names, with or without a manifest).

    bfloat16 members (NumPy stores them as `|V2`) come back as bfloat16. Returns `Activations`.
    Raises:
      GoldenError naming the file and the problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GoldenError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        reader = NpzReader(path)
        try:
            arrays = {key: np.array(reader.get(key)) for key in reader.keys()}
        finally:
            reader.close()
    except CheckpointError as e:
        raise GoldenError(str(e)) from None
    manifest = None
    if MANIFEST in arrays:
        raw = arrays.pop(MANIFEST)
        try:
            manifest = json.loads(raw.astype(np.uint8).tobytes().decode())
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, expected an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise GoldenError(f"{path}: member 'manifest' is not UTF-8 JSON text of an object ({e})") from None
    return Activations(arrays, manifest, path)
