"""Compile the kernels for real hardware without it: Mosaic for TPU topologies, Triton export for CUDA.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python -m paligemma.kernels.compile_check tpu v5e:1x1 v6e:1x1
    .venv/bin/python -m paligemma.kernels.compile_check gpu

"tpu" needs `jax[tpu]` (libtpu) installed (`make tpu-env` makes `.venv-tpu`): a compile-only
topology from `jax.experimental.topologies` runs the real Mosaic compiler, which checks block
tiling, layouts and VMEM, and the compiled HLO states each kernel's scoped VMEM.
"gpu" exports for CUDA through Triton (`jax.export`); no PTX is built, so it checks the
lowering (power-of-two shapes, supported ops), not register or shared-memory pressure.

Every case compiles forward and backward (the gradient of all three inputs). Prints one JSON
line per case, then a table. The shapes are PaliGemma's (`paligemma.ref.PRESETS`, which this
module may not import; tests/test_kernels_compile.py checks the table against them).
"""

import argparse
import json
import re
import sys
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .decode_attention import decode_attention
from .flash_attention import flash_attention
from .masking import TokenMask


class Case(NamedTuple):
    name: str
    kind: str  # "flash" or "decode"
    T: int  # queries (1 for decode)
    S: int  # keys (the cache length for decode)
    N: int
    K: int
    H: int
    softcap: Optional[float] = None
    window: Optional[int] = None
    prefix_lm: bool = True  # SigLIP: every token sees every token


# SigLIP So400m (16 heads of 72) at 224 / 448 / 896 px; the language models' prefill over the
# image tokens plus 128 text tokens, and decoding against a cache 128 slots longer. Gemma 2 runs
# its local layers (window 4096; the window is a runtime scalar, so global layers share the kernel).
LLMS = {"gemma-2b": (8, 1, 256, None, None), "gemma2-9b": (16, 8, 256, 50.0, 4096),
        "gemma2-27b": (32, 16, 128, 50.0, 4096)}
IMAGE_TOKENS = {224: 256, 448: 1024, 896: 4096}


def cases(resolutions=(224, 896)):
    out = [Case(f"siglip-{r}", "flash", p, p, 16, 16, 72, prefix_lm=False) for r, p in IMAGE_TOKENS.items()]
    for r in resolutions:
        T = IMAGE_TOKENS[r] + 128
        for name, (N, K, H, cap, window) in LLMS.items():
            out.append(Case(f"{name}-{r}-prefill", "flash", T, T, N, K, H, cap, window))
            out.append(Case(f"{name}-{r}-decode", "decode", 1, T + 128, N, K, H, cap, window))
    return out


def _functions(case: Case, backend, dtype):
    """(forward, backward) taking (q, k, v, input_mask [B, S] bool); B = 1."""

    def mask_of(input_mask):
        if case.kind == "decode":
            positions = jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1  # [1, S]
            return TokenMask(jnp.ones((1, 1), jnp.int32), jnp.zeros((1, case.S), jnp.int32), jnp.ones((1, 1), bool),
                             input_mask, positions[:, -1:] + 1, positions)
        if not case.prefix_lm:
            return TokenMask.full(1, case.T)
        return TokenMask.prefix_lm(input_mask, jnp.arange(case.T)[None] >= case.T - 112)  # 112 suffix tokens

    attend = decode_attention if case.kind == "decode" else flash_attention

    def forward(q, k, v, input_mask):
        window = None if case.window is None else jnp.int32(case.window)
        return attend(q, k, v, mask_of(input_mask), window=window, softcap=case.softcap, backend=backend)

    def backward(q, k, v, input_mask):
        loss = lambda q, k, v: forward(q, k, v, input_mask).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    shapes = (((1, case.T, case.N, case.H), dtype), ((1, case.S, case.K, case.H), dtype),
              ((1, case.S, case.K, case.H), dtype), ((1, case.S), jnp.bool_))
    return forward, backward, shapes


KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv", "decode_attention")


def _scoped_vmem(hlo_text):
    """{kernel name: scoped VMEM bytes} from a compiled TPU module's custom calls."""
    out = {}
    for line in hlo_text.splitlines():
        if "tpu_custom_call" not in line:
            continue
        names = [name for name in KERNELS if name in line]
        size = re.search(r'"used_scoped_memory_configs":\[\{[^}]*"size":"(\d+)"', line)
        if names and size:
            out[names[0]] = max(out.get(names[0], 0), int(size.group(1)))
    return out


def check_tpu(topology, dtype=jnp.bfloat16, selected=None):
    """Compiles every case for one TPU topology ("v5e:1x1", "v6e:1x1"); yields result dicts."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=(1, 1, 1), wrap=(False, False, False))
    mesh = Mesh(np.array(topo.devices[:1]), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    for case in selected or cases():
        forward, backward, shapes = _functions(case, "tpu", dtype)
        args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
        result = {"target": f"tpu {topology}", "case": case.name, "dtype": jnp.dtype(dtype).name}
        for label, fn in (("fwd", forward), ("bwd", backward)):
            start = time.perf_counter()
            try:
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                    compiled = jax.jit(fn).lower(*args).compile()
                result[label] = "ok"
                result[f"{label}_vmem"] = _scoped_vmem(compiled.as_text())
            except Exception as e:  # noqa: BLE001 - reported, the test fails on it
                result[label] = f"FAIL: {str(e).splitlines()[0][:300]}"
            result[f"{label}_s"] = round(time.perf_counter() - start, 2)
        yield result


def check_gpu(dtype=jnp.bfloat16, selected=None):
    """Exports every case for CUDA through Triton; yields result dicts."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for case in selected or cases():
        forward, backward, shapes = _functions(case, "gpu", dtype)
        args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
        result = {"target": "cuda (triton)", "case": case.name, "dtype": jnp.dtype(dtype).name}
        for label, fn in (("fwd", forward), ("bwd", backward)):
            start = time.perf_counter()
            try:
                exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
                result[label] = "ok"
                result[f"{label}_kernels"] = exported.mlir_module().count("__gpu$xla.gpu.triton")
            except Exception as e:  # noqa: BLE001
                result[label] = f"FAIL: {str(e).splitlines()[0][:300]}"
            result[f"{label}_s"] = round(time.perf_counter() - start, 2)
        yield result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("tpu", "gpu"))
    parser.add_argument("topologies", nargs="*", default=["v5e:1x1", "v6e:1x1"], help="TPU topologies")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    wanted = [c for c in cases() if not args.cases or c.name in args.cases.split(",")]
    dtype = jnp.dtype(args.dtype)
    runs = ([check_tpu(t, dtype, wanted) for t in args.topologies] if args.target == "tpu"
            else [check_gpu(dtype, wanted)])
    failed = False
    rows = []
    for run in runs:
        for result in run:
            print(json.dumps(result), flush=True)
            failed |= result["fwd"] != "ok" or result["bwd"] != "ok"
            rows.append(result)
    print(f"\n{'target':<16} {'case':<24} {'fwd':<5} {'bwd':<5}  scoped VMEM per kernel (MiB) / Triton kernels")
    for r in rows:
        extra = {**r.get("fwd_vmem", {}), **r.get("bwd_vmem", {})}
        detail = (", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(extra.items())) if extra
                  else f"fwd {r.get('fwd_kernels', '-')}, bwd {r.get('bwd_kernels', '-')}")
        print(f"{r['target']:<16} {r['case']:<24} {r['fwd'][:4]:<5} {r['bwd'][:4]:<5}  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
