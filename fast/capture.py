"""Named activations from the compiled model: `paligemma.ref.capture`'s names, from `paligemma.fast`.

    acts = fast.capture.forward(params, config, images, tokens, mask_ar, input_mask, policy=FLOAT32)
    acts["llm/block_03/attn_out"]              # np.ndarray [B, P+T, D], float32

The model functions report into `paligemma.ref.capture.record` as the reference's do; under
jit they run once, at trace time, with tracers. This module's jitted function turns a recorder
on while it traces the ordinary forward body (`model.forward_body`), so what the recorder
collected becomes extra outputs of the compiled program. A `lax.scan` body cannot hand its
intermediate values out that way, so the layers run as a Python loop here (`unstack_layers`
for the language model; `siglip.encode` switches by itself while a recorder is on). The
ordinary compiled `forward` traces with no recorder on: every `record` is then the identity,
and its program is unchanged. (So call this `forward`, not `paligemma.fast.forward` inside
`ref.capture.recording()`: that would trace the ordinary program with a recorder on and leave
tracers in it.)
"""

import dataclasses

import numpy as np

from paligemma.ref import capture
from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.model import validate_inputs

from . import layout, model
from .policy import FLOAT32, Policy


def _forward(params, images, tokens, mask_ar, input_mask, config, policy, names, probs):
    with capture.recording(names, probs) as recorder:
        params = layout.unstack_layers(params)  # per-layer slices, an unrolled loop
        model.forward_body(params, images, tokens, mask_ar, input_mask, config, policy)
    return recorder.values


_forward = model.jit_model(_forward, ("config", "policy", "names", "probs"))


def forward(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None, policy: Policy = FLOAT32,
            names=None, probs=False):
    """Every named activation of `paligemma.fast.forward` on these inputs.

    Args:
      params, config, images, tokens, mask_ar, input_mask, policy: as `paligemma.fast.forward`
        (`policy.remat` is ignored: no backward pass here).
      names: stage names to keep (default: all, see `paligemma.ref.capture.stage_names`).
      probs: keep the attention probabilities too (the XLA attention only: the Pallas kernels
        never form them, so with `attention_impl="pallas*"` those names are absent).
    Returns:
      dict name -> np.ndarray, in pipeline order, in the policy's compute dtype (logits float32).
    """
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    policy = dataclasses.replace(policy, remat="none")  # jax.checkpoint would trace the layers again, inside
    names = None if names is None else tuple(sorted(names))
    values = _forward(params, images, tokens.astype("int32"), mask_ar.astype("int32"), input_mask, config, policy,
                      names, probs)
    order = {name: i for i, name in enumerate(capture.stage_names(config, probs=True))}
    return {name: np.asarray(values[name]) for name in sorted(values, key=lambda n: order.get(n, len(order)))}
