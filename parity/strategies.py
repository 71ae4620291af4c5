"""Hypothesis strategies for PaliGemma configs and inputs.

Porters can drive their own implementation with the same spaces this project tests itself
on: `configs()` draws small but structurally complete models (MQA/GQA/MHA, head dims,
softcaps, post-norms, query scalings, sliding windows, image and patch sizes), `prompts()`
draws a batch of left-aligned prompts with padding and a forced suffix, `video_prompts()` the
same with F frames (or images) per example.

Head dims are mostly tiny, but 72 (SigLIP So400m's head dim, not a power of two, the case
attention kernels tile awkwardly) is drawn one time in four for the vision tower and one in
five for the language model.
"""

import numpy as np
from hypothesis import strategies as st

from paligemma.ref.config import GemmaConfig, PaliGemmaConfig, VisionConfig


@st.composite
def vision_configs(draw, max_depth=2):
    patch = draw(st.sampled_from([2, 3, 4, 7]))
    grid = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 6, 8, 72]))
    return VisionConfig(image_size=patch * grid, patch_size=patch, width=heads * head_dim,
                        depth=draw(st.integers(1, max_depth)), mlp_dim=draw(st.sampled_from([8, 24])),
                        num_heads=heads)


@st.composite
def gemma_configs(draw, max_depth=3, vocab_size=64):
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    gemma2 = draw(st.booleans())
    cap = st.one_of(st.none(), st.floats(0.5, 60.0))
    return GemmaConfig(
        width=draw(st.sampled_from([8, 16, 24])),
        depth=draw(st.integers(1, max_depth)),
        mlp_dim=draw(st.sampled_from([8, 32])),
        num_heads=kv_heads * group,
        num_kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([2, 4, 8, 12, 72])),
        vocab_size=vocab_size,
        query_scaling=draw(st.sampled_from(["rsqrt_head_dim", "rsqrt_emb_per_head"])),
        attn_logits_softcap=draw(cap) if gemma2 else None,
        final_logits_softcap=draw(cap) if gemma2 else None,
        post_norms=gemma2 or draw(st.booleans()),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 12))),
    )


@st.composite
def configs(draw, max_depth=3, vocab_size=64):
    """Small `PaliGemmaConfig`s covering every structural option of the released models."""
    return PaliGemmaConfig(draw(vision_configs(max_depth=min(max_depth, 2))),
                           draw(gemma_configs(max_depth=max_depth, vocab_size=vocab_size)),
                           name="hypothesis")


@st.composite
def prompts(draw, config: PaliGemmaConfig, max_batch=3, max_len=8):
    """A batch `(images, tokens, mask_ar, input_mask)` of left-aligned prompts.

    Each example has a prefix (`mask_ar = 0`, at least one token), an optional forced suffix
    (`mask_ar = 1`) and right padding (`input_mask = False`, `mask_ar = 1` as big_vision pads).
    """
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    images = rng.uniform(-1.0, 1.0, (B, R, R, 3))
    tokens = rng.integers(0, config.llm.vocab_size, (B, T))
    mask_ar = np.ones((B, T), dtype=np.int64)
    input_mask = np.zeros((B, T), dtype=bool)
    for b in range(B):
        length = draw(st.integers(1, T))
        prefix = draw(st.integers(1, length))
        mask_ar[b, :prefix] = 0
        input_mask[b, :length] = True
    tokens = np.where(input_mask, tokens, config.pad_id)
    return images, tokens, mask_ar, input_mask


@st.composite
def video_prompts(draw, config: PaliGemmaConfig, max_frames=3, max_batch=3, max_len=8):
    """`prompts` with F frames per example: images [B, F, R, R, 3] (a video or a multi-image
    prompt, F x P image tokens), F drawn from 1..max_frames."""
    images, tokens, mask_ar, input_mask = draw(prompts(config, max_batch=max_batch, max_len=max_len))
    F = draw(st.integers(1, max_frames))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    frames = rng.uniform(-1.0, 1.0, (images.shape[0], F) + images.shape[1:])  # [B, F, R, R, 3]
    return frames, tokens, mask_ar, input_mask
