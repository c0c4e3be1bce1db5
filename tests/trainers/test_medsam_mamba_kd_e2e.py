"""MedSAMMambaKDTrainer through the real nnU-Net commands: default plans (killed and resumed) and TinyMUNet plans, each
predicted and evaluated; the 3D configuration is refused."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import (assert_binary_png_predictions, kill_after_first_checkpoint, run_cmd, trainer_from_checkpoint,
                      training_log, with_results)

TRAINER = "MedSAMMambaKDTrainer_smoke"
CALIBRATED = "MedSAMMambaKDTrainer_calibrated_smoke"  # the resumed run: t* is computed once and checkpointed
TERMS = ("supervised", "kd_l", "rd_l", "fbvm_l", "kd_u", "rd_u", "fbvm_u")


def _terms(log: str) -> list[dict[str, tuple[float, float]]]:
    """Per epoch: {term: (loss, weight)} from the 'loss terms:' lines of the training log."""
    out = []
    for line in re.findall(r"loss terms: (.*)", log):
        out.append({m[0]: (float(m[1]), float(m[2])) for m in re.findall(r"(\w+) ([\w.e+-]+) \(w ([\d.e+-]+)\)", line)})
    return out


def _predict_and_evaluate(env: dict, tmp_path: Path, plans: str, trainer: str = TRAINER) -> dict:
    raw = Path(env["nnUNet_raw"]) / "Dataset990_SynthRGB"
    pred = tmp_path / f"pred_{plans}"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "990", "-c", "2d", "-f", "0",
             "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert_binary_png_predictions(pred, raw / "labelsTs", 2)
    out = run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env).stdout
    assert "Dice" in out
    return json.loads((pred / "metrics.json").read_text())


def _check_training(fold: Path, student_line: str) -> None:
    log = training_log(fold)
    assert student_line in log, log
    assert "Unlabeled loader: 6 cases" in log
    assert "labeled teacher targets from GT boxes: 4 computed" in log  # 6 labeled, 5-fold: 4 or 5 in training
    epochs = _terms(log)
    assert len(epochs) == 2, log
    for ep in epochs:
        assert set(ep) == set(TERMS), ep
        assert ep["supervised"][1] == 1 and ep["kd_l"][1] == 1 and ep["kd_u"][1] == 0.5
        assert ep["kd_l"][0] > 0 and ep["rd_l"][0] > 0 and ep["rd_u"][0] > 0, "KD and L_RD are active"
        assert -1 < ep["fbvm_l"][0] < 20 and -1 < ep["fbvm_u"][0] < 20
    assert epochs[0]["kd_u"][0] == 0, "no unlabeled pseudo-label before the first refresh"
    m = re.search(r"pseudo-label round 1: (\d+)/6 unlabeled cases have a pseudo-label", log)
    assert m, "refresh at epoch 1"
    if int(m.group(1)) > 0:
        assert epochs[1]["kd_u"][0] > 0, "refreshed pseudo-labels reach the unlabeled KD term"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["semisam"]["pseudolabel_round"] == 1 and ckpt["semisam"]["global_step"] == 20
    assert "projector" in ckpt["semisam"] and ckpt["semisam"]["polarity"] is not None
    labeled = sorted((fold / "pseudolabels" / "labeled").glob("*.npz"))
    unlabeled = sorted((fold / "pseudolabels" / "unlabeled").glob("*.npz"))
    assert len(labeled) == 4 and len(unlabeled) == 6


@pytest.fixture(scope="module")
def tiny2d_tinymunet_plans(tiny2d):
    run_cmd(["nnunet-semisam", "plan", "-d", "990", "-pl", "TinyMUNetPlanner"], tiny2d)
    run_cmd(["nnUNetv2_preprocess", "-d", "990", "-plans_name", "nnUNetPlans_TinyMUNet", "-c", "2d", "-np", "1"],
            tiny2d)
    run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", "990", "-c", "2d", "-p", "nnUNetPlans_TinyMUNet",
             "--quiet"], tiny2d)
    return tiny2d


def test_tinymunet_plans_train_predict_evaluate(tiny2d_tinymunet_plans, tmp_path):
    env = with_results(tiny2d_tinymunet_plans, tmp_path / "results")
    run_cmd(["nnUNetv2_train", "990", "2d", "0", "-tr", TRAINER, "-p", "nnUNetPlans_TinyMUNet", "-device", "cpu"],
            env)
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{TRAINER}__nnUNetPlans_TinyMUNet__2d" / "fold_0"
    _check_training(fold, "student: the planned TinyMUNet (nnUNetPlans_TinyMUNet)")
    assert _predict_and_evaluate(env, tmp_path, "nnUNetPlans_TinyMUNet")


def test_default_plans_kill_resume_predict_evaluate(tiny2d, tmp_path, monkeypatch):
    """The design card's literal command on default nnU-Net plans (the trainer builds TinyMUNet for them), killed after
    its epoch-0 checkpoint, resumed with `--c`, then predicted and evaluated; with the calibrated teacher maps
    (METHODS.md §4.5), whose t* is computed once from the labeled targets and restored with the checkpoint.

    Run in an ASCII locale (no UTF-8 mode): nnU-Net opens its log file with the locale's encoding, so a non-ASCII
    character in a log line would crash the training there."""
    env = with_results(tiny2d, tmp_path / "results")
    env.update(LC_ALL="C", PYTHONUTF8="0")
    env.pop("PYTHONIOENCODING", None)
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{CALIBRATED}__nnUNetPlans__2d" / "fold_0"
    cmd = ["nnUNetv2_train", "990", "2d", "0", "-tr", CALIBRATED, "-device", "cpu"]
    latest = kill_after_first_checkpoint(cmd, env, fold)
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 1 and saved["semisam"]["pseudolabel_round"] == 0
    t_star = float(re.search(r"teacher threshold calibrated on \d+ labeled cases: t\* = ([\d.]+)",
                             training_log(fold)).group(1))
    assert saved["semisam"]["teacher_threshold"] == t_star and 0 < t_star <= 0.5

    # in-process: the checkpoint restores projectors, round, polarity and the optimizer (momentum of projectors too)
    trainer = trainer_from_checkpoint(env, monkeypatch, "990", CALIBRATED, latest)
    for k, v in saved["semisam"]["projector"].items():
        assert torch.equal(trainer.projector.state_dict()[k], v)
    assert trainer.pl_round == 0 and trainer.polarity == saved["semisam"]["polarity"] and trainer.threshold == t_star
    assert trainer.network.decoder.deep_supervision is False, "Tiny-MUNet student: single output (METHODS.md §1.3)"
    opt = trainer.optimizer.state_dict()
    assert len(opt["param_groups"]) == 3, "student (decay), A_log/D (no decay), projectors"
    # projector weights have momentum; their biases cancel in the responses (METHODS.md §4.1, step 3): no gradient
    projector_ids = [i for i in opt["param_groups"][2]["params"] if i in saved["optimizer_state"]["state"]]
    assert len(projector_ids) == len(opt["param_groups"][2]["params"]) // 2
    assert all(torch.equal(opt["state"][i]["momentum_buffer"], saved["optimizer_state"]["state"][i]["momentum_buffer"])
               for i in projector_ids)
    assert all(float(opt["state"][i]["momentum_buffer"].abs().sum()) > 0 for i in projector_ids)
    assert opt["param_groups"][1]["weight_decay"] == 0 and opt["param_groups"][0]["weight_decay"] == 3e-5

    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    assert float(re.search(r"restored pseudo-label round 0, teacher threshold ([\d.]+)", log).group(1)) == t_star
    assert f"restored FBVM polarity {saved['semisam']['polarity']}" in log
    restored = float(re.search(r"restored FPKDM projectors \(sum of weights ([\d.e+-]+)\)", log).group(1))
    assert log.count("teacher threshold calibrated") == 1, "t* comes from the checkpoint when resuming"
    assert restored == pytest.approx(sum(float(v.double().sum()) for v in saved["semisam"]["projector"].values()),
                                     rel=1e-9)
    _check_training(fold, "student: TinyMUNet in place of the planned PlainConvUNet")
    assert _predict_and_evaluate(env, tmp_path, "nnUNetPlans", CALIBRATED)


def test_3d_configuration_is_refused(tiny3d, tmp_path):
    env = with_results(tiny3d, tmp_path / "results")
    proc = run_cmd(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env, check=False)
    assert proc.returncode != 0
    assert "is a 2D method" in proc.stderr and "train the '2d' configuration" in proc.stderr
