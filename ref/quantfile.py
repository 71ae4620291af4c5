"""Quantized checkpoints on disk: one safetensors file, written tensor by tensor, read back checked.

    quantize_file("pt-224.npz", "pt-224-int4.safetensors", "int4", keep=Keep(vision=True))
    config, qtree, header = load_quantized("pt-224-int4.safetensors")
    params = dequantize_tree(qtree, config)           # ref.quant: the float tree it stands for

The file is plain safetensors (any safetensors reader opens it): tensors under the quantized
tree's '/'-joined keys (`llm/layers/mlp/linear/q`, `.../scale`, `llm/final_norm/scale`, ...) and
one metadata entry, `paligemma_quant`, a JSON object: version, format, group_size (int4),
scale_dtype, keep, the quantized source keys, the config's name and the whole config.

Streaming: the output layout (names, shapes, dtypes, offsets) follows from the config alone, so
the header is written first and each tensor is then read, quantized and written in slices of its
leading axis (one or more layers, or rows of the embedding) of at most `chunk_bytes` as float32.
Peak memory is a few times one slice, never a whole float32 tensor, whatever the source dtype.
"""

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from . import hf_layout
from .checkpoint import _atomic_write, _refuse_overwrite, read_config
from .config import GemmaConfig, PaliGemmaConfig, VisionConfig
from .params import flatten, param_shapes, unflatten
from .quant import FORMATS, GROUP_SIZE, SCALE_DTYPES, Keep, layout, quantize_array, stored_shapes
from .tensorfiles import CheckpointError, open_reader

HEADER_KEY = "paligemma_quant"
VERSION = 1
_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
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


# --- Reading the source one slice at a time ------------------------------------------------


class _BigVisionSource:
    """A big_vision `.npz` / safetensors: stacked tensors sliced straight from the file."""

    def __init__(self, reader, config):
        self.reader, self.config = reader, config
        self.names = {k.removeprefix("params/"): k for k in reader.keys()}

    def stored_shape(self, key):
        return self.reader.shape(self.names[key])

    def dtype(self, key):
        return self.reader.dtype(self.names[key])

    def rows(self, key, start, stop):
        return self.reader.get_rows(self.names[key], start, stop)


class _HfSource:
    """A Hugging Face file or directory: one big_vision layer assembled from its HF tensors at a time."""

    def __init__(self, reader, config):
        self.reader, self.config = reader, config
        present = {}
        for name in reader.keys():
            present.setdefault(hf_layout.canonical_name(name), name)
        self.parts = {}  # big_vision key -> [(layer or None, transform, stored name)]
        for (tower, name), (key, how, layer) in hf_layout.name_table(config).items():
            self.parts.setdefault(key, []).append((layer, how, present.get((tower, name))))

    def stored_shape(self, key):
        layer, how, name = self.parts[key][0]
        if name is None:
            raise CheckpointError(f"{self.reader.files[0]}: no HF tensor for {key}")
        if layer is None and how == "same":
            return self.reader.shape(name)
        return flatten(param_shapes(self.config))[key]  # assembled to fit; `rows` checks each piece

    def dtype(self, key):
        return self.reader.dtype(self.parts[key][0][2])

    def rows(self, key, start, stop):
        expected = flatten(param_shapes(self.config))[key]
        parts = self.parts[key]
        if parts[0][0] is None:  # one tensor, not stacked
            _, how, name = parts[0]
            if how == "same":
                return self.reader.get_rows(name, start, stop)
            return hf_layout.hf_to_bv(self.reader.get(name), how, key, self.config)[start:stop]
        out = np.empty((stop - start,) + tuple(expected[1:]), self.dtype(key))  # [layers, ...]
        for layer, how, name in parts:
            if start <= layer < stop:
                index = (layer - start,) + hf_layout.bv_slice(how)
                piece = hf_layout.hf_to_bv(self.reader.get(name), how, key, self.config)
                if piece.shape != out[index].shape:
                    raise CheckpointError(f"{self.reader.files[0]}: HF tensor {name!r} has shape "
                                          f"{list(self.reader.shape(name))}, which does not fit {key} "
                                          f"{list(expected)}")
                out[index] = piece
        return out


