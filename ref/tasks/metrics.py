"""The transfer-task metrics of the PaliGemma papers, each a small pure function.

    report = cider_d(["a dog runs"], [["a dog is running", "the dog runs"]])
    report.metrics["cider"], report.count, report.invalid

Per example: `vqav2_accuracy`, `exact_match`, `relaxed_match`, `box_iou`, `mask_iou`. Over a
data set, each returns a `Report`: the mean score, how many examples were scored and how many
predictions were unusable (`None`: the caller could not parse the model's output into an answer,
a box or a mask). Unusable predictions score 0 and are counted, never dropped, so a model that
emits garbage cannot raise its mean by skipping examples.

Which reference each one follows (docs/transfer.md maps them to the papers' tables):
  CIDEr-D   the `Cider` scorer of pycocoevalcap 1.2, which is CIDEr-D despite its name.
  VQAv2     the official VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py), as the
            evaluation server runs it.
  exact     big_vision's VQA evaluator for single-answer sets (OCR-VQA, ...).
  relaxed   pix2struct's `relaxed_correctness` (ChartQA), as big_vision's ChartQA evaluator.
  box, mask big_vision's referring-expression segmentation evaluator (boxacc, miou).
"""

import dataclasses
import math
import re
from collections import Counter

import numpy as np

CIDER_N = 4  # n-grams 1..4
CIDER_SIGMA = 6.0  # standard deviation of the Gaussian length penalty
CIDER_SCALE = 10.0  # CIDEr-D multiplies by 10 so scores resemble other metrics (papers print x100)


@dataclasses.dataclass(frozen=True)
class Report:
    """One metric over a data set.

    metrics: name -> mean over all `count` examples (unusable predictions counted as 0).
    count: examples scored. invalid: how many predictions were unusable (None).
    per_example: each example's score, in input order.
    """

    metrics: dict
    count: int
    invalid: int
    per_example: tuple

    def as_dict(self):
        """JSON-ready: the metrics plus `count` and `invalid`."""
        return {**self.metrics, "count": self.count, "invalid": self.invalid}


def _report(name, scores, invalid, **more):
    scores = tuple(float(s) for s in scores)
    mean = sum(scores) / len(scores) if scores else float("nan")
    return Report({name: mean, **more}, len(scores), invalid, scores)


def _check_lengths(predictions, truths, what):
    if len(predictions) != len(truths):
        raise ValueError(f"{what}: {len(predictions)} predictions but {len(truths)} ground truths")


# ---------------------------------------------------------------------------- CIDEr-D

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORD = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,:]\d+)+|\w+(?:-\w+)*")


def tokenize_caption(text):
    """A caption -> space-joined lowercase tokens, punctuation dropped.

    Stands in for the Java Stanford PTBTokenizer that pycocoevalcap runs (`-lowerCase`, then
    its punctuation list removed). Like it: clitics split off ("don't" -> "do n't", "dog's" ->
    "dog 's"), hyphenated words and numbers with `.`, `,` or `:` ("3.5", "10:30") kept whole,
    every other punctuation mark dropped. Unlike it: no PTB rules beyond those (abbreviations
    such as "u.s." split at their periods, "&" and "$" are dropped, not kept), so scores on
    real captions can differ slightly from PTB-tokenised ones.
    """
    text = _CLITIC.sub(r" \1", text.lower().replace("\u2019", "'"))
    return " ".join(_WORD.findall(text))


