"""Every numerical tolerance the project compares with, in one place, each with its reasoning.

Relative error. A comparison is "relative": the largest absolute difference divided by the
largest magnitude of the expected values (`relative_error`). Elementwise relative errors are
meaningless for logits, many of which sit near zero; the largest logit is the scale a reader
cares about (a greedy choice, a log-probability) and the scale rounding errors grow with.

Machine epsilons (spacing of numbers just above 1; the unit roundoff u is half of it):
  float64   2.2e-16        float32   1.19e-7        bfloat16  7.8e-3 (8 significant bits)

How errors grow. A dot product of length n carries about sqrt(n) * u of random rounding error
relative to its magnitude (n * u at worst); the model chains such products (patch 588, vision
width 1152 / mlp 4304, LM width D 2048-4608, mlp F 9216-36864, attention over S keys), each
layer re-normalised by LayerNorm / RMSNorm, so the relative error of the logits is a modest
multiple of u rather than growing with depth. Softmax and the final projection do not amplify
it (the softmax's Jacobian is bounded by 1/2 in the logits' absolute error; `c tanh(x / c)` has
slope <= 1), but a softmax does turn an absolute error of attention logits into a relative
error of the probabilities, which is why attention logits are always float32.

Sensitivity. That modest multiple is not the same for every model. Tiny random models, as the
property tests draw them (width 8, one head of dim 2, post-norms that rescale a branch whose
output nearly cancelled), amplify rounding up to ~100x more than others, so any fixed bound is
either loose for most models or flaky for a few. We therefore measure how sensitive each
model is, on each input, to a relative perturbation the size of bfloat16's unit roundoff:

    sensitivity = relative_error(ref.forward(weights rounded to bfloat16), ref.forward(float64 weights))

(the reference's own bfloat16 path, float32 activations). Over the hypothesis space it runs
from 1.6e-3 to 0.24 (median 1.1e-2; the tiny presets 4e-3 to 1e-2). Float32 rounding is the
same kind of perturbation 2^16 times smaller, and bfloat16 activations are the same size of
perturbation applied elsewhere, so errors divided by the sensitivity are tightly bounded (fast
float32: at most 2.5e-4, i.e. 8 float32 unit roundoffs per unit of bfloat16 sensitivity; fast
bfloat16: at most 4.9x) where raw errors spread over two decades. A tolerance is
`max(rel, per_sensitivity * sensitivity)`, capped at `ceiling`: `rel` for ordinarily
conditioned comparisons, proportionally more for ill-conditioned draws, never more than the
ceiling (so a broken sensitivity cannot make a bound vacuous).

The measured values quoted below are maxima over the property-based runs of
tests/test_fast_parity.py (run under the hypothesis "thorough" profile with PARITY_REPORT set);
each bound keeps a margin of 2-4x on the ratio to the sensitivity and ~10x on the floor, so the
tests do not flake, while staying far below the effect of a real bug (a wrong RoPE table, a
swapped GQA head, a missing `1 + scale` move logits by 1e-2 to 1 relative).
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A named bound on `relative_error`, and why it is what it is.

    `bound(sensitivity)` = min(ceiling, max(rel, per_sensitivity * sensitivity)); with the
    default `per_sensitivity = 0` it is just `rel`.
    """

    name: str
    rel: float
    why: str
    per_sensitivity: float = 0.0
    ceiling: float = math.inf

    def bound(self, sensitivity=0.0):
        return min(self.ceiling, max(self.rel, self.per_sensitivity * float(sensitivity)))

    def __float__(self):
        return float(self.rel)


FLOAT64_EXACT = Tolerance("FLOAT64_EXACT", 1e-10, (
    "float64 vs float64 of the same mathematics in another order (cached vs uncached decoding, "
    "batched vs alone, padding moved): epsilon 2.2e-16 times sqrt(n) ~ 100 per dot product and a "
    "few dozen chained operations gives ~1e-13; 1e-10 leaves 1000x while a 1e-6 effect (an eps "
    "in the wrong place) still fails."))

