import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from paligemma.ref.mask import make_attn_mask, positions_from_mask, same_block, sliding_window


def test_worked_example_from_the_big_vision_notes():
    # mask_ar [0,0,0,1,1,1,1], last token invalid (big_vision-paligemma.md, section 1.1).
    expected = np.array([
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ], dtype=bool)
    mask = make_attn_mask(np.array([[1, 1, 1, 1, 1, 1, 0]]), np.array([[0, 0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(mask[0], expected)


@st.composite
def prefix_suffix(draw):
    T = draw(st.integers(1, 12))
    prefix = draw(st.integers(1, T))
    valid = draw(st.integers(prefix, T))
    mask_ar = np.array([[0] * prefix + [1] * (T - prefix)])
    input_mask = np.array([[True] * valid + [False] * (T - valid)])
    return prefix, valid, mask_ar, input_mask


@given(prefix_suffix())
def test_prefix_is_bidirectional_and_suffix_causal(case):
    prefix, valid, mask_ar, input_mask = case
    mask = make_attn_mask(input_mask, mask_ar)[0]
    T = mask.shape[0]
    for i in range(T):
        for j in range(T):
            both_valid = i < valid and j < valid
            rule = (i < prefix and j < prefix) or (i >= prefix and j <= i)  # prefix-LM by definition
            assert mask[i, j] == (both_valid and rule)


def test_sliding_window_keeps_prefix_whole_and_limits_suffix():
    mask_ar = np.array([[0, 0, 0, 0, 1, 1, 1]])
    input_mask = np.ones((1, 7), bool)
    full = make_attn_mask(input_mask, mask_ar)
    pos = positions_from_mask(input_mask)
    local = sliding_window(full, pos, pos, 2, same_block(input_mask, mask_ar))[0]
    for i in range(7):
        for j in range(7):
            if i < 4 and j < 4:
                assert local[i, j]  # prefix <-> prefix is never windowed
            else:
                assert local[i, j] == (full[0, i, j] and i - j < 2)
    np.testing.assert_array_equal(sliding_window(full, pos, pos, None), full)


def test_padding_never_starts_a_block():
    # Left padding with mask_ar = 1 must not cut the prefix off the tokens before it.
    padded = make_attn_mask(np.array([[1, 0, 0, 1, 1, 1]]), np.array([[0, 1, 1, 0, 0, 1]]))[0]
    plain = make_attn_mask(np.array([[1, 1, 1, 1]]), np.array([[0, 0, 0, 1]]))[0]
    np.testing.assert_array_equal(padded[np.ix_([0, 3, 4, 5], [0, 3, 4, 5])], plain)
    assert not padded[:, 1:3].any() and not padded[1:3].any()


def test_positions_skip_padding():
    np.testing.assert_array_equal(positions_from_mask(np.array([[1, 1, 0, 1, 0]])), [[0, 1, 1, 2, 2]])
    np.testing.assert_array_equal(positions_from_mask(np.array([[0, 0, 1, 1]])), [[0, 0, 0, 1]])
