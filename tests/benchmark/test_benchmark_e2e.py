"""`nnunet-semisam benchmark` end to end through the real nnU-Net commands (issue 15).

One tiny synthetic 2D RGB dataset (8 training + 3 test images of 32x32) and one benchmark shared by every test:
nnUNetTrainer (added automatically) and MeanTeacherTrainer x (25 % labeled, 3 labeled) x seed 0, `_smoke` schedules
on CPU. The first invocation is SIGKILLed (whole process group) as soon as the Mean Teacher run at 25 % has written
its epoch-0 checkpoint. Before the second invocation, the preprocessed unlabeled cases of the 3-labeled dataset are
deleted (a damaged dataset), so that Mean Teacher run fails for a real reason inside nnUNetv2_train (the trainer
refuses an empty unlabeled pool) while the baseline on the same dataset trains; the second invocation finishes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_group, nnunet_env, run_cmd, start_in_own_group

SOURCE_ID = 960
RUNS = ["25pct_s0_nnUNetTrainer", "25pct_s0_MeanTeacherTrainer", "3lab_s0_nnUNetTrainer", "3lab_s0_MeanTeacherTrainer"]
DONE, FAILED = RUNS[:3], RUNS[3:]


def _final(out: Path, run_id: str) -> Path:
    hits = list((out / "runs" / run_id / "nnUNet_results").glob("*/*/fold_all/checkpoint_final.pth"))
    assert len(hits) == 1, hits
    return hits[0]


def _digest(plans_file: Path) -> str:
    """Plans content without dataset_name (the only key nnU-Net's plan-transfer tool changes), recomputed here."""
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    plans.pop("dataset_name")
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    from nnunet_semisam.data.synthetic import SynthParams, make_synthetic_dataset

    root = tmp_path_factory.mktemp("benchmark")
    env = nnunet_env(root / "user")
    source = make_synthetic_dataset(env["nnUNet_raw"], SOURCE_ID, kind="2d-rgb", num_labeled=8, num_unlabeled=0,
                                    num_test=3, shape=(32, 32), seed=0, params=SynthParams(contrast=0.8),
                                    progress=False)
    out = root / "bench"
    cmd = ["nnunet-semisam", "benchmark", "-d", str(SOURCE_ID), "-c", "2d", "-tr", "MeanTeacherTrainer",
           "--fractions", "0.25", "--labeled", "3", "--seeds", "0", "--schedule", "smoke",
           "-device", "cpu", "--no-reference", "-o", str(out), "--quiet"]
    t0 = time.time()
    proc = start_in_own_group(cmd, env)
    mt_run = out / "runs" / RUNS[1]
    deadline = time.time() + 1500  # returns as soon as the checkpoint appears; generous for shared machines
    latest = []
    while time.time() < deadline and proc.poll() is None:
        latest = list(mt_run.glob("nnUNet_results/*/*/fold_all/checkpoint_latest.pth"))
        if latest:
            break
        time.sleep(0.2)
    kill_group(proc)
    assert latest, f"the first invocation ended (rc {proc.returncode}) before the Mean Teacher checkpoint"
    assert not list(mt_run.glob("nnUNet_results/*/*/fold_all/checkpoint_final.pth")), "killed mid-training"
    first_final = _final(out, RUNS[0])
    mtime_before = first_final.stat().st_mtime_ns
    killed_at = time.time() - t0
    damaged = out / "nnUNet_preprocessed" / "Dataset901_SynthRGB_3lab_s0" / "nnUNetPlans_2d_unlabeled"
    assert damaged.is_dir()  # every dataset is prepared before the first run
    shutil.rmtree(damaged)
    second = run_cmd(cmd, env, timeout=1800, check=False)
    return {"root": root, "env": env, "source": source, "out": out, "cmd": cmd, "mtime_before": mtime_before,
            "second": second, "killed_at": killed_at, "total": time.time() - t0}


def test_killed_benchmark_resumes_without_retraining_finished_runs(bench):
    out = bench["out"]
    second = bench["second"]
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]  # 1: some runs failed
    assert "3 of 4 run(s) done, 1 failed" in second.stdout
    # the run finished before the kill was skipped, not retrained
    assert _final(out, RUNS[0]).stat().st_mtime_ns == bench["mtime_before"]
    log0 = (out / "runs" / RUNS[0] / "run.log").read_text(encoding="utf-8")
    assert log0.count("$ nnUNetv2_train") == 1 and log0.count("$ nnUNetv2_predict") == 1
    # the killed run continued from its checkpoint with --c
    log1 = (out / "runs" / RUNS[1] / "run.log").read_text(encoding="utf-8")
    trains = [ln for ln in log1.splitlines() if ln.startswith("$ nnUNetv2_train")]
    assert len(trains) == 2 and not trains[0].endswith("--c") and trains[1].endswith("--c")
    rec = json.loads((out / "runs" / RUNS[1] / "run.json").read_text(encoding="utf-8"))
    assert rec["status"] == "done" and [a.get("resumed") for a in rec["attempts"]] == [None, True]
    assert len(list(_final(out, RUNS[1]).parent.glob("training_log_*.txt"))) == 2
    for r in RUNS[2:]:  # not started before the kill: one training each
        assert (out / "runs" / r / "run.log").read_text(encoding="utf-8").count("$ nnUNetv2_train") == 1