def open_source(path, **overrides):
    """`(config, source)`: the checkpoint's config and a reader of row slices, checked against it."""
    path = str(path)
    config = read_config(path, **overrides)
    reader = open_reader(path)
    is_bv = any(k.startswith(("img/", "llm/", "params/")) for k in reader.keys())
    source = _BigVisionSource(reader, config) if is_bv else _HfSource(reader, config)
    expected = flatten(param_shapes(config))
    keys = set(source.names) if is_bv else {k for k, parts in source.parts.items() if all(p[2] for p in parts)}
    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match {config.name} "
                              f"(missing {len(missing)}: {missing[:12]}; unexpected {len(extra)}: {extra[:12]})")
    for key, shape in expected.items():
        got = tuple(source.stored_shape(key))
        if key == "llm/embedder/input_embedding" and got[0] >= shape[0]:
            got = shape  # extra rows (HF pads to 257216, or a vocab_size override) are not read
        if got != tuple(shape):
            raise CheckpointError(f"{path}: {key} has shape {list(got)}, expected {list(shape)} for {config.name}")
        dtype = source.dtype(key)
        if dtype not in _CODES or dtype.kind not in "fV":
            raise CheckpointError(f"{path}: {key} has dtype {dtype}, expected a float type")
    return config, source


def _slices(entry, shape, chunk_bytes):
    """`(start, stop)` row ranges of the source: whole layers / rows of <= chunk_bytes as float32."""
    start, stop = entry.rows or (0, shape[0])
    if entry.axes is not None and len(shape) + min(entry.axes) == 0:
        return [(start, stop)]  # axis 0 is contracted (img/head/kernel): one piece
    per_row = 4 * int(np.prod(shape[1:]))
    step = max(1, chunk_bytes // max(per_row, 1))
    return [(a, min(a + step, stop)) for a in range(start, stop, step)] or [(start, stop)]


def quantize_file(checkpoint, out, fmt, keep=Keep(), group_size=GROUP_SIZE, scale_dtype="float32",
                  chunk_bytes=64 << 20, overwrite=False, **overrides):
    """Quantizes a checkpoint (big_vision `.npz`, safetensors, HF directory) into one safetensors file.

    Args:
      checkpoint: what `ref.load` reads; overrides as for `ref.load`.
      out: the `.safetensors` file to write (atomically: temporary name, then rename).
      fmt: "int8" or "int4"; keep: a `Keep`; group_size: int4's G; scale_dtype: "float32" or "bfloat16".
      chunk_bytes: the largest slice converted to float32 at once (at least one row of axis 0).
    Returns:
      the `QuantHeader` written.
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype: expected one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    _refuse_overwrite(out, overwrite)
    config, source = open_source(checkpoint, **overrides)
    header = QuantHeader(fmt, scale_dtype, keep, config, group_size if fmt == "int4" else None)
    header.to_json()  # checks fmt and keep before anything is written
    shapes = flatten(param_shapes(config))
    plan = header.stored(shapes, {k: source.dtype(k) for k in shapes})
    table, offset = {"__metadata__": {HEADER_KEY: header.to_json()}}, 0
    for key, (shape, dtype) in plan.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        table[key] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    data_start = 8 + len(raw)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(data_start + offset)
            for entry in layout(config, fmt, keep):
                first = (entry.rows or (0,))[0]
                for start, stop in _slices(entry, shapes[entry.source], chunk_bytes):
                    block = source.rows(entry.source, start, stop)
                    for key, array in quantize_array(block, entry, group_size, SCALE_DTYPES[scale_dtype]).items():
                        shape, dtype = plan[key]
                        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
                        f.seek(data_start + table[key]["data_offsets"][0] + (start - first) * row_bytes)
                        f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
                    del block

    os.makedirs(os.path.dirname(os.path.abspath(str(out))) or ".", exist_ok=True)
    _atomic_write(str(out), write)
    return header


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
