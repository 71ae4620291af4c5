"""A device mesh with data, fully-sharded (FSDP) and model axes, and where each array goes.

    mesh = make_mesh(parse_mesh("data=2,fsdp=4"))                              # fine-tuning, 8 devices
    mesh = make_mesh(parse_mesh("data=2,model=4", INFERENCE_AXES))             # inference, 8 devices
    params = jax.device_put(params, tree_shardings(mesh, params))

Mesh axes, always all three (a missing one has size 1): "data" (examples split, parameters
replicated), "fsdp" (examples split, and every parameter split too) and "model" (tensor
parallelism: attention heads and MLP hidden units split, `MODEL_RULES`). A batch is split over
data and fsdp along its example axis. A parameter (and its optimizer state, which has the same
paths) is split over "model" along the axis `MODEL_RULES` names, if the model size divides it,
and over "fsdp" along its largest remaining axis that the fsdp size divides, never the stacked
layer axis (`lax.scan` slices that one every layer); it is replicated over "data". XLA inserts
the all-gathers, all-reduces and reduce-scatters. With a 1 x 1 x 1 mesh every sharding is
trivial, so one code path serves 1 and N devices, and N hosts: after
`jax.distributed.initialize()`, `jax.devices()` lists every host's devices (docs/finetuning.md,
docs/scaling.md). Inference (loading onto a mesh, KV cache, activations): the last section.
"""

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "model")
TRAINING_AXES = ("data", "fsdp")  # fine-tuning has no tensor parallelism (yet): `parse_mesh`'s default
INFERENCE_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the example axis is split over both
# Paths whose arrays carry a leading stacked layer axis [L, ...].
STACKED = ("llm/layers/", "llm/layers_first/", "llm/layers_last/", "img/Transformer/encoderblock/")


def parse_mesh(spec, axes=TRAINING_AXES):
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}: a size for each of `axes`, a missing one 1.

    Args:
      spec: the description; axes: the axes it may name (`INFERENCE_AXES` adds "model").
    Raises:
      ValueError naming the bad part.
    """
    sizes = {axis: 1 for axis in axes}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in axes or not value.strip().isdigit() or int(value) < 1:
            example = "data=2,model=4" if "model" in axes else "data=2,fsdp=4"
            raise ValueError(f"mesh: bad part {part!r} in {spec!r}; expected e.g. {example!r} "
                             f"(axes {list(axes)}, sizes >= 1)")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(sizes, devices=None):
    """A `Mesh` of shape (data, fsdp, model) over the first data * fsdp * model devices.

    Args:
      sizes: {axis: int} (`parse_mesh`; a missing axis is 1); devices: default `jax.devices()`
        (every host's).
    Raises:
      ValueError if there are fewer devices than the mesh needs.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes.get(a, 1) for a in AXES)
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {need} devices, found {len(devices)} "
                         f"({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                         "before jax is imported")
    return Mesh(np.array(devices[:need]).reshape(shape), AXES)


