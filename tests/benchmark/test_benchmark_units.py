"""The pure parts of `nnunet-semisam benchmark` (issue 15): plan of runs, aggregation and statistics, SLURM script,
one-line errors on bad input. No nnU-Net subprocesses."""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time

import numpy as np
import pytest

from nnunet_semisam.benchmark import BenchmarkOptions, run_benchmark, slurm_script
from nnunet_semisam.benchmark.plan import Protocol, format_plan, make_plan
from nnunet_semisam.benchmark.report import collect, markdown, summarize, wilcoxon_p
from nnunet_semisam.benchmark.runner import plans_digest, run_logged
from nnunet_semisam.errors import SemiSAMError


def test_plan_is_deterministic_with_baseline_first_and_reference_last():
    args = (5, "Dataset005_Lesions", ["MeanTeacherTrainer", "nnUNetTrainer"], [0.2, 0.1], [8, 4], [0, 1])
    derived, runs = make_plan(*args, configuration="2d", fold="all", schedule="smoke", id_base=4)
    assert make_plan(*args, configuration="2d", fold="all", schedule="smoke", id_base=4) == (derived, runs)
    # ids count up from --id-base in plan order, skipping the source id (5)
    assert [(d.dataset_id, d.dataset_name) for d in derived] == [
        (4, "Dataset004_Lesions_10pct_s0"), (6, "Dataset006_Lesions_10pct_s1"), (7, "Dataset007_Lesions_20pct_s0"),
        (8, "Dataset008_Lesions_20pct_s1"), (9, "Dataset009_Lesions_4lab_s0"), (10, "Dataset010_Lesions_4lab_s1"),
        (11, "Dataset011_Lesions_8lab_s0"), (12, "Dataset012_Lesions_8lab_s1")]
    assert len(runs) == 8 * 2 + 1 and [r.index for r in runs] == list(range(17))
    assert [r.run_id for r in runs[:3]] == ["10pct_s0_nnUNetTrainer", "10pct_s0_MeanTeacherTrainer",
                                             "10pct_s1_nnUNetTrainer"]
    assert runs[1].trainer == "MeanTeacherTrainer_smoke" and runs[1].dataset_id == 4
    ref = runs[-1]
    assert (ref.run_id, ref.dataset_id, ref.seed, ref.protocol.label) == ("full_nnUNetTrainer", 5, None, "100 %")
    assert len({r.run_id for r in runs}) == len(runs)
    assert "full_nnUNetTrainer" in format_plan(runs)
    _, no_ref = make_plan(*args, schedule="full", reference=False)
    assert all(r.protocol.kind != "full" for r in no_ref) and no_ref[0].trainer == "nnUNetTrainer"


def test_protocol_names():
    assert (Protocol("fraction", 0.1).slug, Protocol("fraction", 0.1).label) == ("10pct", "10 %")
    assert Protocol("fraction", 0.125).slug == "12p5pct"
    assert (Protocol("labeled", 4).slug, Protocol("labeled", 4).label) == ("4lab", "4 labeled")
    assert Protocol("labeled", 4).split_args() == ["--num-labeled", "4"]
    assert Protocol("fraction", 0.2).split_args() == ["--fraction", "0.2"]
    assert Protocol("labeled", 4).labeled_fraction(80) == 0.05


@pytest.mark.parametrize("kw, match", [
    (dict(fractions=[1.0]), r"\(0, 1\)"), (dict(fractions=[0.0]), r"\(0, 1\)"),
    (dict(fractions=[float("nan")]), "0, 1"),
    (dict(labeled=[0]), ">= 1"), (dict(fractions=None, labeled=None), "at least one label protocol"),
    (dict(seeds=[0, 0]), "duplicates"), (dict(seeds=[]), "at least one seed"), (dict(id_base=998), "past 999"),
    (dict(trainers=["MeanTeacherTrainer_smoke"]), "without its schedule suffix"),
    (dict(configuration="3d"), "unknown configuration"), (dict(schedule="long"), "unknown schedule"),
    (dict(fold="x"), "fold"),
])
def test_plan_rejects_bad_input(kw, match):
    args = dict(source_id=1, source_name="Dataset001_X", trainers=[], fractions=[0.1, 0.2], labeled=None,
                seeds=[0, 1], id_base=900)
    args.update(kw)
    with pytest.raises(SemiSAMError, match=match):
        make_plan(**args)


