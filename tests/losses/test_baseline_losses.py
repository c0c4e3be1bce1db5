"""The baselines' losses (METHODS.md §8.2-8.7) against hand-computed values."""
import math

import pytest
import torch

from nnunet_semisam.losses.baselines import (bcp_region_loss, cct_consistency, cps_pseudo_supervision,
                                             mcnet_mutual_consistency, mcnet_supervised_dice, uamt_consistency,
                                             urpc_loss)

S = 1e-5


def test_uamt_consistency_masked_with_literal_two():
    # pixel 0: p_s [0.6, 0.4] vs [0.5, 0.5] -> 0.01 + 0.01; pixel 1 masked out
    p_s = torch.tensor([[[0.6, 0.9], [0.4, 0.1]]], requires_grad=True)
    p_t = torch.full((1, 2, 2), 0.5, requires_grad=True)
    mask = torch.tensor([[[1.0, 0.0]]])
    loss = uamt_consistency(p_s, p_t, mask)
    assert loss.item() == pytest.approx(0.02 / 2)
    loss.backward()
    assert p_t.grad is None and p_s.grad[0, :, 1].abs().sum() == 0


def test_cps_targets_are_detached_argmax():
    z_i = torch.tensor([[[0.0], [math.log(3)]]], requires_grad=True)  # softmax [0.25, 0.75]
    z_j = torch.tensor([[[2.0], [1.0]]], requires_grad=True)  # argmax class 0
    loss = cps_pseudo_supervision(z_i, z_j)
    assert loss.item() == pytest.approx(-math.log(0.25))
    loss.backward()
    assert z_j.grad is None and z_i.grad is not None


def test_bcp_region_loss_two_weights():
    # zero logits: P = 0.5 everywhere, CE = ln 2. Box mask M = [1, 0]: pixel 0 outside, pixel 1 inside.
    logits = torch.zeros(1, 2, 1, 2)
    outside, inside = torch.ones(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2, dtype=torch.long)
    box = torch.tensor([[1.0, 0.0]])
    # outside region (label 1 there): class 0 Dice 1 - s/(0.5+s), class 1 Dice 1 - (1+s)/(1.5+s); inside the same
    d = ((1 - S / (0.5 + S)) + (1 - (1 + S) / (1.5 + S))) / 2
    expected = 0.5 * (1.0 * (d + math.log(2)) + 0.5 * (d + math.log(2)))
    assert bcp_region_loss(logits, outside, inside, box, 1.0, 0.5).item() == pytest.approx(expected, rel=1e-5)
    # swapping the weights weighs the same two regions the other way (they are symmetric here)
    assert bcp_region_loss(logits, outside, inside, box, 0.5, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # a perfect prediction inside with weight 0 leaves only the outside region's loss
    logits2 = torch.tensor([[[[-9.0, 9.0]], [[9.0, -9.0]]]])  # class 1 at pixel 0, class 0 at pixel 1
    only_out = bcp_region_loss(logits2, outside, inside, box, 1.0, 0.0).item()
    assert only_out < 1e-3  # pixel 0 is right: Dice ~0 and CE ~0 outside


def test_urpc_uncertainty_rectification():
    # two pyramid outputs, K = 2, two pixels. Pixel A: p1 = [0.5, 0.5], p2 = [0.9, 0.1]; pixel B: both [0.5, 0.5].
    p1 = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], requires_grad=True)
    p2 = torch.tensor([[[0.9, 0.5], [0.1, 0.5]]], requires_grad=True)
    # p_bar_A = [0.7, 0.3]; D_1A = 0.7 ln(0.7/0.5) + 0.3 ln(0.3/0.5); D_2A = 0.7 ln(0.7/0.9) + 0.3 ln(0.3/0.1)
    d1 = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    d2 = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    # (p_bar - p)^2 = 0.04 on both channels of pixel A, 0 at B; mean over (K x pixels) = 4 entries; D_B = 0, w_B = 1
    ls = [(2 * math.exp(-d) * 0.04 / 4) / ((math.exp(-d) + 1) / 2 + 1e-8) + d / 2 for d in (d1, d2)]
    loss = urpc_loss([p1, p2])
    assert loss.item() == pytest.approx(sum(ls) / 2, rel=1e-4)
    loss.backward()
    assert p1.grad is not None and p2.grad is not None  # no stop-gradient


def test_mcnet_mutual_consistency_sharpened_targets_in_graph():
    p1 = torch.tensor([[[0.6], [0.4]]], requires_grad=True)
    p2 = torch.tensor([[[0.5], [0.5]]], requires_grad=True)
    # T = 0.5: sharpen(p2) = p2; sharpen(p1) = [0.36, 0.16] / 0.52
    s1 = torch.tensor([0.36 / 0.52, 0.16 / 0.52])
    expected = 0.01 + float(torch.mean((torch.tensor([0.5, 0.5]) - s1) ** 2))
    loss = mcnet_mutual_consistency([p1, p2], temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_mcnet_supervised_dice_sum_over_decoders_binary_and_dsq():
    y = torch.tensor([[[[1, 0]]]])  # (B, 1, 1, 2)
    p1 = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # exact: fg = [1, 0]
    p2 = torch.full((1, 2, 1, 2), 0.5)
    # binary (3D): decoder 1 -> 0; decoder 2 -> 1 - (2*0.5 + e)/(1 + 1 + e) = 0.5
    assert mcnet_supervised_dice([p1, p2], y, binary=True).item() == pytest.approx(0.5, abs=1e-6)
    # D_sq (2D), per class: decoder 2 -> 1 - (2*0.5 + s)/(0.5 + 1 + s) = 1/3 for both classes; decoder 1 -> 0
    assert mcnet_supervised_dice([p1, p2], y[:, 0], binary=False).item() == pytest.approx(1 / 3, rel=1e-4)
    # K = 3, binary: the mean over the two foreground classes; class 2 absent and predicted 0 -> (0 + e)/(0 + e) = 1
    p3 = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])
    assert mcnet_supervised_dice([p3], y, binary=True).item() == pytest.approx(0.0, abs=1e-6)


def test_cct_consistency_mean_over_aux():
    main = torch.tensor([[[0.6], [0.4]]], requires_grad=True)
    aux = [torch.tensor([[[0.5], [0.5]]], requires_grad=True), torch.tensor([[[0.8], [0.2]]], requires_grad=True)]
    loss = cct_consistency(main, aux)
    assert loss.item() == pytest.approx((0.01 + 0.04) / 2)
    loss.backward()
    assert main.grad is not None and all(a.grad is not None for a in aux)