# Tensor parallelism: the axis of each parameter split over "model", counted from the end so
# that stacked [L, ...] and per-layer (`unstack_layers`) arrays share a rule; the first listed
# axis the model size divides is split, and a parameter that is not here, or that no listed axis
# fits, is replicated over "model". Heads and MLP hidden units (Megatron's split: each device
# computes its heads and its slice of F, one all-reduce after the output projections); the
# embedding by vocabulary rows, so no device holds it whole and the tied logits come out split
# over V (by width where V does not divide). kv heads only when the model size divides K: with
# fewer kv heads than devices (PaliGemma's K = 1) the K/V projections and the KV cache are
# replicated over "model" (docs/scaling.md).
_SIGLIP = "img/Transformer/encoderblock/"
MODEL_RULES = {
    "llm/embedder/input_embedding": (-2, -1),  # [V, D]: V, else D
    "llm/layers/attn/q_einsum/w": (-3,),  # [L, N, D, H]: N
    "llm/layers/attn/kv_einsum/w": (-3,),  # [L, 2, K, D, H]: K
    "llm/layers/attn/attn_vec_einsum/w": (-3,),  # [L, N, H, D]: N
    "llm/layers/mlp/gating_einsum": (-1,),  # [L, 2, D, F]: F
    "llm/layers/mlp/linear": (-2,),  # [L, F, D]: F
    **{f"{_SIGLIP}MultiHeadDotProductAttention_0/{p}/kernel": (-2,) for p in ("query", "key", "value")},  # [L, W, N, H]
    **{f"{_SIGLIP}MultiHeadDotProductAttention_0/{p}/bias": (-2,) for p in ("query", "key", "value")},  # [L, N, H]
    f"{_SIGLIP}MultiHeadDotProductAttention_0/out/kernel": (-3,),  # [L, N, H, W]
    f"{_SIGLIP}MlpBlock_0/Dense_0/kernel": (-1,),  # [L, W, M]: M
    f"{_SIGLIP}MlpBlock_0/Dense_0/bias": (-1,),  # [L, M]
    f"{_SIGLIP}MlpBlock_0/Dense_1/kernel": (-2,),  # [L, M, W]
}


# Quantized weights (`paligemma.ref.quant`: `{"q", "scale"}`): q and scale follow their weight's
# rule, except where int4 merges the contracted (N, H) into one axis, so that "-3" would name the
# layer axis: those two split their output width instead (GSPMD gathers the heads' activations
# first). Kept end layers (`llm/layers_first`, `llm/layers_last`) follow the layers' rules.
QUANTIZED_RULES = {
    "llm/layers/attn/attn_vec_einsum/w": (-1,),  # int8 q [L, N, H, D], int4 q [L, (NH)p/2, D]: D
    f"{_SIGLIP}MultiHeadDotProductAttention_0/out/kernel": (-1,),  # [L, N, H, W] / [L, (NH)p/2, W]: W
}


def _rules(path):
    """The `MODEL_RULES` axes of a parameter path, quantized leaves and kept end layers included."""
    for segment in ("llm/layers_first/", "llm/layers_last/"):
        if path.startswith(segment):
            path = "llm/layers/" + path[len(segment):]
    base, _, leaf = path.rpartition("/")
    if leaf in ("q", "scale") and base in MODEL_RULES:
        return QUANTIZED_RULES.get(base, MODEL_RULES[base])
    return MODEL_RULES.get(path, ())


def model_axis(path, shape, model):
    """The axis (non-negative) of a parameter split over "model" by `MODEL_RULES`, or None."""
    if model == 1:
        return None
    for axis in _rules(path):
        if len(shape) >= -axis and shape[axis] % model == 0:
            return len(shape) + axis
    return None


def param_spec(path, shape, fsdp, model=1):
    """The `PartitionSpec` of a parameter (or optimizer-state) array.

    Args:
      path: '/'-joined tree path; shape: its shape; fsdp, model: the mesh's sizes of those axes.
    Returns:
      `PartitionSpec` splitting the `MODEL_RULES` axis over "model" (see `model_axis`) and the
      largest other axis divisible by `fsdp` (not a stacked layer axis) over "fsdp"; replicated
      over an axis of size 1 or where nothing divides.
    """
    spec = [None] * len(shape)
    split = model_axis(path, shape, model)
    if split is not None:
        spec[split] = "model"
    first = 1 if path.startswith(STACKED) else 0
    candidates = [a for a in range(first, len(shape))
                  if a != split and shape[a] % fsdp == 0 and shape[a] >= fsdp]
    if fsdp > 1 and candidates:
        spec[max(candidates, key=lambda a: (shape[a], -a))] = "fsdp"
    return PartitionSpec(*spec) if any(spec) else PartitionSpec()


