"""Loading and saving PaliGemma checkpoints: big_vision `.npz` and Hugging Face safetensors.

    config, params = load("paligemma-3b-pt-224.npz")            # big_vision (Kaggle)
    config, params = load("paligemma2-3b-pt-224/")               # HF directory, sharded or not
    config, params = load("model.safetensors", final_logits_softcap=None)
    save("out.npz", config, params)                              # big_vision layout
    save("out-hf/", config, params, format="hf")                 # from_pretrained() loads it
    config, qtree = load("pt-224-int8.safetensors")              # `paligemma quantize`'s output: quantized tree

The config comes from `config.json` when there is one, else from tensor shapes. Shapes cannot
tell softcaps, the query scaling, the sliding window or (for HF names) how a projection splits
into heads; those default to the released model with the same sizes and can be overridden:
any `GemmaConfig` field by name, `VisionConfig` fields as `vision_<field>`, and `name`,
`pad_id`, `eos_id`, `bos_id`. `vocab_size=257152` trims HF's 257216 embedding rows.

A shape the config refuses (an odd head dim, ...) is reported with the file and the tensors it
was read from (`inferconfig`). An HF folder whose SigLIP keeps its pooling head (transformers'
default `vision_use_head=True`) loads with those tensors ignored and named once in a warning.
"""

import dataclasses
import json
import os
import warnings

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..config import PaliGemmaConfig
from ..params import flatten, param_shapes, unflatten
from . import hf_layout
from .inferconfig import apply_overrides, config_from_bv_shapes, config_from_hf_shapes
from .quantread import is_quantized, load_quantized, read_quant_header
from .tensorfiles import CheckpointError, atomic_write, open_reader, refuse_overwrite

def load(path, **overrides):
    """Reads a checkpoint; returns `(config, params)` with params in big_vision's tree layout.

    `.npz` members are memory-mapped read-only (no copy until used); HF tensors are converted
    one at a time, so peak memory stays near one copy of the weights.

    A quantized file (`paligemma quantize`, `quantfile.quantize_file`) gives the *quantized* tree
    (`quant.quantize_tree`'s layout: `{"q", "scale"}` per weight, kept end layers apart), which
    `paligemma.fast` runs as it is; `quant.dequantize_tree(params, config)` gives the float tree the
    reference's functions take. Overrides may change everything but the shapes, except
    `vocab_size`, which keeps the first rows of the (per-row quantized) embedding.
    """
    path = str(path)
    if is_quantized(path):
        return _load_quantized(path, overrides)
    reader = open_reader(path)
    try:
        keys = reader.keys()
        if any(k.startswith(("img/", "llm/", "params/")) for k in keys):
            names = {k.removeprefix("params/"): k for k in keys}
            config = apply_overrides(config_from_bv_shapes({k: reader.shape(v) for k, v in names.items()}, path),
                                     overrides)
            flat = _read_big_vision(reader, names, config, path)
        else:
            hf_config = _read_hf_config(path)
            config = _config_from_hf_file(hf_config, reader, path, overrides)
            flat = _read_hf(reader, config, path)
    finally:
        reader.close()
    return _trim_vocab(config, flat, overrides, path)


def read_config(path, **overrides):
    """The config `load(path, **overrides)` returns, from headers and config.json alone (no tensor is read)."""
    path = str(path)
    if is_quantized(path):
        return apply_overrides(read_quant_header(path).config, overrides)
    reader = open_reader(path)
    try:
        keys = reader.keys()
        if any(k.startswith(("img/", "llm/", "params/")) for k in keys):
            shapes = {k.removeprefix("params/"): reader.shape(k) for k in keys}
            return apply_overrides(config_from_bv_shapes(shapes, path), overrides)
        config = _config_from_hf_file(_read_hf_config(path), reader, path, overrides)
    finally:
        reader.close()
    vocab = overrides.get("vocab_size", config.llm.vocab_size)
    return config.replace(llm=dataclasses.replace(config.llm, vocab_size=vocab))


