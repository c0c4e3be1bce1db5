"""Semi-SAM+ Algorithm 2 (METHODS.md §5.4) with test-double teachers whose answers are known by construction."""
import numpy as np
import pytest

from nnunet_semisam.teachers.algorithm2 import (LatticeTransform, MedSAMSliceTeacher, algorithm2, algorithm2_batch,
                                               slab_around_largest_slice, weak_aug)


class EchoTeacher:
    """Returns the mask prompt itself; for points, the mask it saw last (so both runs agree).

    `rogue` = index of the encode call whose two predictions additionally switch on `extra` (given in the *original*
    frame; the teacher maps it into the augmented frame by locating the marker voxel of the image)."""

    def __init__(self, rogue: int | None = None, extra: np.ndarray | None = None):
        self.calls, self.rogue, self.extra, self.last_mask = 0, rogue, extra, None

    def encode(self, image):
        self.calls += 1
        return {"j": self.calls - 1, "image": image}

    def decode(self, e, points=None, mask=None):
        if mask is not None:
            self.last_mask = mask.astype(np.float32)
        out = self.last_mask.copy()
        if points is not None:
            assert all(self.last_mask[tuple(p)] == 1 for p in points)  # RITM points lie inside the (augmented) mask
        if e["j"] == self.rogue:
            out = np.maximum(out, e["extra_aug"])
        return out


def test_lattice_transform_is_invertible():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 5, 5))
    seen_k = set()
    for _ in range(40):
        t = LatticeTransform.random(rng, a.shape[1:])
        seen_k.add(t.k)
        np.testing.assert_array_equal(t.inverse(t(a)), a)
    assert seen_k == {0, 1, 2, 3}
    for _ in range(20):  # Y != X: only k in {0, 2} keeps the shape
        assert LatticeTransform.random(rng, (3, 4, 6)).k in (0, 2)


def test_weak_aug_small_and_in_range():
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 8, 8)).astype(np.float32) * 200 - 50
    y = weak_aug(x, rng)
    assert y.shape == x.shape and y.min() >= x.min() - 1e-4 and y.max() <= x.max() + 1e-4
    assert 0 < np.abs(y - x).mean() < 0.1 * 250


def test_disagreeing_augmentation_is_masked_out():
    rng = np.random.default_rng(0)
    shape = (4, 10, 10)
    mc = np.zeros(shape, bool)
    mc[1:3, 3:7, 3:7] = True
    extra = np.zeros(shape, np.float32)
    extra[0, 0:2, 0:3] = 1.0                       # region where augmentation j = 2 disagrees
    teacher = EchoTeacher(rogue=2)
    # the rogue teacher needs `extra` in the augmented frame: wrap encode so it knows the transform of call j
    transforms = []
    orig_random = LatticeTransform.random

    def spy(rng_, shp):
        t = orig_random(rng_, shp)
        transforms.append(t)
        return t

    LatticeTransform.random = staticmethod(spy)
    try:
        enc = teacher.encode
        teacher.encode = lambda img: {**enc(img), "extra_aug": transforms[-1](extra)}
        pseudo, conf, preds = algorithm2(np.zeros((1, *shape), np.float32), mc, teacher, rng, n_aug=4,
                                         u_th=0.05, return_predictions=True)
    finally:
        LatticeTransform.random = staticmethod(orig_random)
    assert teacher.calls == 4 and preds.shape == (8, *shape)
    # 2 of 8 predictions say 1 in `extra`: var = 0.25 * 0.75 = 0.1875 >= 0.05 -> masked out; elsewhere unanimous
    np.testing.assert_array_equal(conf, extra == 0)
    np.testing.assert_allclose(preds.var(0)[extra > 0], 0.1875)
    np.testing.assert_array_equal(pseudo, mc.astype(np.float32) * conf)
    # with a tolerant threshold the disagreement passes and Pseudo is the mean (2/8)
    rng = np.random.default_rng(0)
    p2, c2 = algorithm2(np.zeros((1, *shape), np.float32), mc, EchoTeacher(), rng, n_aug=3, u_th=0.05)
    assert c2.all() and np.array_equal(p2, mc.astype(np.float32))


