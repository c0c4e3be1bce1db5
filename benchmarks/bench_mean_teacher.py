"""Iteration time of MeanTeacherTrainer vs nnUNetTrainer on the same data, CPU, measured side by side in one run.

Target (issue 2): ratio <= 1.6. MeanTeacher's step at the default composition (B_l = B_u = the plans' batch B,
METHODS.md §1.2) = one forward/backward over 2B images plus one no-grad EMA forward over B images and the EMA update:
with backward ~ 2 forwards that is (2*3 + 1) / 3 = 2.33x the FLOPs of a supervised step, so the ratio cannot reach 1.6
at that composition. The script also measures SSL4MIS's composition (labeled_bs = batch_size / 2: B_l = B_u = B/2,
the same total batch as the supervised run, (3 + 0.5) / 3 = 1.17x the FLOPs).
Usage: python benchmarks/bench_mean_teacher.py [--size 128] [--iters 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per trainer (in interleaved blocks of 5)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_mt_"))
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_extTrainer": trainers_path(), "nnUNet_n_proc_DA": "1",
           "nnUNet_compile": "false"}
    os.environ.update(env)
    for k in ("raw", "pre", "res"):
        (root / k).mkdir()
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(env["nnUNet_raw"], 777, kind="2d-rgb", num_labeled=10, num_unlabeled=20, num_test=0,
                           shape=(args.size, args.size), progress=False)
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "777", "-c", "2d", "-np", "1"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ})
    subprocess.run(["nnunet-semisam", "preprocess-unlabeled", "-d", "777", "-c", "2d", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ})

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from step_timing import exit_now, interleaved_step_times, ready_for_steps

    torch.set_num_threads(args.threads)
    trainers = {}
    # (label, trainer class, labeled batch, unlabeled batch); None = the plans' batch size B
    setups = [("nnUNetTrainer", "nnUNetTrainer", None, None),
              ("MeanTeacherTrainer", "MeanTeacherTrainer", None, None),
              ("MeanTeacherTrainer B/2+B/2", "MeanTeacherTrainer", "half", "half")]
    for label, name, b_l, b_u in setups:
        t = get_trainer_from_args("777", "2d", 0, name, device=torch.device("cpu"))
        t.initialize()
        if b_l == "half":  # SSL4MIS composition: labeled_bs = batch_size / 2, same total batch as supervised
            t.batch_size = max(1, t.batch_size // 2)
            t.unlabeled_batch_size = t.batch_size
        ready_for_steps(t)
        trainers[label] = t
    times = interleaved_step_times(trainers, args.iters)
    base = np.median(times["nnUNetTrainer"])
    bs = trainers["nnUNetTrainer"].batch_size
    print(f"{args.size}x{args.size} RGB, plans batch B = {bs}, {args.threads} threads, "
          f"median of {len(times['nnUNetTrainer'])} iterations")
    for label, t in trainers.items():
        comp = f"{t.batch_size} labeled" + (f" + {t.unlabeled_batch_size or t.batch_size} unlabeled"
                                            if label != "nnUNetTrainer" else "")
        med = np.median(times[label])
        print(f"{label:28s} {med * 1000:8.1f} ms/iteration ({comp}), ratio to nnUNetTrainer {med / base:.2f}")
    print(f"ratio MeanTeacher / nnUNetTrainer = {np.median(times['MeanTeacherTrainer']) / base:.2f} at the default "
          f"B_l = B_u = B (target <= 1.6); {np.median(times['MeanTeacherTrainer B/2+B/2']) / base:.2f} at the same "
          f"total batch (B_l = B_u = B/2)")
    exit_now()  # kills the augmenter workers of both trainers, which would outlive a plain os._exit


if __name__ == "__main__":
    main()
