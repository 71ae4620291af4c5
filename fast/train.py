"""Fine-tuning pieces: trainable groups, big_vision's loss, the optax optimizer, the train step.

    config = TrainConfig(steps=500, batch_size=32, lr=1e-5, trainable="no-vision")
    trainable, frozen = split_params(params, config)          # by regex over parameter paths
    optimizer = make_optimizer(config)
    step = make_train_step(model_config, config, mesh, ...)   # jit-compiled, sharded
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)

Trainable groups (`GROUPS`, regular expressions over '/'-joined parameter paths): "all", "no-vision"
(`llm/.*`), "attention" (`llm/layers/attn/.*`: big_vision's low-memory recipe) and "lora" (every
parameter frozen, adapters of `paligemma.fast.lora` trained). Frozen parameters never enter the
optimizer, so they come out bit-identical and cost no optimizer memory.

Precision: trainable parameters and the optimizer state are float32; `compute_dtype="bfloat16"`
runs the towers in bfloat16 (weights cast where used); frozen parameters may be kept in bfloat16
(`frozen_dtype`); logits and the loss are float32 always.

Axes: A micro-batches, B examples, T text length, V vocabulary.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.params import flatten, unflatten
from paligemma.options import EVAL_TASKS, FAST_DTYPES, OPTIMIZERS

from . import gemma, lora, xent
from .model import NO_WEIGHT_HOISTING, converts_weights, embed_image_and_text, prefix_lm_masks
from .policy import Policy

GROUPS = {"all": r".*", "no-vision": r"llm/.*", "attention": r"llm/layers/attn/.*", "lora": None}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning run needs besides the model, the tokenizer and the data.

    steps: optimizer steps. batch_size: examples per step (split into `accum_steps` micro-batches).
    text_len: tokens the model reads (sequences are text_len + 1 long, big_vision's layout).
    optimizer: "adamw" (b1, b2, eps, weight_decay: decoupled, times the learning rate, on weights
      with 2+ axes) or "sgd" (momentum). lr: peak learning rate; warmup: fraction of `steps` of
      linear warm-up before the cosine decay to 0 (big_vision's schedule: the first update is 0).
    clip_norm: global gradient-norm clip (None: off). label_smoothing: epsilon of big_vision's loss.
    trainable: a `GROUPS` name; lora_rank, lora_alpha (default: the rank) for "lora".
    remat: recompute each layer in the backward pass. keep_logits: with a trained embedding, hold
      the loss's float32 logits for the backward pass (`paligemma.fast.xent`) instead of
      recomputing them: B x T x V x 4 bytes for one [B T, D] x [D, V] product less.
    compute_dtype, frozen_dtype: "float32" or "bfloat16". mesh: e.g. "data=2,fsdp=4". seed: data order and adapter initialisation.
    checkpoint_every, eval_every, log_every: steps (0: only at the end / never / every step).
    keep_checkpoints: how many recent training checkpoints stay on disk.
    video_frames, video_stride: how "video" lines of the data are sampled (training from a seeded
      random offset, evaluation from frame 0; `paligemma.fast.data`).
    eval_task: the metric of the periodic evaluation besides the loss: "exact_match" (decoded text
      == suffix) or a `paligemma.ref.tasks.scoring` task (caption, vqa, vqav2, chartqa, detect, segment),
      whose ground truth comes from the validation lines. eval_vae: the mask VQ-VAE (.npz) that
      eval_task "segment" needs.
    """

    steps: int = 100
    batch_size: int = 8
    text_len: int = 128
    lr: float = 1e-5
    optimizer: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.05
    clip_norm: float | None = 1.0
    label_smoothing: float = 0.0
    trainable: str = "all"
    lora_rank: int = 8
    lora_alpha: float | None = None
    remat: bool = False
    keep_logits: bool = False
    compute_dtype: str = "float32"
    frozen_dtype: str = "float32"
    accum_steps: int = 1
    mesh: str = "data=1,fsdp=1"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    video_frames: int = 16
    video_stride: int = 9
    eval_task: str = "exact_match"
    eval_vae: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "text_len", "lora_rank", "accum_steps", "keep_checkpoints", "log_every",
                     "video_frames", "video_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be an integer >= 1, got {value!r}")
        for name in ("checkpoint_every", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        checks = [("trainable", self.trainable in GROUPS, f"one of {list(GROUPS)}"),
                  ("optimizer", self.optimizer in OPTIMIZERS, f"one of {list(OPTIMIZERS)}"),
                  ("compute_dtype", self.compute_dtype in FAST_DTYPES, "float32 or bfloat16"),
                  ("frozen_dtype", self.frozen_dtype in FAST_DTYPES, "float32 or bfloat16"),
                  ("lr", self.lr > 0, "> 0"), ("warmup", 0 <= self.warmup < 1, "in [0, 1)"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("clip_norm", self.clip_norm is None or self.clip_norm > 0, "> 0 or None"),
                  ("batch_size", self.batch_size % self.accum_steps == 0, f"a multiple of accum_steps {self.accum_steps}"),
                  ("eval_task", self.eval_task in EVAL_TASKS, f"one of {list(EVAL_TASKS)}"),
                  ("eval_vae", self.eval_task != "segment" or self.eval_vae, "a VQ-VAE path for eval_task segment")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def policy(self):
        """The `Policy` the model runs under (XLA attention: the training path takes dense masks)."""
        return Policy(compute_dtype=self.compute_dtype, cache_dtype=self.compute_dtype, attention_impl="xla",
                      remat="full" if self.remat else "none")

    @property
    def lora_scale(self):
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    @property
    def warmup_steps(self):
        return int(round(self.warmup * self.steps))


# --- Trainable groups ------------------------------------------------------------------------


def split_params(params, config: TrainConfig, pattern=None):
    """(trainable, frozen): two nested dicts partitioning `params` (NumPy arrays are not copied).

    Args:
      params: the whole tree; config: its `trainable` group (or `pattern`, a regex matched in
        full against '/'-joined paths, overrides it). For "lora", `trainable` is a fresh
        adapter tree (`lora.init_adapters`, seeded by `config.seed`) and every parameter is frozen.
    Raises:
      ValueError if the pattern selects no parameter.
    """
    flat = flatten(params)
    if pattern is None and config.trainable == "lora":
        return lora.init_adapters(params["llm"]["layers"], config.lora_rank, config.seed), params
    pattern = pattern or GROUPS[config.trainable]
    chosen = {k for k in flat if re.fullmatch(pattern, k)}
    if not chosen:
        raise ValueError(f"trainable: pattern {pattern!r} matches no parameter path (e.g. {next(iter(flat))!r})")
    return (unflatten({k: v for k, v in flat.items() if k in chosen}),
            unflatten({k: v for k, v in flat.items() if k not in chosen}))


def join_params(trainable, frozen, config: TrainConfig):
    """The whole parameter tree from `split_params`'s halves (LoRA: the frozen tree itself;
    adapters are attached to the layer weights by `model_pre_logits`, or folded in by `merged_params`)."""
    if config.trainable == "lora":
        return frozen
    return unflatten({**flatten(frozen), **flatten(trainable)})


def merged_params(trainable, frozen, config: TrainConfig):
    """Plain parameters with the training applied (LoRA adapters merged): what gets exported."""
    if config.trainable == "lora":
        return lora.merge(frozen, trainable, config.lora_scale)
    return join_params(trainable, frozen, config)


# --- Loss ------------------------------------------------------------------------------------


def big_vision_loss(logits, targets, weights, label_smoothing=0.0):
    """big_vision's per-example loss (trainers/proj/paligemma/train.py), float32.

    Args:
      logits: [B, T, V]; targets: [B, T] ids; weights: [B, T] (mask_loss[:, 1:]).
      label_smoothing: epsilon; the target puts 1 - epsilon on the label, epsilon / (V - 1) elsewhere.
    Returns:
      [B]: -sum_t w_t sum_v target_v log p_v / max(1, sum_t w_t).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    label = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    if label_smoothing:
        V = logits.shape[-1]
        rest = logp.sum(axis=-1) - label  # [B, T]
        token = (1 - label_smoothing) * label + label_smoothing / (V - 1) * rest
    else:
        token = label
    weights = weights.astype(jnp.float32)
    return -(token * weights).sum(axis=-1) / jnp.maximum(1.0, weights.sum(axis=-1))  # [B]


def model_pre_logits(trainable, frozen, images, text, mask_ar, model_config: PaliGemmaConfig, config: TrainConfig):
    """(pre-logits [B, T, D] of the text positions, the whole parameter tree) for big_vision's
    training inputs (`text[:, :-1]`, no input mask: padding carries mask_ar 1, so no real token
    sees it)."""
    policy = config.policy
    params = join_params(trainable, frozen, config)
    tokens, ar = text[:, :-1], mask_ar[:, :-1]  # [B, T]
    x, full_mask, full_ar = embed_image_and_text(params, model_config, images, tokens, ar,
                                                 jnp.ones(tokens.shape, bool), policy)
    attn_mask, local_mask, positions = prefix_lm_masks(model_config, full_mask, full_ar)
    g = model_config.llm
    rope = gemma.rope_table(x.shape[1], g.head_dim, g.rope_base)
    text_from = x.shape[1] - tokens.shape[1]  # after P or F x P image tokens
    # Only the text's outputs are needed: the last layer skips the image rows' queries and MLP.
    llm = lora.adapted(params["llm"], trainable, config.lora_scale) if config.trainable == "lora" else params["llm"]
    pre, _ = gemma.transformer(llm, x, positions, attn_mask, g, policy, rope, local_mask, outputs_from=text_from)
    return pre, params  # [B, T, D]


def model_logits(trainable, frozen, images, text, mask_ar, model_config: PaliGemmaConfig, config: TrainConfig):
    """Text logits [B, T, V] (float32) for big_vision's training inputs (see `model_pre_logits`)."""
    pre, params = model_pre_logits(trainable, frozen, images, text, mask_ar, model_config, config)
    return gemma.logits(params["llm"], pre, model_config.llm)  # [B, T, V]


def batch_loss(trainable, frozen, micro, model_config, config: TrainConfig):
    """(weighted mean of the per-example losses, per-example losses [B]) of one micro-batch
    (`Batch` fields without the A axis): `big_vision_loss` of `model_logits`, computed one
    vocabulary slab at a time from the pre-logits (`paligemma.fast.xent`: the [B, T, V] logits
    never exist, in the forward or the backward pass)."""
    pre, params = model_pre_logits(trainable, frozen, micro.images, micro.text, micro.mask_ar, model_config, config)
    table = params["llm"]["embedder"]["input_embedding"]  # [V, D]
    table_grad = "embedder" in trainable.get("llm", {})  # the tied embedding is trained
    nll = xent.token_nll(pre, table, micro.text[:, 1:], config.label_smoothing,
                         model_config.llm.final_logits_softcap, table_grad=table_grad,
                         keep_logits=config.keep_logits)  # [B, T]
    weights = micro.mask_loss[:, 1:].astype(jnp.float32)  # [B, T]
    per_example = (nll * weights).sum(axis=-1) / jnp.maximum(1.0, weights.sum(axis=-1))  # [B]
    w = micro.weight.astype(jnp.float32)
    return (per_example * w).sum() / jnp.maximum(w.sum(), 1.0), per_example


# --- Optimizer -------------------------------------------------------------------------------


def schedule(config: TrainConfig):
    """big_vision's learning rate at optimizer count t (0-based): lr * min(1, t / w) *
    0.5 (1 + cos(pi * clip((t - w) / (steps - w), 0, 1))), w = round(warmup * steps)."""
    w, total, lr = config.warmup_steps, config.steps, config.lr

    def fn(t):
        t = jnp.asarray(t, jnp.float32)
        ramp = jnp.minimum(1.0, t / w) if w > 0 else 1.0
        progress = jnp.clip((t - w) / max(1, total - w), 0.0, 1.0)
        return lr * ramp * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    return fn


def _decay_mask(tree):
    return jax.tree_util.tree_map(lambda x: np.ndim(x) >= 2, tree)


def make_optimizer(config: TrainConfig):
    """optax chain: global-norm clipping, then AdamW or SGD (momentum) under `schedule`."""
    lr = schedule(config)
    if config.optimizer == "adamw":
        core = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                           mask=_decay_mask)
    else:
        core = optax.sgd(lr, momentum=config.momentum or None)
    clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    return optax.chain(*clip, core)


# --- The compiled step -----------------------------------------------------------------------


def _accumulate(fn, trainable, batch):
    """Mean over the A micro-batches of `fn(trainable, micro) -> (loss, grads)`, as a scan."""
    A = batch.text.shape[0]
    if A == 1:
        return fn(trainable, jax.tree_util.tree_map(lambda a: a[0], batch))
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

    def body(carry, micro):
        loss, grads = fn(trainable, micro)
        return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

    (loss, grads), _ = jax.lax.scan(body, (jnp.float32(0), zeros), batch)
    return jax.tree_util.tree_map(lambda x: x / A, (loss, grads))


def global_norm(tree):
    """sqrt(sum of squares) of every leaf. With `optax.tree.norm`, XLA merges the norm's square of
    each gradient with AdamW's `g ** 2` (common subexpressions) and materialises the shared
    square, one more gradient-sized buffer (2.1 GB for PaliGemma's embedding) next to the update;
    behind an optimisation barrier the norm reads the gradients and AdamW's square fuses into its
    update again."""
    leaves = jax.lax.optimization_barrier(jax.tree_util.tree_leaves(tree))
    squares = [jnp.vdot(x.ravel(), x.ravel()).astype(jnp.float32) for x in leaves]
    return jnp.sqrt(sum(squares, jnp.float32(0)))


def make_train_step(model_config, config: TrainConfig, optimizer, shardings=None, frozen=None):
    """The jit-compiled step `(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`.

    Args:
      shardings: optional (trainable, opt_state, frozen, batch) `NamedSharding` trees
        (`paligemma.fast.sharding`); outputs keep the inputs' shardings.
      frozen: an example frozen tree: on CPU with bfloat16 weights the step is compiled without
        loop-invariant weight hoisting (see `paligemma.fast.model.NO_WEIGHT_HOISTING`).
    Returns:
      the step; metrics: {"loss", "grad_norm"} float32 scalars (loss: mean over micro-batches; the
      learning rate of step s is `schedule(config)(s)`).
      The trainable tree and optimizer state are donated (updated in place).
    """

    def loss_and_grad(trainable, frozen, micro):
        fn = lambda t: batch_loss(t, frozen, micro, model_config, config)[0]  # noqa: E731
        return jax.value_and_grad(fn)(trainable)

    def step(trainable, opt_state, frozen, batch):
        loss, grads = _accumulate(lambda t, m: loss_and_grad(t, frozen, m), trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": global_norm(grads)}

    options = NO_WEIGHT_HOISTING if frozen is not None and converts_weights(frozen) else None
    kwargs = {}
    if shardings is not None:
        t, o, f, b = shardings
        replicated = NamedSharding(jax.tree_util.tree_leaves(t)[0].mesh, PartitionSpec())
        kwargs = dict(in_shardings=(t, o, f, b), out_shardings=(t, o, replicated))
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=options, **kwargs)


def make_eval_step(model_config, config: TrainConfig, shardings=None):
    """The jit-compiled `(trainable, frozen, batch) -> per-example losses [A, B]`."""

    def step(trainable, frozen, batch):
        return jax.lax.map(lambda m: batch_loss(trainable, frozen, m, model_config, config)[1], batch)

    kwargs = {} if shardings is None else dict(in_shardings=shardings)
    return jax.jit(step, **kwargs)
