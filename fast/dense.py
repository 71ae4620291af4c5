"""Float32 weights times a few rows of x on the CPU: batched decoding through `kernels.quant_cpu`.

A decoding step multiplies B rows (one token per example) by every weight. XLA:CPU runs B = 1 as
a matrix-vector product that reads the weight in place, but 2 <= B <= 16 as a GEMM that packs
(copies) panels of the weight before multiplying them, so a batch-8 step cost ~3x a batch-1 step
although both read the same bytes (bench/decode_rows.py). `quant_cpu.dense_columns` /
`dense_rows` read each weight element once for all rows. `fast.quant.routed` sends a float weight
here when `applies`; `fast.quant.per_group`, `matmul` and `logits` then call the functions below,
so `fast.linear.einsum` stays the one seam for every weight product.

Where it applies (`applies`): the CPU without a mesh (`tiles`, as for the quantized kernels),
x and w both float32, MIN_ROWS..MAX_ROWS rows of x, the library built. Everything else (B = 1,
which XLA already reads at the floor; bfloat16; a mesh; GPU/TPU; prefill with many rows) keeps
its XLA dot. Under differentiation the forward and backward are XLA's dots (`custom_vjp`), so
training computes what it computed before.

Axes: G independent weights, M rows of x (= B T), C contracted length, O output channels,
V vocabulary rows; B batch, T tokens, D width.
"""

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.kernels import quant_cpu

MIN_ROWS = 2  # one row: XLA's matrix-vector product already reads the weight in place
MAX_ROWS = 16  # more rows (prefill): XLA's GEMM packs once for many rows and wins
MAX_LOGIT_ROWS = 8  # the tied embedding (`dense_rows`): at 16 rows XLA measured as fast (bench/decode_rows.py)
CPU_KERNEL = True  # read while tracing: False sends every float product to XLA


def applies(w, x, tiles=True, logits=False):
    """Whether x [..., C] times the float weight w runs as a `quant_cpu` dense product here
    (`logits`: w is the tied embedding [V, C], contracted along its rows)."""
    if not (tiles and CPU_KERNEL) or isinstance(w, dict) or not hasattr(w, "dtype"):
        return False
    rows = int(np.prod(x.shape[:-1]))
    return (jnp.dtype(w.dtype) == jnp.float32 and jnp.dtype(x.dtype) == jnp.float32
            and MIN_ROWS <= rows <= (MAX_LOGIT_ROWS if logits else MAX_ROWS) and quant_cpu.available())


@jax.custom_vjp
def _columns(x, w):
    return quant_cpu.dense_columns(x, w)  # [G, M, O]


def _columns_fwd(x, w):
    return quant_cpu.reference_dense_columns(x, w), (x, w)


def _columns_bwd(res, g):  # g [G, M, O]
    x, w = res
    return jnp.einsum("GMO,GCO->GMC", g, w), jnp.einsum("GMC,GMO->GCO", x, g)


_columns.defvjp(_columns_fwd, _columns_bwd)


@jax.custom_vjp
def _rows(x, w):
    return quant_cpu.dense_rows(x, w)  # [M, V]


def _rows_fwd(x, w):
    return quant_cpu.reference_dense_rows(x, w), (x, w)


def _rows_bwd(res, g):  # g [M, V]
    x, w = res
    return jnp.einsum("MV,VC->MC", g, w), jnp.einsum("MV,MC->VC", g, x)


_rows.defvjp(_rows_fwd, _rows_bwd)


def group_dot(x, w):
    """`einsum("BTD,GDO->GBTO")`: x [B, T, D], w [G, D, O] -> [G, B, T, O] (`fast.linear._per_group`)."""
    B, T, D = x.shape
    G, _, O = w.shape
    xs = jnp.broadcast_to(x.reshape(1, B * T, D), (G, B * T, D))  # [G, M, D]
    return _columns(xs, w).reshape(G, B, T, O)  # [G, B, T, O]


def matmul(x, w, contracted=1):
    """x [..., C] times w whose first `contracted` axes are the contracted ones (C = their product),
    e.g. the attention output [N, H, D] with contracted=2: [..., out...]."""
    out_shape = w.shape[contracted:]
    C, O = int(np.prod(w.shape[:contracted])), int(np.prod(out_shape))
    out = _columns(x.reshape(1, -1, C), w.reshape(1, C, O))  # [1, M, O]
    return out.reshape(x.shape[:-1] + tuple(out_shape))


def logits(x, table):
    """The tied projection `x @ E^T`: x [B, T, D], table [V, D] -> [B, T, V] float32."""
    B, T, D = x.shape
    return _rows(x.reshape(B * T, D), table).reshape(B, T, table.shape[0])  # [B, T, V]