FAST_FLOAT32 = Tolerance("FAST_FLOAT32", 1e-5, (
    "paligemma.fast in float32 (parameters and activations) vs paligemma.ref in float64, logits "
    "relative to the largest |logit|. Float32 unit roundoff 6e-8 times the sqrt(n) growth of each "
    "matmul and a handful of chained layers: measured at most 1.4e-6 wherever the sensitivity is "
    "below 1e-2 (half the draws), so 1e-5 (~80 float32 epsilons) there; ill-conditioned draws "
    "scale with the sensitivity, measured error / sensitivity <= 2.5e-4, bound 1e-3 x sensitivity "
    "(largest raw error seen 1.0e-5 at sensitivity 0.24), never above 2e-4."),
    per_sensitivity=1e-3, ceiling=2e-4)

REF_FLOAT32 = Tolerance("REF_FLOAT32", 1e-5, (
    "paligemma.ref run on float32 parameters (float32 activations) vs the same in float64: the "
    "same reasoning as FAST_FLOAT32, for the presets (fixed, ordinarily conditioned)."))

SAME_ROUNDING_FLOAT32 = Tolerance("SAME_ROUNDING_FLOAT32", 2e-5, (
    "two float32 computations of the same already-rounded inputs (fast vs ref, both on bfloat16 "
    "parameters with float32 activations and big_vision's bfloat16 cast points): each is within "
    "FAST_FLOAT32 of the exact result on those parameters, so they are within twice that of each "
    "other; a disagreement about where bfloat16 rounding happens (`1 + scale`, the sqrt(D) "
    "embedding scale, HF's legacy image rounding) shows as ~1e-3."),
    per_sensitivity=2e-3, ceiling=4e-4)

FLOAT32_REORDERED = Tolerance("FLOAT32_REORDERED", 1e-5, (
    "the same float32 computation in another order or fusion (remat's recomputation in the "
    "backward pass): each side is a float32 rounding of the same function, within FAST_FLOAT32 "
    "of it, so the same bound applies; measured on CPU: loss and forward identical, gradients "
    "within 5e-7. A remat bug (a layer recomputed from the wrong inputs, a gradient cut) "
    "moves gradients by O(1)."), per_sensitivity=1e-3, ceiling=2e-4)

HF_FLOAT32 = Tolerance("HF_FLOAT32", 1e-5, (
    "Hugging Face transformers (torch, float32) vs paligemma.ref in float32: two independent "
    "float32 implementations, each ~1e-6 from exact on the fixed test models; measured ~5e-7."))

GRADIENT_FLOAT32 = Tolerance("GRADIENT_FLOAT32", 1e-4, (
    "the float32 gradient of a cross-entropy through paligemma.fast, checked along its own "
    "direction g against a float64 central difference of paligemma.ref (step 1e-4, truncation "
    "error ~1e-8): backpropagation chains about twice the forward's operations and sums "
    "per-parameter contributions over every position, so its relative error is a few times the "
    "forward's."), per_sensitivity=1e-2, ceiling=2e-3)

BFLOAT16_FAST = Tolerance("BFLOAT16_FAST", 2e-2, (
    "paligemma.fast's BFLOAT16 policy (bfloat16 parameters, activations between operations and "
    "KV cache; norms, softmax and logits in float32) vs paligemma.ref in float64 on the unrounded "
    "parameters. bfloat16 unit roundoff 3.9e-3: every weight and every activation is rounded, "
    "which is the sensitivity's perturbation (weights only) applied about twice over; measured "
    "error / sensitivity median 1.4, max 4.9, bound 10 x sensitivity, and at least 2e-2 (raw "
    "errors: median 1.4e-2, 90% below 6e-2, up to 0.6 in the most ill-conditioned width-8 draws, "
    "where rounding the weights alone already costs 0.24)."),
    per_sensitivity=16.0, ceiling=1.0)

BFLOAT16_CACHE = Tolerance("BFLOAT16_CACHE", 1e-2, (
    "float32 computation with keys and values stored in a bfloat16 KV cache (big_vision's "
    "default) vs float64: each cached K/V element carries a relative rounding of at most 3.9e-3, "
    "a fraction of the roundings the sensitivity applies (no weights, no queries, no MLP), and "
    "attention averages over keys."), per_sensitivity=6.0, ceiling=0.5)


# --- Attention kernels (paligemma.kernels, Pallas interpret mode) -------------------------------
# One attention call, not a model: outputs are convex combinations of value rows (|out| <= max |v|),
# so errors are relative to the largest output and there is no sensitivity to scale by.