def save(path, config: PaliGemmaConfig, params, format="npz", overwrite=False, max_shard_bytes=2 << 30):
    """Writes `params` as a big_vision `.npz` or as an HF directory (config.json + safetensors).

    Every file is written under a temporary name and renamed into place, so an interrupted save
    never leaves a half-written checkpoint where a good one was. Existing files are only
    replaced with `overwrite=True`. HF shards hold at most `max_shard_bytes`; each shard is
    built in memory (twice, by the safetensors writer), so smaller shards mean a lower peak.
    """
    flat = flatten(params)
    _check_tree(flat, config, str(path))
    if format == "npz":
        refuse_overwrite(path, overwrite)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda tmp: _write_npz(tmp, flat))
    elif format == "hf":
        _save_hf(str(path), config, flat, overwrite, max_shard_bytes)
    else:
        raise ValueError(f"format: expected 'npz' or 'hf', got {format!r}")


def _load_quantized(path, overrides):
    """`(config, quantized tree)` of a `paligemma quantize` file, with the overrides applied."""
    config, qtree, _ = load_quantized(path)
    config = apply_overrides(config, {k: v for k, v in overrides.items() if k != "vocab_size"})
    flat = flatten(qtree)
    rows = config.llm.vocab_size
    vocab = overrides.get("vocab_size", rows)
    if vocab > rows:
        raise CheckpointError(f"{path}: vocab_size {vocab} requested, but the embedding has only {rows} rows")
    for key in [k for k in flat if k.startswith("llm/embedder/input_embedding")]:  # the table, or its q and scale
        flat[key] = flat[key][:vocab]
    return config.replace(llm=dataclasses.replace(config.llm, vocab_size=vocab)), unflatten(flat)


# --- big_vision layout --------------------------------------------------------------------


def _read_big_vision(reader, names, config, path):
    _check_names(set(names), set(flatten(param_shapes(config))), path)
    flat = {}
    for key, stored in names.items():
        flat[key] = reader.get(stored)
    _check_tree(flat, config, path)
    return flat


def _trim_vocab(config, flat, overrides, path):
    """The stored embedding rows, or the first `vocab_size` of them when an override asks."""
    rows = flat["llm/embedder/input_embedding"].shape[0]
    vocab = overrides.get("vocab_size", rows)
    if vocab > rows:
        raise CheckpointError(f"{path}: vocab_size {vocab} requested, but the embedding has only {rows} rows")
    flat["llm/embedder/input_embedding"] = flat["llm/embedder/input_embedding"][:vocab]
    return config.replace(llm=dataclasses.replace(config.llm, vocab_size=vocab)), unflatten(flat)


# --- HF layout ----------------------------------------------------------------------------


def _read_hf_config(path):
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        return None
    try:
        with open(config_path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None


def _config_from_hf_file(hf_config, reader, path, overrides):
    shapes = {}
    for name in reader.keys():
        canonical = hf_layout.canonical_name(name)
        if canonical is not None:
            shapes[canonical] = reader.shape(name)
    if hf_config is not None:
        try:
            config = hf_layout.config_from_hf(hf_config, name=os.path.basename(path.rstrip("/")))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: config.json does not describe a PaliGemma model ({e})") from None
        # The file decides the embedding rows (257152 in converted big_vision files, 257216 on the hub).
        if ("llm", "embed_tokens.weight") in shapes:
            rows = shapes[("llm", "embed_tokens.weight")][0]
            config = config.replace(llm=dataclasses.replace(config.llm, vocab_size=rows))
    else:
        config = config_from_hf_shapes(shapes, path, overrides)
    return apply_overrides(config, {k: v for k, v in overrides.items() if k != "vocab_size"})


def _read_hf(reader, config, path):
    table = hf_layout.name_table(config)
    present = {}
    for name in reader.keys():
        canonical = hf_layout.canonical_name(name)
        present.setdefault(canonical, name)  # unknown names collect under None
    head = present.pop(("lm_head", ""), None)
    ignored = sorted(n for n in reader.keys() if hf_layout.unused_by_paligemma(hf_layout.canonical_name(n)))
    if ignored:
        warnings.warn(f"{path}: ignoring {len(ignored)} tensors PaliGemma never uses (SigLIP's pooling head, "
                      f"vision_use_head=True): {ignored}", stacklevel=3)
        present = {c: n for c, n in present.items() if not hf_layout.unused_by_paligemma(c)}
    unknown = [n for n in reader.keys() if hf_layout.canonical_name(n) is None]
    missing = sorted(name for (tower, name) in table if (tower, name) not in present)
    extra = sorted(present[c] for c in present if c is not None and c not in table) + unknown
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match {config.name} "
                              f"(missing {len(missing)}: {missing[:12]}; unexpected {len(extra)}: {extra[:12]})")
    expected = flatten(param_shapes(config))
    flat = {}
    for (tower, name), (key, how, layer) in table.items():
        stored = present[(tower, name)]
        w = hf_layout.hf_to_bv(reader.get(stored), how, key, config)
        target_shape = expected[key][1:] if layer is not None else expected[key]
        target_shape = target_shape[len(hf_layout.bv_slice(how)):]
        if tuple(w.shape) != tuple(target_shape):
            raise CheckpointError(f"{path}: tensor {stored!r} has shape {list(reader.shape(stored))}, "
                                  f"which does not fit {key} {list(expected[key])} of {config.name}")
        if key not in flat:
            flat[key] = np.empty(expected[key], dtype=w.dtype)
        flat[key][(layer,) + hf_layout.bv_slice(how) if layer is not None else ...] = w
    if head is not None and not np.array_equal(reader.get(head), flat["llm/embedder/input_embedding"]):
        raise CheckpointError(f"{path}: {head!r} differs from the input embedding; PaliGemma ties them")
    return flat


