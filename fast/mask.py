"""The prefix-LM attention mask in JAX (mirrors `paligemma.ref.mask`; see it for the rules).

Axes: B batch, T query tokens, S key tokens.
"""

import jax.numpy as jnp


def block_ids(input_mask, mask_ar):
    """[B, T]: `cumsum(mask_ar)` over real tokens (padding never starts a block)."""
    return jnp.cumsum(mask_ar * input_mask.astype(mask_ar.dtype), axis=1)


def make_attn_mask(input_mask, mask_ar):
    """[B, T, T] bool: query i sees key j iff block[j] <= block[i] and both are real tokens."""
    blocks = block_ids(input_mask, mask_ar)  # [B, T]
    visible = blocks[:, None, :] <= blocks[:, :, None]  # [B, T, S]
    return visible & input_mask[:, None, :] & input_mask[:, :, None]


def sliding_window(attn_mask, q_positions, k_positions, window, same_block=None):
    """Keys fewer than `window` positions behind the query (prefix pairs exempt); None: unchanged."""
    if window is None:
        return attn_mask
    near = (q_positions[:, :, None] - k_positions[:, None, :]) < window  # [B, T, S]
    if same_block is not None:
        near = near | same_block
    return attn_mask & near


def same_block(input_mask, mask_ar):
    """[B, T, T] bool: tokens i and j lie in the same bidirectional block."""
    blocks = block_ids(input_mask, mask_ar)  # [B, T]
    return blocks[:, :, None] == blocks[:, None, :]


def positions_from_mask(input_mask):
    """RoPE positions: real tokens count 0, 1, 2, ... skipping padding (pads get 0)."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)  # [B, T]
