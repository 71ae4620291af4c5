"""Named activations: the model functions report each stage here; a recorder, when one is on, keeps them.

    from paligemma.ref import capture
    with capture.recording() as rec:
        logits = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    rec.values["llm/block_03/attn_out"]        # [B, P+T, D]

With no recorder on, `record(name, value)` returns `value` and does nothing else, so the model
code reads as before and costs nothing. `paligemma.fast` reports the same names at trace time
(see fast/capture.py); `paligemma.parity` compares them stage by stage.

The names, in pipeline order (`stage_names(config)`); NN is the layer index, two digits:

    img/embed                  [B, P, W]     patch embedding + position embedding
    img/block_NN/attn_probs    [B, N, P, P]  softmax of the attention logits (only with probs=True)
    img/block_NN/attn_out      [B, P, W]     attention branch output (out projection, before the residual add)
    img/block_NN/mlp_out       [B, P, W]     MLP branch output (before the residual add)
    img/block_NN/out           [B, P, W]     the residual stream after the block
    img/encoder_norm           [B, P, W]     after the final LayerNorm (big_vision `pre_logits`)
    img/head                   [B, P, D]     projected to the language model's width
    llm/embed                  [B, P+T, D]   the joined input [image ; sqrt(D) * text]
    llm/block_NN/attn_probs    [B, N, P+T, P+T]  query head n reads kv head n // G (only with probs=True)
    llm/block_NN/attn_out      [B, P+T, D]   attention branch output (o projection, before Gemma 2's post-norm)
    llm/block_NN/mlp_out       [B, P+T, D]   MLP branch output (before Gemma 2's post-norm)
    llm/block_NN/out           [B, P+T, D]   the residual stream after the layer
    llm/final_norm             [B, P+T, D]   after the final RMSNorm
    logits                     [B, T, V]     text positions only, after the final softcap

A value recorded twice under one name (decoding runs the layers once per step) keeps the last.
"""

import contextlib
import contextvars
import dataclasses

_RECORDER = contextvars.ContextVar("paligemma_recorder", default=None)
_SCOPE = contextvars.ContextVar("paligemma_scope", default="")

PROBS = "attn_probs"
BLOCK_STAGES = ("attn_out", "mlp_out", "out")


def block_name(tower, i):
    """`img/block_03`: the scope of layer `i` of a tower ("img" or "llm")."""
    return f"{tower}/block_{i:02d}"


def stage_names(config, probs=False):
    """Every stage name for a `PaliGemmaConfig`, in the order the forward pass produces them.

    Args:
      config: the model's `PaliGemmaConfig`.
      probs: include the `.../attn_probs` stages.
    Returns:
      tuple of str.
    """
    per_block = ((PROBS,) if probs else ()) + BLOCK_STAGES
    names = ["img/embed"]
    names += [f"{block_name('img', i)}/{s}" for i in range(config.vision.depth) for s in per_block]
    names += ["img/encoder_norm", "img/head", "llm/embed"]
    names += [f"{block_name('llm', i)}/{s}" for i in range(config.llm.depth) for s in per_block]
    return tuple(names + ["llm/final_norm", "logits"])


@dataclasses.dataclass
class Recorder:
    """What one `recording()` keeps.

    names: the names to keep (None: every name); probs: keep `.../attn_probs` as well;
    values: name -> the recorded array, in the order recorded.
    """

    names: frozenset | None = None
    probs: bool = False
    values: dict = dataclasses.field(default_factory=dict)

    def wants(self, name):
        if self.names is not None:
            return name in self.names
        return self.probs or not name.endswith(PROBS)


@contextlib.contextmanager
def recording(names=None, probs=False):
    """Turns recording on for the enclosed calls; yields the `Recorder`.

    Args:
      names: an iterable of stage names to keep (default: all; listing an `attn_probs` name
        keeps it whatever `probs` says).
      probs: keep the attention probabilities too (they are [B, N, T, S] per layer: large).
    """
    recorder = Recorder(None if names is None else frozenset(names), probs)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def active():
    """True while a recorder is on (fast/ uses it to leave `lax.scan` for a Python loop)."""
    return _RECORDER.get() is not None


@contextlib.contextmanager
def scope(prefix):
    """Names recorded inside get `prefix/` in front (`with scope("llm/block_03"): ...`)."""
    token = _SCOPE.set(f"{_SCOPE.get()}{prefix}/")
    try:
        yield
    finally:
        _SCOPE.reset(token)


def record(name, value):
    """Keeps `value` under `name` (inside the current scope) if a recorder wants it; returns `value`."""
    recorder = _RECORDER.get()
    if recorder is not None:
        full = _SCOPE.get() + name
        if recorder.wants(full):
            recorder.values[full] = value
    return value
