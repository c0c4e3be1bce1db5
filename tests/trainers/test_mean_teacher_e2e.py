"""MeanTeacherTrainer through the real nnU-Net commands: train, killed after its epoch-0 checkpoint, resumed with --c,
then predict and evaluate (one training, the checks of both)."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import (assert_binary_png_predictions, kill_after_first_checkpoint, run_cmd, trainer_from_checkpoint,
                      training_log, with_results)

TRAINER = "MeanTeacherTrainer_smoke"


def test_kill_resume_predict_evaluate(tiny2d, tmp_path, monkeypatch):
    env = with_results(tiny2d, tmp_path / "results")
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    cmd = ["nnUNetv2_train", "990", "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    latest = kill_after_first_checkpoint(cmd, env, fold)
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 1 and saved["semisam"]["global_step"] == 10
    saved_sum = sum(float(v.double().sum()) for v in saved["semisam"]["ema_teacher"].values())

    # in-process: loading the checkpoint restores exactly the saved EMA weights and step
    trainer = trainer_from_checkpoint(env, monkeypatch, "990", TRAINER, latest)
    for k, v in saved["semisam"]["ema_teacher"].items():
        assert torch.equal(trainer.ema.model.state_dict()[k], v)
    assert trainer.global_step == 10

    # the real resume
    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    assert "Restored MeanTeacherTrainer_smoke state at t_it=10" in log
    restored = float(re.search(r"EMA teacher restored \(sum of weights ([\d.e+-]+)\)", log).group(1))
    assert restored == pytest.approx(saved_sum, rel=1e-9)
    assert "Unlabeled loader: 6 cases" in log
    terms = re.findall(r"loss terms: supervised ([\d.e+-]+) \(w 1\), consistency ([\d.e+-]+) \(w ([\d.e+-]+)\)", log)
    assert len(terms) == 2, log  # epoch 0 before the kill, epoch 1 after the resume
    assert all(float(c) > 0 and float(w) > 0 for _, c, w in terms), "the unlabeled consistency term must be active"
    assert float(terms[1][2]) > float(terms[0][2]), "ramp-up: the weight grows"
    assert (fold / "progress_terms.png").is_file() and (fold / "progress.png").is_file()
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["semisam"]["global_step"] == 20 and "ema_teacher" in final["semisam"]
    assert final["network_weights"].keys() == final["semisam"]["ema_teacher"].keys()

    raw = Path(env["nnUNet_raw"]) / "Dataset990_SynthRGB"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "990", "-c", "2d", "-f", "0",
             "-tr", TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert_binary_png_predictions(pred, raw / "labelsTs", 2)
    out = run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env).stdout
    metrics = json.loads((pred / "metrics.json").read_text())
    assert "Dice" in out and metrics
