"""Numerical building blocks shared by the vision tower and the language model.

Everything is plain NumPy. `einsum` always asks NumPy to optimise the contraction, which
routes two-operand products through BLAS; the result is the same as the naive loop.
"""

import math

import numpy as np

# big_vision masks attention logits with this finite value, not -inf: a row with no
# visible key then becomes a uniform softmax instead of NaN.
BIG_NEG = -2.3819763e38


def einsum(spec, *operands):
    """`np.einsum` with BLAS-backed contraction."""
    return np.einsum(spec, *operands, optimize=True)


def compute_dtype(param):
    """Activation dtype for a parameter dtype: float64 stays float64, everything else
    (float32, bfloat16, float16) computes in float32 as big_vision does."""
    return np.float64 if np.dtype(param.dtype) == np.float64 else np.float32


def cast(w, x):
    """A weight in the dtype of the activations it multiplies (bf16 -> f32 is exact)."""
    return np.asarray(w).astype(x.dtype, copy=False)


def softmax(logits, axis=-1):
    """Numerically stable softmax, computed in the dtype of `logits`."""
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(logits, axis=-1):
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def gelu_tanh(x):
    """GELU, tanh approximation (flax `nn.gelu` default, torch `gelu(approximate="tanh")`)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x, cap):
    """`cap * tanh(x / cap)`; `cap=None` (or 0) means no cap."""
    if not cap:
        return x
    return cap * np.tanh(x / cap)
