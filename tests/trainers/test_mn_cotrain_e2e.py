"""MNCoTrainer (METHODS.md §7) through the real nnU-Net commands on `tiny3d`: `nnUNetv2_train 991 3d_fullres 0 -tr
MNCoTrainer_smoke -device cpu` killed after its epoch-0 checkpoint (mid stage 2), `--c` resume to the end,
`nnUNetv2_predict` with g, `nnunet-semisam evaluate`.

The smoke schedule is 20 iterations in M&N epochs of 2: stage 1 = iterations 0-1, then f, g, f, g, ... epochs; the
epoch-0 checkpoint is at t_it = 10, the start of f's third epoch (f-epoch 2, g-epoch 2 done).
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from conftest import kill_after_first_checkpoint, run_cmd, training_log, with_results

TRAINER = "MNCoTrainer_smoke"
TERM = re.compile(r"(\w+) (\S+) \(w (\S+)\)")


def test_mn_smoke_train_kill_resume_predict_evaluate(tiny3d, tmp_path):
    env = with_results(tiny3d, tmp_path / "results")
    fold = tmp_path / "results" / "Dataset991_Synth3D" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    cmd = ["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    latest = kill_after_first_checkpoint(cmd, env, fold)
    saved = torch.load(latest, map_location="cpu", weights_only=False)["semisam"]
    assert saved["global_step"] == 10
    # per-model epoch counters: t_it 10 is M&N epoch 5 = stage-2 epoch 4, an f-epoch; f and g each did 2 epochs
    assert saved["position"] == {"mn_epoch": 5, "stage": 2, "learner": "f", "epoch_f": 2, "epoch_g": 2,
                                 "first_iteration_of_epoch": True}
    assert saved["refreshes_done"] == 1  # smoke refreshes: stage-2 start (done) and f-epoch 3 (after the kill)
    assert saved["model_f_kind"] == "tinyvit" and any("lora_B" in k for k in saved["model_f"])
    # f was trained: some LoRA B moved away from 0
    assert any(torch.count_nonzero(v) for k, v in saved["model_f"].items() if "lora_B" in k)
    masks = sorted((fold / "mn_pseudo_masks").glob("*.npz"))
    assert len(masks) == 4  # the 4 unlabeled cases of tiny3d
    with np.load(masks[0]) as m:
        assert m["mask"].ndim == 3

    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    assert "M&N 2D model f: tinyvit" in log and "LiteMedSAM TinyViT weights" in log
    restored = float(re.search(r"model f and its optimizer restored \(sum of weights ([\d.e+-]+)\)", log).group(1))
    assert restored == sum(float(v.double().sum()) for v in saved["model_f"].values()) or \
        math.isclose(restored, sum(float(v.double().sum()) for v in saved["model_f"].values()), rel_tol=1e-9)
    assert "stage 2, learner f, f-epoch 2, g-epoch 2, 1 pseudo-mask refreshes done" in log
    assert len(re.findall(r"M&N pseudo-masks of g refreshed", log)) == 2  # 1 before the kill, 1 after (f-epoch 3)
    epochs = [{n: (float(v), float(w)) for n, v, w in TERM.findall(line)}
              for line in re.findall(r"loss terms: (.*)", log)]
    assert len(epochs) >= 2
    last = epochs[-1]  # epoch 1: only stage-2 epochs with b_u = 1 of B = 2 in the later ones
    for term in ("labeled_f", "labeled_g", "unlabeled_f", "unlabeled_g"):
        assert math.isfinite(last[term][0]) and last[term][1] > 0, (term, last)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["semisam"]["global_step"] == 20

    raw = Path(env["nnUNet_raw"]) / "Dataset991_Synth3D"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "991", "-c", "3d_fullres",
             "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    assert len(list(pred.glob("*.nii.gz"))) == 2
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env)
    metrics = json.loads((pred / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 2


def test_unet3d_variant_trains_predicts_and_evaluates(tiny3d, tmp_path):
    """`MNCoTrainer_unet3d_smoke`: g is [MN]'s 3D U-Net (§7.1), one output, rebuilt by `nnUNetv2_predict`."""
    from nnunet_semisam.networks.mn_unet3d import MNUNet3D

    trainer = "MNCoTrainer_unet3d_smoke"
    env = with_results(tiny3d, tmp_path / "results")
    run_cmd(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    fold = tmp_path / "results" / "Dataset991_Synth3D" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = final["network_weights"]
    assert weights.keys() == MNUNet3D(3, 2).state_dict().keys()  # tiny3d: 3 channels, 2 classes
    assert weights["encoder.0.0.weight"].shape[0] == 8  # the smoke variant's quarter width
    assert final["semisam"]["global_step"] == 20
    last = [{n: (float(v), float(w)) for n, v, w in TERM.findall(line)}
            for line in re.findall(r"loss terms: (.*)", training_log(fold))][-1]
    for term in ("labeled_g", "unlabeled_g"):
        assert math.isfinite(last[term][0]) and last[term][1] > 0, (term, last)

    raw = Path(env["nnUNet_raw"]) / "Dataset991_Synth3D"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "991", "-c", "3d_fullres",
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env)
    assert json.loads((pred / "metrics.json").read_text(encoding="utf-8"))["n_cases"] == 2
