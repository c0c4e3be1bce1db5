"""Mean-Teacher pieces against hand-computed values: softmax MSE, sigmoid ramp, consistency weight, EMA update."""
import math

import pytest
import torch

from nnunet_semisam.losses.consistency import gaussian_input_noise, softmax_mse
from nnunet_semisam.schedules import consistency_weight, sigmoid_rampup
from nnunet_semisam.teachers.ema import EMATeacher


def test_softmax_mse_hand_computed():
    # one voxel, two classes: softmax([0, 0]) = (.5, .5); softmax([ln 3, 0]) = (.75, .25)
    s = torch.zeros(1, 2, 1, 1, requires_grad=True)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    loss = softmax_mse(s, t)
    assert loss.item() == pytest.approx(((0.5 - 0.75) ** 2 + (0.5 - 0.25) ** 2) / 2, abs=1e-7)
    loss.backward()
    # d/ds0 of mean((p - q)^2) with p = softmax(s): (p0 - q0) * p0 * (1 - p0) * 2 / 2 * 2 = ...
    p0, q0 = 0.5, 0.75
    g0 = (2 / 2) * ((p0 - q0) * p0 * (1 - p0) - (1 - p0 - (1 - q0)) * p0 * (1 - p0))
    assert s.grad[0, 0, 0, 0].item() == pytest.approx(g0, abs=1e-6)


def test_softmax_mse_detaches_teacher():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    softmax_mse(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(20, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_consistency_weight_rescaled_to_run():
    # lambda_max 0.2, 1000 iterations, ramp over half the run: at t=250 phase = 0.5
    assert consistency_weight(250, 0.2, 1000, 0.5) == pytest.approx(0.2 * math.exp(-5 * 0.25))
    assert consistency_weight(1000, 0.2, 1000) == pytest.approx(0.2)


def test_input_noise_is_clipped():
    x = torch.zeros(10000)
    n = gaussian_input_noise(x, std=1.0, clip=0.2)
    assert n.abs().max().item() <= 0.2 + 1e-7 and n.std().item() > 0.1


def test_ema_update_formula_and_buffers():
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMATeacher(student, alpha=0.99)
    t0 = ema.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(3.0)
    # step 0: a = min(1 - 1/1, .99) = 0 -> copy of the student
    assert ema.update(student, 0) == 0.0
    assert torch.allclose(ema.model[0].weight, student[0].weight)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    # step 9: a = min(1 - 1/10, .99) = 0.9
    before = ema.model[0].weight.clone()
    assert ema.update(student, 9) == pytest.approx(0.9)
    assert torch.allclose(ema.model[0].weight, 0.9 * before + 0.1 * student[0].weight)
    assert torch.equal(ema.model[1].running_mean, student[1].running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())
    ema.train()
    assert not ema.model.training
    assert not torch.equal(t0, ema.model[0].weight)


def test_ema_without_warmup_uses_alpha_from_the_first_step():
    # BCP (METHODS.md §8.4): plain a = 0.99 even at step 0, so the teacher moves 1 % towards the student
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(2.0)
    ema = EMATeacher(student, alpha=0.99, warmup=False)
    with torch.no_grad():
        student.weight.fill_(12.0)
    assert ema.update(student, 0) == 0.99
    assert ema.model.weight.item() == pytest.approx(0.99 * 2.0 + 0.01 * 12.0)  # 2.1
