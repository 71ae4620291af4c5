"""Fine-tuning (paligemma.fast.train, .lora, .finetune) against independent formulas and the
float64 reference.

- the loss is big_vision's, written out here as loops; the schedule is big_vision's closed form;
- the fast loss and its gradient match a loss computed from `ref`'s float64 logits (the gradient
  along its own direction against a finite difference of the reference);
- LoRA: zero-initialised adapters leave the logits unchanged; the merge equals W + s A B written
  as plain matrix products; adapted logits equal the reference's on the merged weights, and the
  adapters' gradients (applied beside W) equal those through the merged weights;
- remat and gradient accumulation change neither gradients nor the step;
- a tiny model overfits the synthetic data set and greedy decoding (by the reference, on the
  exported weights) reproduces every target.

Every compilation costs ~10 s on CPU, so each test compiles few programs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from finetune_fixtures import PREFIX, build, records
from paligemma import ref
from paligemma.fast import data, lora, train, xent
from paligemma.fast.finetune import finetune
from paligemma.parity.tolerances import FAST_FLOAT32, FLOAT32_REORDERED, GRADIENT_FLOAT32, relative_error
from paligemma.ref.ops import log_softmax
from paligemma.ref.params import flatten

TEXT_LEN = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ft"))


def _batch(files, rows=None, micro_batches=1):
    """All four examples (or `rows`) as a `Batch` of float32 images and int32 text."""
    examples = data.load_examples(files.train, files.tok, TEXT_LEN)
    idx = np.arange(len(examples)) if rows is None else np.asarray(rows)
    return data.make_batch(examples, idx, files.config.vision.image_size, micro_batches)


def _loss_loops(logits, targets, weights, eps):
    """big_vision's loss, one example and token at a time (float64)."""
    V = logits.shape[-1]
    losses = []
    for b in range(len(logits)):
        total = 0.0
        for t in range(logits.shape[1]):
            logp = log_softmax(logits[b, t].astype(np.float64))
            target = np.full(V, eps / (V - 1))
            target[targets[b, t]] = 1 - eps
            total += weights[b, t] * np.dot(logp, target)
        losses.append(-total / max(1.0, weights[b].sum()))
    return np.array(losses)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_loss_is_big_vision_per_example_mean(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 5))
    weights = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])  # an example with no target
    got = np.asarray(train.big_vision_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), eps))
    np.testing.assert_allclose(got, _loss_loops(logits, targets, weights, eps), rtol=2e-6, atol=1e-6)
    assert got[1] == 0.0


@pytest.mark.parametrize("V, slab, eps, cap", [(36, 8, 0.0, None), (37, 8, 0.1, 5.0), (37, 64, 0.2, 30.0),
                                                (37, 8, 0.1, None), (36, 8, 0.0, 5.0)])
def test_slab_loss_equals_the_loss_of_the_whole_logits(V, slab, eps, cap):
    # xent.token_nll never forms the logits: 36 = 6 slabs of 6, 37 = 5 slabs of 8 with 3 padding rows,
    # 37 < 64 one slab. Values vs big_vision's loss as loops in float64; gradients (its custom VJP)
    # vs autodiff of the plain formula on whole logits.
    rng = np.random.default_rng(V + slab)
    pre = rng.normal(0, 1, (3, 5, 7)).astype(np.float32)
    table = rng.normal(0, 1, (V, 7)).astype(np.float32)
    targets = rng.integers(0, V, (3, 5))
    weights = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    z64 = np.einsum("BTD,VD->BTV", pre.astype(np.float64), table.astype(np.float64))
    z64 = cap * np.tanh(z64 / cap) if cap else z64
    scale = jnp.arange(1.0, 4.0)  # a different upstream gradient per example

    def slabbed(p, t, table_grad=True, keep_logits=False):
        nll = xent.token_nll(p, t, targets, eps, cap, target=slab, table_grad=table_grad,
                             keep_logits=keep_logits)  # [B, T]
        return (nll * weights).sum(-1) / np.maximum(1.0, weights.sum(-1))

    def whole(p, t):
        z = jnp.einsum("BTD,VD->BTV", p, t)
        return train.big_vision_loss(cap * jnp.tanh(z / cap) if cap else z, targets, weights, eps)

    np.testing.assert_allclose(np.asarray(slabbed(pre, table)), _loss_loops(z64, targets, weights, eps),
                               rtol=FAST_FLOAT32.rel, atol=1e-6)
    grad = lambda f: jax.grad(lambda p, t: (f(p, t) * scale).sum(), (0, 1))(pre, table)  # noqa: E731
    (gp, gt), (wp, wt) = grad(slabbed), grad(whole)
    assert relative_error(gp, wp) <= FAST_FLOAT32.rel and relative_error(gt, wt) <= FAST_FLOAT32.rel
    # A frozen table: no table gradient, and (without both smoothing and a softcap) the forward
    # pass builds the pre-logits gradient itself; kept logits: the same gradients, not recomputed.
    fp, ft = grad(lambda p, t: slabbed(p, t, table_grad=False))
    assert relative_error(fp, wp) <= FAST_FLOAT32.rel and not np.any(ft)
    kp, kt = grad(lambda p, t: slabbed(p, t, keep_logits=True))
    assert relative_error(kp, wp) <= FAST_FLOAT32.rel and relative_error(kt, wt) <= FAST_FLOAT32.rel