KERNEL_FLOAT32 = Tolerance("KERNEL_FLOAT32", 1e-5, (
    "a float32 kernel vs the same attention computed otherwise (the pure-JAX reference in float32, "
    "or paligemma.ref in float64 on the same float32 inputs): a dot product of H <= 128 terms for "
    "the scores, an online softmax that rescales its running sums once per key block, and a "
    "weighted sum of S <= 75 values each carry a few float32 roundings (unit roundoff 6e-8); "
    "measured at most 3e-7 (vs the reference) and 9.5e-7 (vs float64), so 1e-5 (~80 epsilons). A masking bug (one key too many or too "
    "few, a wrong window edge) moves an output row by ~1 / S >= 1e-2."))

KERNEL_BFLOAT16 = Tolerance("KERNEL_BFLOAT16", 2e-2, (
    "a bfloat16 kernel vs the float32 reference on the same bfloat16 inputs: both round the "
    "probabilities to bfloat16 before the value product (unit roundoff 3.9e-3 each, but at "
    "different points of the online softmax, whose running maximum changes) and the kernel "
    "rounds its output to bfloat16; measured at most 2.5e-3, bound 2e-2, still below the "
    "~1 / S >= 1.5e-2 of a masking bug only for long rows, which the float32 draws cover."))

KERNEL_GRADIENT_FLOAT32 = Tolerance("KERNEL_GRADIENT_FLOAT32", 1e-4, (
    "float32 gradients (dq, dk, dv) of the kernels' custom_vjp vs jax.grad of the pure-JAX "
    "reference: the backward pass recomputes the probabilities from the saved log-sum-exp "
    "(exp of a difference of two rounded numbers of magnitude up to ~50 under a softcap: "
    "relative 50 * 6e-8 = 3e-6), forms dp - delta (a cancellation) and sums over every query "
    "of a key and every head of a group; errors relative to max(|expected|, 1) (dq is exactly 0 "
    "where a query sees one key); measured at most 8.4e-7, bound 1e-4 (room for softcaps near 50). A wrong softcap "
    "derivative, a missing scale or a gradient sent to the wrong kv head gives O(1)."))

KERNEL_GRADIENT_BFLOAT16 = Tolerance("KERNEL_GRADIENT_BFLOAT16", 6e-2, (
    "bfloat16 gradients vs the float32 reference's gradients on the same bfloat16 inputs: the "
    "kernel rounds p and ds to bfloat16 before each of its four products and the results to "
    "bfloat16; measured at most 7.7e-3, bound 6e-2. Only coarse errors are caught here; the "
    "float32 draws check the mathematics."))



# --- Training in bfloat16 (paligemma.fast.train, compute_dtype / frozen_dtype "bfloat16") -----------
# One training step in bfloat16 vs the same step in float32 on the same float32 weights and batch
# (tests/test_finetune_bf16.py); sensitivity as in the module docstring, on the test's batch.

BFLOAT16_TRAINING_LOSS = Tolerance("BFLOAT16_TRAINING_LOSS", 5e-3, (
    "the loss, relative to itself: a mean over supervised tokens of -log p(target), so the bfloat16 "
    "activations' error in the logits (BFLOAT16_FAST, relative to the largest |logit|) enters "
    "through log-softmax differences, which the loss then averages over tokens, where independent "
    "rounding errors partly cancel; measured |loss16 - loss32| / loss32 at most 7.0e-4 (loss ~8, "
    "sensitivity 1.4e-2 to 1.6e-2; at most 0.05 x sensitivity), bound max(5e-3, 0.5 x sensitivity). "
    "A wrong cast point (a softcap or norm skipped in bfloat16) moves the loss by >= 1e-2."),
    per_sensitivity=0.5, ceiling=5e-2)

BFLOAT16_TRAINING_GRADIENT = Tolerance("BFLOAT16_TRAINING_GRADIENT", 5e-2, (
    "the gradient of the trainable parameters (float32, through bfloat16 activations and bfloat16 "
    "frozen weights), relative to the largest |component| of the float32 gradient: the backward "
    "pass rounds every activation cotangent to bfloat16 as well, about twice the roundings of the "
    "forward, and products of two rounded factors (activation x cotangent) make up each weight "
    "gradient; measured at most 3.5e-2 (2.2 x sensitivity) over 6 draws of the tiny PaliGemma 2 "
    "test model ('no-vision' and 'lora'), bound max(5e-2, 8 x sensitivity), at most 0.5. A "
    "gradient cut, a doubled path or a wrong sign moves components by O(1) relative."),
    per_sensitivity=8.0, ceiling=0.5)


