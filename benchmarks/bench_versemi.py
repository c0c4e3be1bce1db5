"""VerSemi benchmark on a merged synthetic 3-task 3D dataset (METHODS.md §6): Dice per task, over seeds, of

- `versemi`:  VerSemiTrainer on the merged dataset (labeled + unlabeled of all tasks),
- `merged`:   supervised nnU-Net (`nnUNetTrainer`) on the merged dataset (K task labels, unlabeled unused),
- `per-task`: one supervised nnU-Net per source dataset.

Per seed: three synthetic 3D sources (`make-synthetic --kind 3d`, seeds 100 s + k, N training cases each of which
`--fraction` keep their labels and the rest go to `imagesUnlabeled/`, plus test cases), `merge-datasets`,
`nnUNetv2_plan_and_preprocess` of every dataset, `preprocess-unlabeled` of the merged one, training on fold `all`
(every labeled case), `nnUNetv2_predict` of each test set, `nnunet-semisam evaluate`, and per-task scores
(`evaluation.per_task`: label k over the test cases of task k). Every step is skipped when its output exists, so
re-running resumes. Results: `OUT/results.csv` (method, seed, task, dice), `OUT/summary.md` (mean ± std over seeds).

    python benchmarks/bench_versemi.py -o /tmp/bench_versemi                        # 3 seeds, demo schedule
    python benchmarks/bench_versemi.py -o /tmp/bv --seeds 0 --schedule smoke --cases 10 --test 2 --size 16 32 32

Nothing here is a measured number: run it and read `summary.md`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

TRAINERS = {"versemi": "VerSemiTrainer", "merged": "nnUNetTrainer", "per-task": "nnUNetTrainer"}
K = 3


def run(cmd: list[str], env: dict, log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def nnunet_env(root: Path) -> dict:
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=trainers_path())
    env.setdefault("nnUNet_compile", "false")
    # nnU-Net's default of 8 export workers per final validation oversubscribes small machines
    env.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    return env


def train_predict_evaluate(dataset_id: int, trainer: str, env: dict, raw: Path, out: Path, device: str,
                           labels: list[int], log: Path) -> dict:
    metrics = out / "metrics.json"
    if not metrics.is_file():
        fold = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_all"
        if not (fold / "checkpoint_final.pth").is_file():
            resume = ["--c"] if (fold / "checkpoint_latest.pth").is_file() else []
            run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "all", "-tr", trainer, "-device", device]
                + resume, env, log)
        run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(dataset_id), "-c",
             "3d_fullres", "-f", "all", "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1"], env, log)
        run(["nnunet-semisam", "evaluate", str(out), str(raw / "labelsTs"), "--labels", *map(str, labels),
             "--quiet"], env, log)
    return json.loads(metrics.read_text(encoding="utf-8"))


def bench_seed(seed: int, a: argparse.Namespace, out: Path) -> list[dict]:
    from nnunet_semisam.data.merge_datasets import merge_datasets
    from nnunet_semisam.data.synthetic import make_synthetic_dataset
    from nnunet_semisam.evaluation.per_task import per_task_scores

    root = out / f"seed{seed}"
    env = nnunet_env(root / "nnunet")
    log = root / "commands.log"
    raw = Path(env["nnUNet_raw"])
    base = 700 + 10 * seed
    src_ids = [base + k for k in range(1, K + 1)]
    num_labeled = max(2, round(a.fraction * a.cases))
    for k, sid in enumerate(src_ids):
        if not list(raw.glob(f"Dataset{sid:03d}_*")):
            make_synthetic_dataset(raw, sid, kind="3d", num_labeled=num_labeled, num_unlabeled=a.cases - num_labeled,
                                   num_test=a.test, shape=a.size, seed=100 * seed + k, name=f"VSSrc{k + 1}",
                                   progress=False)
    merged = raw / f"Dataset{base:03d}_VSMerged"
    if not merged.is_dir():
        os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet_")})
        merge_datasets(src_ids, base, "VSMerged", prefix_cases=True)
    sidecar = json.loads((merged / "versemi_tasks.json").read_text(encoding="utf-8"))
    for did in [base] + src_ids:
        if not (Path(env["nnUNet_preprocessed"]) / next(raw.glob(f"Dataset{did:03d}_*")).name / "nnUNetPlans.json"
                ).is_file():
            run(["nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "3d_fullres", "-np", str(a.np), "-npfp",
                 str(a.np)], env, log)
    if not (Path(env["nnUNet_preprocessed"]) / merged.name / "nnUNetPlans_3d_fullres_unlabeled").is_dir():
        run(["nnunet-semisam", "preprocess-unlabeled", "-d", str(base), "-c", "3d_fullres", "--quiet"], env, log)

    rows = []
    suffix = "" if a.schedule == "full" else f"_{a.schedule}"
    for method in a.methods:
        trainer = TRAINERS[method] + suffix
        if method == "per-task":
            for k, sid in enumerate(src_ids, start=1):
                src = next(raw.glob(f"Dataset{sid:03d}_*"))
                m = train_predict_evaluate(sid, trainer, env, src, root / "pred" / f"per-task_{k}", a.device, [1], log)
                dice = [float(c["metrics"]["1"]["dice"]) for c in m["cases"]]
                rows.append(dict(method=method, seed=seed, task=k, n=len(dice), dice=sum(dice) / len(dice)))
        else:
            m = train_predict_evaluate(base, trainer, env, merged, root / "pred" / method, a.device,
                                       list(range(1, K + 1)), log)
            for k, s in per_task_scores(m, sidecar).items():
                rows.append(dict(method=method, seed=seed, task=k, n=s["n"], dice=s["dice"]))
    return rows


def summary(rows: list[dict]) -> str:
    import numpy as np

    lines = ["| method | " + " | ".join(f"task {k} Dice %" for k in range(1, K + 1)) + " | mean | seeds |",
             "|---" * (K + 3) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells, seeds = [], sorted({r["seed"] for r in rows if r["method"] == method})
        for k in range(1, K + 1):
            v = np.array([r["dice"] for r in rows if r["method"] == method and r["task"] == k]) * 100
            cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}")
        per_seed = [np.mean([r["dice"] for r in rows if r["method"] == method and r["seed"] == s]) * 100
                    for s in seeds]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(per_seed):.2f} | {len(seeds)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    p.add_argument("--schedule", choices=("smoke", "demo", "full"), default="demo")
    p.add_argument("--fraction", type=float, default=0.1, help="labeled share of each source (default 0.1)")
    p.add_argument("--cases", type=int, default=30, help="training cases per source (default 30)")
    p.add_argument("--test", type=int, default=6, help="test cases per source (default 6)")
    p.add_argument("--size", type=int, nargs=3, default=[24, 48, 48])
    p.add_argument("--device", default="cpu")
    p.add_argument("-np", type=int, default=1)
    a = p.parse_args(argv)
    from nnunet_semisam.io import atomic_write_text

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for seed in a.seeds for r in bench_seed(seed, a, out)]
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=["method", "seed", "task", "n", "dice"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    atomic_write_text(out / "summary.md", summary(rows))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
