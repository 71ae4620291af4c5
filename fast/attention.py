"""The one place that chooses how attention is computed (`Policy.attention_impl`).

"xla": einsums XLA fuses; the `[T, S]` logits and a dense `[B, T, S]` mask are materialised.
"pallas" / "pallas_interpret": the Pallas kernels of `paligemma.kernels` (on TPU / GPU, or in
Pallas' interpreter on any platform), which take the mask as per-token vectors
(`kernels.TokenMask`) and never build the dense one. "auto" (the default) is "pallas" where the
default device is a TPU or GPU and "xla" elsewhere (`Policy.attention`).

Rows with no visible key (padding queries only: a real token always sees itself) differ: XLA,
with big_vision's finite mask value, gives the mean of all values, the kernels give zeros. No
real token reads a padding token's output (padding keys are masked, padding logits ignored),
so logits at real tokens and generated tokens do not depend on it
(tests/test_kernels_model.py).

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from paligemma import kernels
from paligemma.ref.capture import record
from paligemma.ref.ops import BIG_NEG  # finite, not -inf: a row with no visible key is uniform

from .policy import Policy
from .sharding import BATCH_AXES



def attend_xla(q, k, v, attn_mask, softcap):
    """Grouped-query attention; query head n reads kv head n // G; K/V are never repeated.

    Args:
      q: [B, T, N, H] (rotated and scaled), k, v: [B, S, K, H], attn_mask: [B, T, S] bool,
      softcap: attention-logit cap or None.
    Returns:
      [B, T, N, H] in q's dtype; logits and softmax in float32.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(attn_mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    record("attn_probs", probs.reshape(B, N, T, -1))  # [B, N, T, S]: head n = k * G + g
    enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return enc.reshape(B, T, N, H).astype(q.dtype)


def attend_pallas(q, k, v, token_mask, softcap, window, backend):
    """The kernels (`paligemma.kernels.attention`): flash attention, or decode attention for T = 1.

    Args:
      q: [B, T, N, H] (rotated and scaled); k, v: [B, S, K, H]; token_mask: `kernels.TokenMask`;
      window: None or an int32 scalar (`kernels.NO_WINDOW` on global layers); backend: as kernels.
    """
    if token_mask is None:
        raise ValueError("attend: the Pallas kernels need the mask as per-token vectors (token_mask=TokenMask)")
    return kernels.attention(q, k, v, token_mask, window=window, softcap=softcap, backend=backend)


def attend_pallas_sharded(q, k, v, token_mask, softcap, window, backend, mesh):
    """`attend_pallas` under `shard_map` on `mesh`: a Pallas call is opaque to XLA's partitioner,
    which would otherwise gather its inputs onto every device.

    Each device runs the kernel on its examples (data, fsdp) and its query heads (model, when the
    model size divides N). kv heads split alike when the model size divides K; with fewer kv
    heads than devices (replicated, `sharding.kv_cache_spec`) a device's N / model query heads
    all read one kv head (when K divides the model size), which it slices out; otherwise the
    heads stay whole on every device.
    """
    B, _, N, _ = q.shape
    K, model = k.shape[2], mesh.shape["model"]
    batch = BATCH_AXES if B % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    heads = "model" if model > 1 and N % model == 0 and (K % model == 0 or model % K == 0) else None
    kv_heads = heads if K % model == 0 else None
    q_spec, kv_spec, rows = (PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, kv_heads, None),
                             PartitionSpec(batch, None))
    windowed = window is not None  # a traced scalar crosses into shard_map as an argument
    backend = backend or kernels.platform_backend(mesh.devices.flat[0].platform)  # the mesh's, not the host's

    def local(q, k, v, token_mask, window):  # q [B', T, N', H], k, v [B', S, K or K', H]
        if heads and not kv_heads:  # this device's query heads share kv head (first head) // G
            kv_head = jax.lax.axis_index("model") * q.shape[2] // (N // K)
            k, v = (jax.lax.dynamic_slice_in_dim(a, kv_head, 1, axis=2) for a in (k, v))  # [B', S, 1, H]
        return attend_pallas(q, k, v, token_mask, softcap, window if windowed else None, backend)

    in_specs = (q_spec, kv_spec, kv_spec, kernels.TokenMask(*([rows] * 6)), PartitionSpec())
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
        q, k, v, token_mask, jnp.asarray(window if windowed else 0, jnp.int32))


def attend(q, k, v, attn_mask, softcap, policy: Policy, token_mask=None, window=None):
    """Dispatch to `policy.attention`.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H].
      attn_mask: [B, T, S] bool (the XLA path; may be None when `token_mask` is given).
      token_mask: optional `kernels.TokenMask` ([B, T] / [B, S] vectors; the Pallas path needs it).
      window: the sliding window the Pallas path applies to `token_mask` (None: none); the XLA
        path expects it already inside `attn_mask`.
    """
    impl = policy.attention
    if impl == "xla":
        if attn_mask is None:
            attn_mask = kernels.dense(token_mask, window)
        return attend_xla(q, k, v, attn_mask, softcap)
    backend = "interpret" if impl == "pallas_interpret" else None
    if policy.mesh is not None:
        return attend_pallas_sharded(q, k, v, token_mask, softcap, window, backend, policy.mesh)
    return attend_pallas(q, k, v, token_mask, softcap, window, backend)
