"""DDP overhead on CPU: seconds per training iteration of one trainer, 1 process vs 2 gloo processes (METHODS.md §1.6).

Same dataset, plans and global batch in both runs (the plans' batch is split over the ranks under DDP), real
trainer objects built as `nnunet-semisam train` builds them, `--warmup` steps then `--steps` timed `train_step`s
(median). On a 2-core machine 2 processes share the cores, so this measures the synchronisation overhead and the
loss of per-process threads, not a speed-up; on N GPUs each rank has its own device.

    python benchmarks/bench_ddp.py [--trainer MeanTeacherTrainer] [--size 64] [--batch 4] [--steps 20] [--out DIR]

Makes a synthetic 2D dataset (`nnunet-semisam make-synthetic`), plans and preprocesses it in `OUT/nnunet`, then runs
`python -m torch.distributed.run --standalone --nproc-per-node P benchmarks/bench_ddp.py --worker ...` for P = 1, 2.
Prints a table and writes `OUT/ddp.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET = 871


def _env(root: Path) -> dict[str, str]:
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=trainers_path(), nnUNet_n_proc_DA="0",
               nnUNet_compile="false", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run a step; on failure raise with the command and the last lines of its output (not a bare exit status)."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited with {proc.returncode}:\n{tail}")


def prepare(root: Path, size: int, batch: int) -> dict[str, str]:
    env = _env(root)
    pp = Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET}_DDPBench"
    steps = [  # each step is skipped when its output exists, so an interrupted preparation resumes
        (Path(env["nnUNet_raw"]) / f"Dataset{DATASET}_DDPBench" / "dataset.json",
         ["nnunet-semisam", "make-synthetic", env["nnUNet_raw"], "--dataset-id", str(DATASET), "--name", "DDPBench",
          "--kind", "2d-rgb", "--num-labeled", "8", "--num-unlabeled", "8", "--num-test", "0",
          "--size", str(size), str(size), "--no-progress"]),
        (pp / "nnUNetPlans_2d", ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET), "-c", "2d", "-np", "1",
                                 "-npfp", "1"]),
        (pp / "nnUNetPlans_2d_unlabeled" / "manifest.json",
         ["nnunet-semisam", "preprocess-unlabeled", "-d", str(DATASET), "-c", "2d", "--quiet"]),
    ]
    for done, cmd in steps:
        if not done.exists():
            _run(cmd, env)
    plans_file = pp / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["batch_size"] = batch
    plans_file.write_text(json.dumps(plans, indent=1))
    return env


def worker(args: argparse.Namespace) -> None:
    """One rank: build the trainer, warm up, time `train_step`; rank 0 writes the timings."""
    import torch
    import torch.distributed as dist

    from nnunet_semisam.distributed import all_gather_objects, process_group_timeout, rank
    from nnunet_semisam.launch import build_trainer

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, os.cpu_count() // nproc))
    if nproc > 1:
        dist.init_process_group("gloo", init_method="env://", timeout=process_group_timeout())
    t = build_trainer(str(DATASET), "2d", "all", args.trainer, "nnUNetPlans", False, torch.device("cpu"))
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    times = []
    for i in range(args.warmup + args.steps):
        batch = next(t.dataloader_train)
        start = time.perf_counter()
        t.train_step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    t.stop_background_workers()
    per_rank = all_gather_objects(times)
    if rank() == 0:
        # an iteration ends when the slowest rank's step ends
        steps = [max(ts[i] for ts in per_rank) for i in range(args.steps)]
        Path(args.worker).write_text(json.dumps({"processes": nproc, "batch_per_process": t.batch_size,
                                                 "median_s": statistics.median(steps), "steps": steps}))
    if nproc > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", default="MeanTeacherTrainer")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="global batch (the plans')")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench_ddp")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out).resolve()
    env = prepare(out / "nnunet", args.size, args.batch)
    rows = []
    for nproc in (1, 2):
        result = out / f"ddp_{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
               "--trainer", args.trainer, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--worker", str(result)]
        _run(cmd, env)
        rows.append(json.loads(result.read_text()))
    load = os.getloadavg()[0]
    summary = {"trainer": args.trainer, "size": args.size, "global_batch": args.batch, "runs": rows,
               "ratio_2_over_1": rows[1]["median_s"] / rows[0]["median_s"], "load_average_1min": load}
    (out / "ddp.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.trainer}, {args.size}x{args.size}, global batch {args.batch}, {os.cpu_count()} cores "
          f"(load average {load:.1f})")
    print("| processes | batch per process | s / iteration (median) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['batch_per_process']} | {r['median_s']:.3f} |")
    print(f"2 processes / 1 process: x{summary['ratio_2_over_1']:.2f}")


if __name__ == "__main__":
    main()
