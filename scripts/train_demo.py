"""Reproduces the embedded demo model (`paligemma/ref/demo/assets/`): a small PaliGemma trained from
scratch by this project's own fine-tuning code on synthetic scenes of coloured shapes.

    python scripts/train_demo.py --work /tmp/demo-run                 # train, then score held-out
    python scripts/train_demo.py --work /tmp/demo-run --install       # ... and copy into ref/demo/assets

Steps (each writes into --work; nothing is downloaded):
  1. the mask VQ-VAE (released layout, narrower) trained on mask crops of the three shapes;
  2. the dataset: scenes as PNG files, four tasks each (caption / count / detect / segment), JSONL;
  3. a small SentencePiece tokenizer with the 1024 loc + 128 seg pieces;
  4. a randomly initialised PaliGemma 2-style model saved as a checkpoint, then
     `paligemma.fast.finetune.finetune` on the training JSONL (every parameter trained);
  5. held-out scoring (`scripts/score_demo.py`): exact match for captions and counts, mean IoU for
     boxes and masks; written to --work/metrics.json (the numbers in docs/demo.md).
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from paligemma import ref
from paligemma.fast import vqvae as fast_vqvae
from paligemma.fast.finetune import finetune
from paligemma.fast.train import TrainConfig
from paligemma.ref import vqvae
from paligemma.ref.config import GemmaConfig, PaliGemmaConfig, VisionConfig
from paligemma.ref.tasks import answers, metrics, shapes

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "..", "ref", "demo", "assets")  # the repository's copy (--install)
SCENE_SIZE = shapes.DEMO_SCENE["size"]  # pixels of the generated images; the model reads them at 64
MAX_SHAPES = shapes.DEMO_SCENE["max_shapes"]
GRID = shapes.DEMO_SCENE["grid"]  # 4 px of the 128 px scene: pixel edges of the 64 px model input
VAE = vqvae.VAEConfig(num_codes=128, embed_dim=32, hidden=8)  # released: embed 512, hidden 16


def demo_config(vocab_size):
    """PaliGemma 2's structure (post-norms, softcaps, GQA) at a size a laptop trains in minutes."""
    return PaliGemmaConfig(
        VisionConfig(image_size=64, patch_size=8, width=128, depth=3, mlp_dim=256, num_heads=4),
        GemmaConfig(width=128, depth=3, mlp_dim=384, num_heads=4, num_kv_heads=2, head_dim=32,
                    vocab_size=vocab_size, attn_logits_softcap=50.0, final_logits_softcap=30.0, post_norms=True),
        name="demo-shapes")


# --------------------------------------------------------------------------- 1. the mask VQ-VAE

def random_crops(rng, n):
    """[n, 64, 64] mask crops of random shapes in random boxes, as big_vision builds them."""
    crops = []
    for _ in range(n):
        kind = shapes.KINDS[int(rng.integers(len(shapes.KINDS)))]
        side = int(rng.integers(SCENE_SIZE // 7, SCENE_SIZE // 3 + 1))
        y0, x0 = (int(v) for v in rng.integers(0, SCENE_SIZE - side, size=2))
        box = (y0, x0, y0 + side, x0 + side)
        crops.append(answers.crop_mask(shapes.shape_mask(kind, SCENE_SIZE, box), box))
    return np.stack(crops)  # [n, 64, 64]


def vae_loss(params, masks, beta=0.25):
    z = fast_vqvae._encode_latents(params, masks)  # [B, 4, 4, E]
    codes = fast_vqvae.quantize(params["codebook"], z)  # [B, 16]
    zq = params["codebook"][codes].reshape(z.shape)  # [B, 4, 4, E]
    straight = z + jax.lax.stop_gradient(zq - z)  # gradients pass to the encoder unchanged
    recon = fast_vqvae.decode_latents(params, straight)  # [B, 64, 64]
    commit = jnp.mean((jax.lax.stop_gradient(zq) - z) ** 2)
    codebook = jnp.mean((zq - jax.lax.stop_gradient(z)) ** 2)
    return jnp.mean((recon - (2 * masks - 1)) ** 2) + codebook + beta * commit


def train_vae(work, steps, seed):
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(jnp.asarray, vqvae.init_vae(VAE, seed=seed))
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, masks):
        loss, grads = jax.value_and_grad(vae_loss)(params, masks)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        params, state, loss = step(params, state, jnp.asarray(random_crops(rng, 64)))
        if i % 200 == 0 or i == steps - 1:
            print(f"  vae step {i}: loss {float(loss):.4f}", flush=True)
    params = jax.tree_util.tree_map(np.asarray, params)
    path = os.path.join(work, "demo-vae.npz")
    vqvae.save_vae(path, params)
    held = random_crops(np.random.default_rng(seed + 1), 256)
    recon = vqvae.decode(params, vqvae.encode(params, held)) > 0
    iou = np.mean([metrics.mask_iou(r, h > 0.5) for r, h in zip(recon, held)])
    print(f"  vae: held-out crop IoU after encode -> decode {iou:.3f}")
    return params, float(iou)


# --------------------------------------------------------------------------- 4. structured init

def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))  # [n, n]


