"""Semi-SAM+ losses and schedules by hand (METHODS.md §5.5, §5.7)."""
import math

import pytest
import torch

from nnunet_semisam.losses.semisam_plus import beta_rampdown, lambda_rampup, phase_at, phase_bounds, rs_consistency


def test_rs_consistency_hand_case():
    p = torch.tensor([[0.9, 0.2, 0.5, 0.0], [0.3, 0.3, 0.3, 0.3]], requires_grad=True)
    pseudo = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    conf = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    # sample 0: ((0.1)^2 + (0.2)^2) / 2 = 0.025; sample 1: empty mask -> 0 / max(0, 1) = 0; mean = 0.0125
    loss = rs_consistency(p, pseudo, conf)
    assert loss.item() == pytest.approx(0.0125)
    loss.backward()
    # d/dp of mean_b sum (p - q)^2 / 2 = 0.5 * 2 (p - q) / 2 = (p - q) / 2 per confident voxel
    assert torch.allclose(p.grad[0], torch.tensor([-0.05, 0.1, 0.0, 0.0]))
    assert torch.all(p.grad[1] == 0)
    with pytest.raises(ValueError, match="same shape"):
        rs_consistency(p, pseudo[:1], conf)


def test_ramps_by_hand():
    assert lambda_rampup(0, 1.0, 10) == pytest.approx(math.exp(-5))
    assert lambda_rampup(5, 1.0, 10) == pytest.approx(math.exp(-1.25))
    assert lambda_rampup(10, 1.0, 10) == 1.0 and lambda_rampup(30, 2.0, 10) == 2.0
    assert lambda_rampup(-1, 1.0, 10) == 0.0 and lambda_rampup(0, 0.7, 0) == 0.7
    assert beta_rampdown(0, 0.3, 40) == pytest.approx(0.3)
    assert beta_rampdown(40, 0.3, 40) == pytest.approx(0.3 / math.e)
    assert beta_rampdown(-2, 0.3, 40) == 0.0


def test_phase_switches():
    assert phase_bounds(200) == (50, 150)  # the manual's 50 / 100 / 50 epochs
    assert [phase_at(e, 200) for e in (0, 49, 50, 149, 150, 199)] == [0, 0, 1, 1, 2, 2]
    assert phase_bounds(4) == (1, 3)
    assert [phase_at(e, 4) for e in range(4)] == [0, 1, 1, 2]
    assert phase_bounds(10, (0, 1, 0)) == (0, 10)
    with pytest.raises(ValueError):
        phase_bounds(10, (1, 1))


def test_phase_lr_by_hand():
    from nnunet_semisam.losses.semisam_plus import phase_lr
    assert [phase_lr(e, 200) for e in (0, 49)] == [2e-3, 2e-3]
    assert phase_lr(50, 200) == pytest.approx(2e-3)
    assert phase_lr(100, 200) == pytest.approx(2e-3 * 0.5 ** 0.9)
    assert phase_lr(150, 200) == pytest.approx(2e-4)
    assert phase_lr(175, 200) == pytest.approx(2e-4 * 0.5 ** 0.9)


def test_offline_rs_consistency_from_extra_channels():
    from nnunet_semisam.losses.semisam_plus import offline_rs_consistency
    p = torch.tensor([[0.9, 0.2, 0.5, 0.0]])
    extra = torch.tensor([[[1.0, 0.0, 0.0, 1.0],     # q
                           [1.0, 0.8, 0.4, 1.0],     # conf (soft after interpolation): > 0.5 kept
                           [1.0, 1.0, 1.0, 0.2]]])   # valid: the last voxel is outside the image
    loss, share = offline_rs_consistency(p, extra)
    assert loss.item() == pytest.approx((0.1 ** 2 + 0.2 ** 2) / 2) and share == 0.5


def test_epoch_lr_sets_every_group_from_the_function():
    import torch

    from nnunet_semisam.losses.semisam_plus import phase_lr
    from nnunet_semisam.schedules import EpochLR

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], lr=0.5)
    sched = EpochLR(opt, lambda e: phase_lr(e, 200))
    for epoch, lr in ((0, 2e-3), (100, 2e-3 * 0.5 ** 0.9), (150, 2e-4)):
        sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr)] * 2
