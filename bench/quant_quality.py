"""How much int8 and int4 change a model's predictions: the quality table of docs/quantization.md.

    python bench/quant_quality.py                       # tiny random models with real proportions
    python bench/quant_quality.py --demo                # ... and the trained demo model (ref/demo/assets)

For each format (and keep option), against the float32 model, with `paligemma.fast`:
  top-1 agreement   teacher-forced along the float32 model's greedy answer: the share of answer
                    positions (EOS included) where the quantized model's argmax is the same token;
  greedy agreement  the share of examples whose whole greedy answer is identical.
The demo model also answers `detect K` on held-out scenes (`ref.tasks.shapes`, a seed its training never
used): a detection is correct when every true box of kind K is matched one to one by a predicted
box with IoU >= 0.5 and nothing else is predicted (scripts/score_demo.py's matching).
"""

import argparse
import json
import os
import time

import numpy as np

from paligemma import fast, ref
from paligemma.ref import quant as rq
from paligemma.ref.config import GemmaConfig, PaliGemmaConfig, VisionConfig
from paligemma.ref.demo import ASSETS

FORMATS = [("int8", rq.Keep()), ("int8", rq.Keep(embedding=True)), ("int4", rq.Keep()),
           ("int4", rq.Keep(vision=True, embedding=True, end_layers=1))]


def proportional_configs():
    """Released shapes divided by 8 (widths, MLP, head dims; heads and kv heads kept), 4 text layers."""
    vision = VisionConfig(image_size=56, patch_size=14, width=144, depth=3, mlp_dim=538, num_heads=2)
    return [
        PaliGemmaConfig(vision, GemmaConfig(width=256, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1,
                                            head_dim=32, vocab_size=8192), name="PaliGemma 3B / 8"),
        PaliGemmaConfig(vision, GemmaConfig(width=448, depth=4, mlp_dim=1792, num_heads=16, num_kv_heads=8,
                                            head_dim=32, vocab_size=8192, attn_logits_softcap=50.0,
                                            final_logits_softcap=30.0, post_norms=True),
                        name="PaliGemma 2 10B / 8"),
    ]


def _with_answers(prompt, new):
    """The prompt followed by each example's generated tokens as a causal suffix (padding last)."""
    images, tokens, mask_ar, input_mask = prompt
    rows = []
    for b in range(len(tokens)):
        n = int(input_mask[b].sum())
        rows.append((np.concatenate([tokens[b, :n], new[b], tokens[b, n:]]),
                     np.concatenate([mask_ar[b, :n], np.ones(new.shape[1], int), mask_ar[b, n:]]),
                     np.concatenate([input_mask[b, :n], np.ones(new.shape[1], bool), input_mask[b, n:]])))
    return (images, *(np.stack(r) for r in zip(*rows)))


def agreement(float_params, q_params, config, prompt, new_tokens):
    """(top-1 agreement, greedy agreement, logit error, distinct tokens) of a quantized model vs
    float32: the error is max |logit difference| / max |float32 logit| over the teacher-forced answer
    positions; distinct tokens: how many different ids the float32 answers hold (a random model that
    repeats one token agrees trivially)."""
    want = fast.generate(float_params, config, *prompt, max_new_tokens=new_tokens).tokens  # [B, n]
    got = fast.generate(q_params, config, *prompt, max_new_tokens=new_tokens).tokens
    forced = _with_answers(prompt, want)
    a = np.asarray(fast.forward(float_params, config, *forced))  # [B, T + n, V]
    b = np.asarray(fast.forward(q_params, config, *forced))
    same, total, err = 0, 0, 0.0
    for i in range(len(want)):
        n = int(prompt[3][i].sum())
        eos = np.flatnonzero(want[i] == config.eos_id)
        steps = int(eos[0]) + 1 if eos.size else new_tokens
        rows = slice(n - 1, n - 1 + steps)  # row n - 1 + j predicts answer token j
        same += int((a[i, rows].argmax(-1) == b[i, rows].argmax(-1)).sum())
        err = max(err, float(np.abs(a[i, rows] - b[i, rows]).max() / np.abs(a[i, rows]).max()))
        total += steps
    return same / total, float(np.mean([(g == w).all() for g, w in zip(got, want)])), err, len(np.unique(want))


def random_prompts(config, batch, text_tokens, seed):
    rng = np.random.default_rng(seed)
    R = config.vision.image_size
    images = rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32)
    tokens = rng.integers(3, config.llm.vocab_size, (batch, text_tokens))
    tokens[:, 0] = config.bos_id
    return images, tokens, np.zeros_like(tokens), np.ones(tokens.shape, bool)