def _halfwave_features(t, n_freq):
    """cos/sin(pi k t) for k = 1..n_freq: smooth, non-periodic on t in [0, 1]. [..., 2 n_freq]"""
    angle = np.pi * t[..., None] * np.arange(1, n_freq + 1)
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)


def structured_init(params, config, tok, seed):
    """Gives positions a geometry at initialisation, so that localisation is learnable in minutes.

    Two tables of random values are replaced, both still trained afterwards:
      img/pos_embedding: half-wave features of the patch row and of its column (8 frequencies each:
      with the demo's 8 patches per side that is close to a complete cosine basis, so each row
      and each column gets its own, nearly orthogonal code rather than a smooth map);
      the 1024 `<locNNNN>` rows of the (tied) token embedding: half-wave features of the bin
      (32 frequencies) plus one direction shared by all loc tokens, so a hidden state can raise
      "some loc token" at once and then pick the bin with a smooth, peaked logit profile.
    Each is rotated by a random orthogonal matrix and rescaled to the random init's row norm.
    """
    rng = np.random.default_rng(seed + 99)
    params = jax.tree_util.tree_map(np.array, params)
    pos = params["img"]["pos_embedding"]  # [1, P, W]
    side = config.vision.image_size // config.vision.patch_size
    rows, cols = np.divmod(np.arange(side * side), side)
    feats = np.concatenate([_halfwave_features((rows + 0.5) / side, 8), _halfwave_features((cols + 0.5) / side, 8)], -1)
    width = pos.shape[-1]
    feats = np.pad(feats, ((0, 0), (0, width - feats.shape[-1]))) @ _orthogonal(rng, width)  # [P, W]
    norm = np.linalg.norm(pos[0], axis=-1).mean()
    pos[0] = feats / np.linalg.norm(feats, axis=-1, keepdims=True) * norm
    table = params["llm"]["embedder"]["input_embedding"]  # [V, D]
    loc = np.asarray(tok.loc_ids)  # [1024], bin order
    width = table.shape[-1]
    feats = _halfwave_features((np.arange(1024) + 0.5) / 1024, 32)  # [1024, 64]
    feats = np.concatenate([feats / np.sqrt(32), np.ones((1024, 1))], -1)  # shared direction last
    feats = np.pad(feats, ((0, 0), (0, width - feats.shape[-1]))) @ _orthogonal(rng, width)  # [1024, D]
    norm = np.linalg.norm(table, axis=-1).mean()
    table[loc] = feats / np.linalg.norm(feats, axis=-1, keepdims=True) * norm
    return params


# --------------------------------------------------------------------------- 2.-3. data, tokenizer