def _ngrams(tokens):
    """Token list -> Counter of every k-gram (a tuple), k = 1..CIDER_N."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, CIDER_N + 1)
                   for i in range(len(tokens) - k + 1))


def _tfidf(counts, doc_freq, log_images):
    """n-gram counts -> (CIDER_N dicts n-gram -> tf * idf, CIDER_N vector norms).

    tf is the raw count (pycocoevalcap; the paper normalises by the caption's n-gram total,
    which changes what the clipping below compares). idf = log(#images) - log(max(1, df)),
    df = the number of images whose references contain the n-gram.
    """
    vecs = [{} for _ in range(CIDER_N)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
    return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]


def _similarity(cand, ref, cand_len, ref_len):
    """CIDEr-D between one candidate and one reference, averaged over n = 1..CIDER_N.

    Per n: sum over the candidate's n-grams of min(g_c, g_r) * g_r (the clipping: repeating a
    word does not pay), divided by |g_c| |g_r| when both are non-zero, times the length penalty
    exp(-(l_c - l_r)^2 / (2 sigma^2)).
    """
    (cand_vecs, cand_norms), (ref_vecs, ref_norms) = cand, ref
    penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * CIDER_SIGMA ** 2))
    total = 0.0
    for n in range(CIDER_N):
        dot = sum(min(w, ref_vecs[n].get(g, 0.0)) * ref_vecs[n].get(g, 0.0)
                  for g, w in cand_vecs[n].items())
        if cand_norms[n] != 0 and ref_norms[n] != 0:
            dot /= cand_norms[n] * ref_norms[n]
        total += dot * penalty
    return total / CIDER_N


def cider_d(predictions, references, *, tokenize=True):
    """CIDEr-D (Vedantam et al. 2015), exactly as pycocoevalcap's `Cider` scorer computes it.

    For image i with candidate c and references S_i:
        CIDEr-D(c, S_i) = 10 / |S_i| * sum_{s in S_i} 1/4 * sum_{n=1..4} sim_n(c, s)
    with sim_n as in `_similarity` over tf-idf vectors of n-grams (`_tfidf`), document
    frequencies taken from the references of this data set ("corpus" mode; coco-caption's
    other mode, precomputed COCO-train frequencies, is not what pycocoevalcap ships). The score
    reported is the mean over images. Quirks kept from the package: the length l in the
    penalty is the number of bigrams, max(words - 1, 0), not the word count; with one image
    every idf is log(1) - log(1) = 0, so a single image always scores 0.

    Args:
      predictions: [N] candidate captions (str, or None for an unusable prediction: scores 0).
      references: [N] lists of one or more reference captions.
      tokenize: apply `tokenize_caption` to everything first; False when the text is already
        tokenised (tokens separated by spaces, as pycocoevalcap expects).
    Returns:
      Report with metrics {"cider": mean over images} (papers print it x100).
    """
    _check_lengths(predictions, references, "cider_d")
    prep = tokenize_caption if tokenize else (lambda s: s)
    refs = []
    for i, group in enumerate(references):
        if isinstance(group, str) or len(group) == 0:
            raise ValueError(f"cider_d: references[{i}] must be a non-empty list of captions, "
                             f"got {group!r}")
        refs.append([_ngrams(prep(r).split()) for r in group])
    cands = [_ngrams(prep(p).split() if p is not None else []) for p in predictions]
    doc_freq = Counter(g for group in refs for g in set().union(*group))
    log_images = math.log(len(refs)) if refs else 0.0

    def length(counts):
        return sum(c for g, c in counts.items() if len(g) == 2)  # the bigram count

    scores = []
    for cand, group in zip(cands, refs):
        vec = _tfidf(cand, doc_freq, log_images)
        sims = [_similarity(vec, _tfidf(r, doc_freq, log_images), length(cand), length(r))
                for r in group]
        scores.append(CIDER_SCALE * sum(sims) / len(group))
    return _report("cider", scores, sum(p is None for p in predictions))


# ---------------------------------------------------------------------------- VQA

# The official script's contraction table, written as its canonical forms: each is looked up
# under every spelling with exactly one apostrophe missing ("dont", "couldnt've", "couldn'tve").
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've
it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've""".split()
_CONTRACTIONS = {
    **{w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, ch in enumerate(w) if ch == "'"},
    # Three entries that break the pattern; the last maps the wrong way round. Kept as the
    # server scores with them.
    "let's": "let's", "she's": "she's", "somebody'd": "somebodyd",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]  # not ' (possessives) nor : (times such as 2:50)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The script writes "(?!<=\d)(\.)(?!\d)": a typo of the lookbehind (?<!\d) that is in fact a
# lookahead always true at a period, so only "not followed by a digit" acts. It also passes
# re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_punctuation(text):
    """The official script's punctuation step (`processPunctuation`).

    Each mark of _PUNCT is deleted if it touches a space somewhere in the text, or if the text
    has a digit-comma-digit anywhere ("100,978" -> "100978"); otherwise it becomes a space
    ("black-and-white" -> "black and white"). Then periods not followed by a digit go ("2.5"
    stays).
    """
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or digit_comma) else " ")
    return _PERIOD.sub("", out, count=32)


