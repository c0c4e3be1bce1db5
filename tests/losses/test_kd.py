"""L_KD (METHODS.md §4.3) and L_RD ([KD] Eq. 1-2, METHODS.md §4.1 step 4) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_semisam.losses.kd import kd_loss, response_distillation_loss

LN = math.log
TOL = dict(rtol=1e-6, atol=1e-6)  # float32 arithmetic on O(1) values


def _logits(*pairs_or_triples) -> torch.Tensor:
    """Per-voxel logit vectors -> (1, K, 1, n) (one sample, a 1 x n image)."""
    return torch.tensor(pairs_or_triples, dtype=torch.float32).T[None, :, None, :].contiguous()


def _q(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, None, None, :]


def test_kd_tau1_hand_computed():
    # voxel 1: z = (0, ln 3) -> p = (1/4, 3/4); q = 1/2 -> q̂ = (1/2, 1/2)
    #          KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    # voxel 2: z = (0, 0) -> p = (1/2, 1/2); q = 1 -> q̂ = (0, 1): 0·ln 0 = 0, KL = 1·ln(1/(1/2)) = ln 2
    # voxel 3: z = (0, 0); q = 0 -> q̂ = (1, 0): KL = ln 2
    # voxel 4: z = (0, ln 3) -> p = (1/4, 3/4); q = 1/4 -> q̂ = (3/4, 1/4): KL = 3/4 ln 3 + 1/4 ln(1/3) = 1/2 ln 3
    z = _logits((0, LN(3)), (0, 0), (0, 0), (0, LN(3)))
    q = _q(0.5, 1.0, 0.0, 0.25)
    expected = (0.5 * LN(4 / 3) + LN(2) + LN(2) + 0.5 * LN(3)) / 4  # mean over the 4 voxels, τ² = 1
    torch.testing.assert_close(kd_loss(z, q), torch.tensor(expected), **TOL)


def test_kd_tau2_hand_computed():
    # τ = 2: z/τ = (0, ln 3) for z = (0, ln 9) -> p̂ = (1/4, 3/4)
    # q = 1/2: logit 0 -> q̂ = (1/2, 1/2), KL = 1/2 ln(4/3) (as above)
    # q = 1/10: logit(q) = ln(1/9) = -ln 9, /2 = -ln 3 -> q̂_1 = 1/(1+3) = 1/4, q̂ = (3/4, 1/4), KL = 1/2 ln 3
    # q = 9/10: logit = ln 9, /2 = ln 3 -> q̂ = (1/4, 3/4) = p̂, KL = 0
    z = _logits((0, LN(9)), (0, LN(9)), (0, LN(9)))
    q = _q(0.5, 0.1, 0.9)
    expected = 2 ** 2 * (0.5 * LN(4 / 3) + 0.5 * LN(3) + 0.0) / 3
    torch.testing.assert_close(kd_loss(z, q, tau=2.0), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_kd_more_than_two_classes_uses_background_vs_rest():
    # K = 3, z = (0, 0, ln 2): p = (1, 1, 2)/4 -> p̂ = (p_0, 1 - p_0) = (1/4, 3/4); q = 1/2 -> KL = 1/2 ln(4/3)
    z = _logits((0, 0, LN(2)))
    torch.testing.assert_close(kd_loss(z, _q(0.5)), torch.tensor(0.5 * LN(4 / 3)), **TOL)


def test_kd_weight_masking_and_sample_average():
    # sample 0: voxels KL = (1/2 ln(4/3), ln 2), weights (1, 0) -> 1/2 ln(4/3)
    # sample 1: voxels KL = (ln 2, 1/2 ln 3), weights (0.5, 0.5) -> (ln 2 + 1/2 ln 3) / 2
    # sample 2: no weight -> left out of the average (not counted as 0)
    z1 = _logits((0, LN(3)), (0, 0))
    q1 = _q(0.5, 1.0)
    z2 = _logits((0, 0), (0, LN(3)))
    q2 = _q(0.0, 0.25)
    z = torch.cat([z1, z2, z2])
    q = torch.cat([q1, q2, q2])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])[:, None, None, :]
    expected = (0.5 * LN(4 / 3) + (LN(2) + 0.5 * LN(3)) / 2) / 2
    torch.testing.assert_close(kd_loss(z, q, weight=w), torch.tensor(expected), **TOL)
    # bool weights are the 0/1 case
    wb = torch.tensor([[True, False], [True, True], [False, False]])[:, None, None, :]
    expected_b = (0.5 * LN(4 / 3) + (LN(2) + 0.5 * LN(3)) / 2) / 2
    torch.testing.assert_close(kd_loss(z, q, weight=wb), torch.tensor(expected_b), **TOL)


def test_kd_no_weight_is_a_differentiable_zero():
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    loss = kd_loss(z, torch.rand(2, 1, 3, 3), weight=torch.zeros(2, 1, 3, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_kd_gradient_only_into_the_student_and_zero_at_the_target():
    z = torch.randn(2, 2, 4, 4, requires_grad=True)
    q = torch.rand(2, 1, 4, 4, requires_grad=True)
    kd_loss(z, q).backward()
    assert q.grad is None and z.grad is not None and z.grad.abs().sum() > 0
    # at p̂ = q̂ the loss is 0 and stationary: z = (0, logit q)
    q0 = torch.tensor([0.2, 0.5, 0.7])[None, None, None, :]
    z0 = torch.stack([torch.zeros(3), torch.logit(q0[0, 0, 0])])[None, :, None, :].clone().requires_grad_(True)
    loss = kd_loss(z0, q0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and z0.grad.abs().max() < 1e-6


def test_kd_3d_and_shape_errors():
    z = _logits((0, LN(3)), (0, 0)).reshape(1, 2, 1, 1, 2)  # (B, K, Z, Y, X)
    q = _q(0.5, 1.0).reshape(1, 1, 1, 1, 2)
    torch.testing.assert_close(kd_loss(z, q), torch.tensor((0.5 * LN(4 / 3) + LN(2)) / 2), **TOL)
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3), weight=torch.ones(1, 1, 3, 2))


def test_rd_orthogonal_parallel_antiparallel():
    # layer A, (B=2, C=1, 2, 2): sample 0 orthogonal (cos 0 -> 1); sample 1 parallel, scaled by 2 (cos 1 -> 0)
    ta = torch.tensor([[1.0, 0, 0, 0], [1, 2, 3, 4]]).reshape(2, 1, 2, 2)
    sa = torch.tensor([[0.0, 1, 0, 0], [2, 4, 6, 8]]).reshape(2, 1, 2, 2)
    # layer B, (B=2, C=2, 1, 1): sample 0 anti-parallel (cos -1 -> 2); sample 1 (1, 0) vs (1, 1): cos 1/√2
    tb = torch.tensor([[1.0, -2], [1, 0]]).reshape(2, 2, 1, 1)
    sb = torch.tensor([[-3.0, 6], [1, 1]]).reshape(2, 2, 1, 1)
    layer_a = (1 + 0) / 2
    layer_b = (2 + (1 - 1 / math.sqrt(2))) / 2
    torch.testing.assert_close(response_distillation_loss([ta], [sa]), torch.tensor(layer_a), **TOL)
    torch.testing.assert_close(response_distillation_loss([tb], [sb]), torch.tensor(layer_b), **TOL)
    torch.testing.assert_close(response_distillation_loss([ta, tb], [sa, sb]), torch.tensor((layer_a + layer_b) / 2),
                               **TOL)


def test_rd_gradient_flows_into_both_sides_and_errors():
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    response_distillation_loss([t], [s]).backward()
    assert t.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    # aligned responses: loss 0 (and it cannot go below)
    assert response_distillation_loss([t.detach()], [3 * t.detach()]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        response_distillation_loss([], [])
    with pytest.raises(ValueError):
        response_distillation_loss([t], [s, s])
    with pytest.raises(ValueError):
        response_distillation_loss([t], [s[:, :2]])
