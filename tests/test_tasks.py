"""ref/tasks/answers.py and ref/tasks/draw.py: <loc>/<seg> answers to objects and back, IoU, drawing.

Expected pixel boxes are worked out by hand in the comments (both conventions); round trips and
fuzzing are property-based.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paligemma.ref.inputs.tokenizer import train_tiny_tokenizer
from paligemma.ref.tasks import answers, draw

SEG16 = "".join(f"<seg{i:03d}>" for i in (5, 0, 127, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21))
ANSWER = "<loc0102><loc0205><loc0716><loc0818> cat ; <loc0000><loc0000><loc1023><loc1023> dog"


def test_hand_worked_big_vision():
    # 480 x 640 image, v = loc / 1023, pixel = int(v * size):
    # 102/1023*480 = 47.86 -> 47; 205/1023*640 = 128.25 -> 128; 716/1023*480 = 335.95 -> 335;
    # 818/1023*640 = 511.75 -> 511. loc 1023 is the far edge exactly (480, 640).
    p = answers.parse(ANSWER, height=480, width=640)
    assert p.ok and [o.label for o in p.objects] == ["cat", "dog"]
    assert p.objects[0].box == (47, 128, 335, 511) and p.objects[0].loc == (102, 205, 716, 818)
    assert p.objects[1].box == (0, 0, 480, 640) and p.objects[0].seg is None
    assert p.objects[0].normalized == pytest.approx((102 / 1023, 205 / 1023, 716 / 1023, 818 / 1023))


def test_hand_worked_demo():
    # v = loc / 1024, pixel = round(v * size): 47.81 -> 48; 128.125 -> 128; 335.625 -> 336;
    # 511.25 -> 511; 1023/1024*480 = 479.53 -> 480, 1023/1024*640 = 639.375 -> 639.
    p = answers.parse(ANSWER, height=480, width=640, convention="demo")
    assert p.ok and p.objects[0].box == (48, 128, 336, 511) and p.objects[1].box == (0, 0, 480, 639)
    # Python's round halves to even: 256/1024*2 = 0.5 -> 0 and 512/1024*3 = 1.5 -> 2.
    q = answers.parse("<loc0256><loc0512><loc1023><loc1023>", height=2, width=3, convention="demo")
    assert q.objects[0].box == (0, 2, 2, 3) and q.objects[0].label == ""


def test_segmentation_and_refcoco_forms():
    p = answers.parse("<loc0100><loc0200><loc0300><loc0400>" + SEG16 + " cat", 1023, 1023, require_seg=True)
    obj = p.objects[0]
    assert obj.ok and obj.has_mask_codes and obj.seg[:3] == (5, 0, 127) and obj.label == "cat"
    assert obj.box == (100, 200, 300, 400)  # size 1023: pixel = loc
    refcoco = answers.parse("<loc0100><loc0200><loc0300><loc0400>" + SEG16, 1023, 1023, require_seg=True)
    assert refcoco.ok and refcoco.objects[0].label == "" and refcoco.objects[0].has_mask_codes
    missing = answers.parse("<loc0100><loc0200><loc0300><loc0400> cat", 100, 100, require_seg=True)
    assert "no mask" in missing.objects[0].errors[0]


@pytest.mark.parametrize("text, n, fragment", [
    ("<loc0001><loc0002><loc0003> cat", 1, "expected 4 <loc> tokens, got 3"),
    ("<loc0001><loc0002><loc0003><loc0004><loc0005> cat", 1, "got 5"),
    ("<loc0001><loc2000><loc0003><loc0004> cat", 1, "loc value 2000 out of range"),
    ("<loc0500><loc0001><loc0400><loc0004> cat", 1, "inverted box"),
    ("<loc0500><loc0001><loc0500><loc0004> cat", 1, "empty box"),
    ("<loc0001><loc0002><loc0003><loc0004><seg001><seg002> cat", 1, "expected 16 <seg> tokens, got 2"),
    ("<loc0001><loc0002><loc0003><loc0004>" + SEG16.replace("<seg127>", "<seg900>"), 1, "seg value 900"),
    ("hello <loc0001><loc0002><loc0003><loc0004> cat", 1, "unexpected text before the box: 'hello'"),
    ("<loc0001><loc0002><loc0003><loc0004> cat <loc0001><loc0002><loc0003><loc0004> dog", 2, "no ' ; '"),
    ("<loc0001><loc0002><loc03><loc0004> cat", 1, "malformed token '<loc03>'"),
    ("<loc0001><loc0002><loc0003><loc0004> cat <seg001>", 1, "out of place"),
    ("just a caption", 1, "no box"),
])
def test_malformed_objects_are_reported_not_raised(text, n, fragment):
    p = answers.parse(text, 100, 100)
    assert len(p.objects) == n and not p.ok
    assert any(fragment in e for e in p.objects[-1].errors), p.objects[-1].errors


def test_good_objects_survive_bad_neighbours():
    text = "<loc0001><loc0002> junk ; <loc0010><loc0020><loc0500><loc0600> dog ; ; "
    first, second = answers.parse(text, 1023, 1023).objects
    assert not first.ok and first.box is None and second.ok and second.box == (10, 20, 500, 600)
    assert answers.parse("", 10, 10).objects == () and answers.parse(" ; ", 10, 10).objects == ()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="convention"):
        answers.parse("", 10, 10, convention="hf")
    with pytest.raises(ValueError, match="height"):
        answers.parse("", 0, 10)


def test_format_hand_worked():
    # 0.1*1023 = 102.3 -> 102, 0.2*1023 = 204.6 -> 205, 0.7*1023 = 716.1 -> 716, 0.8*1023 = 818.4 -> 818;
    # out of [0, 1] clips; 0.5*1023 = 511.5 rounds half to even -> 512.
    text = answers.format_objects([{"box": (0.1, 0.2, 0.7, 0.8), "label": "cat"},
                                 {"box": (-0.1, 0.5, 1.2, 1.0), "label": "big dog"}])
    assert text == "<loc0102><loc0205><loc0716><loc0818> cat ; <loc0000><loc0512><loc1023><loc1023> big dog"
    # Pixel boxes: 48 / 480 = 0.1, 128 / 640 = 0.2, ...; segmentation puts 16 seg tokens after the locs.
    seg = [5, 0, 127, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    text = answers.format_objects([{"box": (48, 128, 336, 512), "seg": seg, "label": "cat"}], height=480, width=640)
    assert text == "<loc0102><loc0205><loc0716><loc0818>" + SEG16 + " cat"
    assert answers.format_objects([{"box": (0, 0, 1, 1), "seg": seg}]) == "<loc0000><loc0000><loc1023><loc1023>" + SEG16


@pytest.mark.parametrize("obj, fragment", [
    ({"box": (0, 0, 1)}, "4 finite numbers"), ({"box": (0, 0, float("nan"), 1)}, "4 finite"),
    ({"box": (0, 0, 1, 1), "label": "a;b"}, "without ';'"), ({"box": (0, 0, 1, 1), "label": " a"}, "spaces"),
    ({"box": (0, 0, 1, 1), "seg": [1] * 15}, "16 codes"), ({"box": (0, 0, 1, 1), "seg": [128] * 16}, "16 codes"),
])
def test_format_rejects_bad_objects(obj, fragment):
    with pytest.raises(ValueError, match=f"object 0: .*{fragment}"):
        answers.format_objects([obj])


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz -'0123456789", max_size=12).map(str.strip)


@st.composite
def objects(draw):
    y0, x0 = draw(st.floats(0, 0.9)), draw(st.floats(0, 0.9))  # at least 2.5 px wide at 50 px
    y1, x1 = draw(st.floats(y0 + 0.05, 1.0)), draw(st.floats(x0 + 0.05, 1.0))
    seg = draw(st.one_of(st.none(), st.lists(st.integers(0, 127), min_size=16, max_size=16)))
    return {"box": (y0, x0, y1, x1), "label": draw(labels), "seg": seg}


@settings(max_examples=60)
@given(st.lists(objects(), min_size=1, max_size=4), st.integers(50, 4000), st.integers(50, 4000),
       st.sampled_from(answers.CONVENTIONS))
def test_format_then_parse_round_trips(objs, height, width, convention):
    parsed = answers.parse(answers.format_objects(objs), height, width, convention)
    assert len(parsed.objects) == len(objs)
    for obj, got in zip(objs, parsed.objects):
        assert got.ok, got.errors
        assert got.label == obj["label"] and got.seg == (tuple(obj["seg"]) if obj["seg"] else None)
        assert got.loc == tuple(int(np.clip(np.round(v * 1023), 0, 1023)) for v in obj["box"])
        # Quantisation moves a coordinate by <= half a step of 1/1023; de-quantisation adds
        # truncation (< 1 px) or, for /1024, a scale error of <= 1/1024 plus rounding (<= 0.5 px).
        sizes = np.array([height, width, height, width], float)
        exact = np.array(obj["box"]) * sizes
        slack = sizes * 0.5 / 1023 + 1 if convention == "big_vision" else sizes * (0.5 / 1023 + 1 / 1024) + 0.5
        assert np.all(np.abs(np.array(got.box) - exact) <= slack + 1e-9)


pieces = st.one_of(
    st.integers(0, 1200).map(lambda v: f"<loc{v:04d}>"), st.integers(0, 200).map(lambda v: f"<seg{v:03d}>"),
    st.sampled_from([" ; ", ";", " ", "<loc12>", "<seg", "<", ">", "<loc0001", "cat", "\n", "<eos>"]),
    st.text(max_size=6))


@settings(max_examples=150)
@given(st.lists(pieces, max_size=30), st.integers(1, 5000), st.integers(1, 5000), st.sampled_from(answers.CONVENTIONS),
       st.booleans())
def test_fuzzed_answers_never_raise(parts, height, width, convention, require_seg):
    text = "".join(parts)
    parsed = answers.parse(text, height, width, convention, require_seg)
    for obj in parsed.objects:
        assert isinstance(obj.label, str) and isinstance(obj.errors, tuple)
        if obj.ok:  # a clean object is a complete, in-range, non-empty box in the image
            y0, x0, y1, x1 = obj.box
            assert len(obj.loc) == 4 and 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
            assert (obj.seg is None and not require_seg) or obj.has_mask_codes
        obj.to_dict()


def test_parse_ids_matches_the_text(tmp_path):
    tok = train_tiny_tokenizer(tmp_path / "tok.model")
    text = "<loc0102><loc0205><loc0716><loc0818>" + SEG16 + " cat ; <loc0000><loc0000><loc1023><loc1023> dog"
    ids = tok.encode(text) + [tok.eos_id, 7, 7]
    assert answers.parse_ids(ids, tok, 480, 640) == answers.parse(text, 480, 640)


def test_draw_boxes_labels_and_masks(tmp_path):
    image = np.full((60, 80, 3), 40, np.uint8)
    objs = answers.parse("<loc0000><loc0000><loc0511><loc0511> cat ; <loc0100><loc0100><loc0100><loc0200> x",
                       60, 80).objects
    mask = np.zeros((60, 80), np.float32)
    mask[40:, 60:] = 1.0
    picture = draw.draw_objects(image, objs, [mask, None])
    draw.save_png(tmp_path / "out.png", picture)
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == image.shape
    assert (out[28, 5] != 40).any()  # the cat's bottom edge: y1 = int(511/1023*60) = 29, rows 0..28
    assert (out[29, 5] == 40).all() and (out[20, 39] == 40).all() and (out[20, 38] != 40).any()
    assert (out[50, 70] != 40).any() and (out[50, 70] != out[10, 70]).any()  # the translucent mask
    assert (out[45, 20] == 40).all()  # outside every box and mask; the empty second box is skipped
    with pytest.raises(ValueError, match="one per object"):
        draw.draw_objects(image, objs, [mask])
    with pytest.raises(ValueError, match="does not exist"):
        draw.save_png(tmp_path / "no" / "out.png", picture)
