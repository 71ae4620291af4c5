"""The prefix-LM attention mask, from big_vision's `mask_ar` and `input_mask`.

`mask_ar[t] = 1` starts a new causal block at token t; tokens with the same cumulative sum
form one fully bidirectional block. PaliGemma gives image, BOS, prefix and "\\n" `mask_ar = 0`
(one bidirectional block) and every suffix token `mask_ar = 1` (causal), so:

    query i sees key j  <=>  cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]
                             and input_mask[i] and input_mask[j]

Padding (`input_mask = False`) never starts a block here, so pads may carry any `mask_ar`
and may sit on either side; with trailing padding (big_vision's layout) this is exactly
big_vision's rule, and left padding (HF's layout) gives the same result as no padding.

Axes: B batch, T query tokens, S key tokens.
"""

import numpy as np


def block_ids(input_mask, mask_ar):
    """[B, T] int: the block each token belongs to, `cumsum(mask_ar)` over real tokens."""
    return np.cumsum(np.asarray(mask_ar) * np.asarray(input_mask, dtype=bool), axis=1)


def make_attn_mask(input_mask, mask_ar):
    """Boolean attention mask.

    Args:
      input_mask: [B, T] bool, True for real tokens.
      mask_ar: [B, T] int, 1 where a new causal block starts.
    Returns:
      [B, T, T] bool, `mask[b, i, j]` = query i may attend to key j.
    """
    input_mask = np.asarray(input_mask, dtype=bool)
    blocks = block_ids(input_mask, mask_ar)  # [B, T]
    visible = blocks[:, None, :] <= blocks[:, :, None]  # [B, T, S]
    return visible & input_mask[:, None, :] & input_mask[:, :, None]


def sliding_window(attn_mask, q_positions, k_positions, window, same_block=None):
    """Restrict a mask to keys fewer than `window` positions behind the query (Gemma 2's local
    layers, HF semantics). Pairs inside one bidirectional block (the prefix) stay unrestricted.

    Args:
      attn_mask: [B, T, S] bool.
      q_positions: [B, T] int token positions of the queries.
      k_positions: [B, S] int token positions of the keys.
      window: int or None (None returns `attn_mask` unchanged).
      same_block: optional [B, T, S] bool, True where query and key share a block.
    Returns:
      [B, T, S] bool.
    """
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
    """RoPE positions: real tokens count 0, 1, 2, ... skipping padding (pads get 0).

    big_vision uses `cumsum(input_mask) - 1` for decoding; using it for the full forward too
    makes the result independent of where the padding sits.
    """
    input_mask = np.asarray(input_mask, dtype=bool)
    return np.maximum(np.cumsum(input_mask, axis=1) - 1, 0)  # [B, T]