def _rows():
    """A hand-made results table: baseline and MT at 10 % over seeds 0, 1 (4 cases each), MT seed 2 failed."""
    rows = []
    dice = {("nnUNetTrainer", 0): [0.5, 0.6, 0.7, 0.4], ("nnUNetTrainer", 1): [0.55, 0.65, 0.5, 0.45],
            ("MeanTeacherTrainer", 0): [0.6, 0.7, 0.75, 0.5], ("MeanTeacherTrainer", 1): [0.6, 0.64, 0.7, 0.52]}
    for (m, s), ds in dice.items():
        for i, d in enumerate(ds):
            rows.append({"run_id": f"10pct_s{s}_{m}", "method": m, "protocol": "10 %", "labeled_fraction": 0.1,
                         "seed": s, "status": "done", "case": f"c{i}.png", "dice": d, "hd95_mm": 10 * (1 - d),
                         "asd_mm": 2 * (1 - d), "train_s": 100.0 + s, "s_per_iteration": 0.5,
                         "peak_rss_mb": 1000.0 + s, "error": None})
    rows.append({"run_id": "10pct_s2_MeanTeacherTrainer", "method": "MeanTeacherTrainer", "protocol": "10 %",
                 "labeled_fraction": 0.1, "seed": 2, "status": "failed", "case": None, "dice": None,
                 "hd95_mm": None, "asd_mm": None, "train_s": None, "s_per_iteration": None, "peak_rss_mb": None,
                 "error": "RuntimeError: CUDA out of memory"})
    return rows, dice


def test_summary_means_over_seeds_wilcoxon_and_failed_runs():
    from scipy.stats import wilcoxon

    rows, dice = _rows()
    s = {(x["method"], x["protocol"]): x for x in summarize(rows)}
    mt, base = s[("MeanTeacherTrainer", "10 %")], s[("nnUNetTrainer", "10 %")]
    run_means = [np.mean(dice[("MeanTeacherTrainer", k)]) for k in (0, 1)]
    assert mt["dice_mean"] == pytest.approx(np.mean(run_means))
    assert mt["dice_std"] == pytest.approx(np.std(run_means, ddof=1))
    assert (mt["n_runs"], mt["n_done"], mt["n_failed"]) == (3, 2, 1)  # the failed seed is counted, not averaged
    assert mt["hd95_mm_mean"] == pytest.approx(np.mean([10 * (1 - np.mean(dice[("MeanTeacherTrainer", k)]))
                                                        for k in (0, 1)]))
    x = dice[("MeanTeacherTrainer", 0)] + dice[("MeanTeacherTrainer", 1)]
    y = dice[("nnUNetTrainer", 0)] + dice[("nnUNetTrainer", 1)]
    assert mt["wilcoxon_p"] == pytest.approx(wilcoxon(x, y).pvalue) and mt["n_pairs"] == 8
    assert math.isnan(base["wilcoxon_p"]) and base["n_pairs"] == 0
    assert (mt["train_s_mean"], mt["peak_rss_mb_max"]) == (100.5, 1001.0)
    md = markdown(summarize(rows), rows, "t")
    assert "| MeanTeacherTrainer | " in md and "(1 failed)" in md and "CUDA out of memory" in md
    assert f"{100 * mt['dice_mean']:.2f} ± {100 * mt['dice_std']:.2f}" in md


