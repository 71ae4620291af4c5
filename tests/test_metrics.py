"""Transfer-task metrics (paligemma.ref.tasks.metrics).

Expected values are worked by hand in the comments, come from the reference implementations
themselves (pycocoevalcap's Cider scorer), or from a second, literal formula (the ten 9-of-10
subsets enumerated; a box rasterised to pixels); none from the code under test.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paligemma.parity.tolerances import FLOAT64_EXACT, assert_close
from paligemma.ref.tasks import metrics as M


# ---------------------------------------------------------------------------- CIDEr-D

def test_cider_perfect_two_word_caption():
    # Two images, so idf = log(2) - log(df) = log 2 =: L for every n-gram here (df = 1).
    # Image 0: "a b" vs reference "a b". n=1: (L*L + L*L) / (sqrt(2)L * sqrt(2)L) = 1;
    #   n=2: L*L / (L*L) = 1; n=3, n=4: no n-grams, 0. Same length, penalty 1.
    #   10 * (1 + 1 + 0 + 0) / 4 = 5.0  (a perfect 2-word caption is not 10: no 3-, 4-grams)
    # Image 1: "c" vs "d": nothing shared, 0.     Mean: 2.5.
    r = M.cider_d(["a b", "c"], [["a b"], ["d"]])
    assert r.per_example == pytest.approx((5.0, 0.0), abs=1e-12)
    assert r.metrics["cider"] == pytest.approx(2.5, abs=1e-12)
    assert (r.count, r.invalid) == (2, 0)


def test_cider_clipping_and_length_penalty():
    # Image 0: candidate "dog dog dog", reference "dog runs"; every idf is L = log 2.
    #   candidate n=1: {dog: 3L}, |.| = 3L;  reference n=1: {dog: L, runs: L}, |.| = sqrt(2) L
    #   n=1 clipped: min(3L, L) * L / (3L * sqrt(2) L) = 1 / (3 sqrt 2)  (unclipped: 1 / sqrt 2)
    #   n=2: "dog dog" is not in the reference, 0;  n=3: the reference has none, 0.
    #   lengths are bigram counts, 2 and 1: penalty exp(-1 / (2 * 6^2)) = exp(-1/72)
    #   10 * exp(-1/72) / (3 sqrt 2) / 4 = 0.589256 * 0.986207 = 0.581128
    # Image 1: "x" vs "cat": 0.
    expected = 10 * math.exp(-1 / 72) / (3 * math.sqrt(2)) / 4
    r = M.cider_d(["dog dog dog", "x"], [["dog runs"], ["cat"]])
    assert r.per_example == pytest.approx((expected, 0.0), rel=1e-12)
    assert expected == pytest.approx(0.581128, abs=1e-6)


def test_cider_averages_over_references_and_single_image_is_zero():
    # Adding a reference that shares nothing halves image 0's score: 10/|S| * sum over S.
    one = M.cider_d(["a b", "c"], [["a b"], ["d"]]).per_example[0]
    two = M.cider_d(["a b", "c"], [["a b", "z"], ["d"]]).per_example[0]
    assert two == pytest.approx(one / 2, rel=1e-12)
    # One image: idf = log(1) - log(1) = 0 for everything, so the score is 0 by construction.
    assert M.cider_d(["a dog"], [["a dog"]]).per_example == (0.0,)


def test_cider_none_prediction_is_a_counted_miss():
    # As in the first test, image 0 scores 5.0; the None scores 0 and is counted, not dropped
    # (the mean is over both images).
    r = M.cider_d(["a b", None], [["a b"], ["c"]])
    assert r.per_example == pytest.approx((5.0, 0.0), abs=1e-12)
    assert (r.count, r.invalid, r.metrics["cider"]) == (2, 1, pytest.approx(2.5))


def test_cider_bad_references():
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        M.cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty list"):
        M.cider_d(["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 ground truths"):
        M.cider_d(["a", "b"], [["a"]])


_WORDS = st.sampled_from("a dog cat on the grass red runs big two".split())
_CAPTION = st.lists(_WORDS, min_size=0, max_size=10).map(" ".join)
_REFERENCE = st.lists(_WORDS, min_size=1, max_size=10).map(" ".join)  # the package fails on
# a data set whose references are all empty (max() of no document frequencies)


@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(_CAPTION, min_size=n, max_size=n),
    st.lists(st.lists(_REFERENCE, min_size=1, max_size=5), min_size=n, max_size=n))))
def test_cider_matches_pycocoevalcap(data):
    pycocoevalcap = pytest.importorskip("pycocoevalcap.cider.cider")  # the `test` extra
    predictions, references = data
    ours = M.cider_d(predictions, references, tokenize=False)
    mean, per_image = pycocoevalcap.Cider().compute_score(
        {i: refs for i, refs in enumerate(references)},
        {i: [p] for i, p in enumerate(predictions)})
    assert_close(ours.per_example, per_image, FLOAT64_EXACT, "CIDEr-D per image vs pycocoevalcap")
    assert_close(ours.metrics["cider"], mean, FLOAT64_EXACT, "CIDEr-D mean vs pycocoevalcap")


def test_tokenize_caption():
    # Lowercase; clitics split off as PTB does; hyphenated words and numbers kept; punctuation
    # (PTB's list: . , ? ! : ; - -- ... quotes, brackets) dropped.
    assert M.tokenize_caption("A Dog's ball, isn't it?") == "a dog 's ball is n't it"
    assert M.tokenize_caption("Black-and-white photo (3.5 x 10:30)...") == \
        "black-and-white photo 3.5 x 10:30"
    assert M.tokenize_caption("\u201cQuoted\u201d \u2014 they\u2019re here!") == \
        "quoted they 're here"
    assert M.tokenize_caption("  ") == ""


# ---------------------------------------------------------------------------- VQAv2

@pytest.mark.parametrize("raw, normalised", [
    # The rules listed on visualqa.org/evaluation.html, each with its own example:
    ("Yes", "yes"),                          # lowercase
    ("yes.", "yes"), ("2.5", "2.5"),         # periods removed except as decimals
    ("two", "2"), ("None", "0"), ("ten", "10"),  # number words to digits
    ("a dog", "dog"), ("the cat an owl", "cat owl"),  # articles removed
    ("dont", "don't"), ("youre", "you're"),  # missing contraction apostrophes added
    ("couldnt've", "couldn't've"),
    ("girl's", "girl's"), ("2:50 pm", "2:50 pm"),  # apostrophe and colon kept
    ("black-and-white", "black and white"),  # other punctuation -> space ...
    ("red, white", "red white"),             # ... or removed where it touches a space
    ("100,978", "100978"),                   # no space for a comma between digits
    ("100,978 (approx)", "100978 approx"),   # and then no space for any mark (the script's rule)
    ("  yes\n", "yes"),                      # whitespace trimmed first
])
def test_vqa_normalize_official_rules(raw, normalised):
    assert M.vqa_normalize(raw) == normalised


def test_vqa_normalize_script_quirks():
    # The script's period regex only spares periods followed by a digit: "a.b" loses it too.
    assert M.vqa_normalize("st.louis") == "stlouis"
    # ... and it removes at most 32 periods (re.UNICODE passed as `count`).
    assert M.vqa_normalize("." * 40) == "." * 8
    # The one backwards contraction entry.
    assert M.vqa_normalize("somebody'd") == "somebodyd"


@pytest.mark.parametrize("n_match, expected", [
    # answers: n_match x "yes", the rest "no"; the prediction "yes".
    (0, 0.0),
    # 1 match: leaving it out leaves 0 (1 subset); any other leaves 1 -> 1/3 (9 subsets).
    (1, 9 * (1 / 3) / 10),                 # = 0.3
    # 2: leaving one out -> 1/3 (2 subsets); else 2/3 (8 subsets): (2/3 + 16/3) / 10 = 0.6
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
    # 3: leaving one out -> 2/3 (3 subsets); else 3 -> 1 (7 subsets): (2 + 7) / 10 = 0.9
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),
    (4, 1.0),                              # 4: every subset keeps >= 3 matches
    (10, 1.0),
])
def test_vqav2_accuracy_hand_worked(n_match, expected):
    answers = ["yes"] * n_match + ["no"] * (10 - n_match)
    assert M.vqav2_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12)
    assert M.vqav2_accuracy("Yes.", answers) == pytest.approx(expected, abs=1e-12)  # normalised


def test_vqav2_ground_truth_processing_as_the_script():
    # Humans disagree: their answers get the punctuation step (only), so "black-and-white"
    # becomes "black and white" and matches the normalised prediction 9 times -> 1.0.
    mixed = ["black-and-white"] * 9 + ["gray"]
    assert M.vqav2_accuracy("Black and white", mixed) == 1.0
    # Humans agree: their answers are left alone and the normalised prediction no longer
    # matches the raw "black-and-white" (the released annotations are pre-normalised, so this
    # does not bite in practice; it is what the server computes).
    assert M.vqav2_accuracy("black-and-white", ["black-and-white"] * 10) == 0.0
    # Ground truths are never lowercased: "Yes" (disagreeing set) never matches.
    assert M.vqav2_accuracy("yes", ["Yes"] * 5 + ["no"] * 5) == 0.0


@given(st.lists(st.sampled_from(["yes", "no", "2", "two", "red"]), min_size=10, max_size=10),
       st.sampled_from(["yes", "no", "2", "two", "red", "blue"]))
def test_vqav2_accuracy_equals_the_ten_subsets(answers, prediction):
    # Literal definition: average over all C(10, 9) subsets of min(1, matches / 3). These
    # answers need no normalisation except "two" (a number word: the prediction becomes "2",
    # while the humans' "two" is never converted).
    pred = "2" if prediction == "two" else prediction
    subsets = list(itertools.combinations(answers, 9))
    expected = sum(min(1.0, sum(a == pred for a in s) / 3) for s in subsets) / len(subsets)
    assert M.vqav2_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqav2_report_counts_invalid_and_checks_answers():
    r = M.vqav2_report(["yes", None], [["yes"] * 10, ["no"] * 10])
    assert r.per_example == (1.0, 0.0) and (r.count, r.invalid) == (2, 1)
    assert r.as_dict() == {"vqav2_accuracy": 0.5, "count": 2, "invalid": 1}
    with pytest.raises(ValueError, match="two or more human answers"):
        M.vqav2_accuracy("yes", ["yes"])
    with pytest.raises(ValueError, match="two or more human answers"):
        M.vqav2_accuracy("yes", "yes")  # a bare string is not a list of answers


# ---------------------------------------------------------------------------- exact, relaxed

def test_exact_match():
    assert M.exact_match(" Harry Potter ", "Harry Potter") == 1.0  # trimmed
    assert M.exact_match("harry potter", "Harry Potter") == 0.0  # case matters by default
    assert M.exact_match("harry potter", "Harry Potter", lower=True) == 1.0
    assert M.exact_match("b", ["a", "b"]) == 1.0  # any of several answers
    r = M.exact_match_report(["a", "x", None], ["a", "y", "z"])
    assert r.metrics["exact_match"] == pytest.approx(1 / 3) and r.invalid == 1


@pytest.mark.parametrize("pred, target, ok", [
    ("21", "20", 1.0),       # |21 - 20| / 20 = 0.05 <= 0.05
    ("21.2", "20", 0.0),     # 1.2 / 20 = 0.06
    ("19", "20", 1.0),       # 0.05 below
    ("-21", "-20", 1.0),     # relative to |target|
    ("40%", "0.41", 1.0),    # 40% reads as 0.4; |0.4 - 0.41| / 0.41 = 0.024
    ("0.41", "40%", 1.0),    # 0.01 / 0.4 = 0.025
    ("0.0", "0", 0.0),       # target 0: no tolerance, the strings must match
    ("0", "0", 1.0),
    ("Yes", "yes", 1.0),     # text: equal ignoring case (pix2struct)
    ("yes ", "yes", 1.0),    # trimmed
    ("1,000", "1000", 0.0),  # "1,000" is not a number to float(): compared as text
    ("twenty", "20", 0.0),
    (None, "20", 0.0),
])
def test_relaxed_match(pred, target, ok):
    assert M.relaxed_match(pred, target) == ok


def test_relaxed_accuracy_report_takes_the_best_target():
    r = M.relaxed_accuracy_report(["21", "blue", None], [["5", "20"], "Red", "1"])
    assert r.per_example == (1.0, 0.0, 0.0)
    assert (r.count, r.invalid) == (3, 1)


# ---------------------------------------------------------------------------- boxes, masks

def test_box_iou_hand_worked():
    # [0,0,2,2] and [1,1,3,3]: intersection 1x1 = 1, union 4 + 4 - 1 = 7.
    assert M.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert M.box_iou([0, 0, 2, 2], [2, 2, 4, 4]) == 0.0  # touching corners
    assert M.box_iou([2, 2, 0, 0], [0, 0, 2, 2]) == 0.0  # inverted: no area
    with pytest.raises(ValueError, match=r"4 finite numbers \[y0, x0, y1, x1\]"):
        M.box_iou([0, 0, 1], [0, 0, 1, 1])


def test_detection_report_hand_worked():
    gts = [[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 1, 1]]
    preds = [[0, 0, 2, 2],   # IoU 1
             [0, 0, 10, 8],  # 80 / 100 = 0.8
             [0, 0, 10, 6],  # 60 / 100 = 0.6
             [0, 0, 10, 5],  # 50 / 100 = 0.5, counts at 0.5 (IoU >= t)
             None]           # unparseable: 0, counted
    r = M.detection_report(preds, gts)
    assert r.per_example == pytest.approx((1.0, 0.8, 0.6, 0.5, 0.0))
    assert r.metrics["acc@0.5"] == pytest.approx(4 / 5)   # 1, 0.8, 0.6, 0.5
    assert r.metrics["acc@0.75"] == pytest.approx(2 / 5)  # 1, 0.8
    assert r.metrics["box_iou"] == pytest.approx(2.9 / 5)
    assert (r.count, r.invalid) == (5, 1)
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] = \[0.0, 0.0, 0.0, 5.0\] has no area"):
        M.detection_report([[0, 0, 1, 1]], [[0, 0, 0, 5]])


def test_mask_iou_hand_worked():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True                 # 4 pixels, top-left
    pred = np.zeros((4, 4), bool)
    pred[0, :] = True                 # 4 pixels, top row
    # intersection: row 0, columns 0-1 = 2 pixels; union 4 + 4 - 2 = 6.
    assert M.mask_iou(pred, gt) == pytest.approx(2 / 6)
    assert M.mask_iou(gt.astype(np.uint8), gt) == 1.0  # 0/1 integers are fine
    with pytest.raises(ValueError, match="expected a boolean .* threshold"):
        M.mask_iou(np.full((4, 4), 0.3), gt)  # a float mask straight from the decoder
    with pytest.raises(ValueError, match=r"shape \[4, 5\] != gt shape \[4, 4\]"):
        M.mask_iou(np.zeros((4, 5), bool), gt)


def test_segmentation_report():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    r = M.segmentation_report([gt, None, ~gt], [gt, gt, gt])
    # IoUs 1, 0 (unparseable), 0 (disjoint): miou 1/3.
    assert r.per_example == (1.0, 0.0, 0.0) and r.metrics["miou"] == pytest.approx(1 / 3)
    assert (r.count, r.invalid) == (3, 1)
    with pytest.raises(ValueError, match=r"gt_masks\[0\] is empty"):
        M.segmentation_report([gt], [np.zeros((4, 4), bool)])
    with pytest.raises(ValueError, match=r"pred_masks\[0\] shape \[2, 2\] != gt_masks\[0\]"):
        M.segmentation_report([np.ones((2, 2), bool)], [gt])


_SIDE = st.integers(0, 12)


@given(st.tuples(_SIDE, _SIDE, _SIDE, _SIDE), st.tuples(_SIDE, _SIDE, _SIDE, _SIDE))
def test_mask_iou_of_rasterised_boxes_equals_box_iou(a, b):
    # A box with integer corners covers exactly the pixels [y0, y1) x [x0, x1), so the pixel
    # IoU of the two rasterised boxes is their box IoU.
    def raster(y0, x0, y1, x1):
        m = np.zeros((12, 12), bool)
        m[y0:y1, x0:x1] = True
        return m

    assert M.mask_iou(raster(*a), raster(*b)) == pytest.approx(M.box_iou(a, b), abs=1e-12)