def test_empty_coarse_mask_skips_teacher():
    t = EchoTeacher()
    pseudo, conf = algorithm2(np.ones((1, 2, 6, 6)), np.zeros((2, 6, 6)), t, np.random.default_rng(0))
    assert t.calls == 0 and not conf.any() and not pseudo.any()


class BoxOracle:
    """2D teacher double with MedSAMTeacher's embed/segment API: each box is filled, points give a 3x3 square."""

    def __init__(self):
        self.embeds = 0

    def embed(self, img):
        self.embeds += 1
        return img

    def segment(self, emb, boxes, hw, points=None, point_labels=None, mask_prompt=None, batched=False):
        import torch
        if boxes is not None:
            out = np.zeros((len(boxes), *hw), np.float32)
            for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes)):
                out[i, y0:y1 + 1, x0:x1 + 1] = 1
        else:
            out = np.zeros((1, *hw), np.float32)
            for x, y in np.asarray(points)[0].astype(int):
                out[0, max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 1
        return torch.as_tensor(out)


def test_medsam_slice_teacher_adapter_slicewise_points_and_boxes():
    oracle = BoxOracle()
    st = MedSAMSliceTeacher(oracle, box_min_area=1)
    mc = np.zeros((3, 12, 12), bool)
    mc[1, 4:7, 4:7] = True                          # a 3x3 square: its box fill == itself, its point square == itself
    pseudo, conf = algorithm2(np.full((1, 3, 12, 12), 100.0), mc, st, np.random.default_rng(1), n_aug=2,
                              point_mode="slicewise")
    assert conf.all() and np.array_equal(pseudo, mc.astype(np.float32))
    assert oracle.embeds == 2                       # only slice 1 was ever encoded, once per augmentation
    with pytest.raises(ValueError):
        MedSAMSliceTeacher(oracle, mask_prompt="scribble")


def test_slab_around_the_largest_slice_by_hand():
    m = np.zeros((10, 4, 4), bool)
    m[2, :2, :2] = True  # 4 voxels
    m[7, :, :3] = True   # 12 voxels: the largest slice
    assert slab_around_largest_slice(m, None) == slice(0, 10) == slab_around_largest_slice(m, 0)
    assert slab_around_largest_slice(m, 12) == slice(0, 10)
    assert slab_around_largest_slice(m, 4) == slice(5, 9)    # 7 - 4 // 2 = 5
    assert slab_around_largest_slice(m, 7) == slice(3, 10)   # 7 - 3 = 4 would end at 11: shifted inside
    m[7] = False
    m[0, 0, 0] = True
    assert slab_around_largest_slice(m, 3) == slice(1, 4)    # largest slice 2 -> 1..3


def test_algorithm2_batch_is_per_sample_algorithm2_inside_the_slab():
    """The batch version equals `algorithm2` on each sample's slab with the same random stream, and leaves
    Pseudo = 0, M_conf = False outside the slab; an empty M_c costs no teacher call."""
    shape = (6, 8, 8)
    masks = np.zeros((3, *shape), bool)
    masks[0, 1:3, 2:6, 2:6] = True
    masks[1, 3:6, 1:4, 1:7] = True  # sample 2 stays empty
    volumes = [np.random.default_rng(i).random(shape).astype(np.float32) for i in range(3)]
    teacher = EchoTeacher()
    pseudo, conf = algorithm2_batch(volumes, masks, teacher, np.random.default_rng(5), slab=2, n_aug=2, u_th=0.05)
    assert pseudo.shape == conf.shape == masks.shape and teacher.calls == 4  # 2 samples x N = 2
    rng = np.random.default_rng(5)
    for b, zs in ((0, slice(0, 2)), (1, slice(2, 4))):  # argmax: first largest slice, minus k // 2
        assert slab_around_largest_slice(masks[b], 2) == zs
        ref_p, ref_c = algorithm2(volumes[b][zs], masks[b][zs], EchoTeacher(), rng, n_aug=2, u_th=0.05)
        np.testing.assert_array_equal(pseudo[b][zs], ref_p)
        np.testing.assert_array_equal(conf[b][zs], ref_c)
        outside = np.ones(shape[0], bool)
        outside[zs] = False
        assert not conf[b][outside].any() and not pseudo[b][outside].any()
    assert not conf[2].any() and not pseudo[2].any()