def path_of(key_path):
    """A tree key path as '/'-joined dict keys; other entries (optax's tuples, fields) are left out,
    so an optimizer state's `mu` of `llm/x` has path `llm/x`, as the parameter."""
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(mesh, tree):
    """A `NamedSharding` for every array of `tree` (parameters or optimizer state), by `param_spec`."""
    fsdp, model = mesh.shape["fsdp"], dict(mesh.shape).get("model", 1)

    def one(key_path, leaf):
        return NamedSharding(mesh, param_spec(path_of(key_path), np.shape(leaf), fsdp, model))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh, example_axis=1):
    """Split the example axis (axis 1 of a `Batch` field: [A, B, ...]) over both mesh axes."""
    return NamedSharding(mesh, PartitionSpec(*([None] * example_axis), BATCH_AXES))


def check_batch_size(mesh, batch_size, micro_batches):
    """Raises ValueError unless each micro-batch splits evenly over the mesh."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % micro_batches or (batch_size // micro_batches) % devices:
        raise ValueError(f"batch size {batch_size} with {micro_batches} accumulation steps gives micro-batches of "
                         f"{batch_size / micro_batches:g} examples, which must be a whole multiple of the "
                         f"{devices} devices of mesh {dict(mesh.shape)}")


def put_global(array, sharding):
    """A host array every process holds in full, as a global `jax.Array` with `sharding` (each
    process fills only its own devices' shards: works on one host and on many)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, shardings):
    return jax.tree_util.tree_map(put_global, tree, shardings)


def process_rows(sharding, shape, axis=1):
    """The indices along `axis` of a global array of `shape` that this process's devices hold,
    sorted: all of them on one host; on several, each process's own (disjoint across processes
    when `axis` is split over every process, as the example axis of a batch is).

    >>> mesh = make_mesh({"data": 1})                       # one device: every row
    >>> process_rows(batch_sharding(mesh), (1, 4, 16)).tolist()
    [0, 1, 2, 3]
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(rows), np.int64)


def put_rows(local, rows, shape, sharding, axis=1):
    """A global array of `shape` from this process's rows only (`process_rows`): `local` holds
    rows `rows` along `axis`, in that order; each device gets its part of them. Raises
    ValueError if a device of this process needs a row that `local` lacks."""
    local, rows = np.asarray(local), np.asarray(rows)

    def part(index):
        wanted = np.arange(shape[axis])[index[axis]]
        at = np.minimum(np.searchsorted(rows, wanted), len(rows) - 1)
        if not np.array_equal(rows[at], wanted):
            raise ValueError(f"put_rows: this process holds rows {rows.tolist()}, a device needs {wanted.tolist()}")
        return local[tuple(at if a == axis else index[a] for a in range(local.ndim))]

    return jax.make_array_from_callback(tuple(shape), sharding, part)


def to_host(tree):
    """Every array of `tree` as a full NumPy array on this host (gathered across hosts if needed)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


# --- Inference: loading onto a mesh, batch, KV cache, activations --------------------------


def mesh_from(mesh):
    """None, a `Mesh` (returned as is) or a description ("data=2,model=4") -> None or a `Mesh`.

    Raises:
      ValueError for a bad description, too few devices, or a `Mesh` without the three `AXES`.
    """
    if mesh is None or isinstance(mesh, Mesh):
        if mesh is not None and tuple(mesh.axis_names) != AXES:
            raise ValueError(f"mesh: expected axes {AXES} (make_mesh builds them), got {tuple(mesh.axis_names)}")
        return mesh
    return make_mesh(parse_mesh(mesh, INFERENCE_AXES))


def batch_multiple(mesh):
    """How many devices share out the examples: a batch must be a multiple of this."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def pad_batch(arrays, multiple):
    """Host arrays [B, ...] with the last example repeated up to a multiple of `multiple` rows.

    The copies decode in lockstep with the example they copy (the same tokens, the same EOS),
    so they neither stop a batch early nor keep it running; the caller drops them.
    """
    extra = -len(arrays[0]) % multiple
    return [np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) if extra else a for a in arrays]


def batch_spec(ndim):
    """[B, ...] with the examples over data and fsdp, the rest replicated."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def kv_cache_spec(mesh, num_kv_heads):
    """The KV cache [L, B, S, K, H]: examples over data and fsdp, kv heads over "model" when the
    model size divides K; otherwise (K < model, PaliGemma's K = 1) replicated over "model", as the
    K/V projections are (`MODEL_RULES`): every device of a model group holds the whole cache of
    its examples and computes K and V itself, instead of exchanging them every layer."""
    model = 1 if mesh is None else mesh.shape["model"]
    heads = "model" if model > 1 and num_kv_heads % model == 0 else None
    return PartitionSpec(None, BATCH_AXES, None, heads, None)


def logits_spec(mesh, vocab_size, ndim):
    """Logits [B, ..., V]: the examples over data and fsdp, the vocabulary over "model" as the
    embedding rows are (`MODEL_RULES`); argmax and log-softmax reduce across the model group."""
    model = 1 if mesh is None else mesh.shape["model"]
    vocab = "model" if model > 1 and vocab_size % model == 0 else None
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 2)), vocab)


