"""UA-MT's uncertainty mask inside the trainer (hand-made teacher), and CPS's second network and optimizer across a
real kill and `nnUNetv2_train --c` (METHODS.md §8.2, §8.3)."""
import math
import re

import pytest
import torch

from conftest import kill_after_first_checkpoint, run_cmd, trainer_from_checkpoint, training_log, with_results
from test_baselines_e2e import check_predict_evaluate
from nnunet_semisam.trainers.uamt import UAMTTrainer


class FixedTeacher(torch.nn.Module):
    """Ignores its (noised) input: pixel 0 confident [5, -5], pixel 1 undecided [0, 0], for every row."""

    def forward(self, x):
        logits = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])  # (K=2, X=2)
        return logits.expand(x.shape[0], 2, 2)


def test_uamt_masks_the_uncertain_voxels():
    t = object.__new__(UAMTTrainer)  # only what unlabeled_loss_terms reads
    t.ema, t.uncertainty_rounds, t.uncertainty_copies = FixedTeacher(), 4, 2
    t.global_step, t.num_epochs, t.num_iterations_per_epoch = 0, 1, 100
    t.consistency_max, t.rampup_fraction, t.mt_hard_warmup_fraction = 0.2, 1.0, 0.0
    student = torch.zeros(3, 2, 2)  # p_s = [0.5, 0.5] at both pixels
    terms = t.unlabeled_loss_terms(student, {"strong": torch.zeros(3, 1, 2)})
    # entropy: pixel 0 ~ 0.0067 < th(0) = (0.75 + 0.25 e^-5) ln 2 = 0.521; pixel 1 = ln 2 > th -> mask [1, 0]
    assert terms["kept"][1].item() == pytest.approx(0.5) and terms["kept"][0] == 0.0
    assert terms["threshold"][1].item() == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    p0 = 1 / (1 + math.exp(-10))  # teacher's softmax at pixel 0
    # sum over 3 rows x 2 channels of (0.5 - p)^2 at pixel 0, over 2 * (3 kept voxels)
    expected = 3 * 2 * (0.5 - p0) ** 2 / (2 * 3)
    weight, loss = terms["consistency"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert weight == pytest.approx(0.2 * math.exp(-5))


CPS = "CPSTrainer_smoke"


def test_cps_kill_and_resume_restores_network2_and_optimizer2(tiny2d, tmp_path, monkeypatch):
    env = with_results(tiny2d, tmp_path / "results")
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{CPS}__nnUNetPlans__2d" / "fold_0"
    cmd = ["nnUNetv2_train", "990", "2d", "0", "-tr", CPS, "-device", "cpu"]
    latest = kill_after_first_checkpoint(cmd, env, fold)
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["semisam"]["global_step"] == 10
    net1, net2 = saved["network_weights"], saved["semisam"]["network2"]
    assert net1.keys() == net2.keys() and not all(torch.equal(net1[k], net2[k]) for k in net1)

    trainer = trainer_from_checkpoint(env, monkeypatch, "990", CPS, latest)
    for k, v in net2.items():
        assert torch.equal(trainer.network2.state_dict()[k], v)
    state = trainer.optimizer2.state_dict()["state"]
    assert state and all(torch.equal(state[i]["momentum_buffer"], s["momentum_buffer"])
                         for i, s in saved["semisam"]["optimizer2"]["state"].items())

    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    saved_sum = sum(float(v.double().sum()) for v in net2.values())
    restored = float(re.search(r"CPS network 2 and its optimizer restored \(sum of weights ([\d.e+-]+)\)",
                               log).group(1))
    assert restored == pytest.approx(saved_sum, rel=1e-9)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["semisam"]["global_step"] == 20
    check_predict_evaluate("CPSTrainer", "2d", env, tmp_path)  # the baseline e2e checks of this 2D run
