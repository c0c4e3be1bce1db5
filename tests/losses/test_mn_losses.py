"""M&N losses (METHODS.md §7.3) and slice-volume conversion (§7.2) against hand-computed cases."""
import math

import pytest
import torch

from nnunet_semisam.losses.mn import (combined_weights, kl_target_to_prediction, mn_labeled_loss,
                                      mn_unlabeled_loss)
from nnunet_semisam.networks.slices import apply_slicewise, slices_to_volume, volume_to_slices


def test_slice_volume_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    s = volume_to_slices(x)
    assert s.shape == (8, 3, 5, 6)
    # sample-major, then slice: row 5 is sample 1, slice 1
    assert torch.equal(s[5], x[1, :, 1])
    assert torch.equal(slices_to_volume(s, 2), x)
    assert torch.equal(apply_slicewise(lambda t: t * 2, x), x * 2)
    with pytest.raises(ValueError):
        slices_to_volume(s, 3)


def test_unlabeled_loss_hand_computed():
    # one voxel, K = 2: prediction p = softmax([0, log 3]) = (1/4, 3/4), target P = (1/2, 1/2)
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1, 1)
    target = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1, 1)
    kl = 0.5 * (math.log(0.5) - math.log(0.25)) + 0.5 * (math.log(0.5) - math.log(0.75))
    assert kl_target_to_prediction(target, logits).item() == pytest.approx(kl, rel=1e-6)
    # D_vnet per class: 1 - 2 p P / (p^2 + P^2); class 0: 1 - 0.25/(1/16 + 1/4), class 1: 1 - 0.75/(9/16 + 1/4)
    d = ((1 - 0.25 / (1 / 16 + 0.25)) + (1 - 0.75 / (9 / 16 + 0.25))) / 2
    assert mn_unlabeled_loss(logits, target).item() == pytest.approx(kl + d, rel=1e-6)
    # direction: KL(P || p), not KL(p || P)
    reverse = 0.25 * (math.log(0.25) - math.log(0.5)) + 0.75 * (math.log(0.75) - math.log(0.5))
    assert abs(kl - reverse) > 1e-3
    # zero target probabilities contribute 0 (x log x at 0); averaged over voxels
    t2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).T.reshape(1, 2, 2, 1, 1)
    l2 = torch.zeros(1, 2, 2, 1, 1)
    expected = ((0 - math.log(0.5)) + 0.0) / 2
    assert kl_target_to_prediction(t2, l2).item() == pytest.approx(expected, rel=1e-6)
    # no gradient to the target
    target_g = target.clone().requires_grad_(True)
    mn_unlabeled_loss(logits.clone().requires_grad_(True), target_g).backward()
    assert target_g.grad is None


def test_labeled_loss_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)],
                           [0.0, 0.0]]).T.reshape(1, 2, 2, 1, 1)  # voxel 0: (1/4, 3/4); 1: (1/2, 1/2)
    labels = torch.tensor([1, 0]).view(1, 1, 2, 1, 1)
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    # class 0: P = (1/4, 1/2), Y = (0, 1); class 1: P = (3/4, 1/2), Y = (1, 0)
    d0 = 1 - 2 * 0.5 / (1 / 16 + 1 / 4 + 1)
    d1 = 1 - 2 * 0.75 / (9 / 16 + 1 / 4 + 1)
    assert mn_labeled_loss(logits, labels).item() == pytest.approx(ce + (d0 + d1) / 2, rel=1e-6)


def test_combined_weights_eq5():
    assert combined_weights(3, 2) == (0.6, 0.4)
    assert combined_weights(5, 0) == (1.0, 0.0)
    assert combined_weights(0, 0) == (0.0, 0.0)
