"""BCP (METHODS.md §8.4): which region gets which image, the teacher copied from the pre-trained student at the
switch, and the phase + EMA teacher across a real kill and `nnUNetv2_train --c` after the switch."""
import re

import pytest
import torch

from conftest import kill_after_first_checkpoint, run_cmd, trainer_from_checkpoint, training_log, with_results
from test_baselines_e2e import check_predict_evaluate
from nnunet_semisam.trainers.bcp import BCPTrainer, paste


def test_paste_puts_inside_the_box_the_second_image():
    box = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # the box is pixel (0, 1)
    a, b = torch.full((1, 1, 2, 2), 7.0), torch.full((1, 1, 2, 2), 3.0)
    assert paste(a, b, box)[0, 0].tolist() == [[7.0, 3.0], [7.0, 7.0]]


def test_switch_copies_the_student():
    t = object.__new__(BCPTrainer)
    t.network, t.ema_decay, t.device, t.global_step = torch.nn.Conv2d(1, 2, 3), 0.99, torch.device("cpu"), 5
    t.print_to_log_file = lambda *a, **k: None
    t.start_self_training()
    for k, v in t.network.state_dict().items():
        assert torch.equal(t.ema.model.state_dict()[k], v)
    # plain EMA (no warm-up): the first update moves the teacher 1 % towards the student
    with torch.no_grad():
        t.network.weight.add_(1.0)
    before = t.ema.model.weight.clone()
    t.after_optimizer_step()
    assert torch.allclose(t.ema.model.weight, 0.99 * before + 0.01 * t.network.weight)


BCP = "BCPTrainer_smoke"


def test_bcp_kill_after_switch_and_resume(tiny2d, tmp_path, monkeypatch):
    env = with_results(tiny2d, tmp_path / "results")
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{BCP}__nnUNetPlans__2d" / "fold_0"
    cmd = ["nnUNetv2_train", "990", "2d", "0", "-tr", BCP, "-device", "cpu"]
    latest = kill_after_first_checkpoint(cmd, env, fold)  # epoch 0 = t_it 0..9, the switch is at t_it 5
    saved = torch.load(latest, map_location="cpu", weights_only=False)["semisam"]
    assert saved["global_step"] == 10 and saved["switch_step"] == 5 and saved["bcp_ema"] is not None

    trainer = trainer_from_checkpoint(env, monkeypatch, "990", BCP, latest)
    for k, v in saved["bcp_ema"].items():
        assert torch.equal(trainer.ema.model.state_dict()[k], v)

    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    assert log.count("EMA teacher initialised from the pre-trained student") == 1  # not re-copied on resume
    restored = float(re.search(r"self-training phase restored with its EMA teacher \(sum of weights ([\d.e+-]+)\)",
                               log).group(1))
    assert restored == pytest.approx(sum(float(v.double().sum()) for v in saved["bcp_ema"].values()), rel=1e-9)
    terms = re.findall(r"loss terms: pretrain (\S+) \(w (\S+)\), mix_l (\S+) \(w (\S+)\)", log)
    assert terms[0][1] == "1" and terms[-1][0] == "nan" and float(terms[-1][2]) > 0  # epoch 1: self-training only
    check_predict_evaluate("BCPTrainer", "2d", env, tmp_path)  # the baseline e2e checks of this 2D run
