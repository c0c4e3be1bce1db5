"""SemiSAMPlusTrainer (METHODS.md §5) through the real nnU-Net commands on `tiny3d`: train the smoke schedule
(phases 0 / 1 / 2 = epochs 0 / 1-2 / 3), kill it in the middle of Phase 1, resume with `--c`, then
`nnUNetv2_predict` (which rebuilds SlicingSAM3D from the trainer) and `nnunet-semisam evaluate`; then the `_offline`
variant on Algorithm 2 pseudo-labels that `nnunet-semisam pseudolabel --prompts student --aug 1` made with that
trained student."""
import json
import shutil
import time
from pathlib import Path

import torch

from conftest import kill_group, run_cmd, start_in_own_group, training_log, with_results
from test_baselines_e2e import logged_terms


def wait_for_epoch(cmd, env, latest: Path, epoch: int, timeout: float = 600) -> dict:
    """Start `cmd`, SIGKILL it once `latest` holds `current_epoch == epoch` (epochs done); return that checkpoint."""
    proc = start_in_own_group(cmd, env)
    deadline = time.time() + timeout
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            try:
                ckpt = torch.load(latest, map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - being replaced right now
                ckpt = None
            if ckpt is not None and ckpt["current_epoch"] >= epoch:
                break
        time.sleep(0.2)
    kill_group(proc)
    assert ckpt is not None and ckpt["current_epoch"] == epoch, "killed after the wanted epoch"
    return ckpt


def test_semisam_plus_kill_mid_phase_resume_predict_evaluate(tiny3d, tmp_path):
    env = with_results(tiny3d, tmp_path / "results")
    trainer = "SemiSAMPlusTrainer_smoke"
    cmd = ["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    fold = tmp_path / "results" / "Dataset991_Synth3D" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"

    # killed after epoch 1: the first epoch of Phase 1 is done, the second is not (mid-phase)
    ckpt = wait_for_epoch(cmd, env, fold / "checkpoint_latest.pth", 2)
    state = ckpt["semisam"]
    assert state["phase"] == 1 and state["global_step"] == 6 and "frozen_target" not in state
    # network_weights = the EMA (theta'), the student is kept apart; they differ after EMA steps, encoder identical
    ema, student = ckpt["network_weights"], state["student"]
    assert ema.keys() == student.keys()
    assert all(torch.equal(ema[k], student[k]) for k in ema if k.startswith("encoder."))
    assert any(not torch.equal(ema[k], student[k]) for k in ema if not k.startswith("encoder."))

    run_cmd(cmd + ["--c"], env)
    log = training_log(fold)
    assert "Semi-SAM+ resumed in phase 1 at t_it=6; EMA, student restored" in log
    assert "1,252,674 trainable decoder parameters" in log or "trainable decoder parameters" in log
    assert [f"Semi-SAM+ phase {p}" in log for p in (0, 1, 2)] == [True, True, True]
    assert "EMA frozen as the Phase-2 target" in log and "confident coverage" in log
    epochs = logged_terms(log)
    assert len(epochs) == 4  # epochs 0, 1 (first run) and 2, 3 (resumed)
    assert epochs[0]["consistency"][1] == 0 and epochs[1]["rs_consistency"][1] > 0  # phase 0 / phase 1
    assert epochs[3]["consistency"][1] == 1.0 and epochs[3]["rs_consistency"][1] == 0  # phase 2: lambda_max, no SAM
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["semisam"]["global_step"] == 12 and final["semisam"]["phase"] == 2
    assert "frozen_target" in final["semisam"]
    assert (fold / "progress_terms.png").is_file() and (fold / "checkpoint_best.pth").is_file()

    raw = Path(env["nnUNet_raw"]) / "Dataset991_Synth3D"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "991", "-c", "3d_fullres",
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env)
    metrics = json.loads((pred / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 2
    check_offline_variant(env, tmp_path, fold.parent)


def check_offline_variant(env: dict, tmp_path: Path, student_model: Path) -> None:
    """`pseudolabel --prompts student --aug 1` on the unlabeled volumes (a small random SAM as the teacher: its
    quality is irrelevant here) into a copy of the preprocessed dataset, then `SemiSAMPlusTrainer_offline_smoke`
    trains on the stored maps (fold 'all'): L_rs-con on every Phase-1 step, no teacher built."""
    from nnunet_semisam.teachers.sam_models import TINY_ARCH, build_sam_custom, save_sam_checkpoint

    pre = tmp_path / "preprocessed"
    shutil.copytree(Path(env["nnUNet_preprocessed"]) / "Dataset991_Synth3D", pre / "Dataset991_Synth3D")
    env = {**env, "nnUNet_preprocessed": str(pre)}
    torch.manual_seed(0)
    save_sam_checkpoint(build_sam_custom(**TINY_ARCH), tmp_path / "sam.pth", "semisam_tiny", arch=TINY_ARCH)
    run_cmd(["nnunet-semisam", "pseudolabel", "-d", "991", "-c", "3d_fullres", "--teacher", "medsam", "--checkpoint",
             str(tmp_path / "sam.pth"), "--prompts", "student", "--student-model", str(student_model),
             "--cases", "unlabeled", "--aug", "1", "--device", "cpu", "--quiet"], env)
    store = pre / "Dataset991_Synth3D" / "nnUNetPlans_3d_fullres_pseudolabels"
    manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["cases"]) == 4 and len(list(store.glob("*.npz"))) == 4  # tiny3d's 4 unlabeled volumes

    trainer = "SemiSAMPlusTrainer_offline_smoke"  # fold 'all', as `nnunet-semisam benchmark` trains
    run_cmd(["nnUNetv2_train", "991", "3d_fullres", "all", "-tr", trainer, "-device", "cpu"], env)
    fold = Path(env["nnUNet_results"]) / "Dataset991_Synth3D" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_all"
    log = training_log(fold)
    assert "Algorithm 2 teachers" not in log, "the offline variant builds no teacher"
    epochs = logged_terms(log)
    assert len(epochs) == 4 and all(epochs[e]["rs_consistency"][1] > 0 for e in (1, 2))  # every Phase-1 epoch
    assert epochs[0]["rs_consistency"][1] == 0 and epochs[3]["rs_consistency"][1] == 0
    assert (fold / "checkpoint_final.pth").is_file()
