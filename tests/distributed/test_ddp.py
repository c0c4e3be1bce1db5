"""Every trainer under PyTorch DDP, on CPU: 2 processes, gloo backend (METHODS.md §1.6).

One torchrun job (`ddp_harness.py`) runs each trainer for one short epoch in both ranks, on a private copy of the
session dataset `tiny2d` whose plans ask for a global batch of 4 (2 per rank, so methods that mix batch halves run
too). Per trainer the tests check: the network and every extra module (EMA teachers, projectors, second networks)
are bitwise identical on both ranks after the steps; the ranks drew different unlabeled cases; only rank 0 wrote
checkpoints; a closed-loop refresh (the KD trainer) happened once, sharded, and both ranks read the same targets;
and the 2-rank checkpoint resumes in one process with the same weights. A separate test runs
`torchrun --nproc-per-node 2 nnunet-semisam train` end to end (train, final validation, prediction).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import nnunet_env, run_cmd

HARNESS = Path(__file__).with_name("ddp_harness.py")
STEPS = 6  # BCP switches to self-training (its EMA starts) after 25 % of the smoke schedule's 20 iterations
#: trainer -> the extra modules it must have after the steps (all of them are compared across ranks)
TRAINERS_2D = {"MeanTeacherTrainer_smoke": {"ema"}, "UAMTTrainer_smoke": {"ema"}, "CPSTrainer_smoke": {"network2"},
               "BCPTrainer_smoke": {"ema"}, "URPCTrainer_smoke": set(), "MedSAMMambaKDTrainer_smoke": {"projector"},
               "MCNetPlusTrainer_smoke": set(), "CCTTrainer_smoke": set()}  # decoders are part of the network


def torchrun(nproc: int) -> list[str]:
    """`python -m torch.distributed.run` with a free rendezvous port (tests may run side by side)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def private_copy(env: dict[str, str], root: Path, dataset: str, batch_size: int) -> dict[str, str]:
    """A copy of a session dataset's preprocessed folder whose plans have `batch_size` (global), results beside it."""
    src = Path(env["nnUNet_preprocessed"]) / dataset
    new = nnunet_env(root, nnUNet_n_proc_DA="0", nnUNet_semisam_ddp_timeout_min="5")
    dst = Path(new["nnUNet_preprocessed"]) / dataset
    shutil.copytree(src, dst)
    plans_file = dst / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    for cfg in plans["configurations"].values():
        if "batch_size" in cfg:
            cfg["batch_size"] = batch_size
    plans_file.write_text(json.dumps(plans, indent=1))
    return new


