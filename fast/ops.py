"""Numerical building blocks shared by the JAX vision tower and language model (mirrors the
part of `paligemma.ref.ops` that needs a JAX twin; `BIG_NEG` is imported from there as it is).
"""

import jax.numpy as jnp


def cast(w, x):
    """A weight in the dtype of the activations it multiplies (bf16 -> f32 is exact); traceable."""
    return jnp.asarray(w).astype(x.dtype)
