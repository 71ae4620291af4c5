"""The kernels compiled for hardware this machine does not have, at PaliGemma's real shapes.

TPU: a real Mosaic compile (forward and backward of both kernels) for TPU v5e and v6e
compile-only topologies, in the separate environment `.venv-tpu` with `jax[tpu]` (libtpu),
which `make test` installs (`make tpu-env`); each kernel's scoped VMEM must fit the chip's
default limit. Outside `make`, the TPU group skips, saying why, when `.venv-tpu` is missing;
under `make test` (PALIGEMMA_REQUIRE_TPU=1) a missing environment fails instead.
GPU: `jax.export` for CUDA through Triton (no PTX is built: the lowering is what is checked).
"""

import json
import os
import subprocess
from pathlib import Path

import jax.numpy as jnp
import pytest

from paligemma import ref
from paligemma.kernels import compile_check

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
# CI compiles SigLIP at every resolution and the language models at 896 px (the largest
# sequences, where VMEM runs out first); `python -m paligemma.kernels.compile_check` runs all.
CI_CASES = compile_check.cases(resolutions=(896,))
SCOPED_VMEM = {"v5e:1x1": 16 << 20, "v6e:1x1": 32 << 20}  # Mosaic's default scoped limits


def test_case_table_is_paligemmas():
    """The compile shapes (kernels may not import ref) agree with the presets."""
    for family, name in (("paligemma-3b", "gemma-2b"), ("paligemma2-10b", "gemma2-9b"),
                         ("paligemma2-28b", "gemma2-27b")):
        for res, tokens in compile_check.IMAGE_TOKENS.items():
            config = ref.get_config(f"{family}-{res}")
            g = config.llm
            assert config.vision.num_patches == tokens
            N, K, H, cap, _ = compile_check.LLMS[name]
            assert (N, K, H, cap) == (g.num_heads, g.num_kv_heads, g.head_dim, g.attn_logits_softcap)
            assert (config.vision.num_heads, config.vision.head_dim) == (16, 72)


def test_tpu_compile_at_real_shapes():
    """v5e and v6e in one process: libtpu takes a machine-wide lock, so two at once would fail."""
    if not TPU_PYTHON.exists():
        if os.environ.get("PALIGEMMA_REQUIRE_TPU"):
            pytest.fail(f"{TPU_PYTHON} is missing: `make tpu-env` installs jax[tpu]")
        pytest.skip(f"no TPU compile environment: {TPU_PYTHON} is missing (`make tpu-env` installs jax[tpu]==0.10.2)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    names = ",".join(c.name for c in CI_CASES)
    run = subprocess.run([str(TPU_PYTHON), "-m", "paligemma.kernels.compile_check", "tpu", *SCOPED_VMEM, "--cases",
                          names], env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(SCOPED_VMEM) * len(CI_CASES), run.stdout[-2000:] + run.stderr[-4000:]
    for topology in SCOPED_VMEM:
        mine = [r for r in results if r["target"] == f"tpu {topology}"]
        assert [r["case"] for r in mine] == [c.name for c in CI_CASES]
        for r in mine:
            assert r["fwd"] == "ok" and r["bwd"] == "ok", r
            kernels = {**r["fwd_vmem"], **r["bwd_vmem"]}
            expected = {"decode_attention"} if r["case"].endswith("decode") else {"flash_attention_fwd"}
            assert expected | {"flash_attention_dq", "flash_attention_dkv"} <= set(kernels), r
            for kernel, size in kernels.items():
                assert 0 < size <= SCOPED_VMEM[topology], (r["case"], kernel, size)
    assert run.returncode == 0, run.stdout[-2000:]


def test_gpu_triton_export_at_real_shapes():
    for r in compile_check.check_gpu(jnp.bfloat16, CI_CASES):
        assert r["fwd"] == "ok" and r["bwd"] == "ok", r
        assert r["fwd_kernels"] >= 1 and r["bwd_kernels"] >= 3, r  # fwd; fwd + dq + dkv in the gradient


def test_gpu_triton_export_float32_head_dim_72():
    """float32 and SigLIP's 72 (padded to 128, a power of two) through the same lowering."""
    small = [compile_check.Case("siglip-f32", "flash", 256, 256, 16, 16, 72, prefix_lm=False),
             compile_check.Case("decode-f32", "decode", 1, 384, 8, 1, 256, 30.0, 64)]
    for r in compile_check.check_gpu(jnp.float32, small):
        assert r["fwd"] == "ok" and r["bwd"] == "ok", r
