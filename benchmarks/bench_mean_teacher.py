"""Iteration time of MeanTeacherTrainer vs nnUNetTrainer on the same data, CPU, measured side by side in one run.

Target (issue 2): ratio <= 1.6. MeanTeacher's step = one forward/backward over B_l + B_u images (B_u = B_l) plus one
no-grad EMA forward over B_u images and the EMA update, so ~1.5-2x the images of a supervised step pass through a
network. Usage: python benchmarks/bench_mean_teacher.py [--size 128] [--iters 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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

    torch.set_num_threads(args.threads)
    trainers = {}
    for name in ("nnUNetTrainer", "MeanTeacherTrainer"):
        t = get_trainer_from_args("777", "2d", 0, name, device=torch.device("cpu"))
        t.on_train_start()
        t.network.train()
        for _ in range(2):  # warm-up
            t.train_step(next(t.dataloader_train))
        trainers[name] = t
    times = {k: [] for k in trainers}
    for _ in range(max(1, args.iters // 5)):
        for name, t in trainers.items():
            for _ in range(5):
                batch = next(t.dataloader_train)
                t0 = time.perf_counter()
                t.train_step(batch)
                times[name].append(time.perf_counter() - t0)
    base = np.median(times["nnUNetTrainer"])
    mt = np.median(times["MeanTeacherTrainer"])
    bs = trainers["nnUNetTrainer"].batch_size
    print(f"{args.size}x{args.size} RGB, batch {bs} labeled (+{bs} unlabeled for MT), {args.threads} threads, "
          f"median of {len(times['nnUNetTrainer'])} iterations")
    print(f"nnUNetTrainer      {base * 1000:8.1f} ms/iteration")
    print(f"MeanTeacherTrainer {mt * 1000:8.1f} ms/iteration")
    print(f"ratio MeanTeacher / nnUNetTrainer = {mt / base:.2f} (target <= 1.6)")
    sys.stdout.flush()
    os._exit(0)  # background augmenter workers of both trainers exit with the process


if __name__ == "__main__":
    main()