def test_failed_runs_are_reported_not_dropped(bench):
    out = bench["out"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    for r in FAILED:
        mine = [x for x in rows if x["run_id"] == r]
        assert len(mine) == 1 and mine[0]["status"] == "failed" and mine[0]["dice"] == ""
        assert "needs unlabeled cases" in mine[0]["error"]
        assert json.loads((out / "runs" / r / "run.json").read_text(encoding="utf-8"))["status"] == "failed"
    summary = {(s["method"], s["protocol"]): s for s in csv.DictReader(open(out / "summary.csv"))}
    mt = summary[("MeanTeacherTrainer", "3 labeled")]
    assert (mt["n_runs"], mt["n_done"], mt["n_failed"], mt["dice_mean"], mt["wilcoxon_p"]) == ("1", "0", "1", "", "")
    md = (out / "summary.md").read_text(encoding="utf-8")
    mt_row = next(ln for ln in md.splitlines() if ln.startswith("| MeanTeacherTrainer |"))
    assert mt_row.count("1 failed") == 1 and "needs unlabeled cases" in md
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert {k: v["status"] for k, v in prov["runs"].items()} == {r: ("failed" if r in FAILED else "done")
                                                                   for r in RUNS}


def test_summary_equals_metrics_recomputed_from_predictions(bench):
    from PIL import Image

    out, source = bench["out"], bench["source"]
    rows = [x for x in csv.DictReader(open(out / "results.csv")) if x["status"] == "done"]
    cases = sorted(f.name for f in (source / "labelsTs").glob("*.png"))
    assert sorted({(x["run_id"], x["case"]) for x in rows}) == sorted((r, c) for r in DONE for c in cases)
    for x in rows:  # Dice of each case, from the prediction files against the source's labelsTs
        pred = np.asarray(Image.open(out / "runs" / x["run_id"] / "predictions" / x["case"])) > 0
        gt = np.asarray(Image.open(source / "labelsTs" / x["case"])) > 0
        s = pred.sum() + gt.sum()
        dice = 1.0 if s == 0 else 2.0 * (pred & gt).sum() / s
        assert float(x["dice"]) == pytest.approx(dice, abs=1e-9), x
    summary = {(s["method"], s["protocol"]): s for s in csv.DictReader(open(out / "summary.csv"))}
    for method, proto, slug in (("nnUNetTrainer", "25 %", "25pct"), ("MeanTeacherTrainer", "25 %", "25pct"),
                                ("nnUNetTrainer", "3 labeled", "3lab")):
        mine = [x for x in rows if x["run_id"] == f"{slug}_s0_{method}"]
        s = summary[(method, proto)]
        assert (s["n_done"], s["n_failed"], s["dice_std"]) == ("1", "0", "")  # one seed: no std
        for m in ("dice", "hd95_mm", "asd_mm"):
            assert float(s[f"{m}_mean"]) == pytest.approx(np.mean([float(x[m]) for x in mine]), abs=1e-9)
        assert float(s["train_s_mean"]) > 0 and float(s["s_per_iteration_mean"]) > 0
    from scipy.stats import wilcoxon  # MT against the baseline at 25 %, paired by case

    per = {r: {x["case"]: float(x["dice"]) for x in rows if x["run_id"] == r} for r in RUNS[:2]}
    a, b = [per[RUNS[1]][c] for c in cases], [per[RUNS[0]][c] for c in cases]
    p = summary[("MeanTeacherTrainer", "25 %")]["wilcoxon_p"]
    if a == b:
        assert p == ""  # undefined when every difference is zero
    else:
        assert float(p) == pytest.approx(wilcoxon(a, b).pvalue)
    assert (out / "plots" / "dice_vs_fraction.png").stat().st_size > 0
    assert (out / "plots" / "boxplot_25pct.png").is_file() and (out / "plots" / "boxplot_3_labeled.png").is_file()


def test_every_protocol_uses_the_same_plans(bench):
    out = bench["out"]
    src_plans = out / "nnUNet_preprocessed" / f"Dataset{SOURCE_ID}_SynthRGB" / "nnUNetPlans.json"
    derived = sorted(p for p in (out / "nnUNet_preprocessed").iterdir() if p.name.startswith("Dataset90"))
    assert [p.name for p in derived] == ["Dataset900_SynthRGB_25pct_s0", "Dataset901_SynthRGB_3lab_s0"]
    for d in derived:
        plans = json.loads((d / "nnUNetPlans.json").read_text(encoding="utf-8"))
        assert plans["dataset_name"] == d.name and _digest(d / "nnUNetPlans.json") == _digest(src_plans)
        split = json.loads((out / "nnUNet_raw" / d.name / "split_labels.json").read_text(encoding="utf-8"))
        assert split["request"]["seed"] == 0
    prov = json.loads((out / "provenance.json").read_text(encoding="utf-8"))
    assert prov["plans_sha256"] == hashlib.sha256(src_plans.read_bytes()).hexdigest()
    assert prov["plans_digest"] == _digest(src_plans)
    for r in DONE:  # the plans each trained model carries
        used = _final(out, r).parent.parent / "plans.json"
        assert _digest(used) == _digest(src_plans)
        assert prov["runs"][r]["plans_digest"] == _digest(src_plans)
    assert prov["command_line"][:2] == ["nnunet-semisam", "benchmark"] and prov["versions"]["nnunetv2"]
    labeled = {d.name: len(list((out / "nnUNet_raw" / d.name / "labelsTr").glob("*.png"))) for d in derived}
    assert labeled == {"Dataset900_SynthRGB_25pct_s0": 2, "Dataset901_SynthRGB_3lab_s0": 3}


def test_emit_slurm_script_runs_the_resumable_command(bench, tmp_path):
    out, env = bench["out"], bench["env"]
    script = tmp_path / "bench.sbatch"
    cmd = bench["cmd"]
    run_cmd([*cmd, "--emit-slurm", str(script)], env)
    text = script.read_text(encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0-3" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("nnunet-semisam benchmark")]
    assert len(lines) == 1 and lines[0].endswith('--run-index "$SLURM_ARRAY_TASK_ID"')
    assert str(bench["source"]) in lines[0] and str(out) in lines[0]
    before = (out / "summary.csv").read_bytes(), (out / "results.csv").read_bytes()
    mtime = _final(out, RUNS[0]).stat().st_mtime_ns
    # array task 0 = run 0: complete, so the task only re-aggregates; the tables stay the same
    task = run_cmd(["bash", str(script)], {**env, "SLURM_ARRAY_TASK_ID": "0"})
    assert "1 of 1 run(s) done, 0 failed" in task.stdout
    assert _final(out, RUNS[0]).stat().st_mtime_ns == mtime
    assert ((out / "summary.csv").read_bytes(), (out / "results.csv").read_bytes()) == before
    print(f"benchmark e2e: killed after {bench['killed_at']:.0f} s, finished after {bench['total']:.0f} s")
