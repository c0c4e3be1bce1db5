"""Seconds per training iteration of every baseline against nnUNetTrainer, side by side in one run (issue 16).

Real trainer objects (`nnUNetv2_train`'s `get_trainer_from_args`, CPU) on the same synthetic 2D RGB plans:
nnUNetTrainer, Mean Teacher, UA-MT, CPS, BCP (self-training phase, its steady state for 75 % of a 2D run, and
pre-training), URPC, MC-Net+, CCT. Each is started (`on_train_start`) and warmed up, then `train_step` is timed in
interleaved blocks so that all trainers see the same machine load. Loaders are synchronous (`nnUNet_n_proc_DA=0`, no
worker processes competing for the cores) and both batches are drawn outside the timed region: the labeled batch as
nnU-Net does, the unlabeled batch by pre-fetching it and handing it to `train_step`. Reported: the median seconds per
iteration and its ratio to nnUNetTrainer's; a JSON file and a table.

Usage: python benchmarks/bench_baselines_cost.py [--size 64] [--iters 10] [--threads 1] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

#: (row label, trainer class); BCP twice, one per phase
TRAINERS = [("nnUNetTrainer", "nnUNetTrainer"), ("MeanTeacherTrainer", "MeanTeacherTrainer"),
            ("UAMTTrainer", "UAMTTrainer"), ("CPSTrainer", "CPSTrainer"), ("BCPTrainer", "BCPTrainer"),
            ("BCPTrainer (pre-training)", "BCPTrainer"), ("URPCTrainer", "URPCTrainer"),
            ("MCNetPlusTrainer", "MCNetPlusTrainer"), ("CCTTrainer", "CCTTrainer")]


def prepare(root: Path, size: int) -> None:
    """Synthetic 2D RGB dataset (10 labeled, 10 unlabeled) planned and preprocessed under `root`; sets the env."""
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_extTrainer": trainers_path(), "nnUNet_n_proc_DA": "1",
           "nnUNet_compile": "false"}
    os.environ.update(env)
    for k in ("raw", "pre", "res"):
        (root / k).mkdir(parents=True, exist_ok=True)
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(env["nnUNet_raw"], 778, kind="2d-rgb", num_labeled=10, num_unlabeled=10, num_test=0,
                           shape=(size, size), progress=False)
    for cmd in (["nnUNetv2_plan_and_preprocess", "-d", "778", "-c", "2d", "-np", "1", "-npfp", "1"],
                ["nnunet-semisam", "preprocess-unlabeled", "-d", "778", "-c", "2d", "--quiet"]):
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    os.environ["nnUNet_n_proc_DA"] = "0"  # synchronous loaders for the timing (the planner needs >= 1)


def build(label: str, name: str):
    """The trainer as `nnUNetv2_train 778 2d 0 -tr name -device cpu` builds it, started, in train mode."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args("778", "2d", 0, name, device=torch.device("cpu"))
    if name == "BCPTrainer":  # phase by the switch step: 0 -> self-training from the first step
        t.pretrain_fraction = 1.0 if "pre-training" in label else 0.0
    t.on_train_start()
    t.network.train()
    return t


def timed_step(t) -> float:
    """One `train_step` with both batches drawn before the clock starts."""
    batch = next(t.dataloader_train)
    if hasattr(t, "dataloader_unlabeled"):
        unlabeled = type(t).next_unlabeled_batch(t)
        t.next_unlabeled_batch = lambda: unlabeled
    t0 = time.perf_counter()
    t.train_step(batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image side (the plans' 2D patch follows)")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per trainer")
    ap.add_argument("--block", type=int, default=5, help="steps per trainer before the next one's block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", default="bench_baselines_cost.json", help="output JSON (written atomically)")
    args = ap.parse_args()

    prepare(Path(tempfile.mkdtemp(prefix="bench_baselines_")), args.size)
    import torch

    from nnunet_semisam.io import atomic_path
    torch.set_num_threads(args.threads)
    trainers = {label: build(label, name) for label, name in TRAINERS}
    for t in trainers.values():
        for _ in range(args.warmup):
            timed_step(t)
    times = {label: [] for label in trainers}
    start = time.time()
    for _ in range(max(1, args.iters // args.block)):
        for label, t in trainers.items():
            times[label] += [timed_step(t) for _ in range(args.block)]
    wall = time.time() - start
    base = float(np.median(times["nnUNetTrainer"]))
    t0 = trainers["nnUNetTrainer"]
    rows = [{"trainer": label, "median_s": float(np.median(v)), "ratio": float(np.median(v)) / base,
             "min_s": float(np.min(v)), "max_s": float(np.max(v)), "n": len(v)} for label, v in times.items()]
    report = {"patch_size": list(t0.configuration_manager.patch_size), "batch_size": t0.batch_size,
              "threads": args.threads, "iters": args.iters, "block": args.block, "warmup": args.warmup,
              "cpu_count": os.cpu_count(), "load_avg_at_end": list(os.getloadavg()), "timed_wall_s": wall,
              "machine": platform.platform(), "torch": torch.__version__, "rows": rows}
    with atomic_path(args.json) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"2D {args.size}x{args.size} RGB, patch {report['patch_size']}, plans batch B = {t0.batch_size} (B_l = "
          f"B_u = B), {args.threads} thread(s), median of {args.iters} steps after {args.warmup} warm-up, "
          f"load average at the end {report['load_avg_at_end'][0]:.2f} on {os.cpu_count()} cores")
    print("| trainer | s / iteration (median) | ratio to nnUNetTrainer |\n|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['median_s']:.3f} | {r['ratio']:.2f} |")
    print(f"written {args.json}")
    os._exit(0)  # synchronous loaders: no worker processes to stop


if __name__ == "__main__":
    main()
