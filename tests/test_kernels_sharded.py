"""The kernels under `shard_map` on a 2 x 4 (data x model) mesh of 8 virtual CPU devices.

Batch is split over "data" and heads over "model" (query heads and kv heads alike, so each
device keeps whole GQA groups); the sharded results, forward and gradients, must equal the
unsharded ones. The device count is fixed when jax starts, so this runs in a subprocess.
`check_vma=False`: the interpreter mixes per-device and replicated values inside the kernel
(jax 0.10.2 refuses that under the varying-axes check).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from paligemma import kernels
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    B, T, N, K, H = 4, 24, 8, 4, 16
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) for _ in range(2))
    input_mask = np.arange(T)[None] < np.array([[24], [17], [9], [20]])
    mask_ar = (np.arange(T)[None] >= np.array([[12], [5], [3], [19]])).astype(np.int32)
    mask = kernels.TokenMask.prefix_lm(input_mask, mask_ar)
    blocks = kernels.BlockSizes(block_q=8, block_k=8)
    heads, rows = P("data", None, "model", None), P("data", None)
    mask_spec = kernels.TokenMask(*([rows] * 6))

    def flash(q, k, v, mask):
        return kernels.flash_attention(q, k, v, mask, window=7, softcap=20.0, block_sizes=blocks)

    def loss(q, k, v, mask):
        return jnp.sum(flash(q, k, v, mask) ** 2)

    sharded = jax.jit(jax.shard_map(flash, mesh=mesh, check_vma=False, in_specs=(heads, heads, heads, mask_spec), out_specs=heads))
    np.testing.assert_allclose(sharded(q, k, v, mask), flash(q, k, v, mask), rtol=1e-6, atol=1e-6)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    sharded_grad = jax.jit(jax.shard_map(grad, mesh=mesh, check_vma=False, in_specs=(heads, heads, heads, mask_spec),
                                         out_specs=(heads, heads, heads)))
    for a, b in zip(sharded_grad(q, k, v, mask), grad(q, k, v, mask)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    valid = jnp.asarray(input_mask)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    step = kernels.TokenMask(jnp.ones((B, 1), jnp.int32), jnp.zeros((B, T), jnp.int32), jnp.ones((B, 1), bool),
                             valid, valid.sum(1, keepdims=True).astype(jnp.int32), positions)

    def decode(q, k, v, mask):
        return kernels.decode_attention(q, k, v, mask, window=6, block_sizes=kernels.DecodeBlockSizes(block_k=8))

    sharded = jax.jit(jax.shard_map(decode, mesh=mesh, check_vma=False, in_specs=(heads, heads, heads, mask_spec), out_specs=heads))
    np.testing.assert_allclose(sharded(q[:, :1], k, v, step), decode(q[:, :1], k, v, step), rtol=1e-6, atol=1e-6)
    print("SHARDED OK")
""")


def test_kernels_under_shard_map_match_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "SHARDED OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
