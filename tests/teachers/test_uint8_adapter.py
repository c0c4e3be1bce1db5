"""Rule U with nnU-Net's background mask (METHODS.md §2.4, "Correction (turn 2)"): `to_uint8(..., background=...)` and
`background_from_seg`. The old rule (no mask) is covered by tests/teachers/test_medsam.py::test_rule_u."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.uint8_adapter import background_from_seg, to_uint8


def zscored_brain(seed: int = 0):
    """A 2D 'brain' as nnU-Net stores it with use_mask_for_norm: tissue z-scored (mean 0, std 1) with a brighter
    lesion inside, the outside of the mask set to 0 and marked -1 in seg. Returns (data (1, 1, H, W), seg)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 / 26 ** 2 + (xx - 32) ** 2 / 22 ** 2 <= 1
    lesion = (yy - 28) ** 2 + (xx - 36) ** 2 <= 36
    x = rng.normal(0.0, 1.0, (64, 64))
    x[lesion] += 3.0
    x[brain] = (x[brain] - x[brain].mean()) / x[brain].std()  # nnU-Net's z-score over the mask
    x[~brain] = 0.0
    seg = np.where(brain, lesion.astype(np.int8), -1).astype(np.int8)[None, None]
    return x[None, None], seg, brain, lesion


def test_old_rule_maps_the_background_to_mid_grey_the_mask_maps_it_to_zero():
    data, seg, brain, lesion = zscored_brain()
    old = to_uint8(data, ["ZScoreNormalization"])[0]
    # the failure METHODS.md measured (MSD brain: background 130, brain mean 130.6): the 0 outside the mask is the
    # tissue mean, so the old rule maps it to mid-grey, next to the brain's own mean (here 98 and 98.1)
    assert 64 <= old[~brain].min() == old[~brain].max() <= 192
    assert abs(float(old[brain].mean()) - float(old[~brain].mean())) < 5

    bg = background_from_seg(seg)
    assert bg.shape == (1, 64, 64) and np.array_equal(bg[0], ~brain)
    new = to_uint8(data, ["ZScoreNormalization"], background=bg)[0]
    assert new.dtype == np.uint8 and new.shape == (64, 64)
    assert (new[~brain] == 0).all()
    # the tissue spans the range: percentiles over the brain only, then min-max to [0, 255]
    assert new[brain].min() == 0 and new[brain].max() == 255
    assert new[lesion].mean() > new[brain & ~lesion].mean() + 60
    # by hand: p0.5 / p99.5 over the brain voxels, clip, (x − lo) / (hi − lo) · 255, truncation
    v = data[0, 0][brain]
    lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    ref = (np.clip(data[0, 0], lo, hi) - lo) / (hi - lo) * 255.0
    ref[~brain] = 0
    np.testing.assert_array_equal(new, np.uint8(ref))


def test_without_a_mask_the_old_rule_stands_exactly():
    data, seg, brain, _ = zscored_brain(1)
    data[0, 0][~brain] = data[0, 0][brain].min() - 1.0  # background = the case minimum: the old rule's premise
    old = to_uint8(data, ["ZScoreNormalization"])
    assert background_from_seg(np.zeros_like(seg)) is None  # no voxel < 0: no mask
    np.testing.assert_array_equal(to_uint8(data, ["ZScoreNormalization"], background=None), old)
    # where the background is the minimum, the mask gives the same image as the old rule
    np.testing.assert_array_equal(to_uint8(data, ["ZScoreNormalization"], background=background_from_seg(seg)), old)


def test_ct_and_rgb_apply_a_given_background_and_ignore_none():
    hu = np.array([[[[-1000.0, -160.0, 40.0, 240.0, 3000.0, 140.0]]]])
    props = {"0": {"mean": 100.0, "std": 50.0}}
    z = (hu - 100.0) / 50.0
    np.testing.assert_array_equal(to_uint8(z, ["CTNormalization"], intensity_properties=props),
                                  [[[0, 0, 127, 255, 255, 191]]])
    bg = np.zeros((1, 1, 6), bool)
    bg[..., [0, 1]] = True  # window [-160, 240]; the rest spans [40, 240] -> min-max over it, background 0
    ct = to_uint8(z, ["CTNormalization"], intensity_properties=props, background=bg)
    np.testing.assert_array_equal(ct, [[[0, 0, 0, 255, 255, 127]]])

    rgb = np.random.default_rng(0).random((3, 1, 4, 5))
    bg = np.zeros((1, 4, 5), bool)
    bg[0, 0] = True
    u_old = to_uint8(rgb, ["RGBTo01Normalization"] * 3)
    u = to_uint8(rgb, ["RGBTo01Normalization"] * 3, background=bg)
    assert (u[0, 0] == 0).all() and np.array_equal(u[0, 1:], u_old[0, 1:])


def test_all_background_and_errors():
    data, _, _, _ = zscored_brain()
    assert not to_uint8(data, ["ZScoreNormalization"], background=np.ones((1, 64, 64), bool)).any()
    with pytest.raises(SemiSAMError, match="spatial shape"):
        to_uint8(data, ["ZScoreNormalization"], background=np.ones((64, 64), bool))
    with pytest.raises(SemiSAMError, match="seg"):
        background_from_seg(np.zeros(3))