def test_schedule_is_big_vision_warmup_then_cosine():
    for steps, warmup in ((100, 0.05), (10, 0.0), (7, 0.3)):
        config = train.TrainConfig(steps=steps, lr=2e-3, warmup=warmup)
        w = round(warmup * steps)
        fn = train.schedule(config)
        for t in range(steps + 2):
            ramp = min(1.0, t / w) if w else 1.0
            progress = min(max((t - w) / max(1, steps - w), 0.0), 1.0)
            np.testing.assert_allclose(float(fn(t)), 2e-3 * ramp * 0.5 * (1 + np.cos(np.pi * progress)),
                                       rtol=0, atol=1e-6 * 2e-3)  # float32: relative to the peak
    assert float(train.schedule(train.TrainConfig(steps=20))(0)) == 0.0  # big_vision's first update is 0


def _ref_loss(params64, config, batch, eps=0.0):
    m = jax.tree_util.tree_map(lambda a: np.asarray(a)[0], batch)
    logits = ref.forward(params64, config, m.images.astype(np.float64), m.text[:, :-1], m.mask_ar[:, :-1])
    return float(np.mean(_loss_loops(logits, m.text[:, 1:], m.mask_loss[:, 1:], eps))), logits


def test_fast_loss_and_gradient_match_the_float64_reference(files):
    config = files.config
    params64 = ref.init_params(config, seed=1, dtype=np.float64, random_norms=True)
    params32 = ref.cast_params(params64, np.float32)
    batch = _batch(files)
    micro = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), batch)
    tc = train.TrainConfig(text_len=TEXT_LEN, label_smoothing=0.1)
    fn = jax.jit(jax.value_and_grad(lambda p: train.batch_loss(p, {}, micro, config, tc)[0]))
    loss, grads = fn(params32)
    gold, logits64 = _ref_loss(params64, config, batch, eps=0.1)
    inputs = (batch.images[0], batch.text[0, :, :-1], batch.mask_ar[0, :, :-1])
    rounded = ref.forward(ref.cast_params(params64, ml_dtypes.bfloat16), config, *inputs)
    sensitivity = relative_error(rounded, logits64)
    assert relative_error(np.array([float(loss)]), np.array([gold])) <= FAST_FLOAT32.bound(sensitivity)

    # The gradient, along its own direction u: d loss / d t at t = 0 of loss(p + t u) is |g|.
    # The reference's loss is differentiated numerically (fourth-order stencil, float64).
    leaves, treedef = jax.tree_util.tree_flatten(params64)
    g = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(grads)]
    norm = np.sqrt(sum((x * x).sum() for x in g))
    step = 1e-5
    moved = lambda t: jax.tree_util.tree_unflatten(treedef, [p + t * d / norm for p, d in zip(leaves, g)])  # noqa: E731
    at = {k: _ref_loss(moved(k * step), config, batch, 0.1)[0] for k in (-2, -1, 1, 2)}
    slope = (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * step)
    assert abs(norm - slope) / abs(slope) <= GRADIENT_FLOAT32.bound(sensitivity), (norm, slope)


