"""The worked example of docs/porting.md: plant a porting bug, let `check` find the stage.

    python -m paligemma.parity.planted_bugs [--bug rope-interleaved] [--config tiny-paligemma2]

A "port" here is the NumPy reference run in float32 with one function swapped for a plausible
mistake (the mistakes people make when they port PaliGemma, docs/architecture.md's traps); its
named activations are recorded the way a port would dump them, and `compare.check` is asked
which stage breaks first. The clean float32 run must pass; each bug must be named at the stage
listed in `BUGS`. tests/test_parity_tools.py runs every one of them.
"""

import argparse
import contextlib
import math

import numpy as np

from paligemma.ref import gemma, siglip
from paligemma.ref.config import get_config
from paligemma.ref.ops import BIG_NEG, einsum, softcap, softmax
from paligemma.ref.params import cast_params, init_params

from . import compare, golden


def rope_interleaved(x, positions, base=10_000.0):
    """RoPE on interleaved pairs (x[0::2], x[1::2]), as GPT-J and some Llama ports lay it out."""
    H = x.shape[-1]
    theta = positions[..., None].astype(np.float64) / base ** (2.0 * np.arange(H // 2) / H)  # [B, T, H/2]
    sin, cos = np.sin(theta)[:, :, None, :].astype(x.dtype), np.cos(theta)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, T, N, H/2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def rms_norm_plain_scale(x, scale, eps=1e-6):
    """RMSNorm times `scale` instead of `(1 + scale)`."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale).astype(x.dtype)


def gelu_erf(x):
    """The exact (erf) GELU where SigLIP uses the tanh approximation."""
    erf = np.frompyfunc(math.erf, 1, 1)
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)).astype(x.dtype))).astype(x.dtype)


def embed_tokens_unscaled(params, tokens, dtype):
    """Text embeddings without the sqrt(D) factor."""
    return params["input_embedding"][tokens].astype(dtype)  # [B, T, D]


def attend_kv_head_modulo(q, k, v, attn_mask, config):
    """GQA with query head n reading kv head n % K (instead of n // G)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    heads = np.arange(N) % K  # [N]
    logits = softcap(einsum("BTNH,BSNH->BNTS", q, k[:, :, heads]), config.attn_logits_softcap)  # [B, N, T, S]
    probs = softmax(np.where(attn_mask[:, None], logits, BIG_NEG), axis=-1)  # [B, N, T, S]
    return einsum("BNTS,BSNH->BTNH", probs, v[:, :, heads])  # [B, T, N, H]


# name -> (module, attribute, replacement, the stage `check` must name first, what the bug is)
BUGS = {
    "rope-interleaved": (gemma, "apply_rope", rope_interleaved, "llm/block_00/attn_out",
                         "RoPE rotating interleaved pairs instead of the two halves"),
    "no-one-plus-scale": (gemma, "rms_norm", rms_norm_plain_scale, "llm/block_00/attn_out",
                          "Gemma's RMSNorm multiplying by scale, not (1 + scale)"),
    "gelu-erf": (siglip, "gelu_tanh", gelu_erf, "img/block_00/mlp_out",
                 "SigLIP's MLP with the exact GELU instead of the tanh approximation"),
    "text-unscaled": (gemma, "embed_tokens", embed_tokens_unscaled, "llm/embed",
                      "text embeddings not multiplied by sqrt(D)"),
    "kv-head-modulo": (gemma, "attend", attend_kv_head_modulo, "llm/block_00/attn_out",
                       "query head n reading kv head n % K instead of n // G"),
}


@contextlib.contextmanager
def planted(bug):
    """The reference with `BUGS[bug]` swapped in for the enclosed calls (None: no bug)."""
    if bug is None:
        yield
        return
    module, attribute, replacement = BUGS[bug][:3]
    original = getattr(module, attribute)
    setattr(module, attribute, replacement)
    try:
        yield
    finally:
        setattr(module, attribute, original)


def port_activations(gold: golden.Activations, params, config, bug=None):
    """What a float32 port with `bug` would dump: the reference's stages on the golden's inputs."""
    inputs = [gold.arrays[k] for k in golden.INPUTS]
    with planted(bug):
        stages = golden.record_stages(cast_params(params, np.float32), config, *inputs)
    return golden.Activations(stages, None, f"float32 port, {bug or 'no bug'}")


def run(bug, config_name="tiny-paligemma2", seed=0):
    """The golden (float64, seeded weights with norms away from identity), then `check` of the port.

    Returns:
      `compare.Report`.
    """
    config = get_config(config_name)
    params = init_params(config, seed=seed, dtype=np.float64, random_norms=True)
    gold = golden.make_golden(params, config, *golden.random_inputs(config, seed))
    gold = golden.Activations(gold.arrays, gold.manifest, f"golden ({config_name}, seed {seed})")
    return compare.check(gold, port_activations(gold, params, config, bug), dtype="float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", choices=sorted(BUGS), action="append", help="default: the clean port, then every bug")
    parser.add_argument("--config", default="tiny-paligemma2")
    args = parser.parse_args(argv)
    for bug in args.bug or [None, *BUGS]:
        report = run(bug, args.config)
        print(f"## {bug or 'no bug'}" + (f": {BUGS[bug][4]}" if bug else "") + f"\n{report.format_table()}\n")


if __name__ == "__main__":
    main()