def vqa_normalize(answer):
    """A predicted answer as the official script compares it: whitespace trimmed, the
    punctuation step, lowercase, number words 'none', 'zero' ... 'ten' -> digits, articles
    (a, an, the) dropped, missing contraction apostrophes added ("dont" -> "don't")."""
    text = vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqav2_accuracy(prediction, answers):
    """VQAv2 accuracy of one prediction against the human answers (10 in VQAv2).

        acc = mean over i of min(1, #{j != i : answers[j] == pred} / 3)

    i.e. min(#matching humans / 3, 1) averaged over the ten 9-of-10 subsets. The prediction
    goes through `vqa_normalize`; the human answers (already normalised in the annotation
    files) only through `vqa_punctuation`, and only when they are not all the same string —
    exactly as the official script (big_vision's evaluator differs: it normalises both fully,
    and neither when the humans agree).

    Args:
      prediction: str, or None for an unusable prediction (0).
      answers: two or more human answers.
    Returns:
      float in [0, 1].
    """
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(answers) < 2 or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"vqav2_accuracy: expected two or more human answers (VQAv2 has 10), "
                         f"got {answers!r}")
    if prediction is None:
        return 0.0
    pred = vqa_normalize(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_punctuation(a) for a in answers]
    matches = [a == pred for a in answers]
    n_match = sum(matches)
    return sum(min(1.0, (n_match - m) / 3) for m in matches) / len(answers)


def vqav2_report(predictions, answers):
    """Mean `vqav2_accuracy` over questions: Report {"vqav2_accuracy": mean}."""
    _check_lengths(predictions, answers, "vqav2_report")
    scores = [vqav2_accuracy(p, a) for p, a in zip(predictions, answers)]
    return _report("vqav2_accuracy", scores, sum(p is None for p in predictions))


def _as_list(truth):
    return [truth] if isinstance(truth, str) else list(truth)


def exact_match(prediction, answers, *, lower=False):
    """1.0 if the prediction, whitespace-trimmed, equals one of the answers (trimmed), else 0.

    big_vision's evaluator for single-answer VQA sets (OCR-VQA, ...), with its optional
    `to_lower`. None (an unusable prediction) scores 0.
    """
    if prediction is None:
        return 0.0
    norm = (lambda s: s.strip().lower()) if lower else (lambda s: s.strip())
    return float(any(norm(prediction) == norm(a) for a in _as_list(answers)))


def exact_match_report(predictions, answers, *, lower=False):
    """Mean `exact_match`: Report {"exact_match": mean}; answers[i] is a str or a list."""
    _check_lengths(predictions, answers, "exact_match_report")
    scores = [exact_match(p, a, lower=lower) for p, a in zip(predictions, answers)]
    return _report("exact_match", scores, sum(p is None for p in predictions))


def _to_float(text):
    """pix2struct's number reading: float(text), or float(text without "%") / 100."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction, target, max_relative_change=0.05):
    """ChartQA's relaxed correctness (Masry et al. 2022, after Methani et al. 2020).

    If both read as numbers (`_to_float`: "12.5", "1e3", "40%" = 0.4) and the target is not
    0: correct when |pred - target| / |target| <= 5%. Otherwise: correct when equal ignoring
    case. As pix2struct's `relaxed_correctness` (big_vision's matches it with to_lower), plus
    trimming surrounding whitespace. None (an unusable prediction) scores 0.
    """
    if prediction is None:
        return 0.0
    prediction, target = prediction.strip(), target.strip()
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= max_relative_change)
    return float(prediction.lower() == target.lower())


def relaxed_accuracy_report(predictions, targets, max_relative_change=0.05):
    """Mean over examples of the best `relaxed_match` over each example's targets (a str or a
    list; pix2struct's aggregation): Report {"relaxed_accuracy": mean}."""
    _check_lengths(predictions, targets, "relaxed_accuracy_report")
    scores = [max(relaxed_match(p, t, max_relative_change) for t in _as_list(ts))
              for p, ts in zip(predictions, targets)]
    return _report("relaxed_accuracy", scores, sum(p is None for p in predictions))


# ---------------------------------------------------------------------------- boxes, masks