def write_split(work, name, n_scenes, seed, vae, loc_rounds=1):
    """Writes `name`.jsonl, its PNGs and `name`-truth.json (every shape's kind, colour and pixel box,
    for scoring); returns the JSONL records."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    codes_of = lambda s: [int(c) for c in vqvae.encode(vae, answers.crop_mask(s.mask, s.box)[None])[0]]  # noqa: E731
    records, truth = [], {}
    for i in range(n_scenes):
        scene = shapes.random_scene(rng, SCENE_SIZE, MAX_SHAPES, grid=GRID)
        image = f"{name}/{i:05d}.png"
        Image.fromarray(scene.image).save(os.path.join(work, image))
        pairs = shapes.task_examples(scene, rng, codes_of)
        for _ in range(loc_rounds - 1):  # more detect/segment questions (other kinds) of the same scene
            pairs += [p for p in shapes.task_examples(scene, rng, codes_of) if p[0].split()[0] in ("detect", "segment")]
        for prefix, suffix in dict.fromkeys(pairs):
            records.append({"image": image, "prefix": prefix, "suffix": suffix})
        truth[image] = [{"kind": s.kind, "colour": s.colour, "box": list(s.box)} for s in scene.shapes]
    with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(work, f"{name}-truth.json"), "w") as f:
        json.dump({"size": SCENE_SIZE, "scenes": truth}, f)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--train-scenes", type=int, default=6000)
    parser.add_argument("--val-scenes", type=int, default=250)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-seed", type=int, default=0, help="the shipped VAE's is 0")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loc-rounds", type=int, default=2, help="detect/segment questions per scene and task")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--continue-from", metavar="WORK", help="start from the model, tokenizer and VAE "
                        "of an earlier --work folder instead of random weights")
    parser.add_argument("--vae-from", metavar="WORK", help="reuse the mask VQ-VAE of an earlier --work folder")
    parser.add_argument("--install", action="store_true", help="copy the results into ref/demo/assets")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()

    tok_path = os.path.join(args.work, "demo-tokenizer.model")
    if args.continue_from:
        print(f"1. mask VQ-VAE and tokenizer from {args.continue_from}", flush=True)
        for name in ("demo-vae.npz", "demo-tokenizer.model"):
            shutil.copy(os.path.join(args.continue_from, name), os.path.join(args.work, name))
        vae = vqvae.load_vae(os.path.join(args.work, "demo-vae.npz"))
        with open(os.path.join(args.continue_from, "metrics.json")) as f:
            earlier = json.load(f)
        vae_iou = earlier["vae_crop_iou"]
    elif args.vae_from:
        print(f"1. mask VQ-VAE from {args.vae_from}", flush=True)
        shutil.copy(os.path.join(args.vae_from, "demo-vae.npz"), os.path.join(args.work, "demo-vae.npz"))
        vae = vqvae.load_vae(os.path.join(args.work, "demo-vae.npz"))
        with open(os.path.join(args.vae_from, "metrics.json")) as f:
            vae_iou = json.load(f)["vae_crop_iou"]
    else:
        print("1. mask VQ-VAE", flush=True)
        vae, vae_iou = train_vae(args.work, args.vae_steps, args.vae_seed)
    print(f"2. data ({time.time() - t0:.0f}s)", flush=True)
    train = write_split(args.work, "train", args.train_scenes, args.seed + 10, vae, args.loc_rounds)
    write_split(args.work, "val", args.val_scenes, args.seed + 20, vae)
    print("3. tokenizer", flush=True)
    if args.continue_from:
        tok = ref.Tokenizer(tok_path)
    else:
        words = sorted({r["prefix"] for r in train} | {r["suffix"] for r in train if "<" not in r["suffix"]})
        tok = ref.train_tiny_tokenizer(tok_path, vocab_size=1500, extra_text=words * 20)
    # [BOS] prefix "\n" suffix [EOS], plus the one extra position of big_vision's layout.
    text_len = max(len(tok.encode(r["prefix"])) + len(tok.encode(r["suffix"])) + 3 for r in train) + 1
    print(f"   vocabulary {tok.vocab_size}, text_len {text_len}")

    print(f"4. model, training ({time.time() - t0:.0f}s)", flush=True)
    config = demo_config(tok.vocab_size)
    init = os.path.join(args.work, "init.npz")
    if args.continue_from:
        shutil.copy(os.path.join(args.continue_from, "run", "model.npz"), init)
        earlier_steps = earlier["train_steps"] + earlier.get("earlier_steps", 0)
    else:
        ref.save(init, config, structured_init(ref.init_params(config, seed=args.seed), config, tok, args.seed),
                 overwrite=True)
        earlier_steps = 0
    run = os.path.join(args.work, "run")
    shutil.rmtree(run, ignore_errors=True)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, text_len=text_len, lr=args.lr, warmup=0.05,
                     weight_decay=1e-4, clip_norm=1.0, trainable="all", log_every=50, seed=args.seed,
                     checkpoint_every=args.checkpoint_every, keep_checkpoints=40)
    summary = finetune(init, tok_path, os.path.join(args.work, "train.jsonl"), run, tc, export=("npz",))
    print(f"   {summary.last_step} steps in {summary.seconds:.0f}s, last loss {summary.losses[-1][1]:.4f}")

    print(f"5. held-out scoring ({time.time() - t0:.0f}s)", flush=True)
    sys.path.insert(0, HERE)
    from score_demo import score

    report = score(os.path.join(run, "model.npz"), tok_path, os.path.join(args.work, "demo-vae.npz"),
                   os.path.join(args.work, "val.jsonl"))
    report.update(vae_crop_iou=vae_iou, train_steps=summary.last_step, earlier_steps=earlier_steps, train_seconds=round(summary.seconds),
                   batch_size=args.batch_size, train_scenes=args.train_scenes, final_loss=summary.losses[-1][1])
    with open(os.path.join(args.work, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    if args.install:
        os.makedirs(ASSETS, exist_ok=True)
        shutil.copy(os.path.join(run, "model.npz"), os.path.join(ASSETS, "demo-model.npz"))
        for name in ("demo-tokenizer.model", "demo-vae.npz", "metrics.json"):
            shutil.copy(os.path.join(args.work, name), os.path.join(ASSETS, name if name != "metrics.json" else "demo-metrics.json"))
        print(f"installed into {os.path.abspath(ASSETS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
