"""How the JAX implementation computes: dtypes, attention implementation, rematerialisation.

The model's *shape* lives in `paligemma.ref.config` (shared by both implementations); this
dataclass holds the runtime choices that only the fast path has. Both are static arguments
of every jitted function, so each combination compiles once.
"""

import dataclasses

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
REMAT_POLICIES = ("none", "full")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Runtime choices of `paligemma.fast`.

    compute_dtype: activations ("float32" or "bfloat16"); norms, softmax and logits are always
      computed in float32, whatever this says.
    cache_dtype: the KV cache ("float32" or "bfloat16"; big_vision uses bfloat16).
    attention_impl: "auto" (default: "pallas" on TPU and GPU, "xla" elsewhere), "xla" (plain
      einsums, dense mask), "pallas" (the kernels of `paligemma.kernels`, TPU or GPU) or
      "pallas_interpret" (the same kernels in Pallas' interpreter: any platform, slow; tests).
    remat: "none" or "full" (recompute each layer in the backward pass: less memory for
      fine-tuning, no effect on results).
    mesh: None (one device), or the `jax.sharding.Mesh` (axes `fast.sharding.AXES`) inference
      runs on: the KV cache, residual stream and logits are constrained to its shardings and the
      Pallas kernels run under `shard_map`; `forward` and `generate` set it from their `mesh=`.
    """

    compute_dtype: str = "float32"
    cache_dtype: str = "float32"
    attention_impl: str = "auto"
    remat: str = "none"
    mesh: Optional[Mesh] = None

    def __post_init__(self):
        for name, allowed in (("compute_dtype", ("float32", "bfloat16")), ("cache_dtype", ("float32", "bfloat16")),
                              ("attention_impl", ATTENTION_IMPLS), ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Policy: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def attention(self):
        """`attention_impl` with "auto" resolved for the default device's platform."""
        if self.attention_impl != "auto":
            return self.attention_impl
        return "pallas" if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else "xla"

    @property
    def uses_kernels(self):
        """Whether attention runs the Pallas kernels (which take per-token mask vectors)."""
        return self.attention != "xla"

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def kv_dtype(self):
        return jnp.dtype(self.cache_dtype)


FLOAT32 = Policy()
BFLOAT16 = Policy(compute_dtype="bfloat16", cache_dtype="bfloat16")