@pytest.fixture(scope="module")
def report_2d(tiny2d, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp2d")
    env = private_copy(tiny2d, root, "Dataset990_SynthRGB", batch_size=4)
    out = root / "report.json"
    run_cmd(torchrun(2) + [str(HARNESS), "990", "2d", str(out), *TRAINERS_2D, "--steps", str(STEPS)], env,
            timeout=1800)
    return {"env": env, "report": json.loads(out.read_text(encoding="utf-8"))}


class TestDDP2D:
    @pytest.mark.parametrize("trainer", TRAINERS_2D)
    def test_ranks_stay_identical(self, trainer, report_2d):
        ranks = report_2d["report"][trainer]
        assert [r["ok"] for r in ranks] == [True, True], "\n".join(r.get("error", "") for r in ranks)
        r0, r1 = ranks
        assert r0["network"] == r1["network"], "student weights differ between ranks"
        assert r0["modules"].keys() == r1["modules"].keys() and TRAINERS_2D[trainer] <= set(r0["modules"])
        for name in r0["modules"]:
            assert r0["modules"][name] == r1["modules"][name], f"extra module {name} differs between ranks"
        assert r0["global_step"] == r1["global_step"] == STEPS and r0["loss_finite"] and r1["loss_finite"]
        assert r0["batch_size"] == r1["batch_size"] == 2  # the global batch of 4 split over 2 ranks

    @pytest.mark.parametrize("trainer", TRAINERS_2D)
    def test_ranks_draw_their_own_unlabeled_batches(self, trainer, report_2d):
        r0, r1 = report_2d["report"][trainer]
        assert len(r0["unlabeled_keys"]) == len(r1["unlabeled_keys"]) == STEPS
        assert r0["unlabeled_keys"] != r1["unlabeled_keys"], "both ranks drew the same unlabeled cases"

    @pytest.mark.parametrize("trainer", TRAINERS_2D)
    def test_only_rank0_writes_checkpoints(self, trainer, report_2d):
        r0, r1 = report_2d["report"][trainer]
        assert any("checkpoint_latest" in f for f in r0["saves"])
        assert not [f for f in r1["saves"] if "checkpoint" in os.path.basename(f)]

    def test_closed_loop_refresh_once_same_targets(self, report_2d):
        r0, r1 = report_2d["report"]["MedSAMMambaKDTrainer_smoke"]
        assert r0["refresh_rounds"] == r1["refresh_rounds"] == 1
        assert r0["store"] is not None and r0["store"] == r1["store"]
        manifest = json.loads((Path(r0["output_folder"]) / "pseudolabels" / "unlabeled" / "manifest.json").read_text())
        assert manifest["complete"] and manifest["num_done"] == manifest["num_expected"] == 6

    @pytest.mark.parametrize("trainer", TRAINERS_2D)
    def test_two_rank_checkpoint_resumes_on_one(self, trainer, report_2d, monkeypatch):
        """The checkpoint written under DDP loads in a single process (nnU-Net's `--c` path) with the weights the
        ranks had, and training goes on."""
        from nnunet_semisam.distributed import state_digest
        from nnunet_semisam.launch import build_trainer

        for k, v in report_2d["env"].items():
            if k.startswith("nnUNet"):
                monkeypatch.setenv(k, v)
        r0 = report_2d["report"][trainer][0]
        t = build_trainer("990", "2d", 0, trainer, "nnUNetPlans", True, torch.device("cpu"))
        t.load_checkpoint(str(Path(r0["output_folder"]) / "checkpoint_latest.pth"))
        assert state_digest(t.network) == r0["network"]
        modules = t.extra_modules()
        for name, digest in r0["modules"].items():
            assert state_digest(modules[name]) == digest, name
        assert t.global_step == STEPS and t.batch_size == 4  # one process takes the whole global batch


def test_torchrun_nnunet_semisam_train_end_to_end(tiny2d, tmp_path):
    """`torchrun --nproc-per-node 2 nnunet-semisam train ... -device cpu`: nnU-Net's full loop under gloo (training,
    checkpoints by rank 0, the final validation split over the ranks), then `nnUNetv2_predict` with the result."""
    env = {**tiny2d, "nnUNet_results": str(tmp_path / "results"), "nnUNet_semisam_ddp_timeout_min": "5",
           "nnUNet_semisam_smoke_validation": "1"}  # the `_smoke` schedule skips it otherwise
    script = shutil.which("nnunet-semisam")
    trainer = "MeanTeacherTrainer_smoke"
    r = run_cmd(torchrun(2) + [script, "train", "990", "2d", "0", "-tr", trainer, "-device", "cpu"], env, timeout=1200)
    fold = tmp_path / "results" / "Dataset990_SynthRGB" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    log = "\n".join(p.read_text(encoding="utf-8") for p in fold.glob("training_log_*.txt"))
    assert "DDP: rank 0 of 2 on cpu (backend gloo)" in log and "rank 1 of 2" in r.stdout + r.stderr
    assert "extra module(s) synchronised from rank 0 (ema)" in log
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["semisam"]["global_step"] == 20 and not any(k.startswith("module.") for k in ckpt["network_weights"])
    raw = Path(env["nnUNet_raw"]) / "Dataset990_SynthRGB"
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "990", "-c", "2d", "-f", "0",
             "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    assert len(list(pred.glob("*.png"))) == 2