def random_models(args):
    rows = []
    for config in proportional_configs():
        params = ref.init_params(config, seed=0, dtype=np.float32)
        prompt = random_prompts(config, args.batch, 8, seed=1)
        for fmt, keep in FORMATS:
            qtree = rq.quantize_tree(params, config, fmt, keep)
            top1, greedy, err, distinct = agreement(params, qtree, config, prompt, args.new_tokens)
            rows.append({"model": config.name, "format": fmt, "keep": keep.label(), "top1": top1, "greedy": greedy,
                         "logit_err": err, "distinct_tokens": distinct, "examples": args.batch})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def demo_scenes(n, seed):
    """`n` held-out scenes and one `detect K` prompt per kind present in each."""
    from paligemma.ref.tasks import shapes
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(rng, **shapes.DEMO_SCENE) for _ in range(n)]  # as the demo model was trained
    pairs = [(scene, kind) for scene in scenes for kind in sorted({s.kind for s in scene.shapes})]
    return pairs


def detection_correct(answer, scene, kind):
    """Every true box of `kind` matched one to one (greedy by IoU) with IoU >= 0.5, nothing extra."""
    from paligemma.ref.tasks import answers, metrics
    size = scene.image.shape[0]
    true = [s.box for s in scene.of_kind(kind)]
    objects = answers.parse(answer, size, size).objects
    if len(objects) != len(true) or any(o.errors for o in objects):
        return False
    pairs = sorted(((metrics.box_iou(t, o.box), i, j) for i, t in enumerate(true) for j, o in enumerate(objects)),
                   reverse=True)
    matched, used = {}, set()
    for iou, i, j in pairs:
        if i not in matched and j not in used:
            matched[i] = iou
            used.add(j)
    return len(matched) == len(true) and min(matched.values(), default=1.0) >= 0.5


def demo_model(args):
    from paligemma.fast.pipeline import PaliGemma
    checkpoint, tok = os.path.join(ASSETS, "demo-model.npz"), os.path.join(ASSETS, "demo-tokenizer.model")
    pairs = demo_scenes(args.scenes, args.seed)
    images = [scene.image for scene, _ in pairs]
    prompts = [f"detect {kind}" for _, kind in pairs]
    float_model = PaliGemma.load(checkpoint, tok)
    config = float_model.config
    pixels = ref.preprocess(images, config.vision.image_size, "big_vision")
    prompt = float_model.tokenizer.batch_prompts(prompts)
    prompt = (pixels, *(np.asarray(a) for a in prompt))
    rows, float_answers = [], None
    for fmt, keep in [("float32", None)] + FORMATS:
        model = float_model if fmt == "float32" else PaliGemma.load(checkpoint, tok, quantize=fmt, keep=keep)
        t0 = time.perf_counter()
        answers = [r.text for r in model.generate(images, prompts, max_new_tokens=args.demo_tokens)]
        correct = float(np.mean([detection_correct(a, s, k) for a, (s, k) in zip(answers, pairs)]))
        row = {"model": "demo (trained)", "format": fmt, "keep": "-" if keep is None else keep.label(),
               "detect_correct": correct, "examples": len(pairs), "seconds": time.perf_counter() - t0}
        if fmt == "float32":
            float_answers = answers
        else:
            top1, greedy, err, distinct = agreement(float_model.params, model.params, config, prompt, args.demo_tokens)
            row.update(top1=top1, greedy=greedy, logit_err=err, distinct_tokens=distinct,
                       same_text=float(np.mean([a == b for a, b in zip(answers, float_answers)])))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="prompts per random model")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--demo", action="store_true", help="also the trained demo model (ref/demo/assets)")
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--scenes", type=int, default=40, help="held-out demo scenes")
    parser.add_argument("--seed", type=int, default=20261126, help="scene seed (not one training used)")
    parser.add_argument("--demo-tokens", type=int, default=40)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [] if args.skip_random else random_models(args)
    if args.demo:
        rows += demo_model(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| model | format | keep | top-1 agreement | greedy agreement | logit error | distinct tokens "
          "| detection correct |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = lambda k: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
        err = f"{r['logit_err']:.1e}" if "logit_err" in r else "-"
        print(f"| {r['model']} | {r['format']} | {r['keep']} | {pct('top1')} | {pct('greedy')} | {err} | "
              f"{r.get('distinct_tokens', '-')} | {pct('detect_correct')} |")


if __name__ == "__main__":
    main()