def test_per_seed_table_counts_empty_predictions_of_foreground_cases():
    """summary.md's per-seed section, checked cell by cell on a hand-made table: 2 seeds x 3 cases, case c2 has no
    foreground; MT predicts c0 empty in seed 1; the fully labeled reference has no seed ("no split" column)."""
    def row(m, seed, case, dice, gt_empty, pred_empty, protocol="10 %"):
        return {"run_id": f"{protocol}{seed}{m}", "method": m, "protocol": protocol, "labeled_fraction": 0.1,
                "seed": seed, "status": "done", "case": case, "dice": dice, "gt_empty": gt_empty,
                "pred_empty": pred_empty, "hd95_mm": None, "asd_mm": None, "train_s": None, "s_per_iteration": None,
                "peak_rss_mb": None, "error": None}
    rows = [row("nnUNetTrainer", 0, "c0", 0.5, 0, 0), row("nnUNetTrainer", 0, "c1", 0.3, 0, 0),
            row("nnUNetTrainer", 0, "c2", 1.0, 1, 1), row("nnUNetTrainer", 1, "c0", 0.6, 0, 0),
            row("nnUNetTrainer", 1, "c1", 0.2, 0, 0), row("nnUNetTrainer", 1, "c2", 0.0, 1, 0),
            row("MeanTeacherTrainer", 0, "c0", 0.7, 0, 0), row("MeanTeacherTrainer", 0, "c1", 0.5, 0, 0),
            row("MeanTeacherTrainer", 0, "c2", 1.0, 1, 1), row("MeanTeacherTrainer", 1, "c0", 0.0, 0, 1),
            row("MeanTeacherTrainer", 1, "c1", 0.4, 0, 0), row("MeanTeacherTrainer", 1, "c2", 1.0, 1, 1),
            row("nnUNetTrainer", None, "c0", 0.9, 0, 0, "100 %"), row("nnUNetTrainer", None, "c1", 0.7, 0, 0, "100 %")]
    lines = [x for x in markdown(summarize(rows), rows, "t").splitlines() if x.startswith("| ")]
    i = lines.index("| Method | Protocol | seed 0 | seed 1 | no split | above nnUNetTrainer | foreground cases "
                    "predicted empty | Dice % on foreground cases |")
    # nnU-Net: seeds (0.5+0.3+1)/3 = 60.00, (0.6+0.2+0)/3 = 26.67; foreground Dice ((0.5+0.3)/2 + (0.6+0.2)/2)/2
    assert lines[i + 1] == "| nnUNetTrainer | 10 % | 60.00 | 26.67 |  |  | 0/4 | 40.00 |"
    # MT: 73.33 > 60.00 and 46.67 > 26.67; c0 of seed 1 empty; foreground Dice ((0.7+0.5)/2 + (0+0.4)/2)/2 = 40
    assert lines[i + 2] == "| MeanTeacherTrainer | 10 % | 73.33 | 46.67 |  | 2/2 | 1/4 | 40.00 |"
    assert lines[i + 3] == "| nnUNetTrainer | 100 % |  |  | 80.00 |  | 0/2 | 80.00 |"


def test_wilcoxon_undefined_cases_are_nan():
    assert math.isnan(wilcoxon_p([], []))
    assert math.isnan(wilcoxon_p([0.5, 0.5], [0.5, 0.5]))
    assert math.isnan(wilcoxon_p([float("nan")], [0.2]))


def test_collect_rows_per_case_and_one_row_per_run_not_done():
    _, runs = make_plan(1, "Dataset001_X", ["MeanTeacherTrainer"], [0.5], None, [0], reference=False)
    metrics = {"cases": [{"case": "a.png", "metrics": {"1": {"dice": 0.5, "jaccard": 1 / 3, "hd95_mm": 2.0,
                                                              "asd_mm": 1.0, "hd95_vox": 2.0, "asd_vox": 1.0},
                                                        "2": {"dice": 1.0, "jaccard": 1.0, "hd95_mm": None,
                                                              "asd_mm": 0.0, "hd95_vox": 0.0, "asd_vox": 0.0,
                                                              "gt_empty": True, "pred_empty": True}}}]}
    records = {runs[0].run_id: {"status": "done", "train_s": 3.0}, runs[1].run_id: None}
    rows = collect(runs, records, {runs[0].run_id: metrics}, num_training=10)
    assert [(r["run_id"], r["status"], r["case"]) for r in rows] == [
        ("50pct_s0_nnUNetTrainer", "done", "a.png"), ("50pct_s0_MeanTeacherTrainer", "pending", None)]
    assert rows[0]["dice"] == 0.75 and rows[0]["hd95_mm"] == 2.0  # mean over labels, NaN left out
    assert rows[0]["labeled_fraction"] == 0.5 and rows[0]["train_s"] == 3.0
    # empty flags need every label's: label 1 has none recorded here -> unknown (None), not "empty"
    assert rows[0]["gt_empty"] is None and rows[0]["pred_empty"] is None and rows[1]["pred_empty"] is None
    metrics["cases"][0]["metrics"]["1"].update(gt_empty=False, pred_empty=True)
    rows = collect(runs, records, {runs[0].run_id: metrics}, num_training=10)
    assert (rows[0]["gt_empty"], rows[0]["pred_empty"]) == (0, 1)  # empty = no foreground of any label