def _box(box, what):
    box = np.asarray(box, dtype=np.float64)  # [4]: y0, x0, y1, x1
    if box.shape != (4,) or not np.isfinite(box).all():
        raise ValueError(f"{what}: expected 4 finite numbers [y0, x0, y1, x1], got {box.tolist()}")
    return box


def _area(y0, x0, y1, x1):
    return max(y1 - y0, 0.0) * max(x1 - x0, 0.0)


def box_iou(a, b):
    """Intersection over union of two boxes [y0, x0, y1, x1] (any one unit for both).

    An inverted side counts as zero extent (big_vision's `_area`). 0 when the union is empty.
    """
    a, b = _box(a, "box_iou: a"), _box(b, "box_iou: b")
    inter = _area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = _area(*a) + _area(*b) - inter
    return inter / union if union > 0 else 0.0


def detection_report(pred_boxes, gt_boxes, thresholds=(0.5, 0.75)):
    """Referring-expression detection: one predicted box per example against its true box.

    Accuracy at t is the fraction of examples with IoU >= t (big_vision's boxacc/t, computed
    there in [0, 1] image-normalised coordinates). A None prediction (unparseable output)
    has IoU 0.

    Args:
      pred_boxes: [N] boxes [y0, x0, y1, x1], or None.
      gt_boxes: [N] boxes with positive area, same unit.
      thresholds: IoU thresholds.
    Returns:
      Report {"box_iou": mean IoU, "acc@0.5": ..., "acc@0.75": ...}; per_example holds IoUs.
    """
    _check_lengths(pred_boxes, gt_boxes, "detection_report")
    ious = []
    for i, (pred, gt) in enumerate(zip(pred_boxes, gt_boxes)):
        gt = _box(gt, f"detection_report: gt_boxes[{i}]")
        if _area(*gt) <= 0:
            raise ValueError(f"detection_report: gt_boxes[{i}] = {gt.tolist()} has no area")
        ious.append(0.0 if pred is None else box_iou(_box(pred, f"pred_boxes[{i}]"), gt))
    acc = {f"acc@{t:g}": sum(iou >= t for iou in ious) / len(ious) if ious else float("nan")
           for t in thresholds}
    return _report("box_iou", ious, sum(p is None for p in pred_boxes), **acc)


def _mask(mask, what):
    mask = np.asarray(mask)  # [H, W]
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer)
                                   and np.isin(mask, (0, 1)).all()):
        raise ValueError(f"{what}: expected a boolean (or 0/1) mask, got {mask.dtype}; "
                         f"threshold the decoded mask first (> 0)")
    return mask.astype(bool)


def mask_iou(pred, gt):
    """Pixel IoU of two boolean masks of one shape [H, W]: |pred & gt| / |pred | gt|; 0 when
    both are empty."""
    pred, gt = _mask(pred, "mask_iou: pred"), _mask(gt, "mask_iou: gt")
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: pred shape {list(pred.shape)} != gt shape {list(gt.shape)}")
    union = int((pred | gt).sum())  # pixels in either  [H, W] -> scalar
    return int((pred & gt).sum()) / union if union else 0.0


def segmentation_report(pred_masks, gt_masks):
    """Referring-expression segmentation: mean over examples of the pixel IoU between the
    predicted mask (already decoded and pasted at the image's full resolution) and the true
    one; big_vision's `miou`. A None prediction (unparseable output) has IoU 0.

    Args:
      pred_masks: [N] boolean [H_i, W_i] masks, or None.
      gt_masks: [N] non-empty boolean [H_i, W_i] masks.
    Returns:
      Report {"miou": mean IoU}; per_example holds IoUs.
    """
    _check_lengths(pred_masks, gt_masks, "segmentation_report")
    ious = []
    for i, (pred, gt) in enumerate(zip(pred_masks, gt_masks)):
        gt = _mask(gt, f"segmentation_report: gt_masks[{i}]")
        if not gt.any():
            raise ValueError(f"segmentation_report: gt_masks[{i}] is empty (IoU undefined)")
        if pred is not None and np.shape(pred) != gt.shape:
            raise ValueError(f"segmentation_report: pred_masks[{i}] shape "
                             f"{list(np.shape(pred))} != gt_masks[{i}] shape {list(gt.shape)}")
        ious.append(0.0 if pred is None else mask_iou(pred, gt))
    return _report("miou", ious, sum(p is None for p in pred_masks))
