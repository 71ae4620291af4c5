"""Quantized checkpoints on disk: one safetensors file, written tensor by tensor, read back checked.

    quantize_file("pt-224.npz", "pt-224-int4.safetensors", "int4", keep=Keep(vision=True))
    config, qtree, header = load_quantized("pt-224-int4.safetensors")
    params = dequantize_tree(qtree, config)           # ref.quant: the float tree it stands for

The file and its header are described in `quantread`, which reads them (and which this module
re-exports: `quantfile.load_quantized`, `QuantHeader`, `HEADER_KEY`, `read_quant_header`). This
module writes them. It reads float checkpoints (`checkpoint.read_config`), so it sits above
`checkpoint`, which reads quantized files through `quantread` alone: imports point one way.

Streaming: the output layout (names, shapes, dtypes, offsets) follows from the config alone, so
the header is written first and each tensor is then read, quantized and written in slices of its
leading axis (one or more layers, or rows of the embedding) of at most `chunk_bytes` as float32.
Peak memory is a few times one slice, never a whole float32 tensor, whatever the source dtype.
"""

import json
import os
import struct

import numpy as np

from ..params import flatten, param_shapes
from ..quant import GROUP_SIZE, SCALE_DTYPES, Keep, layout, quantize_array
from . import hf_layout
from .checkpoint import read_config
from .quantread import DTYPE_CODES, HEADER_KEY, VERSION, QuantHeader, load_quantized, read_quant_header
from .tensorfiles import CheckpointError, atomic_write, open_reader, refuse_overwrite

__all__ = ["HEADER_KEY", "VERSION", "QuantHeader", "load_quantized", "open_source", "quantize_file",
           "read_quant_header"]


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
        if dtype not in DTYPE_CODES or dtype.kind not in "fV":
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
    refuse_overwrite(out, overwrite)
    config, source = open_source(checkpoint, **overrides)
    header = QuantHeader(fmt, scale_dtype, keep, config, group_size if fmt == "int4" else None)
    header.to_json()  # checks fmt and keep before anything is written
    shapes = flatten(param_shapes(config))
    plan = header.stored(shapes, {k: source.dtype(k) for k in shapes})
    table, offset = {"__metadata__": {HEADER_KEY: header.to_json()}}, 0
    for key, (shape, dtype) in plan.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        table[key] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                      "data_offsets": [offset, offset + size]}
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
    atomic_write(str(out), write)
    return header