def test_plans_digest_ignores_only_the_dataset_name(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    plans = {"dataset_name": "Dataset001_X", "configurations": {"2d": {"patch_size": [32, 32]}}}
    a.write_text(json.dumps(plans))
    b.write_text(json.dumps({**plans, "dataset_name": "Dataset900_X_10pct_s0"}, indent=4))
    c.write_text(json.dumps({**plans, "configurations": {"2d": {"patch_size": [64, 64]}}}))
    assert plans_digest(a) == plans_digest(b) != plans_digest(c)


def test_slurm_script_is_one_array_line_of_the_resumable_command(tmp_path):
    _, runs = make_plan(1, "Dataset001_X", ["MeanTeacherTrainer"], [0.1], [4], [0, 1])
    cmd = ["nnunet-semisam", "benchmark", "-d", "/data/raw/Dataset001_X", "-o", str(tmp_path / "my out")]
    text = slurm_script(cmd, runs, tmp_path / "my out", "cuda")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and f"#SBATCH --array=0-{len(runs) - 1}" in lines
    assert "#SBATCH --gres=gpu:1" in lines
    run_lines = [ln for ln in lines if ln.startswith("nnunet-semisam ")]
    assert len(run_lines) == 1
    assert shlex.split(run_lines[0]) == [*cmd, "--run-index", "$SLURM_ARRAY_TASK_ID"]
    assert run_lines[0].endswith('--run-index "$SLURM_ARRAY_TASK_ID"')
    assert all(f"#   {r.index:3d}  {r.run_id}" in text for r in runs)
    assert "--gres" not in slurm_script(cmd, runs, tmp_path, "cpu")


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def raw(tmp_path, monkeypatch):
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    root = tmp_path / "raw"
    root.mkdir()
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, str(root))
    make_synthetic_dataset(root, 970, num_labeled=6, num_unlabeled=0, num_test=2, shape=(16, 16), progress=False)
    make_synthetic_dataset(root, 971, num_labeled=6, num_unlabeled=0, num_test=0, shape=(16, 16), progress=False,
                           name="NoTest")
    return root


def _opts(tmp_path, **kw):
    base = dict(out=str(tmp_path / "out"), dataset="970", trainers=["MeanTeacherTrainer"], fractions=[0.5],
                schedule="smoke", device="cpu", dry_run=True, quiet=True)
    base.update(kw)
    return BenchmarkOptions(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(trainers=["NoSuchTrainer"]), "unknown trainer 'NoSuchTrainer'"),
    (dict(trainers=["MeanTeacherTrainer"], schedule="bench"), "no 'bench' schedule variant"),
    (dict(fractions=[1.5]), r"must lie in \(0, 1\)"),
    (dict(fractions=None, labeled=[6]), "--labeled 6 leaves no unlabeled case"),
    (dict(dataset="971"), "no imagesTs/ cases"),
    (dict(dataset="972"), "unknown dataset 972"),
    (dict(dataset=None), "give a dataset"),
    (dict(preset="no-such"), "unknown preset"),
    (dict(run_index=7), "--run-index 7 is not in 0..2"),
    (dict(jobs=0), "--jobs must be >= 1"),
    (dict(device="tpu"), "-device must be"),
])
def test_bad_input_is_a_one_line_error(raw, tmp_path, kw, match):
    with pytest.raises(SemiSAMError, match=match) as e:
        run_benchmark(_opts(tmp_path, **kw))
    assert "\n" not in str(e.value)


