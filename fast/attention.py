"""The one place that chooses how attention is computed (`Policy.attention_impl`).

"xla": einsums XLA fuses; the `[T, S]` logits are materialised. The Pallas kernels (a later
issue) register here with the same signature, so the model code never changes.

Axes: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim.
"""

import jax
import jax.numpy as jnp

from .policy import Policy

# big_vision masks with this finite value, not -inf: a row with no visible key is uniform.
BIG_NEG = -2.3819763e38


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
    enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return enc.reshape(B, T, N, H).astype(q.dtype)


IMPLEMENTATIONS = {"xla": attend_xla}


def attend(q, k, v, attn_mask, softcap, policy: Policy):
    """Dispatch to `policy.attention_impl`."""
    return IMPLEMENTATIONS[policy.attention_impl](q, k, v, attn_mask, softcap)
