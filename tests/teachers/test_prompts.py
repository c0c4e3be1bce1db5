"""Boxes and points from masks (METHODS.md §2.3, §5.4): hand-built masks with known answers."""
import numpy as np
import pytest

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.prompts import (box_from_mask, boxes_from_mask, boxes_from_mask_slicewise, boxes_to_mask,
                                             jitter_boxes, sample_interior_point, sample_points,
                                             sample_points_slicewise)


def _two_blobs() -> np.ndarray:
    m = np.zeros((20, 30), np.uint8)
    m[2:5, 3:7] = 1      # 3x4 = 12 px, rows 2..4, cols 3..6
    m[10:18, 12:25] = 1  # 8x13 = 104 px
    m[0, 29] = 1         # 1 px speck
    return m


def test_boxes_per_component_largest_first_and_min_area():
    boxes = boxes_from_mask(_two_blobs(), min_area=10)
    np.testing.assert_array_equal(boxes, [[12, 10, 24, 17], [3, 2, 6, 4]])
    assert boxes.dtype == np.int64
    # min_area 1 keeps the speck; max_boxes truncates to the largest ones
    assert len(boxes_from_mask(_two_blobs(), min_area=1)) == 3
    np.testing.assert_array_equal(boxes_from_mask(_two_blobs(), min_area=1, max_boxes=1), [[12, 10, 24, 17]])


def test_diagonal_pixels_are_one_component_8_connectivity():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True
    np.testing.assert_array_equal(boxes_from_mask(m, min_area=1), [[0, 0, 2, 2]])


def test_whole_mask_box_and_empty_mask_fallback():
    np.testing.assert_array_equal(box_from_mask(_two_blobs()), [3, 0, 29, 17])
    np.testing.assert_array_equal(boxes_from_mask(_two_blobs(), per_component=False), [[3, 0, 29, 17]])
    empty = np.zeros((8, 8))
    assert box_from_mask(empty) is None
    assert boxes_from_mask(empty).shape == (0, 4)           # no prompt, not a crash
    assert boxes_from_mask_slicewise(np.zeros((3, 8, 8))) == {}
    assert sample_interior_point(empty, np.random.default_rng(0)) is None
    c, lab = sample_points(empty, np.random.default_rng(0), n_pos=2, n_neg=2)
    assert c.shape == (0, 2) and lab.shape == (0,)


def test_jitter_only_enlarges_and_stays_inside():
    rng = np.random.default_rng(0)
    base = np.array([[5, 6, 10, 12]])
    for _ in range(50):
        b = jitter_boxes(base, (15, 13), 4, rng)[0]
        assert b[0] <= 5 and b[1] <= 6 and b[2] >= 10 and b[3] >= 12
        assert b[0] >= 0 and b[1] >= 0 and b[2] <= 12 and b[3] <= 14
    with pytest.raises(SemiSAMError):
        boxes_from_mask(_two_blobs(), jitter=3)  # jitter needs an rng


def test_margin_widens_every_side_clipped_to_the_image():
    # blobs of _two_blobs: [12, 10, 24, 17] and [3, 2, 6, 4] in a 20 x 30 image; +3 px per side, clipped to
    # columns 0..29 and rows 0..19
    np.testing.assert_array_equal(boxes_from_mask(_two_blobs(), min_area=10, margin=3),
                                  [[9, 7, 27, 19], [0, 0, 9, 7]])
    # components are selected on their own pixels (the speck stays below min_area), not on the widened box
    assert len(boxes_from_mask(_two_blobs(), min_area=2, margin=5)) == 2
    np.testing.assert_array_equal(boxes_from_mask_slicewise(_two_blobs()[None], min_area=10, margin=1)[0],
                                  [[11, 9, 25, 18], [2, 1, 7, 5]])
    with pytest.raises(SemiSAMError, match="margin"):
        boxes_from_mask(_two_blobs(), margin=-1)


def test_slicewise_boxes():
    v = np.zeros((3, 20, 30), np.uint8)
    v[1] = _two_blobs()
    out = boxes_from_mask_slicewise(v, min_area=10)
    assert list(out) == [1]
    np.testing.assert_array_equal(out[1], [[12, 10, 24, 17], [3, 2, 6, 4]])


def test_interior_point_is_deep_inside_largest_blob():
    m = _two_blobs()
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = sample_interior_point(m, rng)          # (row, col) of the 8x13 blob, EDT > max/2 = 2
        assert 10 + 2 <= p[0] <= 17 - 2 and 12 + 2 <= p[1] <= 24 - 2
    vol = np.zeros((9, 9, 9), bool)
    vol[2:7, 2:7, 2:7] = True
    for _ in range(20):  # EDT max 3 at the centre; EDT > 1.5 is the inner 3x3x3 cube
        p = sample_interior_point(vol, rng)
        assert ((3 <= p) & (p <= 5)).all()


def test_positive_and_negative_points():
    m = _two_blobs()
    rng = np.random.default_rng(1)
    c, lab = sample_points(m, rng, n_pos=3, n_neg=4, neg_margin=2)
    np.testing.assert_array_equal(lab, [1, 1, 1, 0, 0, 0, 0])
    for (x, y), l in zip(c.astype(int), lab):
        assert m[y, x] == l                                   # (x, y) order; positives inside, negatives outside
        if l == 0:
            assert 1 <= x <= 29 and 0 <= y <= 19                # within the whole-mask box grown by 2
    v = np.zeros((2, 20, 30), np.uint8)
    v[0] = m
    assert list(sample_points_slicewise(v, rng)) == [0]


def test_boxes_to_mask_roundtrip():
    boxes = boxes_from_mask(_two_blobs(), min_area=1)
    filled = boxes_to_mask(boxes, (20, 30))
    assert filled.sum() == 12 + 104 + 1 and (filled >= (_two_blobs() > 0)).all()


def test_pseudolabel_job_box_margin_checks():
    """`nnunet-semisam pseudolabel --box-margin`: >= 0, and only on the plain path (Algorithm 2 draws its own boxes)."""
    from nnunet_semisam.teachers.pseudolabel_job import PseudoLabelJob

    PseudoLabelJob(dataset="1", box_margin=2).validate()
    for kwargs in ({"box_margin": -1}, {"box_margin": 2, "aug": 4}):
        with pytest.raises(SemiSAMError, match=r"^--box-margin .*: must be >= 0 px, and applies to the plain path"):
            PseudoLabelJob(dataset="1", **kwargs).validate()