# --- The segmentation mask VQ-VAE (ref/vqvae.py, fast/vqvae.py) ---------------------------------

VQVAE_FLOAT32 = Tolerance("VQVAE_FLOAT32", 1e-5, (
    "a float32 run of the mask VQ-VAE (paligemma.fast, or torch.nn layers) vs paligemma.ref in "
    "float64, decoder masks or encoder latents relative to their largest magnitude: about 12 "
    "chained convolutions, each a dot product of at most 9 x 128 = 1152 (3x3 convs) or 512 (the "
    "codebook width) terms, float32 unit roundoff 6e-8 times sqrt(n) ~ 30 per layer; ReLU and "
    "the residual sums do not amplify it. Measured 1.0e-6 (decoder) and 1.2e-6 (encoder) on "
    "the released sizes with random He-initialised weights, so 1e-5 (~80 float32 epsilons). A "
    "transposed-convolution kernel that is not flipped, a swapped in/out axis or an off-by-one "
    "padding moves outputs by O(1)."))

QUANT_INT8_LOGITS = Tolerance("QUANT_INT8_LOGITS", 1e-2, (
    "paligemma.ref on the int8-dequantized tree (ref/quant.py) vs on the float64 weights, logits: a "
    "sanity property, not exactness. Each weight moves by up to half a step of max|w| / 127 over its "
    "channel, RMS ~ max|w| / 440; for Gaussian channels of 8-300 values (max ~ 2-3 sigma) that is "
    "~0.5% of sigma, about 4x the RMS relative perturbation of rounding to bfloat16, so the error "
    "scales with the bfloat16 sensitivity: measured at most 9.1x it over 150 hypothesis-drawn "
    "configs (0.13 at most raw). Bound 20x, ceiling 0.3. Applying each scale to the wrong channel "
    "(rolled by one) measured at least 36x the sensitivity."), per_sensitivity=20.0, ceiling=0.3)

QUANT_INT4_LOGITS = Tolerance("QUANT_INT4_LOGITS", 0.5, (
    "as QUANT_INT8_LOGITS for int4 in groups of 128, and only a smoke test: a step of max|w| / 7 "
    "is 18x int8's, which on tiny random models (width 8-48, one padded group per channel) is no "
    "longer a small perturbation: logits moved by up to 1.48 relative (230x the bfloat16 "
    "sensitivity, 48x the int8 error) over 150 draws. Bound 0.5 or 400x the sensitivity, ceiling "
    "2.5: it catches a missing or wildly wrong scale, not subtle bugs; the element-wise half-step "
    "bound and the hand-worked packing in tests/test_quant.py are the proof of the format."),
    per_sensitivity=400.0, ceiling=2.5)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (0 when they are equal).

    Both arrays are compared in float64, so bfloat16 or float32 inputs are fine.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"relative_error: shapes differ, {actual.shape} vs {expected.shape}")
    if expected.size == 0:
        return 0.0
    diff = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def assert_close(actual, expected, tolerance, what, sensitivity=0.0):
    """Assert `relative_error(actual, expected) <= tolerance.bound(sensitivity)`; returns the error.

    Args:
      actual, expected: arrays of the same shape; infinities must sit at the same places
        (masked logits) and are left out of the error.
      tolerance: a `Tolerance`, or a float used as the bound.
      what: what is being compared, for the message (e.g. "fast float32 logits vs ref float64").
      sensitivity: see the module docstring; 0 gives the tolerance's floor `rel`.
    Raises:
      AssertionError naming the comparison, the error, the bound and where the largest
      difference sits. NaN anywhere fails.
    """
    if isinstance(tolerance, Tolerance):
        name, bound = tolerance.name, tolerance.bound(sensitivity)
    else:
        name, bound = "tolerance", float(tolerance)
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shapes differ, actual {a.shape} vs expected {e.shape}")
    if np.isnan(a).any() or np.isnan(e).any():
        raise AssertionError(f"{what}: NaN in {'actual' if np.isnan(a).any() else 'expected'}")
    finite = np.isfinite(e)
    if not np.array_equal(finite, np.isfinite(a)) or not np.array_equal(a[~finite], e[~finite]):
        raise AssertionError(f"{what}: infinities differ between actual and expected")
    err = relative_error(a[finite], e[finite])
    if not err <= bound:
        diff = np.where(finite, np.abs(a - e), 0.0)
        where = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(
            f"{what}: relative error {err:.3g} exceeds {name} = {bound:.3g} at sensitivity {sensitivity:.3g} "
            f"(max |diff| {diff.max():.3g} at index {tuple(int(i) for i in where)}: actual {a[where]:.7g}, "
            f"expected {e[where]:.7g}; max |expected| {np.abs(e[finite]).max():.3g})")
    return err


