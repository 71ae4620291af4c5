"""Where the language model's layer weights live, and the loop that runs the layers over them.

Two layouts compute the same numbers (tests/test_fast_layout.py):
- stacked: `llm/layers` as [L, ...] arrays (big_vision's, what `ref.load` returns), run under
  `lax.scan`: compile time does not grow with depth; training and meshes use it.
- per-layer: `llm/layers` as a tuple of L trees, each weight its own buffer, run as an unrolled
  loop. XLA:CPU copies each layer's slice out of a stacked weight before a dot reads it, so a
  scan over stacked weights moves every weight three times per token; per-layer buffers are read
  in place (docs/performance.md section 2).
A quantized tree with kept end layers (`ref.quant.Keep(end_layers=k)`) holds three segments,
`SEGMENTS`, each in either layout.

The layout is the library's choice: `for_platform` gives every public entry point
(`fast.generate`, `fast.forward`, `fast.Engine`) the layout this platform runs fastest, whatever
the caller passed.
"""

import contextlib
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.ref import capture

SEGMENTS = ("layers_first", "layers", "layers_last")  # `ref.quant.Keep(end_layers=k)` stores three
AUTO = True  # read at call time: False runs every tree in the layout it came in (bench/generate_speed.py)


def to_device(array):
    """A host array copied to the default device, waited for. Without the wait, the first program
    run that reads the array on XLA:CPU holds its bytes twice until the next run (measured: +2.1
    GB for PaliGemma's float32 embedding, the engine's old warm-up peak; a `jnp.sum` of a fresh
    `device_put` array is enough to show it); waited for, it never does."""
    return jax.block_until_ready(jax.device_put(array))


def layer_segments(llm):
    """`[(layers, index of its first layer)]`: `llm/layers` alone, or the three segments a quantized
    tree with kept end layers has (`ref.quant.Keep`), in order; each stacked or per-layer."""
    out, start = [], 0
    for name in SEGMENTS:
        if name in llm and count(llm[name]):  # a middle segment may be empty (depth = 2 x end layers)
            layers = llm[name]
            out.append((layers, start))
            start += count(layers)
    return out


def per_layer(layers):
    """Whether a segment is per-layer buffers (a tuple of trees) rather than stacked arrays."""
    return isinstance(layers, (list, tuple))


def count(layers):
    """Number of layers in a segment (per-layer tuple or stacked tree)."""
    return len(layers) if per_layer(layers) else len(jax.tree_util.tree_leaves(layers)[0])


def unstack_layers(params):
    """`params` with `llm/layers` as a tuple of L per-layer trees, each weight its own buffer.

    The price of the per-layer layout: the layer loop is unrolled, so compile time grows with
    depth. NumPy input (e.g. from `ref.load`) is copied to the device one layer at a time; for
    JAX input the stacked arrays can be dropped afterwards.
    """
    llm = dict(params["llm"])
    take = lambda w, i: to_device(w[i]) if isinstance(w, np.ndarray) else w[i]  # noqa: E731
    for name in SEGMENTS:
        if name not in llm or per_layer(llm[name]):
            continue
        depth = count(llm[name])
        llm[name] = tuple(jax.tree_util.tree_map(lambda w: take(w, i), llm[name]) for i in range(depth))  # noqa: B023
    return {**params, "llm": llm}


def stack_layers(params):
    """The inverse of `unstack_layers`: `llm/layers` as stacked [L, ...] arrays (the reference's layout)."""
    llm = dict(params["llm"])
    for name in SEGMENTS:
        if isinstance(llm.get(name), (list, tuple)):
            llm[name] = jax.tree_util.tree_map(lambda *ws: jnp.stack(ws), *llm[name])
    return {**params, "llm": llm}


