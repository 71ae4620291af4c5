"""Which Pallas backend a kernel is built for, and what each backend requires of it.

"tpu": Mosaic (`pltpu.CompilerParams`: every grid axis "parallel", since each kernel loops over
  its reduction axis inside one grid step); scalars (loop bounds, the window) live in SMEM.
"gpu": Triton (`pallas.triton.CompilerParams(num_warps, num_stages)`, chosen explicitly:
  jax 0.10.2's default GPU backend, Mosaic GPU, cannot lower these kernels); every array in
  the kernel must have power-of-two dimensions and a matmul at least 16 rows.
"interpret": the same kernels run on any platform by Pallas' interpreter (numerics only),
  with the TPU's layout rules, so a test on the CPU exercises the padding the TPU needs.

Axes: H head dim.
"""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("tpu", "gpu", "interpret")


def platform_backend(platform=None):
    """The kernel backend of a JAX platform: "tpu", "gpu" (cuda / rocm) or None (CPU: no kernels)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return None


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def padded_head_dim(head_dim, backend):
    """Head dim the kernel computes with: a multiple of 128 lanes on TPU (and in interpret mode),
    a power of two on GPU. Zero columns change no logit and give zero output columns, so
    SigLIP's 72 runs as 128 and the wrapper slices the result back."""
    check_backend(backend)
    if backend == "gpu":
        return max(16, _next_power_of_2(head_dim))
    return -(-head_dim // 128) * 128


def row_alignment(backend, dtype):
    """Blocks along a sequence axis must be multiples of this (TPU sublanes: 8 rows of 32 bits,
    16 of bfloat16) or, on GPU, powers of two of at least 16 (Triton's smallest matmul)."""
    check_backend(backend)
    if backend == "gpu":
        return 16
    return 16 if jax.numpy.dtype(dtype).itemsize < 4 else 8


def check_block(name, size, backend, dtype):
    """Raises ValueError naming the block if `size` breaks the backend's tiling rule."""
    align = row_alignment(backend, dtype)
    if not isinstance(size, int) or size <= 0 or size % align:
        raise ValueError(f"{name} = {size!r}: must be a positive multiple of {align} for the {backend!r} "
                         f"backend and {jax.numpy.dtype(dtype).name} inputs")
    if backend == "gpu" and size & (size - 1):
        raise ValueError(f"{name} = {size}: Triton needs power-of-two block sizes")


def fit_block(length, preferred, backend, dtype):
    """A block size for a sequence of `length`: one block if the sequence is short, else the
    largest of preferred, preferred / 2, ... (aligned) that divides `length` (no padding copy),
    else `preferred` (the wrapper pads)."""
    align = row_alignment(backend, dtype)
    if length <= preferred:
        if backend == "gpu":
            return max(align, _next_power_of_2(length))
        return -(-length // align) * align
    size = preferred
    while size >= align and size % align == 0:
        if length % size == 0:
            return size
        size //= 2
    return preferred


def out_struct(shape, dtype, like):
    """`ShapeDtypeStruct` of a kernel output varying over the same mesh axes as `like` (inside
    `shard_map` with `check_vma`, Pallas must be told; outside it this is empty)."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    return jax.ShapeDtypeStruct(shape, dtype, **({} if mat is None else {"manual_axis_type": mat}))


def scalar_spec(backend):
    """BlockSpec of a small int32 vector read element by element (loop bounds, the window)."""
    if backend == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


DEFAULT_SCOPED_VMEM = 16 << 20  # Mosaic's default scoped-VMEM limit on v5e (v6e: 32 MiB)
MAX_SCOPED_VMEM = 96 << 20  # v5e and v6e have 128 MiB of VMEM per core


def vmem_limit(resident_bytes):
    """A scoped-VMEM limit for a kernel whose blocks take `resident_bytes` (each block is double
    buffered, plus 4 MiB for score tiles): None while the default suffices."""
    need = 2 * int(resident_bytes) + (4 << 20)
    return None if need <= DEFAULT_SCOPED_VMEM else min(need, MAX_SCOPED_VMEM)


def call_kwargs(backend, grid_rank, num_warps=4, num_stages=2, resident_bytes=0):
    """`pl.pallas_call` keyword arguments selecting the backend and its compiler parameters;
    `resident_bytes` (the blocks' size) raises the TPU's VMEM limit where needed."""
    check_backend(backend)
    if backend == "interpret":
        return {"interpret": True}
    if backend == "tpu":
        return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank,
                                                        vmem_limit_bytes=vmem_limit(resident_bytes))}
    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
