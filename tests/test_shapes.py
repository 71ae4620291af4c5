"""The synthetic scenes the demo model learns from (ref/tasks/shapes.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma.ref.tasks import answers, shapes


def test_masks_by_hand():
    # A 4 x 4 square box at (2, 3): pixel centres 2.5..5.5 rows, 3.5..6.5 columns.
    square = shapes.shape_mask("square", 10, (2, 3, 6, 7))
    assert square.sum() == 16 and square[2:6, 3:7].all()
    # The disc inscribed in a 4 x 4 box: the 4 corner pixels (centre distance sqrt(2) * 1.5 / 2
    # = 1.06 > 1 in box units) are out, the other 12 are in.
    disc = shapes.shape_mask("circle", 10, (0, 0, 4, 4))
    assert disc.sum() == 12 and not disc[0, 0] and not disc[3, 3] and disc[1, 1]
    # Triangle, apex at the top centre of a 4 x 4 box: row r admits |x + 0.5 - 2| <= (r + 0.5) / 2.
    tri = shapes.shape_mask("triangle", 4, (0, 0, 4, 4))
    assert tri.sum(axis=1).tolist() == [0, 2, 2, 4]
    with pytest.raises(ValueError, match="shape kind"):
        shapes.shape_mask("hexagon", 4, (0, 0, 4, 4))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([64, 96, 128]))
def test_scenes_are_consistent(seed, size):
    rng = np.random.default_rng(seed)
    scene = shapes.random_scene(rng, size, max_shapes=4)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    assert 1 <= len(scene.shapes) <= 4
    taken = np.zeros((size, size), bool)
    for s in scene.shapes:
        y0, x0, y1, x1 = s.box
        assert 0 <= y0 < y1 <= size and 0 <= x0 < x1 <= size
        outside = s.mask.copy()
        outside[y0:y1, x0:x1] = False
        assert s.mask.any() and not outside.any()  # the mask lies in its box
        assert not (taken & s.mask).any()  # shapes never overlap
        taken |= s.mask
        assert (scene.image[s.mask] == shapes.COLOURS[s.colour]).all()  # painted in its colour
    # The caption names every shape exactly once: the numbers add up to the shape count.
    words = shapes.caption(scene).replace(",", "").split()
    counted = sum(shapes.NUMBERS.index(w) for w in words if w in shapes.NUMBERS)
    assert counted == len(scene.shapes)
    for kind in shapes.KINDS:
        assert shapes.count(scene, kind) == str(sum(s.kind == kind for s in scene.shapes))


def _scene(*specs, size=64):
    made = []
    for kind, colour, box in specs:
        made.append(shapes.Shape(kind, colour, box, shapes.shape_mask(kind, size, box)))
    return shapes.Scene(np.zeros((size, size, 3), np.uint8), tuple(made))


def test_caption_grouping_and_order():
    scene = _scene(("square", "blue", (0, 0, 8, 8)), ("circle", "red", (10, 10, 18, 18)),
                   ("circle", "red", (20, 20, 28, 28)), ("triangle", "green", (30, 30, 38, 38)),
                   ("circle", "green", (40, 40, 48, 48)))
    # kinds in KINDS order (circle, square, triangle), colours in COLOURS order within a kind
    assert shapes.caption(scene) == "two red circles, a green circle, a blue square and a green triangle"
    assert shapes.caption(_scene(("square", "red", (0, 0, 8, 8)))) == "a red square"
    assert shapes.caption(_scene(("square", "red", (0, 0, 8, 8)), ("circle", "blue", (9, 9, 20, 20)))) == \
        "a blue circle and a red square"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_task_targets_parse_back_to_the_scene(seed):
    rng = np.random.default_rng(seed)
    scene = shapes.random_scene(rng, 128, 3)
    codes = lambda s: [shapes.KINDS.index(s.kind)] * 16  # noqa: E731 (any 16 codes in range)
    for prefix, suffix in shapes.task_examples(scene, rng, codes):
        task, _, kind = prefix.partition(" ")
        if task in ("caption", "count"):
            continue
        parsed = answers.parse(suffix, 128, 128, require_seg=task == "segment")
        want = scene.of_kind(kind)
        assert [o.label for o in parsed.objects] == [kind] * len(want)
        for obj, s in zip(parsed.objects, want):
            assert not obj.errors
            # big_vision's quantisation: round(v * 1023) then int(loc / 1023 * 128): within 1 px.
            assert np.abs(np.subtract(obj.box, s.box)).max() <= 1
            if task == "segment":
                assert list(obj.seg) == codes(s)
