"""bfloat16 training (`compute_dtype="bfloat16"`, frozen parameters kept in bfloat16) against the
float32 step on the same weights and batch.

- the loss and the gradient stay within BFLOAT16_TRAINING_LOSS / BFLOAT16_TRAINING_GRADIENT
  (parity/tolerances.py) of float32's, scaled by the model's measured bfloat16 sensitivity, and
  really differ from them (the bfloat16 path ran);
- the gradients, the optimizer state and the updated trainable parameters are float32 (only the
  frozen half and the activations are bfloat16), and a few AdamW steps lower the loss.

Modes: "no-vision" (the vision tower frozen in bfloat16; the LLM, tied embedding included, trained
in float32 and cast to bfloat16 where used) and "lora" (the whole model frozen in bfloat16,
float32 adapters merged per layer). Tiny PaliGemma 2 model (final-logit softcap on).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from finetune_fixtures import build
from paligemma import ref
from paligemma.fast import data, train
from paligemma.fast.finetune import _prepare
from paligemma.parity.tolerances import BFLOAT16_TRAINING_GRADIENT, BFLOAT16_TRAINING_LOSS, relative_error

TEXT_LEN = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    files = build(tmp_path_factory.mktemp("bf16"))
    config = files.config
    examples = data.load_examples(files.train, files.tok, TEXT_LEN)
    batch = data.make_batch(examples, np.arange(4), config.vision.image_size)  # [A=1, B=4, ...]
    # The model's sensitivity to a bfloat16-sized relative perturbation (tolerances.py's definition).
    p64 = ref.cast_params(files.params, np.float64)
    inputs = (batch.images[0].astype(np.float64), batch.text[0, :, :-1], batch.mask_ar[0, :, :-1])
    exact = ref.forward(p64, config, *inputs)
    sensitivity = relative_error(ref.forward(ref.cast_params(p64, ml_dtypes.bfloat16), config, *inputs), exact)
    return files, batch, sensitivity


def _config(mode, dtype, **kw):
    return train.TrainConfig(text_len=TEXT_LEN, trainable=mode, compute_dtype=dtype, frozen_dtype=dtype, lora_rank=2,
                             **kw)


def _halves(params, config):
    trainable, frozen = _prepare(params, config)  # what `finetune` trains: float32 / frozen_dtype
    if config.trainable == "lora":  # B != 0, so the adapters change the logits and A gets gradients
        trainable = jax.tree_util.tree_map(lambda x: x + np.float32(0.05), trainable)
    return trainable, frozen


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("mode", ["no-vision", "lora"])
def test_bfloat16_loss_and_gradients_stay_near_float32(setup, mode):
    files, batch, sensitivity = setup
    micro = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), batch)
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(mode, dtype)
        trainable, frozen = _halves(files.params, config)
        want = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(frozen)} == {np.dtype(want)}
        fn = jax.jit(jax.value_and_grad(lambda t, f, c=config: train.batch_loss(t, f, micro, files.config, c)[0]))
        loss, grads = fn(trainable, frozen)
        assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {np.dtype(np.float32)}  # float32 gradients
        results[dtype] = float(loss), _flat(grads)
    (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
    loss_error, grad_error = abs(l16 - l32) / abs(l32), relative_error(g16, g32)
    assert loss_error <= BFLOAT16_TRAINING_LOSS.bound(sensitivity), (loss_error, sensitivity)
    assert grad_error <= BFLOAT16_TRAINING_GRADIENT.bound(sensitivity), (grad_error, sensitivity)
    assert grad_error > 1e-4  # the bfloat16 path really ran (float32 vs float32 differs by ~1e-7)


def test_bfloat16_training_keeps_float32_state_and_lowers_the_loss(setup):
    files, batch, _ = setup
    config = _config("no-vision", "bfloat16", steps=8, lr=3e-3, warmup=0.0, batch_size=4)
    trainable, frozen = _halves(files.params, config)
    optimizer = train.make_optimizer(config)
    step = train.make_train_step(files.config, config, optimizer, frozen=frozen)
    opt_state = optimizer.init(trainable)
    start = _flat(trainable)
    losses = []
    for _ in range(config.steps):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree_util.tree_leaves(trainable)} == {np.dtype(np.float32)}
    floats = [x for x in jax.tree_util.tree_leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {np.dtype(np.float32)}  # AdamW's mu and nu
    assert len(floats) == 2 * len(jax.tree_util.tree_leaves(trainable))
    # Updates far below bfloat16's resolution of the weights survive in the float32 parameters.
    moved = np.abs(_flat(trainable) - start)
    assert np.isfinite(losses).all() and moved.max() > 0
    assert losses[-1] < 0.5 * losses[0], losses  # measured: see the assertion message on failure