def test_dry_run_prints_the_plan_and_writes_nothing(raw, tmp_path, capsys):
    assert run_benchmark(_opts(tmp_path, reference=True)) == 0
    text = capsys.readouterr().out
    assert "50pct_s0_nnUNetTrainer" in text and "50pct_s0_MeanTeacherTrainer" in text and "full_nnUNetTrainer" in text
    assert "3 run(s) on 1 derived dataset(s) of Dataset970_SynthRGB" in text
    assert not (tmp_path / "out").exists()


def test_paper_preset_dry_run_without_the_dataset(raw, tmp_path, capsys):
    assert run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset="la-mn", dry_run=True)) == 0
    text = capsys.readouterr().out
    assert "4lab_s0_MeanTeacherTrainer" in text and "16lab_s2_nnUNetTrainer" in text and "3d_fullres" in text
    with pytest.raises(SemiSAMError, match="convert la-h5"):
        run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset="la-mn"))


def test_jobs_run_side_by_side_one_gpu_each(monkeypatch, tmp_path):
    import threading
    import time

    from nnunet_semisam.benchmark import runner

    _, runs = make_plan(1, "Dataset001_X", ["MeanTeacherTrainer"], [0.1, 0.2], None, [0, 1], reference=False)
    busy, seen, lock = set(), [], threading.Lock()

    def fake(ctx, run, gpu=None):
        with lock:
            assert gpu not in busy  # never two runs on one GPU
            busy.add(gpu)
            seen.append((run.run_id, gpu, len(busy)))
        time.sleep(0.05)
        with lock:
            busy.discard(gpu)
        return {"run_id": run.run_id, "status": "done"}

    monkeypatch.setattr(runner, "execute_run", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ctx = runner.Context(tmp_path, tmp_path, 1, "Dataset001_X", "2d", device="cuda")
    records = runner.execute_all(ctx, runs, jobs=2, progress=False)
    assert sorted(r["run_id"] for r in records) == sorted(r.run_id for r in runs)
    assert {g for _, g, _ in seen} == {"0", "1"} and max(n for _, _, n in seen) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU: jobs share it, no CUDA_VISIBLE_DEVICES override
    seen.clear()
    busy.clear()
    runner.execute_all(ctx, runs[:1], jobs=1, progress=False)
    assert seen[0][1] is None


def test_synthetic_preset_dry_run_generates_nothing(tmp_path, capsys):
    assert run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset="synthetic-3d", dry_run=True)) == 0
    text = capsys.readouterr().out
    assert "Dataset900_BenchSynth3D_4lab_s0" in text and "3d_fullres" in text and "full_nnUNetTrainer" in text
    assert not (tmp_path / "o").exists()


def test_mn_synthetic_preset_dry_run(tmp_path, capsys):
    """seed 004's LA protocol on synthetic volumes: MN vs nnU-Net 3D vs Mean Teacher 3D at 4 and 8 labels, 3 seeds."""
    assert run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset="synthetic-3d-mn", dry_run=True)) == 0
    text = capsys.readouterr().out
    for run in ("4lab_s0_MNCoTrainer", "8lab_s2_MNCoTrainer", "8lab_s2_MeanTeacherTrainer", "4lab_s1_nnUNetTrainer"):
        assert run in text, run
    assert "MNCoTrainer_demo (3d_fullres" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_run_logged_leaves_no_process_of_the_command_behind(tmp_path):
    """A trainer killed hard leaves its loader workers running; run_logged kills the command's process group."""
    spawner = ("import subprocess, sys; "
               "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
               "print('worker', w.pid, flush=True)")  # exits at once, its 'worker' keeps running
    log = tmp_path / "run.log"
    rc, _, peak = run_logged([sys.executable, "-c", spawner], dict(os.environ), log)
    assert rc == 0 and peak > 0
    worker = int(next(ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("worker ")))
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with open(f"/proc/{worker}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # killed, not yet reaped by init
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, 9)
        pytest.fail(f"the command's worker {worker} outlived run_logged")