def _merge_by_matrices(layers, adapters, scale):
    """W + scale A B for every target, as plain 2-D matrix products per layer (independent of lora's
    einsum strings): the flattened input axes times the flattened output axes."""
    out = dict(flatten(layers))
    fa = flatten(adapters)
    for name, w in flatten(layers).items():
        if f"{name}/lora_a" not in fa:
            continue
        a, b = fa[f"{name}/lora_a"], fa[f"{name}/lora_b"]
        new = np.array(w, np.float64)
        for l in range(w.shape[0]):
            if name.endswith("q_einsum/w"):  # [N, D, H], A [D, R], B [R, N, H]
                N, D, H = w.shape[1:]
                new[l] += scale * (a[l] @ b[l].reshape(-1, N * H)).reshape(D, N, H).transpose(1, 0, 2)
            elif name.endswith("kv_einsum/w"):  # [2, K, D, H], A [2, D, R], B [2, R, K, H]
                _, K, D, H = w.shape[1:]
                for c in range(2):
                    new[l, c] += scale * (a[l, c] @ b[l, c].reshape(-1, K * H)).reshape(D, K, H).transpose(1, 0, 2)
            elif name.endswith("attn_vec_einsum/w"):  # [N, H, D], A [N, H, R], B [R, D]
                N, H, D = w.shape[1:]
                new[l] += scale * (a[l].reshape(N * H, -1) @ b[l]).reshape(N, H, D)
            elif name.endswith("gating_einsum"):  # [2, D, F], A [2, D, R], B [2, R, F]
                for c in range(2):
                    new[l, c] += scale * a[l, c] @ b[l, c]
            else:  # linear [F, D], A [F, R], B [R, D]
                new[l] += scale * a[l] @ b[l]
        out[name] = new
    return out


def test_lora_starts_as_the_base_model_and_merges_exactly(files):
    config = files.config
    params = ref.cast_params(files.params, np.float32)
    batch = _batch(files)
    m = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), batch)
    tc = train.TrainConfig(text_len=TEXT_LEN, trainable="lora", lora_rank=3, lora_alpha=6.0)
    logits = jax.jit(lambda t, f: train.model_logits(t, f, m.images, m.text, m.mask_ar, config, tc))

    adapters, frozen = train.split_params(params, tc)
    assert all(not np.any(v) for k, v in flatten(adapters).items() if k.endswith("lora_b"))
    base = np.asarray(jax.jit(lambda p: train.model_logits(
        p, {}, m.images, m.text, m.mask_ar, config, dataclasses.replace(tc, trainable="all")))(params))
    first = np.asarray(logits(adapters, frozen))
    assert relative_error(first, base) <= 1e-7  # the same float32 arithmetic (W + 0 = W)

    rng = np.random.default_rng(5)
    trained = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32), adapters)
    merged = lora.merge(params, trained, tc.lora_scale)
    expected = _merge_by_matrices(params["llm"]["layers"], trained, tc.lora_scale)
    for name, value in flatten(merged["llm"]["layers"]).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    adapted = np.asarray(logits(trained, frozen))
    assert relative_error(adapted, base) > 1e-3  # the adapters do something
    # Adapted (merged per layer inside the scan) = the reference on the merged weights, float64.
    merged64 = ref.cast_params(merged, np.float64)
    gold = ref.forward(merged64, config, np.asarray(m.images, np.float64), np.asarray(m.text)[:, :-1],
                       np.asarray(m.mask_ar)[:, :-1])
    assert relative_error(adapted, gold) <= FAST_FLOAT32.ceiling