def _save_hf(folder, config, flat, overwrite, max_shard_bytes):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder}: exists and is not a directory")
    os.makedirs(folder, exist_ok=True)
    dtype = flat["llm/embedder/input_embedding"].dtype
    dtype_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")
    # Plan the shards from sizes alone, then convert and write one shard at a time.
    sources = {name: (flat[key] if layer is None else flat[key][(layer,) + hf_layout.bv_slice(how)], how, key)
               for name, (key, how, layer) in hf_layout.hf_names_for_save(config).items()}
    shards, size = [[]], 0
    for name, (source, _, _) in sources.items():
        if shards[-1] and size + source.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += source.nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index_file = [] if len(shards) == 1 else ["model.safetensors.index.json"]
    for out in ["config.json"] + files + index_file:
        refuse_overwrite(os.path.join(folder, out), overwrite)
    for out, names in zip(files, shards):
        tensors = {n: np.ascontiguousarray(hf_layout.bv_to_hf(np.asarray(sources[n][0]), sources[n][1],
                                                               sources[n][2], config)) for n in names}
        atomic_write(os.path.join(folder, out), lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"}))
        del tensors
    if index_file:
        index = {"metadata": {"total_size": sum(src.nbytes for src, _, _ in sources.values())},
                 "weight_map": {n: out for out, names in zip(files, shards) for n in names}}
        atomic_write(os.path.join(folder, index_file[0]), lambda tmp: _write_text(tmp, json.dumps(index, indent=2)))
    hf_json = json.dumps(hf_layout.config_to_hf(config, dtype_name), indent=2)
    atomic_write(os.path.join(folder, "config.json"), lambda tmp: _write_text(tmp, hf_json))


# --- checks and the file writers ---------------------------------------------------------


def _check_names(got, want, path):
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        raise CheckpointError(f"{path}: keys do not match the model "
                              f"(missing {len(missing)}: {missing[:12]}; unexpected {len(extra)}: {extra[:12]})")


def _check_tree(flat, config, path):
    expected = flatten(param_shapes(config))
    _check_names(set(flat), set(expected), path)
    for key, shape in expected.items():
        got = tuple(np.shape(flat[key]))
        if key == "llm/embedder/input_embedding":
            shape = (got[0], shape[1])  # rows may exceed the tokenizer (HF pads to 257216)
        if got != tuple(shape):
            raise CheckpointError(f"{path}: {key} has shape {list(got)}, expected {list(shape)} for {config.name}")
        dtype = np.asarray(flat[key]).dtype  # no copy for arrays and memmaps
        if not (np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16):
            raise CheckpointError(f"{path}: {key} has dtype {dtype}, expected a float type")


def _write_npz(path, flat):
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **flat)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
