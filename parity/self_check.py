"""`paligemma parity self`: the project's own health check, stage by stage.

For a config, seeded random parameters (norms drawn away from identity, so a lost `1 + scale`
shows) and seeded inputs with a prefix and a causal suffix: a float64 golden from
`paligemma.ref`, then `paligemma.fast` in float32 with XLA attention and with the Pallas
kernels in interpret mode, each compared with `compare.check` at the float32 tolerance. The
attention probabilities are compared where they exist (XLA; the kernels never form them).
"""

import numpy as np

from paligemma.ref.config import PRESETS, get_config
from paligemma.ref.params import cast_params, init_params

from . import compare, golden

TINY = tuple(name for name in PRESETS if name.startswith("tiny-"))
IMPLS = ("xla", "pallas_interpret")


def self_check(config, seed=0, impls=IMPLS, batch=2, text_len=8):
    """ref (float64) vs fast (float32) for each attention implementation.

    Args:
      config: a `PaliGemmaConfig` or a preset name.
      seed: parameters and inputs.
      impls: `Policy.attention_impl` values to run.
      batch, text_len: the input's shape.
    Returns:
      list of (label, `compare.Report`).
    """
    from paligemma.fast import capture as fast_capture
    from paligemma.fast.policy import Policy

    config = get_config(config) if isinstance(config, str) else config
    params = init_params(config, seed=seed, dtype=np.float64, random_norms=True)
    inputs = golden.random_inputs(config, seed, batch, text_len)
    gold = golden.make_golden(params, config, *inputs, probs=True,
                              source={"kind": "random", "config": config.name, "seed": seed})
    gold = golden.Activations(gold.arrays, gold.manifest, f"ref float64 ({config.name})")
    params32 = cast_params(params, np.float32)
    reports = []
    for impl in impls:
        acts = fast_capture.forward(params32, config, *inputs, policy=Policy(attention_impl=impl), probs=True)
        label = f"fast float32, attention {impl}"
        reports.append((label, compare.check(gold, golden.Activations(acts, None, label), dtype="float32")))
    return reports
