"""The JAX implementation of PaliGemma and PaliGemma 2: `paligemma.ref`'s model, jit-compiled.

Same file names, function names and parameter tree as `paligemma.ref`; runtime choices
(dtypes, attention implementation, remat) live in `Policy`.
"""

from .decode import extend, generate, prefill
from .engine import Engine, Request
from .layout import stack_layers, unstack_layers
from .model import forward
from .pipeline import PaliGemma
from .policy import BFLOAT16, FLOAT32, Policy

__all__ = ["forward", "generate", "prefill", "extend", "Policy", "FLOAT32", "BFLOAT16", "PaliGemma", "unstack_layers",
           "stack_layers", "Engine", "Request"]
