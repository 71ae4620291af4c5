"""Scores a demo-style model on held-out synthetic scenes (written by `scripts/train_demo.py`).

    python scripts/score_demo.py --checkpoint M.npz --tokenizer T.model --vae V.npz --data val.jsonl

Captions and counts: exact match. `detect K`: every true shape of kind K is matched one to one
with a predicted box (greedily, highest IoU first); the box mean IoU averages over true shapes
(unmatched ones score 0), and extra predicted boxes are counted. `segment K`: the predicted
masks (VQ-VAE decoded, pasted into their boxes, big_vision's convention) are united and compared
with the union of the true masks: mean mask IoU over examples that have such shapes. Examples
whose kind is absent score "empty correct" when the answer has no object. Unparseable objects
count as misses (their errors are counted too).
"""

import argparse
import json
import os
from collections import defaultdict

import numpy as np

from paligemma.fast.pipeline import PaliGemma
from paligemma.ref import vqvae
from paligemma.ref.tasks import metrics, shapes
from paligemma.ref.tasks.answers import parse, paste_mask


def _match(true_boxes, pred_boxes):
    """Greedy one-to-one matching by IoU: the IoU of each true box with its partner (0 if none)."""
    pairs = sorted(((metrics.box_iou(t, p), i, j) for i, t in enumerate(true_boxes) for j, p in enumerate(pred_boxes)),
                   reverse=True)
    best, used = [0.0] * len(true_boxes), set()
    for iou, i, j in pairs:
        if best[i] == 0.0 and j not in used and iou > 0:
            best[i] = iou
            used.add(j)
    return best


def score(checkpoint, tokenizer, vae_path, data, batch_size=64, max_new_tokens=80):
    """Returns a dict of metrics (see the module docstring) for the examples in `data`."""
    root = os.path.dirname(os.path.abspath(data))
    with open(data) as f:
        records = [json.loads(line) for line in f]
    with open(data.replace(".jsonl", "-truth.json")) as f:
        truth = json.load(f)
    size = truth["size"]
    model = PaliGemma.load(checkpoint, tokenizer)
    vae = vqvae.load_vae(vae_path)
    answers = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        results = model.generate([os.path.join(root, r["image"]) for r in chunk], [r["prefix"] for r in chunk],
                                 max_new_tokens=max_new_tokens)
        answers += [r.text for r in results]

    sums = defaultdict(list)
    for record, answer in zip(records, answers):
        task, _, kind = record["prefix"].partition(" ")
        if task in ("caption", "count"):
            sums[f"{task}_exact"].append(answer == record["suffix"])
            continue
        kind = kind.rstrip("s")
        true = [s for s in truth["scenes"][record["image"]] if s["kind"] == kind]
        parsed = parse(answer, size, size, require_seg=task == "segment")
        good = [o for o in parsed.objects if not o.errors]
        sums[f"{task}_objects_with_errors"].append(len(parsed.objects) - len(good))
        if not true:
            sums[f"{task}_empty_correct"].append(not parsed.objects)
            continue
        if task == "detect":
            ious = _match([s["box"] for s in true], [o.box for o in good])
            sums["detect_box_iou"] += ious
            sums["detect_box_recall@0.5"] += [iou >= 0.5 for iou in ious]
            sums["detect_extra_boxes"].append(max(0, len(parsed.objects) - len(true)))
        else:
            want = np.zeros((size, size), bool)
            for s in true:
                want |= shapes.shape_mask(kind, size, tuple(s["box"]))
            got = np.zeros((size, size), bool)
            if good:
                masks = vqvae.decode(vae, np.array([o.seg for o in good]))  # [n, 64, 64]
                for o, m in zip(good, masks):
                    got |= paste_mask(m, o.box, size, size) > 0.5
            sums["segment_mask_iou"].append(metrics.mask_iou(got, want))
    out = {name: float(np.mean(v)) for name, v in sorted(sums.items())}
    out.update({f"n_{name}": len(v) for name, v in sorted(sums.items())})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--vae", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(score(args.checkpoint, args.tokenizer, args.vae, args.data), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