# --- Stage by stage (paligemma.parity.compare: a port's named activations vs a float64 golden) ------
# Every stage is measured like the logits: relative_error, i.e. relative to the stage's own largest
# magnitude, and bounded at the stage's own sensitivity, which the golden file records
# (parity/golden.py: each stage's relative error when every weight is multiplied by
# 1 + 2^-8 U(-1, 1), the size of bfloat16 rounding, so it is defined for bfloat16 checkpoints too).
# Measured: paligemma.fast (XLA attention) on 40 hypothesis draws of `strategies.configs()` with
# `golden.random_inputs` (batch 2, 6 text tokens), 800 stage comparisons, attention probabilities
# included; stage sensitivities from 0 (a one-patch image: softmax over one key) to 0.19, median 8e-3.

STAGE_FLOAT32 = Tolerance("STAGE_FLOAT32", 1e-5, (
    "a float32 port, any stage, vs the float64 golden: FAST_FLOAT32's reasoning holds stage by stage "
    "(each stage is a few float32 dot products past a norm); measured at most 1.4e-6 where the "
    "stage's sensitivity is below 1e-2, error / sensitivity at most 4.3e-4 (median 5e-5), largest raw "
    "error 8.4e-6; FAST_FLOAT32's numbers keep 7x and 2.3x of margin. An exact-erf GELU for the tanh "
    "one fails it (3.4e-4 at img/block_00/mlp_out, parity/planted_bugs.py), and so would TF32 "
    "matmuls (10-bit mantissas: unit roundoff 4.9e-4): float32 means float32 throughout."),
    per_sensitivity=1e-3, ceiling=2e-4)

STAGE_BFLOAT16 = Tolerance("STAGE_BFLOAT16", 2e-2, (
    "a bfloat16 port (bfloat16 weights and activations; norms, softmax and logits in float32, as "
    "paligemma.fast's BFLOAT16 policy) vs the float64 golden: the weights' rounding is the "
    "sensitivity's perturbation, activations add roundings of the same size; measured error / "
    "sensitivity median 1.4, max 7.7 (at the logits of a 2-layer width-16 draw), raw errors median "
    "1.1e-2, at most 3.0e-2 where the sensitivity is below 1e-2, largest 0.15; bound "
    "max(2e-2, 16 x sensitivity), at most 1, 2x over the worst draw. Only coarse bugs show in "
    "bfloat16: check the mathematics in float32 first."), per_sensitivity=16.0, ceiling=1.0)

STAGE_FLOAT16 = Tolerance("STAGE_FLOAT16", 2.5e-3, (
    "a float16 port: STAGE_BFLOAT16 scaled by the ratio of unit roundoffs (float16 2^-11 = 4.9e-4, "
    "bfloat16 2^-8: 8x smaller): floor 2.5e-3, 2 x sensitivity, at most 0.125. Derived, not measured "
    "(this project has no float16 path); float16's range (max 65504) is the other risk, which shows "
    "as NON-FINITE stages rather than as a tolerance question."), per_sensitivity=2.0, ceiling=0.125)

STAGE_FLOAT64 = Tolerance("STAGE_FLOAT64", 1e-10, (
    "a float64 port vs the float64 golden: FLOAT64_EXACT's reasoning (another order of the same "
    "float64 arithmetic), stage by stage."))

STAGE_TOLERANCES = {"float32": STAGE_FLOAT32, "bfloat16": STAGE_BFLOAT16, "float16": STAGE_FLOAT16,
                    "float64": STAGE_FLOAT64}
