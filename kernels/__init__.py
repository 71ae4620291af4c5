"""Pallas attention kernels for TPU (Mosaic) and GPU (Triton), proven on the CPU in interpret mode.

`attention` is the one entry point: it picks the backend from the platform (or takes one) and
the kernel from the shape (one query per example: `decode_attention`; otherwise
`flash_attention`). Masks are lazy (`TokenMask`: per-token vectors, see `masking`).
`quant_cpu` (a submodule, not re-exported) is the CPU's one kernel: int8 / int4 matrix-vector
products as a C++ XLA FFI custom call, compiled on first use (docs/quantization.md).
This package imports neither `paligemma.ref` nor `paligemma.fast`. Design, block sizes and the
compile checks: docs/kernels.md.
"""

from typing import Optional

from .backend import BACKENDS, platform_backend
from .decode_attention import DecodeBlockSizes, decode_attention
from .flash_attention import BlockSizes, flash_attention, reference
from .masking import NO_WINDOW, TokenMask, dense

__all__ = ["BACKENDS", "BlockSizes", "DecodeBlockSizes", "NO_WINDOW", "TokenMask", "attention", "decode_attention",
           "dense", "flash_attention", "platform_backend", "reference"]


def attention(q, k, v, mask: Optional[TokenMask] = None, *, window=None, softcap=None, scale=1.0,
              backend: Optional[str] = None, block_sizes: Optional[BlockSizes] = None,
              decode_block_sizes: Optional[DecodeBlockSizes] = None):
    """Masked GQA attention by the Pallas kernel that fits.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: `TokenMask` or None (all visible).
      window: None or a sliding window (int, or an int32 scalar that may be traced; `NO_WINDOW`
        disables it at run time); softcap: None or the logit cap; scale: multiplies q k^T.
      backend: "tpu", "gpu", "interpret", or None for the default device's platform.
    Returns:
      [B, T, N, H] in q's dtype; rows with no visible key are 0.
    """
    backend = backend or platform_backend()
    if backend is None:
        raise ValueError("attention: no Pallas backend for the platform "
                         f"{__import__('jax').default_backend()!r}; pass backend='interpret' to run the kernels "
                         "in Pallas' interpreter")
    if q.shape[1] == 1:
        return decode_attention(q, k, v, mask, window=window, softcap=softcap, scale=scale, backend=backend,
                                block_sizes=decode_block_sizes)
    return flash_attention(q, k, v, mask, window=window, softcap=softcap, scale=scale, backend=backend,
                           block_sizes=block_sizes)