def run_layers(llm, x, layer_step, caches=None, outputs_from=0):
    """Every layer of `llm` over x, in order: (x, the layers' updated caches or None).

    layer_step(outputs_from) -> step(x, (params_l, index, cache_l)) -> (x, cache update), the
      body of one layer, which only the last layer gets with outputs_from > 0.
    caches: None or (k, v) [L, ...]; each layer gets its own (k[i], v[i]).
    outputs_from: the last layer computes rows >= this only (its step from `layer_step(outputs_from)`).
    """
    step, segments = layer_step(0), layer_segments(llm)
    if outputs_from:  # the last layer apart
        *segments, (layers, start) = segments
        depth = start + count(layers)
        if per_layer(layers):
            head, last = layers[:-1], layers[-1]
        else:
            head = jax.tree_util.tree_map(lambda w: w[:-1], layers)
            last = jax.tree_util.tree_map(lambda w: w[-1], layers)
        if depth - 1 > start:
            segments.append((head, start))
    parts = []  # each segment's updated (k, v)
    for layers, start in segments:
        if per_layer(layers):  # an unrolled loop
            updates = []
            for index, params_l in enumerate(layers, start):
                cache_l = None if caches is None else (caches[0][index], caches[1][index])
                with capture.scope(capture.block_name("llm", index)):  # names for fast/capture.py
                    x, update = step(x, (params_l, jnp.int32(index), cache_l))
                updates.append(update)
            parts.append(None if caches is None else tuple(jnp.stack(u) for u in zip(*updates)))
        else:
            n = count(layers)
            seg_caches = caches if caches is None or len(segments) == 1 else (
                caches[0][start:start + n], caches[1][start:start + n])
            x, update = jax.lax.scan(step, x, (layers, jnp.arange(start, start + n), seg_caches))
            parts.append(update)
    if outputs_from:
        with capture.scope(capture.block_name("llm", depth - 1)):
            x, _ = layer_step(outputs_from)(x, (last, jnp.int32(depth - 1), None))
    updated = None if caches is None else (
        parts[0] if len(parts) == 1 else tuple(jnp.concatenate(u) for u in zip(*parts)))  # [L, B, S, K, H] each
    return x, updated


# --- The library's choice ----------------------------------------------------------------------


def prefers_per_layer(params, mesh=None):
    """Whether this platform runs `params` fastest with per-layer buffers: on the CPU without a
    mesh, when the layer weights are float32 or quantized. bfloat16 weights stay stacked there:
    XLA:CPU converts each to float32 where it is used anyway, and schedules the conversions of
    all unrolled layers early (8 GB of temporaries for 3B-224). GPU/TPU and meshes: stacked."""
    if mesh is not None or jax.default_backend() != "cpu":
        return False
    llm = params["llm"]
    leaves = [leaf for _, layers in _segment_names(llm) for leaf in jax.tree_util.tree_leaves(layers)]
    return all(jnp.dtype(leaf.dtype) == jnp.float32 for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating))


@contextlib.contextmanager
def as_given():
    """Within this block every entry point runs the layout it is given (`AUTO = False`): for the
    tests and benchmarks that compare the layouts."""
    global AUTO
    before, AUTO = AUTO, False
    try:
        yield
    finally:
        AUTO = before


def _segment_names(llm):
    return [(name, llm[name]) for name in SEGMENTS if name in llm]


_converted = {}  # the last tree `for_platform` converted: {"sources": weak refs to its leaves, "tree": ...}


def for_platform(params, mesh=None):
    """`params` as device arrays in this platform's layout (`prefers_per_layer`), converted once.

    NumPy leaves (`ref.load`'s) are copied to the device, per layer where the layers become
    per-layer buffers; a tree already in place comes back as it is. The conversion of the last
    tree is kept for as long as the caller's arrays live (weak references), so a second call with
    the same tree costs nothing; arrays changed in place after the first call are not seen (pass
    a new tree, or convert once yourself and keep the result: `fast.layout.for_platform(params)`).
    With `AUTO = False` the tree runs as given.
    """
    if not AUTO or mesh is not None:
        return params
    want = prefers_per_layer(params, mesh)
    stacked = any(not per_layer(layers) for _, layers in _segment_names(params["llm"]))
    leaves = jax.tree_util.tree_leaves(params)
    on_device = all(isinstance(leaf, jax.Array) for leaf in leaves)
    if on_device and not (want and stacked):
        return params
    sources = _converted.get("sources", ())
    if len(sources) == len(leaves) and all(ref() is leaf for ref, leaf in zip(sources, leaves)):
        return _converted["tree"]
    _converted.clear()
    tree = unstack_layers(params) if want else params
    tree = jax.tree_util.tree_map(lambda w: w if isinstance(w, jax.Array) else to_device(w), tree)
    forget = lambda _: _converted.clear()  # noqa: E731  (a source array died: the copy goes too)
    try:
        _converted.update(sources=[weakref.ref(leaf, forget) for leaf in leaves], tree=tree)
    except TypeError:  # a leaf that takes no weak reference (a Python scalar): not cached
        _converted.clear()
    return tree
