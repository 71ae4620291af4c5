"""LoRA adapters on the language model's attention and MLP weights.

A weight W: [in, out] (here with head, pair and layer axes around those) is used as
`W + (alpha / rank) A B` with A: [in, R] and B: [R, out] trainable and W frozen. B starts at
zero, so the first forward pass is the base model's exactly; `merge` folds the adapters back
into plain parameters that `paligemma.ref.save` writes.

Which axes are "in" and "out", per weight (one layer; R is the rank, C the pair of k/v or
gate/up projections, which get separate adapters):

    q_einsum/w        [N, D, H]     A [D, R]      B [R, N, H]     "DR,RNH->NDH"
    kv_einsum/w       [C, K, D, H]  A [C, D, R]   B [C, R, K, H]  "CDR,CRKH->CKDH"
    attn_vec_einsum/w [N, H, D]     A [N, H, R]   B [R, D]        "NHR,RD->NHD"
    gating_einsum     [C, D, F]     A [C, D, R]   B [C, R, F]     "CDR,CRF->CDF"
    linear            [F, D]        A [F, R]      B [R, D]        "FR,RD->FD"

Adapters are a nested dict with the weights' paths, each leaf a `{"lora_a", "lora_b"}` pair,
stacked on the layer axis L like the weights. In training the adapters are applied beside the
frozen weights, `x W + (alpha / rank) (x A) B`, as PEFT does: `attach` makes each adapted weight a
`fast.linear.LoRA`, a kind of weight the one product seam (`linear.einsum`) multiplies, so the
model's own layers run it. Merging the adapters into W inside the step would make XLA compute every
adapted weight's full gradient (`merge` is for export only).
"""

import jax.numpy as jnp
import numpy as np

from paligemma.ref.config import GemmaConfig
from paligemma.ref.params import flatten, unflatten

from . import gemma
from .linear import LoRA
from .policy import Policy

# weight path under llm/layers -> (einsum of one layer, A's axes, B's axes, fan-in axes of W); the
# letters are W's axes, R the rank.
TARGETS = {
    "attn/q_einsum/w": ("DR,RNH->NDH", "DR", "RNH", "D"),
    "attn/kv_einsum/w": ("CDR,CRKH->CKDH", "CDR", "CRKH", "D"),
    "attn/attn_vec_einsum/w": ("NHR,RD->NHD", "NHR", "RD", "NH"),
    "mlp/gating_einsum": ("CDR,CRF->CDF", "CDR", "CRF", "D"),
    "mlp/linear": ("FR,RD->FD", "FR", "RD", "F"),
}
_W_AXES = {name: spec[0].split("->")[1] for name, spec in TARGETS.items()}


def init_adapters(llm_layers, rank, seed=0):
    """Adapters for every target weight: A ~ N(0, 1/fan_in), B = 0 (so W + A B = W).

    Args:
      llm_layers: the `llm/layers` subtree (stacked [L, ...] arrays); rank: R >= 1.
    Returns:
      nested dict `{"attn": {"q_einsum": {"w": {"lora_a": [L, ...], "lora_b": [L, ...]}}}, ...}`
      of float32 NumPy arrays.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: expected an integer >= 1, got {rank!r}")
    flat, out = flatten(llm_layers), {}
    rng = np.random.default_rng(seed)
    for name, (_, a_axes, b_axes, fan_in) in TARGETS.items():
        shape = np.shape(flat[name])
        size = dict(zip("L" + _W_AXES[name], shape), R=rank)
        fan = int(np.prod([size[a] for a in fan_in]))
        out[f"{name}/lora_a"] = rng.normal(0, fan**-0.5, [size[a] for a in "L" + a_axes]).astype(np.float32)
        out[f"{name}/lora_b"] = np.zeros([size[a] for a in "L" + b_axes], np.float32)
    return unflatten(out)


def delta(adapter, name, scale, stacked=True):
    """`scale * A B` in W's layout, float32 (stacked: with the leading L axis)."""
    equation = TARGETS[name][0]
    if stacked:
        inputs, output = equation.split("->")
        equation = ",".join("L" + s for s in inputs.split(",")) + "->L" + output
    a, b = adapter["lora_a"], adapter["lora_b"]
    xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
    return scale * xp.einsum(equation, xp.asarray(a, np.float32), xp.asarray(b, np.float32))


def merge_layers(llm_layers, adapters, scale, stacked=True):
    """`llm_layers` with every adapted weight replaced by `W + scale A B` (float32)."""
    flat, flat_adapters = dict(flatten(llm_layers)), flatten(adapters)
    for name in TARGETS:
        pair = {"lora_a": flat_adapters[f"{name}/lora_a"], "lora_b": flat_adapters[f"{name}/lora_b"]}
        w = flat[name]
        xp = np if isinstance(w, np.ndarray) and isinstance(pair["lora_a"], np.ndarray) else jnp
        flat[name] = xp.asarray(w).astype(np.float32) + delta(pair, name, scale, stacked)
    return unflatten(flat)


def merge(params, adapters, scale):
    """Plain parameters (the whole `{"img", "llm"}` tree) with the adapters folded in, ready for
    `paligemma.ref.save`; adapted weights come out float32, the others unchanged.

    Args:
      params: the base parameters; adapters: `init_adapters`'s tree (trained); scale: alpha / rank.
    """
    llm = dict(params["llm"], layers=merge_layers(params["llm"]["layers"], adapters, scale))
    return dict(params, llm=llm)


def attach(llm_layers, adapters, scale):
    """`llm_layers` with every adapted weight W replaced by `LoRA(W, A, B, scale)`, which
    `fast.linear.einsum` applies as `x W + scale (x A) B` (never forming W + A B). Stacked
    layers stay stacked: the [L, ...] leaves of a `LoRA` scan like plain weights."""
    flat, flat_adapters = dict(flatten(llm_layers)), flatten(adapters)
    for name in TARGETS:
        flat[name] = LoRA(flat[name], flat_adapters[f"{name}/lora_a"], flat_adapters[f"{name}/lora_b"], scale)
    return unflatten(flat)


def adapted(llm, adapters, scale):
    """The `llm` subtree with `attach`ed layers, for `gemma.transformer`."""
    return {**llm, "layers": attach(llm["layers"], adapters, scale)}


def transformer(params, adapters, scale, x, positions, attn_mask, config: GemmaConfig, policy: Policy, rope,
                local_mask=None, outputs_from=0):
    """`gemma.transformer` (no KV cache) on `adapted(params, adapters, scale)`: pre-logits
    [B, T - outputs_from, D]."""
    llm = adapted(params, adapters, scale)
    return gemma.transformer(llm, x, positions, attn_mask, config, policy, rope, local_mask,
                             outputs_from=outputs_from)[0]
