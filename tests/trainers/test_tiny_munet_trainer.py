"""TinyMUNetTrainer (METHODS.md §4.8): the KD student trained on the labels alone, through the real nnU-Net commands
on `tiny2d`'s default plans, predicted and evaluated; the same network and optimiser groups as the KD trainer."""
import json
from pathlib import Path

import torch

from conftest import run_cmd, training_log, with_results

TRAINER = "TinyMUNetTrainer_smoke"


def test_train_predict_evaluate_the_kd_student_alone(tiny2d, tmp_path):
    env = with_results(tiny2d, tmp_path / "results")
    run_cmd(["nnUNetv2_train", "990", "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    log = training_log(fold)
    assert "student: TinyMUNet in place of the planned PlainConvUNet" in log and "per-image z-scored input" in log
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and ckpt["trainer_name"] == TRAINER
    assert any(k.endswith("A_log") for k in ckpt["network_weights"]), "a Mamba student, not the planned U-Net"
    groups = ckpt["optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [3e-5, 0.0] and groups[0]["momentum"] == 0.99

    # the KD trainer's student for the same plans has the same state dict (the control is the same network)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semisam.networks.kd_student import build_kd_student

    pre = Path(tiny2d["nnUNet_preprocessed"]) / "Dataset990_SynthRGB"
    cm = PlansManager(str(pre / "nnUNetPlans.json")).get_configuration("2d")
    student = build_kd_student(cm, 3, 2)
    assert {k: tuple(v.shape) for k, v in student.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ckpt["network_weights"].items()}

    raw = Path(env["nnUNet_raw"]) / "Dataset990_SynthRGB"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "990", "-c", "2d", "-f", "0",
             "-tr", TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env)
    assert json.loads((pred / "metrics.json").read_text(encoding="utf-8"))["n_cases"] == 2
