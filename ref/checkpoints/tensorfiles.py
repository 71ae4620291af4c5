"""Reading tensors lazily from `.npz` and `.safetensors` files, one at a time.

A 3B float32 checkpoint is 11.7 GB; reading it whole and then converting would need twice
that. These readers list names, shapes and dtypes from the headers alone and hand out one
tensor at a time: uncompressed `.npz` members (what `np.savez` writes) are memory-mapped
read-only, so nothing is read until used and the pages can be evicted again.

Nothing is ever unpickled: `.npz` members with object dtype are refused.

Writing goes through `atomic_write` (checkpoints, quantized files, VQ-VAEs, golden files,
drawings): a temporary file beside the target, renamed into place once it is complete.
"""

import json
import os
import struct
import tempfile
import zipfile

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, incomplete or does not match the model."""


class NpzReader:
    """Members of an `.npz` archive. bfloat16 (stored by NumPy as `|V2`) comes back as bfloat16."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable .npz archive ({e})") from None
        self._members = {i.filename[:-4]: i for i in self._zip.infolist() if i.filename.endswith(".npy")}
        self._headers = {}

    def keys(self):
        return list(self._members)

    def _header(self, key):
        """(shape, dtype, fortran_order, data offset inside the member)."""
        if key not in self._headers:
            try:
                with self._zip.open(self._members[key]) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"unsupported .npy format version {version}")
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
            except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
                raise CheckpointError(f"{self.path}: member {key!r} is not a readable .npy array ({e})") from None
            if dtype.hasobject:
                raise CheckpointError(f"{self.path}: member {key!r} holds Python objects (a pickle); "
                                      "refusing to load it (allow_pickle=False)")
            self._headers[key] = (shape, dtype, fortran, offset)
        return self._headers[key]

    def shape(self, key):
        return tuple(self._header(key)[0])

    def dtype(self, key):
        dtype = self._header(key)[1]
        return np.dtype(ml_dtypes.bfloat16) if dtype == np.dtype("V2") else dtype

    def get(self, key):
        shape, dtype, fortran, offset = self._header(key)
        info = self._members[key]
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:  # the member's local header may differ from the central one
                f.seek(info.header_offset)
                local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: member {key!r}: damaged zip header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len + offset
            if start + nbytes > os.path.getsize(self.path):
                raise CheckpointError(f"{self.path}: member {key!r} is truncated: expected {nbytes} bytes "
                                      f"of {dtype} {list(shape)} at offset {start}, the file ends before")
            array = np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=shape,
                              order="F" if fortran else "C") if nbytes else np.zeros(shape, dtype)
        else:
            try:
                with self._zip.open(info) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
                raise CheckpointError(f"{self.path}: member {key!r} could not be read ({e})") from None
        return array.view(ml_dtypes.bfloat16) if dtype == np.dtype("V2") else array

    def get_rows(self, key, start, stop):
        """Rows [start, stop) of the leading axis: only those are read for stored (memory-mapped) members."""
        return self.get(key)[start:stop]

    def close(self):
        self._zip.close()


class SafetensorsReader:
    """Tensors of one `.safetensors` file, or of HF shards listed in `model.safetensors.index.json`."""

    def __init__(self, files):
        self.files = [str(f) for f in files]
        self._where, self._meta = {}, {}
        for path in self.files:
            header = _read_safetensors_header(path)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {self._where[name]}")
                self._where[name], self._meta[name] = path, meta

    @classmethod
    def from_index(cls, index_path):
        index_path = str(index_path)
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
        folder = os.path.dirname(index_path)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{index_path}: shards listed in the index are missing: {missing}")
        reader = cls(os.path.join(folder, s) for s in shards)
        for name, shard in weight_map.items():
            if reader._where.get(name) != os.path.join(folder, shard):
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {shard} but not stored there")
        return reader

    def keys(self):
        return list(self._where)

    def shape(self, key):
        return tuple(self._meta[key]["shape"])

    def dtype(self, key):
        return _SAFETENSORS_DTYPES[self._meta[key]["dtype"]]

    def get(self, key):
        path = self._where[key]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor {key!r} could not be read ({e})") from None

    def get_rows(self, key, start, stop):
        """Rows [start, stop) of the leading axis, reading only their bytes."""
        path = self._where[key]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_slice(key)[start:stop]
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor {key!r} could not be read ({e})") from None

    def close(self):
        pass


_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(bool),
}


def _read_safetensors_header(path):
    """The JSON header, checked against the file size so truncation is caught up front."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {length}, file size {size})")
            header = json.loads(f.read(length))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    data_size = size - 8 - length
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        end = meta["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"which holds only {data_size} bytes")
    return header


def open_reader(path):
    """The reader for a file or an HF directory, chosen by what is there."""
    path = str(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            return SafetensorsReader.from_index(index)
        if os.path.exists(single):
            return SafetensorsReader([single])
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if found:
            return SafetensorsReader(os.path.join(path, f) for f in found)
        raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors here")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if path.endswith(".safetensors"):
        return SafetensorsReader([path])
    if path.endswith(".safetensors.index.json"):
        return SafetensorsReader.from_index(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" or path.endswith(".npz"):
        return NpzReader(path)
    raise CheckpointError(f"{path}: unknown checkpoint format; expected a big_vision .npz, a .safetensors "
                          "file or a Hugging Face directory")


def refuse_overwrite(path, overwrite):
    """Raises ValueError if `path` exists and `overwrite` is False."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path}: already exists; pass overwrite=True to replace it")


def atomic_write(path, write):
    """`write(tmp_path)` to a temporary file beside `path`, flush it to disk, rename it over `path`.

    An interrupted write (an exception, a full disk) removes the temporary file and leaves
    whatever was at `path` untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
