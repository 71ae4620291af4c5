"""Reading quantized checkpoints: the `paligemma_quant` header and the tree it describes, checked.

    header = read_quant_header("pt-224-int4.safetensors")       # metadata only, no tensor read
    config, qtree, header = load_quantized("pt-224-int4.safetensors")
    is_quantized("pt-224-int4.safetensors")                      # True: `ref.load` reads it this way

The file is plain safetensors (any safetensors reader opens it): tensors under the quantized
tree's '/'-joined keys (`llm/layers/mlp/linear/q`, `.../scale`, `llm/final_norm/scale`, ...) and
one metadata entry, `paligemma_quant`, a JSON object: version, format, group_size (int4),
scale_dtype, keep, the quantized source keys, the config's name and the whole config. Every
stored key, shape and dtype follows from the header alone. `quantfile.quantize_file` writes it;
`checkpoint.load` reads it through this module (so this module imports no checkpoint code).
"""

import dataclasses
import json
import os

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import GemmaConfig, PaliGemmaConfig, VisionConfig
from ..params import flatten, param_shapes, unflatten
from ..quant import FORMATS, GROUP_SIZE, SCALE_DTYPES, Keep, layout, stored_shapes
from .tensorfiles import CheckpointError

HEADER_KEY = "paligemma_quant"
VERSION = 1
# safetensors' dtype codes of what a quantized file may hold.
DTYPE_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
               np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8"}


@dataclasses.dataclass(frozen=True)
class QuantHeader:
    """What the `paligemma_quant` metadata says: enough to rebuild and check every stored shape."""

    format: str
    scale_dtype: str
    keep: Keep
    config: PaliGemmaConfig
    group_size: int | None = None  # int4 only
    version: int = VERSION

    def to_json(self):
        quantized = [e.source for e in layout(self.config, self.format, self.keep) if e.fmt]
        return json.dumps({"version": self.version, "format": self.format, "group_size": self.group_size,
                           "scale_dtype": self.scale_dtype, "keep": dataclasses.asdict(self.keep),
                           "quantized": quantized, "config_name": self.config.name,
                           "config": dataclasses.asdict(self.config)})

    @classmethod
    def from_json(cls, text, path):
        """Parses and checks the metadata JSON; raises CheckpointError naming the field."""
        def bad(field, expected, got):
            raise CheckpointError(f"{path}: {HEADER_KEY} metadata: {field}: expected {expected}, got {got!r}")

        try:
            meta = json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{path}: {HEADER_KEY} metadata is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            bad("the metadata", "a JSON object", meta)
        missing = sorted({"version", "format", "scale_dtype", "keep", "config"} - set(meta))
        if missing:
            raise CheckpointError(f"{path}: {HEADER_KEY} metadata lacks {missing}")
        if meta["version"] != VERSION:
            bad("version", f"{VERSION} (the only version this reader knows)", meta["version"])
        if meta["format"] not in FORMATS:
            bad("format", f"one of {list(FORMATS)}", meta["format"])
        if meta["scale_dtype"] not in SCALE_DTYPES:
            bad("scale_dtype", f"one of {sorted(SCALE_DTYPES)}", meta["scale_dtype"])
        group = meta.get("group_size")
        if meta["format"] == "int4" and not (isinstance(group, int) and group >= 2 and group % 2 == 0):
            bad("group_size", "an even integer >= 2 for int4", group)
        try:
            keep = Keep(**meta["keep"])
            c = dict(meta["config"])
            config = PaliGemmaConfig(vision=VisionConfig(**c.pop("vision")), llm=GemmaConfig(**c.pop("llm")), **c)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: {HEADER_KEY} metadata: keep or config is malformed ({e})") from None
        header = cls(meta["format"], meta["scale_dtype"], keep, config,
                     group if meta["format"] == "int4" else None)
        try:
            quantized = [e.source for e in layout(config, header.format, keep) if e.fmt]
        except ValueError as e:
            raise CheckpointError(f"{path}: {HEADER_KEY} metadata: {e}") from None
        if "quantized" in meta and meta["quantized"] != quantized:
            bad("quantized", f"the keys format {header.format} with keep={keep.label()} quantizes {quantized}",
                meta["quantized"])
        return header

    def stored(self, source_shapes, float_dtypes=None):
        """`{stored key: (shape, dtype)}` (float entries: the dtype in `float_dtypes`, else None)."""
        plan = {}
        scale_dtype = SCALE_DTYPES[self.scale_dtype]
        for entry in layout(self.config, self.format, self.keep):
            dtype = None if float_dtypes is None else float_dtypes[entry.source]
            plan.update(stored_shapes(entry, source_shapes[entry.source], self.group_size or GROUP_SIZE,
                                      scale_dtype, dtype))
        return plan


def is_quantized(path):
    """True for a single safetensors file whose metadata holds the quantization header."""
    path = str(path)
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return False
    try:
        with safe_open(path, framework="numpy") as f:
            return HEADER_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: the ordinary reader says why
        return False


def read_quant_header(path):
    """The `QuantHeader` of a quantized file, from its metadata alone (no tensor is read)."""
    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if HEADER_KEY not in meta:
        raise CheckpointError(f"{path}: no {HEADER_KEY!r} entry in the safetensors metadata: not a "
                              "quantized PaliGemma checkpoint (write one with `paligemma quantize`)")
    return QuantHeader.from_json(meta[HEADER_KEY], path)


def load_quantized(path):
    """Reads a file `quantize_file` wrote. Returns `(config, qtree, header)`.

    Raises CheckpointError naming the file, the key, and what was expected and found: a missing or
    malformed `paligemma_quant` header, an unknown format, missing or extra tensors, a q or scale
    whose shape or dtype does not follow from the header, int8 -128 or an int4 nibble of -8.
    """
    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if HEADER_KEY not in meta:
                raise CheckpointError(f"{path}: no {HEADER_KEY!r} entry in the safetensors metadata: not a "
                                      "quantized PaliGemma checkpoint (write one with `paligemma quantize`)")
            header = QuantHeader.from_json(meta[HEADER_KEY], path)
            flat = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    expected = header.stored(flatten(param_shapes(header.config)))
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match a {header.format} {header.config.name} with "
                              f"keep={header.keep.label()} (missing {len(missing)}: {missing[:12]}; "
                              f"unexpected {len(extra)}: {extra[:12]})")
    for key, (shape, dtype) in expected.items():
        got = flat[key]
        if got.shape != tuple(shape):
            fmt = header.format + (f" in groups of {header.group_size}" if header.group_size else "")
            raise CheckpointError(f"{path}: {key} has shape {list(got.shape)}, expected {list(shape)} "
                                  f"({fmt}, {header.config.name}, keep={header.keep.label()})")
        want = "a float type" if dtype is None else str(np.dtype(dtype))
        if (dtype is None and got.dtype.kind not in "fV") or (dtype is not None and got.dtype != dtype):
            raise CheckpointError(f"{path}: {key} has dtype {got.dtype}, expected {want}")
        if key.endswith("/q") and header.format == "int8" and got.size and got.min() < -127:
            raise CheckpointError(f"{path}: {key} holds -128, outside int8's symmetric range [-127, 127]")
        if key.endswith("/q") and header.format == "int4" and np.any(((got & 0x0F) == 8) | ((got >> 4) == 8)):
            raise CheckpointError(f"{path}: {key} holds the nibble -8, outside int4's symmetric range [-7, 7]")
    return header.config, unflatten(flat), header
