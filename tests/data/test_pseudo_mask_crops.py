"""Saved pseudo-masks and the foreground-biased crop draw of M&N (METHODS.md §7.4)."""
from types import SimpleNamespace

import numpy as np
import pytest

from nnunet_semisam.data.pseudo_mask_crops import (RandomForegroundDataLoader, foreground_locations, load_locations,
                                                   save_pseudo_mask)
from nnunet_semisam.errors import SemiSAMError


def test_locations_in_nnunet_format_and_round_trip(tmp_path):
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[1, 2, 3] = 1
    mask[2, 0, 0] = 2
    mask[2, 1, 0] = 2
    locs = foreground_locations(mask)
    assert sorted(locs) == [1, 2]
    assert locs[1].tolist() == [[0, 1, 2, 3]]  # (channel 0, z, y, x) as nnU-Net's class_locations
    assert sorted(map(tuple, locs[2].tolist())) == [(0, 2, 0, 0), (0, 2, 1, 0)]
    path = save_pseudo_mask(str(tmp_path), "case_a", mask)
    back = load_locations(str(tmp_path), "case_a")
    assert {k: v.tolist() for k, v in back.items()} == {k: v.tolist() for k, v in locs.items()}
    with np.load(path) as f:
        assert np.array_equal(f["mask"], mask)
    assert load_locations(str(tmp_path), "missing") == {}  # no saved mask yet: uniform crops
    assert load_locations(str(tmp_path), "case_a") and not list(tmp_path.glob(".tmp_*"))


def test_empty_mask_has_no_locations_and_subsampling(tmp_path):
    assert foreground_locations(np.zeros((2, 2, 2), np.uint8)) == {}
    big = np.ones((10, 10, 10), np.uint8)
    assert len(foreground_locations(big, max_locations=7)[1]) == 7


def test_unreadable_mask_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SemiSAMError, match="bad.npz"):
        load_locations(str(tmp_path), "bad")


def test_foreground_draw_is_per_sample_with_probability_p():
    np.random.seed(0)
    loader = SimpleNamespace(oversample_foreground_percent=0.5)
    draws = [RandomForegroundDataLoader.get_do_oversample(loader, 0) for _ in range(4000)]
    assert abs(np.mean(draws) - 0.5) < 0.03
    loader.oversample_foreground_percent = 0.0
    assert not any(RandomForegroundDataLoader.get_do_oversample(loader, j) for j in range(100))
