"""METHODS.md §1.4 primitives against hand-computed values (numbers worked out in the comments)."""
import math

import pytest
import torch

from nnunet_semisam.losses.primitives import (binary_dice_loss, copy_paste_box_mask, dice_lin, dice_sq, dice_vnet,
                                              entropy_uncertainty, largest_connected_component, one_hot, sharpen,
                                              uamt_threshold)
from nnunet_semisam.networks.perturbations import FeatureDropout, FeatureNoise

S = 1e-5
# one sample, two classes, two pixels: P_1 = [0.8, 0.4], Y = [1, 0] (class 1 at pixel 0)
P = torch.tensor([[[0.2, 0.6], [0.8, 0.4]]])  # (B=1, K=2, X=2)
Y = one_hot(torch.tensor([[1, 0]]), 2)


def test_one_hot_layouts():
    assert torch.equal(Y, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
    assert torch.equal(one_hot(torch.tensor([[[1, 0]]]), 2), Y)  # (B, 1, X) as well


def test_dice_sq():
    # class 1: 2*0.8 / (0.64 + 0.16 + 1) ; class 0: 2*0.6 / (0.04 + 0.36 + 1)
    expected = ((1 - (1.6 + S) / (1.8 + S)) + (1 - (1.2 + S) / (1.4 + S))) / 2
    assert dice_sq(P, Y).item() == pytest.approx(expected)  # 0.12698
    assert dice_vnet(P, Y).item() == pytest.approx(((1 - 1.6 / 1.8) + (1 - 1.2 / 1.4)) / 2)


def test_dice_lin_with_and_without_mask():
    # no mask: class 1: 2*0.8 / (0.8+0.4+1) ; class 0: 2*0.6 / (0.2+0.6+1)
    assert dice_lin(P, Y).item() == pytest.approx(((1 - (1.6 + S) / (2.2 + S)) + (1 - (1.2 + S) / (1.8 + S))) / 2)
    # mask [1, 0]: only pixel 0 counts: class 1: 2*0.8/(0.8+1); class 0: 0/(0.2+0)
    mask = torch.tensor([[[1.0, 0.0]]])
    expected = ((1 - (1.6 + S) / (1.8 + S)) + (1 - S / (0.2 + S))) / 2
    assert dice_lin(P, Y, mask).item() == pytest.approx(expected)
    assert dice_lin(P, Y, mask[:, 0]).item() == pytest.approx(expected)  # (B, X) mask broadcasts too


def test_binary_dice_and_sharpen():
    assert binary_dice_loss(P[:, 1], Y[:, 1]).item() == pytest.approx(1 - 1.6 / 2.2)
    # T = 0.5: 0.6^2 / (0.6^2 + 0.4^2) = 0.36 / 0.52; 0.5 stays 0.5; not renormalised over classes
    out = sharpen(torch.tensor([0.6, 0.5, 0.4]), 0.5)
    assert out.tolist() == pytest.approx([0.36 / 0.52, 0.5, 0.16 / 0.52])
    assert sharpen(torch.tensor([0.9]), 0.1).item() == pytest.approx(0.9 ** 10 / (0.9 ** 10 + 0.1 ** 10))


def test_entropy_and_threshold_schedule():
    p = torch.tensor([[[0.5], [0.5]], [[1.0], [0.0]]])  # two samples, K=2, one pixel
    u = entropy_uncertainty(p)
    assert u.shape == (2, 1, 1)
    assert u[0].item() == pytest.approx(-math.log(0.5 + 1e-6), rel=1e-6)  # ~ ln 2
    assert abs(u[1].item()) < 1e-5
    assert uamt_threshold(0, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))  # 0.52103
    assert uamt_threshold(50, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5 * 0.25)) * math.log(2))
    assert uamt_threshold(100, 100) == pytest.approx(math.log(2))


def test_largest_connected_component_2d_full_connectivity():
    lab = torch.tensor([[[1, 0, 0, 2, 2],
                         [0, 1, 0, 0, 0],   # (0,0)-(1,1)-(2,2) touch diagonally: one class-1 component of 3
                         [0, 0, 1, 0, 0],
                         [1, 0, 0, 0, 2],   # (3,0): a class-1 component of 1; (3,4)-(4,4): class 2 of size 2 ...
                         [0, 0, 0, 0, 2]]])  # ... ties with (0,3)-(0,4): the first found is kept
    out = largest_connected_component(lab, 3)
    expected = lab.clone()
    expected[0, 3, 0] = 0
    expected[0, 3, 4] = expected[0, 4, 4] = 0
    assert torch.equal(out, expected) and out.dtype == lab.dtype
    assert torch.equal(largest_connected_component(lab[:, None], 3), expected[:, None])  # (B, 1, ...) layout


def test_largest_connected_component_3d_per_sample():
    lab = torch.zeros(2, 3, 3, 3, dtype=torch.long)
    lab[0, 0, 0, 0] = 1  # sample 0: a single voxel ...
    lab[0, 2, 1:3, 1:3] = 1  # ... and a 4-voxel component: the 4 stay
    lab[1, 0, 0, 0] = 1  # sample 1: only the single voxel (kept: it is that sample's largest)
    lab[1, 1, 1, 1] = 1  # touches (0,0,0) through a corner: same component with full connectivity
    out = largest_connected_component(lab, 2)
    assert out[0].sum() == 4 and out[0, 0, 0, 0] == 0
    assert torch.equal(out[1], lab[1])


def test_copy_paste_box_mask_size_and_positions():
    # (6, 9): sides floor(2/3 * 6) = 4 and 6; starts in {0, 1} and {0, 1, 2}
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        m = copy_paste_box_mask((6, 9), generator=g)
        assert m.shape == (6, 9) and int((m == 0).sum()) == 24 and set(m.unique().tolist()) == {0.0, 1.0}
        ys, xs = torch.nonzero(m == 0, as_tuple=True)
        starts.add((int(ys.min()), int(xs.min())))
        assert int(ys.max() - ys.min()) == 3 and int(xs.max() - xs.min()) == 5
    assert starts == {(a, b) for a in (0, 1) for b in (0, 1, 2)}
    # 3D and the degenerate case (side == S - 0: start 0)
    assert int((copy_paste_box_mask((3, 3, 3)) == 0).sum()) == 8
    assert int((copy_paste_box_mask((1, 4)) == 0).sum()) == 0  # floor(2/3) = 0 rows: an empty box


def test_feature_noise_and_dropout():
    x = torch.ones(2, 3, 4, 4)
    noise = FeatureNoise().train()
    y = noise(x)
    assert torch.all((y >= 0.7) & (y <= 1.3)) and torch.equal(y[0], y[1])  # shared over the batch
    assert torch.equal(noise.eval()(x), x)
    # attention a = mean_c: one hot position (4) against 1 elsewhere; threshold in [0.7, 0.9] * 4 = [2.8, 3.6]
    f = torch.ones(1, 2, 2, 2)
    f[0, :, 0, 0] = 4.0
    out = FeatureDropout().train()(f)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0] and torch.equal(out[0, :, 1], f[0, :, 1])
    assert torch.equal(FeatureDropout().eval()(f), f)