def constrain(x, mesh, spec):
    """`with_sharding_constraint(x, NamedSharding(mesh, spec))`, or `x` when `mesh` is None.

    Used where propagation alone might choose otherwise: the residual stream (examples split,
    width whole after every layer's all-reduce), the KV cache (which the decoding loop carries),
    and the logits.
    """
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def place_params(params, mesh, dtype=None):
    """The parameter tree on `mesh` by `tree_shardings`, each device's shard read on its own.

    Every leaf becomes a global array through `jax.make_array_from_callback`, whose callback
    slices (and casts to `dtype`, if given) only the part one device holds. With the memory-mapped
    arrays `paligemma.ref.load` returns for `.npz` and `.safetensors` files, that slice is all
    that is read from disk: the host holds one shard at a time, never a whole tensor, and no
    device ever holds more than its shards (tests/test_sharded_inference.py counts the bytes).
    JAX arrays already on devices are moved with `jax.device_put`. On many hosts each process
    reads only its own devices' shards.

    Args:
      params: nested dicts of NumPy (or memory-mapped) or JAX arrays; `llm/layers` stacked or
        per-layer; mesh: a `Mesh` with `AXES`; dtype: None (keep) or a NumPy dtype.
    Returns:
      the same tree of global `jax.Array`s.
    """
    shardings = tree_shardings(mesh, params)

    def one(leaf, sharding):
        cast = None if np.issubdtype(leaf.dtype, np.integer) else dtype  # quantized q stays as it is
        if isinstance(leaf, jax.Array):
            return jax.device_put(leaf if cast is None else leaf.astype(cast), sharding)
        read = lambda index: np.asarray(leaf[index]).astype(cast or leaf.dtype, copy=False)  # noqa: E731
        return jax.make_array_from_callback(tuple(leaf.shape), sharding, read)

    return jax.tree_util.tree_map(one, params, shardings)


def on_mesh(params, inputs, policy, mesh):
    """Everything a jitted inference call needs, on the mesh (`forward` and `generate`'s `mesh=`).

    Args:
      params: the parameter tree; inputs: host arrays [B, ...]; policy: a `fast.Policy`;
      mesh: None (then `policy.mesh`), a `Mesh` or a description for `mesh_from`.
    Returns:
      (params, inputs, policy): unchanged without a mesh; else the parameters placed
      (`place_params`; a no-op for arrays already placed so), the inputs padded to a multiple of
      `batch_multiple` examples and split over data and fsdp, and `policy.mesh` set.
    """
    mesh = mesh_from(policy.mesh if mesh is None else mesh)
    if mesh is None:
        return params, inputs, policy
    inputs = pad_batch([np.asarray(a) for a in inputs], batch_multiple(mesh))
    inputs = [put_global(a, NamedSharding(mesh, batch_spec(a.ndim))) for a in inputs]
    return place_params(params, mesh), inputs, dataclasses.replace(policy, mesh=mesh)
