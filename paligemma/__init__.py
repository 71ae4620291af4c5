"""PaliGemma and PaliGemma 2.

`paligemma.ref` is the NumPy reference, `paligemma.fast` the JAX implementation,
`paligemma.kernels` the Pallas attention kernels and `paligemma.parity` the tools that
hold implementations (ours and yours) against each other; `paligemma.options` holds the
option lists the library and the `paligemma` command share.
"""

__version__ = "0.1.0"