def test_lora_gradients_equal_the_gradients_through_the_merged_weights(files):
    """Training applies the adapters beside W, `x W + s (x A) B`; differentiating the loss of the
    merged weights `W + s A B` (the export formula, checked above) must give the same gradients."""
    config = files.config
    params = ref.cast_params(ref.init_params(config, seed=2, random_norms=True), np.float32)
    micro = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), _batch(files))
    tc = train.TrainConfig(text_len=TEXT_LEN, trainable="lora", lora_rank=2, lora_alpha=3.0)
    adapters, frozen = train.split_params(params, tc)
    rng = np.random.default_rng(3)
    adapters = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), adapters)
    unmerged = jax.jit(jax.grad(lambda a: train.batch_loss(a, frozen, micro, config, tc)[0]))(adapters)
    everything = dataclasses.replace(tc, trainable="all")
    merged = jax.jit(jax.grad(lambda a: train.batch_loss(lora.merge(params, a, tc.lora_scale), {}, micro, config,
                                                         everything)[0]))(adapters)
    for name, got in flatten(unmerged).items():
        want = flatten(merged)[name]
        assert np.abs(want).max() > 0, name
        assert relative_error(np.asarray(got), np.asarray(want)) <= FLOAT32_REORDERED.ceiling, name


def test_remat_and_accumulation_leave_the_step_unchanged(files):
    config = files.config
    params = ref.cast_params(files.params, np.float32)
    tc = train.TrainConfig(text_len=TEXT_LEN, steps=4, lr=1e-3, warmup=0.0, trainable="lora", lora_rank=2)
    adapters, frozen = train.split_params(params, tc)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)  # B != 0: gradients reach A too
    m = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), _batch(files))

    def grads(cfg):
        return jax.jit(jax.grad(lambda t: train.batch_loss(t, frozen, m, config, cfg)[0]))(adapters)

    plain, remat = grads(tc), grads(dataclasses.replace(tc, remat=True))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    assert relative_error(flat(remat), flat(plain)) <= FLOAT32_REORDERED.rel

    # One step with 2 micro-batches of 2 = one step with the batch of 4 (a mean of equal-size means).
    # SGD without clipping, so the update is lr times the gradient (a large lr: the update, not the
    # float32 rounding of p + update, dominates the difference).
    results = []
    for accum in (1, 2):
        cfg = dataclasses.replace(tc, trainable="attention", accum_steps=accum, batch_size=4, optimizer="sgd",
                                  clip_norm=None, lr=1e3)
        trainable, frozen_a = train.split_params(params, cfg)
        before = flat(trainable)
        optimizer = train.make_optimizer(cfg)
        step = train.make_train_step(config, cfg, optimizer)
        state = optimizer.init(trainable)
        trainable, _, metrics = step(trainable, state, frozen_a, _batch(files, micro_batches=accum))
        results.append((float(metrics["loss"]), flat(trainable) - before, float(metrics["grad_norm"])))
    (l1, u1, g1), (l2, u2, g2) = results
    assert abs(l1 - l2) <= 1e-6 * abs(l1) and abs(g1 - g2) <= 1e-5 * g1
    assert relative_error(u2, u1) <= FLOAT32_REORDERED.rel and np.abs(u1).max() > 0


def test_tiny_model_overfits_and_greedy_decoding_reproduces_targets(files, tmp_path):
    config = train.TrainConfig(steps=150, batch_size=4, text_len=TEXT_LEN, lr=3e-3, warmup=0.1)
    summary = finetune(files.base, files.tok_path, files.train, tmp_path / "run", config, val=files.train,
                       progress=False)
    final = summary.losses[-1][1]
    assert summary.losses[0][1] > 5.0 and final < 0.05, summary.losses[-5:]  # measured: 7.7 -> 0.006
    assert summary.evals[-1]["exact_match"] == 1.0 and summary.evals[-1]["val_loss"] < 0.05
    # Independently of the fast path: the reference, in float64, on the exported weights.
    model_config, trained = ref.load(summary.files["npz"])
    trained = ref.cast_params(trained, np.float64)
    rows = records()
    images = ref.preprocess([f"{files.dir}/{r['image']}" for r in rows], 28).astype(np.float64)
    prompt = files.tok.batch_prompts([PREFIX] * len(rows))
    out = ref.generate(trained, model_config, images, *prompt, max_new_tokens=8)
    assert files.tok.decode_generations(out.tokens) == [r["suffix"] for r in rows]
    _, hf = ref.load(summary.files["hf"])  # the HF export holds the same weights
    for key, value in flatten(hf).items():
        np.testing.assert_array_equal(value, flatten(trained)[key].astype(np.float32), err_msg=key)
