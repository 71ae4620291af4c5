"""The whole fast model with attention_impl="pallas_interpret" against "xla" and against paligemma.ref.

Three tiny models cover the kernels' uses in the model: MQA with a SigLIP head dim of 72
(the vision tower's attention goes through the flash kernel too), Gemma 2 style GQA with
attention softcap and alternating sliding-window layers (the window a runtime scalar in the
layer scan), and query scaling by width / heads. Prompts have prefixes, suffixes and right
padding; padding queries are the only rows where the kernels (zeros) and XLA (a uniform
average) differ, so logits are compared at real tokens only, which is all the model promises.
Generation runs prefill through the flash kernel over a 128-slot-aligned cache and every
further token through the decode kernel.
"""

import dataclasses

import numpy as np
import pytest

from paligemma import fast, ref
from paligemma.fast.policy import Policy
from paligemma.parity.tolerances import FAST_FLOAT32, SAME_ROUNDING_FLOAT32, assert_close
from paligemma.ref.config import VisionConfig

XLA = Policy(attention_impl="xla")
KERNELS = Policy(attention_impl="pallas_interpret")


def _config(name):
    if name == "mqa-vision72":
        config = ref.get_config("tiny-paligemma")
        return dataclasses.replace(config, vision=VisionConfig(image_size=14, patch_size=7, width=144, depth=1,
                                                               mlp_dim=32, num_heads=2), name=name)
    if name == "gemma2-window":
        return ref.get_config("tiny-paligemma2", sliding_window=3)
    return ref.get_config("tiny-paligemma2-28b")


def _prompt(config, seed):
    """B = 3 prompts of 9 tokens: prefixes of 2-5 tokens, suffixes, 0-3 padding tokens on the right."""
    rng = np.random.default_rng(seed)
    B, T = 3, 9
    R = config.vision.image_size
    images = rng.uniform(-1, 1, (B, R, R, 3))
    tokens = rng.integers(1, config.llm.vocab_size, (B, T))
    lengths, prefixes = np.array([9, 7, 6]), np.array([3, 5, 2])
    input_mask = np.arange(T)[None] < lengths[:, None]
    mask_ar = (np.arange(T)[None] >= prefixes[:, None]).astype(np.int64)
    return images, np.where(input_mask, tokens, config.pad_id), mask_ar, input_mask


@pytest.mark.parametrize("name", ["mqa-vision72", "gemma2-window", "gemma2-27b-scaling"])
def test_pallas_interpret_model_matches_xla_and_the_reference(name):
    config = _config(name)
    params64 = ref.init_params(config, seed=3, dtype=np.float64, random_norms=True)
    params = ref.cast_params(params64, np.float32)
    prompt = _prompt(config, seed=7)
    real = prompt[3]  # [B, T] logits are compared at real tokens

    gold = ref.forward(params64, config, *prompt)  # [B, T, V]
    with_xla = np.asarray(fast.forward(params, config, *prompt, policy=XLA))
    with_kernels = np.asarray(fast.forward(params, config, *prompt, policy=KERNELS))
    assert np.isfinite(with_kernels).all()
    assert_close(with_kernels[real], with_xla[real], SAME_ROUNDING_FLOAT32, f"{name}: pallas_interpret vs xla logits")
    assert_close(with_kernels[real], gold[real], FAST_FLOAT32, f"{name}: pallas_interpret vs ref float64")

    steps = 4
    greedy_xla = fast.generate(params, config, *prompt, max_new_tokens=steps, policy=XLA)
    greedy_kernels = fast.generate(params, config, *prompt, max_new_tokens=steps, policy=KERNELS)
    np.testing.assert_array_equal(greedy_kernels.tokens, greedy_xla.tokens)
    assert_close(greedy_kernels.logprobs, greedy_xla.logprobs, SAME_ROUNDING_FLOAT32, f"{name}: greedy log-probabilities")
