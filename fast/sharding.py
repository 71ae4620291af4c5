"""A device mesh with data-parallel and fully-sharded (FSDP) axes, and where each array goes.

    mesh = make_mesh(parse_mesh("data=2,fsdp=4"))      # 8 devices
    params = jax.device_put(params, tree_shardings(mesh, params))

Mesh axes: "data" (examples split, parameters replicated) and "fsdp" (examples split, and every
parameter split too). A batch is split over both axes along its example axis; a parameter (and
its optimizer state, which has the same paths) is split over "fsdp" along its largest axis that
the fsdp size divides, never the stacked layer axis (`lax.scan` slices that one every layer),
and replicated over "data". XLA inserts the all-gathers and reduce-scatters. With a 1 x 1 mesh
every sharding is trivial, so one code path serves 1 and N devices, and N hosts: after
`jax.distributed.initialize()`, `jax.devices()` lists every host's devices (docs/finetuning.md).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the example axis is split over both
# Paths whose arrays carry a leading stacked layer axis [L, ...].
STACKED = ("llm/layers/", "img/Transformer/encoderblock/")


def parse_mesh(spec):
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; a missing axis is 1.

    Raises:
      ValueError naming the bad part.
    """
    sizes = {axis: 1 for axis in AXES}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh: bad part {part!r} in {spec!r}; expected e.g. 'data=2,fsdp=4' "
                             f"(axes {list(AXES)}, sizes >= 1)")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(sizes, devices=None):
    """A `Mesh` of shape (data, fsdp) over the first data * fsdp devices.

    Args:
      sizes: {"data": int, "fsdp": int}; devices: default `jax.devices()` (every host's).
    Raises:
      ValueError if there are fewer devices than the mesh needs.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in AXES)
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {need} devices, found {len(devices)} "
                         f"({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                         "before jax is imported")
    return Mesh(np.array(devices[:need]).reshape(shape), AXES)


def param_spec(path, shape, fsdp):
    """The `PartitionSpec` of a parameter (or optimizer-state) array.

    Args:
      path: '/'-joined tree path; shape: its shape; fsdp: the mesh's fsdp size.
    Returns:
      `PartitionSpec` splitting the largest axis divisible by `fsdp` (not a stacked layer axis)
      over "fsdp"; replicated if none is, or if fsdp is 1.
    """
    first = 1 if path.startswith(STACKED) else 0
    candidates = [a for a in range(first, len(shape)) if shape[a] % fsdp == 0 and shape[a] >= fsdp]
    if fsdp == 1 or not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return PartitionSpec(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def path_of(key_path):
    """A tree key path as '/'-joined dict keys; other entries (optax's tuples, fields) are left out,
    so an optimizer state's `mu` of `llm/x` has path `llm/x`, as the parameter."""
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(mesh, tree):
    """A `NamedSharding` for every array of `tree` (parameters or optimizer state), by `param_spec`."""
    fsdp = mesh.shape["fsdp"]

    def one(key_path, leaf):
        return NamedSharding(mesh, param_spec(path_of(key_path), np.shape(leaf), fsdp))

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


def to_host(tree):
    """Every array of `tree` as a full NumPy array on this host (gathered across hosts if needed)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)
