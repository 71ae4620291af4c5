"""Training checkpoints: trainable parameters, optimizer state, step and data position, atomically.

    OUT/checkpoints/step_00000200/trainable.npz    '/'-joined parameter paths (LoRA: the adapters)
                                  opt_state.npz    optimizer-state leaves by their tree key path
                                  state.json       {"step", "data_position", ...}: written last
    OUT/checkpoints/LATEST                         "step_00000200"

A checkpoint is written into a temporary folder beside the others, each file flushed to disk,
and renamed into place in one step; then `LATEST` is replaced (write a temporary file, rename),
and only then are checkpoints beyond the newest `keep` removed. A crash at any point leaves the
previous checkpoint complete and `LATEST` naming a complete one (`latest` also falls back to the
newest folder with a `state.json` if `LATEST` is missing or stale). Frozen parameters are not
saved: they are the base checkpoint's, reloaded on resume. Files are read with
`allow_pickle=False`.
"""

import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np

from paligemma.ref.params import flatten, unflatten

from .sharding import to_host

_NAME = re.compile(r"^step_(\d{8})$")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _replace_text(path, text):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)


def _state_leaves(opt_state):
    """{key path string: NumPy array} of an optimizer state."""
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {jax.tree_util.keystr(path): value for path, value in leaves}


def save(folder, step, trainable, opt_state, data_position, info=None, keep=2):
    """Writes checkpoint `step` under `folder` (created if needed); returns its path.

    Args:
      trainable, opt_state: trees of arrays (gathered to this host); data_position: the next
        stream position of the data; info: more JSON fields for state.json; keep: checkpoints kept.
    Only process 0 writes when several hosts run (all of them must call it: arrays are gathered).
    """
    trainable, opt_state = to_host(trainable), to_host(opt_state)
    if jax.process_index() != 0:
        return None
    os.makedirs(folder, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(folder, name)
    tmp = tempfile.mkdtemp(dir=folder, prefix=f".tmp-{name}-")
    try:
        _write_npz(os.path.join(tmp, "trainable.npz"), flatten(trainable))
        _write_npz(os.path.join(tmp, "opt_state.npz"), _state_leaves(opt_state))
        state = dict(info or {}, step=int(step), data_position=int(data_position))
        _replace_text(os.path.join(tmp, "state.json"), json.dumps(state, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step again (a resumed run): move the old one aside first
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_text(os.path.join(folder, "LATEST"), name)
    for old in _complete(folder)[:-keep]:
        shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    return final


def _complete(folder):
    """Names of complete checkpoints (with state.json), oldest first."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if _NAME.match(n) and os.path.isfile(os.path.join(folder, n, "state.json"))]
    return sorted(names)


def latest(folder):
    """Path of the newest complete checkpoint under `folder`, or None."""
    names = _complete(folder)
    try:
        with open(os.path.join(folder, "LATEST")) as f:
            named = f.read().strip()
        if named in names:
            return os.path.join(folder, named)
    except OSError:
        pass
    return os.path.join(folder, names[-1]) if names else None


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read training checkpoint ({e})") from None


def _check(path, got, want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: does not match this run (missing {missing[:5]}, unexpected {extra[:5]}): "
                         "was it written with other --trainable / --lora-rank / --optimizer settings?")
    for key, value in want.items():
        if np.shape(got[key]) != np.shape(value):
            raise ValueError(f"{path}: {key} has shape {list(np.shape(got[key]))}, this run expects "
                             f"{list(np.shape(value))}")


def load(path, trainable_like, opt_state_like):
    """Reads checkpoint folder `path`: `(trainable, opt_state, state dict)` as NumPy trees shaped
    like the given templates (their arrays are only used for names and shapes).

    Raises:
      ValueError naming the file and key that do not fit.
    """
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    flat = _read_npz(os.path.join(path, "trainable.npz"))
    _check(os.path.join(path, "trainable.npz"), flat, flatten(trainable_like))
    leaves_path = os.path.join(path, "opt_state.npz")
    leaves = _read_npz(leaves_path)
    want = _state_leaves(opt_state_like)
    _check(leaves_path, leaves, want)
    treedef = jax.tree_util.tree_structure(opt_state_like)
    opt_state = jax.tree_util.tree_unflatten(treedef, [leaves[k].astype(v.dtype) for k, v in want.items()])
    return unflatten(flat), opt_state, state
