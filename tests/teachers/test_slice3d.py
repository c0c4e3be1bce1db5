"""LiteMedSAM slice-wise 3D teacher (METHODS.md §5.4, §2.8) and Algorithm 2 over several teachers."""
import numpy as np
import pytest

from nnunet_semisam.teachers.algorithm2 import algorithm2
from nnunet_semisam.teachers.slice3d import LiteMedSAMSliceTeacher


class ConstTeacher:
    """Answers `value` inside the mask prompt's bounding volume / everywhere for points; counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def encode(self, image):
        self.calls += 1
        return image

    def decode(self, e, points=None, mask=None):
        return np.full(e.shape[-3:], self.value, np.float32)


def test_algorithm2_over_two_teachers_counts_and_variance():
    rng = np.random.default_rng(0)
    img = rng.random((1, 3, 6, 6)).astype(np.float32)
    mc = np.zeros((3, 6, 6), bool)
    mc[1, 2:4, 2:4] = True
    a, b = ConstTeacher(1.0), ConstTeacher(0.5)
    pseudo, conf, preds = algorithm2(img, mc, [a, b], rng, n_aug=3, u_th=0.05, return_predictions=True)
    assert a.calls == b.calls == 3 and preds.shape == (12, 3, 6, 6)  # 2N x 2 teachers
    # values 1 (6 masks) and 0.5 (6 masks): population variance 0.0625 >= 0.05 -> nothing confident
    assert not conf.any() and np.all(pseudo == 0)
    pseudo, conf = algorithm2(img, mc, [a, b], rng, n_aug=3, u_th=0.07)
    assert conf.all() and np.allclose(pseudo, 0.75)  # the mean over all 12 masks


@pytest.fixture(scope="module")
def lite():
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher
    return LiteMedSAMSliceTeacher(LiteMedSAMTeacher.from_package())


def test_litemedsam_slice_teacher_on_a_synthetic_volume(lite):
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:3, :32, :32]
    blob = ((y - 15) ** 2 + (x - 17) ** 2 <= 36) & (z >= 1)  # slices 1, 2: a disc of radius 6
    vol = (40 + 15 * rng.random((3, 32, 32)) + 150 * blob).astype(np.float32)
    e = lite.encode(vol)
    prob = lite.decode(e, mask=blob)
    assert prob.shape == (3, 32, 32) and prob.dtype == np.float32
    assert np.all(prob[0] == 0)  # no prompt on slice 0: no teacher answer, and no encoder call
    assert sorted(e["emb"]) == [1, 2]
    pred = prob > 0.5
    dice = 2 * (pred & blob).sum() / (pred.sum() + blob.sum())
    assert dice > 0.85, dice
    # a point prompt -> a box of half side 32 // 8 = 4 around it, clipped to the slice
    boxes = lite.point_boxes(np.array([[15, 17], [0, 31]]), (32, 32))
    np.testing.assert_array_equal(boxes, [[13, 11, 21, 19], [27, 0, 31, 4]])
    pp = lite.decode(e, points=np.array([[2, 15, 17]]))
    assert np.all(pp[:2] == 0) and (pp[2] > 0.5).sum() > 0
    assert ((pp[2] > 0.5) & blob[2]).sum() / (pp[2] > 0.5).sum() > 0.8  # what it finds is the disc
