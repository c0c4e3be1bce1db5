"""VerSemi's context mask, mixing and losses on hand-made cases (METHODS.md §6.3, §6.4)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_semisam.losses.versemi import (PHASE_A_RATIO, aggregated_target, aux_loss, aux_targets, context_mask,
                                           dice_fg, fg_prob, mix, mix_ratio, mixlab_loss, supervised_loss,
                                           synthetic_loss, unlabeled_loss)


def logits_for(p: torch.Tensor) -> torch.Tensor:
    """2-class logits whose softmax foreground is p (0 < p < 1)."""
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)


def test_context_mask_boxes_and_start_range():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        m = context_mask(3, (9, 12, 6), PHASE_A_RATIO, g)
        assert m.shape == (3, 1, 9, 12, 6) and set(m.unique().tolist()) <= {0.0, 1.0}
        for b in range(3):
            zero = (m[b, 0] == 0).nonzero()
            lo, hi = zero.min(0).values, zero.max(0).values
            assert (hi - lo + 1).tolist() == [6, 8, 4]  # floor(2/3 S) per dim
            assert zero.shape[0] == 6 * 8 * 4  # one full box
            starts.add(int(lo[0]))
    assert starts == {0, 1, 2}  # uniform in {0, ..., S - s - 1} = {0, 1, 2}; never 3
    m = context_mask(2, (96, 96, 96), PHASE_A_RATIO, g)
    assert float((m == 0).float().mean()) == pytest.approx((64 / 96) ** 3)


def test_mix_ratio_per_phase():
    g = torch.Generator().manual_seed(1)
    assert mix_ratio("A", g) == 2 / 3
    draws = [mix_ratio("B", g) for _ in range(500)]
    assert 0.3 <= min(draws) < 0.32 and 0.58 < max(draws) <= 0.6
    with pytest.raises(ValueError):
        mix_ratio("C")


def test_mixed_images_and_labels_union():
    m = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])  # (B=1, 1, 4): box = the middle two voxels
    x_a, x_b = torch.full((1, 2, 4), 1.0), torch.full((1, 2, 4), 5.0)
    assert mix(x_a, x_b, m).tolist() == [[[1, 5, 5, 1], [1, 5, 5, 1]]]
    y_a, y_b = torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert mix(y_a, y_b, m[:, 0]).tolist() == [[1, 1, 1, 0]]  # a outside the box, b inside: both foregrounds


def test_dice_hand_computed():
    p, y = torch.tensor([0.5, 1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert float(dice_fg(p, y)) == pytest.approx(1 - (3 + 1e-5) / (3.25 + 1e-5))
    assert float(dice_fg(torch.zeros(4), torch.zeros(4))) == pytest.approx(0.0)  # the trivial solution


def test_supervised_and_synthetic_losses():
    p = torch.tensor([[0.8, 0.6, 0.1, 0.3]])
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logits = logits_for(p)
    inter, z, ys = 0.8 + 0.6, 0.64 + 0.36 + 0.01 + 0.09, 2.0
    dice = 1 - (2 * inter + 1e-5) / (z + ys + 1e-5)
    ce = -(math.log(0.8) + math.log(0.6) + math.log(0.9) + math.log(0.7)) / 4
    assert float(supervised_loss(logits, y)) == pytest.approx(dice + ce, rel=1e-5)
    assert float(synthetic_loss(logits, y)) == pytest.approx(dice, rel=1e-5)


def test_aux_targets_and_loss():
    m = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0, 1.0]]])
    y_a = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    y_b = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    t_a, t_b = torch.tensor([1, 2]), torch.tensor([3, 2])
    ta, tb = aux_targets(y_a, y_b, m, t_a, t_b)
    assert ta[0].tolist() == [1, 0, 0, 0] and tb[0].tolist() == [0, 0, 1, 1]  # different tasks: own region only
    assert ta[1].tolist() == tb[1].tolist() == [1, 1, 0, 0]  # same task: y_mix for both
    la, lb = logits_for(torch.full((2, 4), 0.3)), logits_for(torch.full((2, 4), 0.6))
    expect = 0.5 * (supervised_loss(la, ta) + supervised_loss(lb, tb))
    assert float(aux_loss(la, lb, y_a, y_b, m, t_a, t_b)) == pytest.approx(float(expect))


def test_unlabeled_loss_stops_the_gradient_of_the_aggregated_target():
    p1 = torch.tensor([[0.2, 0.9]], requires_grad=True)
    p2 = torch.tensor([[0.7, 0.1]], requires_grad=True)
    agg = aggregated_target([p1, p2])
    assert agg[0].tolist() == pytest.approx([0.7, 0.9]) and not agg.requires_grad
    union = logits_for(torch.tensor([[0.5, 0.5]])).requires_grad_()
    loss = unlabeled_loss(union, agg)
    expect = 1 - (2 * (0.35 + 0.45) + 1e-5) / (0.5 + 0.49 + 0.81 + 1e-5)
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert union.grad is not None and p1.grad is None and p2.grad is None


def official_mixlab(p_union: torch.Tensor, y_l: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official expression: (B, *S) tensors times the (B, 1, *S) mask broadcast to (B, B, *S)."""
    return dice_fg(p_union * (1 - mask), y_l * (1 - mask))


def test_mixlab_uses_each_samples_own_mask():
    # sample 0 pastes voxels 0-1, sample 1 pastes voxels 2-3; the prediction is right exactly there and wrong elsewhere
    m = torch.tensor([[[0.0, 0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]])
    y_l = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    p = torch.where(m[:, 0] == 0, y_l, 1 - y_l).clamp(1e-4, 1 - 1e-4)
    ours = mixlab_loss(logits_for(p), y_l, m)
    assert float(ours) == pytest.approx(0.0, abs=1e-3)
    assert (p * (1 - m)).shape == (2, 2, 4)  # the official broadcasting mixes samples ...
    assert float(official_mixlab(fg_prob(logits_for(p)), y_l, m)) > 0.3  # ... and penalises a perfect prediction
    # hand-computed with a non-trivial prediction in the pasted regions
    p2 = torch.tensor([[0.5, 0.5, 0.9, 0.9], [0.9, 0.9, 0.25, 0.5]])
    inter = 0.5 + 0.25
    z = 0.25 + 0.25 + 0.0625 + 0.25
    expect = 1 - (2 * inter + 1e-5) / (z + 2 + 1e-5)
    assert float(mixlab_loss(logits_for(p2), y_l, m)) == pytest.approx(expect, rel=1e-4)


def test_losses_differentiable_through_logits():
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    y = (torch.rand(2, 3, 3) > 0.5).float()
    m = context_mask(2, (3, 3), 0.5, torch.Generator().manual_seed(0))
    total = supervised_loss(logits, y) + synthetic_loss(logits, y) + mixlab_loss(logits, y, m)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert F.softmax(logits, 1).shape == logits.shape
