"""SemiSAMPlusTrainer benchmark (issue 17): accuracy against supervised nnU-Net 3D and Mean Teacher 3D, and the
quality of the filtered pseudo-labels, on CPU.

1. A thin caller of `nnunet-semisam benchmark --preset synthetic-3d-semisam` (`run_benchmark`): synthetic MRI-like 3D
   lesions (24x48x48, 40 training / 8 test volumes), 10 % labeled (4 volumes, the rest in imagesUnlabeled/ with their
   labels kept aside), `_demo` schedules, fold `all`, seeds `--seeds` (default 0 1 2), plus the fully labeled
   nnU-Net reference. Resumable: finished runs are skipped. Its `summary.md` has Dice / HD95 / ASD (mean and std
   over seeds), seconds per iteration and peak RSS.
2. Pseudo-label diagnosis, per seed: the trained `SemiSAMPlusTrainer_demo` student prompts Algorithm 2 (METHODS.md
   §5.3-5.4: the same LiteMedSAM teacher, N = `--aug` (the demo trainer's 2), u_th 0.05) on the unlabeled volumes
   through `nnunet-semisam pseudolabel --prompts student --aug N` (the first of `--pl-parts` shards, to bound the CPU
   time), and the stored Pseudo / M_conf are compared with the labels `split-labels` kept aside
   (`labelsUnlabeled_heldout/`, never read by training): confident coverage (share of voxels in M_conf), Dice of
   Pseudo > 0.5 against the label inside M_conf (the voxels L_rs-con trains on), and Dice of (Pseudo > 0.5 and M_conf)
   against the whole label (what the filter keeps of the lesion). These are the final student's pseudo-labels, a
   proxy for those seen during training (whose prompts came from the student of each step).

Writes `OUT/semisam_plus.md` / `.json` with both tables.

    python benchmarks/bench_semisam_plus.py [--out DIR] [--seeds 0 1 2] [--aug 2] [--pl-parts 4] [--diagnose-only]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PRESET = "synthetic-3d-semisam"
METHOD = "SemiSAMPlusTrainer"


def _dice(a, b) -> float:
    """Dice in percent by the project's metric (two empty masks score 100)."""
    from nnunet_semisam.evaluation.metrics import binary_metrics

    return 100.0 * binary_metrics(a, b)["dice"]


def pseudolabel_quality(store: Path, heldout: Path) -> dict:
    """Per-case coverage / in-mask Dice / kept-lesion Dice (module docstring, step 2), averaged over the cases."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_semisam.data.pseudolabel_store import load_pseudolabel

    cov, in_mask, kept = [], [], []
    cases = sorted(p.stem for p in store.glob("*.npz"))
    for case in cases:
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(heldout / f"{case}.nii.gz"))) > 0
        prob, conf = load_pseudolabel(store, case)
        if prob.size != gt.size:
            raise SystemExit(f"{store / case}: pseudo-label grid {prob.shape} differs from its label {gt.shape} "
                             "(cropped or resampled preprocessing; this diagnosis needs the raw grid)")
        fg, conf = prob.reshape(gt.shape) > 0.5, conf.reshape(gt.shape)
        cov.append(100.0 * conf.mean())
        in_mask.append(_dice(fg[conf], gt[conf]))
        kept.append(_dice(fg & conf, gt))
    mean = (lambda v: round(float(np.mean(v)), 2) if v else float("nan"))
    return {"cases": len(cases), "confident coverage %": mean(cov), "Dice % inside M_conf": mean(in_mask),
            "Dice % of Pseudo & M_conf vs label": mean(kept)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_semisam_plus")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--aug", type=int, default=2, help="Algorithm 2's N for the diagnosis (the demo trainer's: 2)")
    ap.add_argument("--pl-parts", type=int, default=4, help="diagnose the first of this many shards of the cases")
    ap.add_argument("--diagnose-only", action="store_true",
                    help=f"skip step 1: the runs of `nnunet-semisam benchmark --preset {PRESET} -o OUT` exist")
    a = ap.parse_args()

    from nnunet_semisam.benchmark import BenchmarkOptions, run_benchmark
    from nnunet_semisam.cli.trainers_path import trainers_path
    from nnunet_semisam.data.split_labels import HELDOUT_LABELS
    from nnunet_semisam.io import atomic_write_json, atomic_write_text

    t0 = time.time()
    out = Path(a.out).resolve()
    rc = 0 if a.diagnose_only else run_benchmark(BenchmarkOptions(out=str(out), preset=PRESET, seeds=list(a.seeds),
                                                                   device="cpu"))
    rows = []
    for seed in a.seeds:
        folds = list((out / "runs").glob(f"*_s{seed}_{METHOD}/nnUNet_results/*/{METHOD}_demo__*/fold_all"))
        if len(folds) != 1 or not (folds[0] / "checkpoint_final.pth").is_file():
            rows.append({"seed": seed, "status": "no finished SemiSAMPlusTrainer_demo run"})
            continue
        model, dataset = folds[0].parent, folds[0].parent.parent.name
        env = {**os.environ, "nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_results": str(model.parent.parent),
               "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"), "nnUNet_extTrainer": trainers_path()}
        store = out / "pseudolabel_diagnosis" / f"seed{seed}"
        cmd = ["nnunet-semisam", "pseudolabel", "-d", dataset, "-c", "3d_fullres", "--prompts", "student",
               "--student-model", str(model), "-f", "all", "--cases", "unlabeled", "--aug", str(a.aug),
               "--num-parts", str(a.pl_parts), "--part-id", "0", "--device", "cpu", "--quiet", "-o", str(store)]
        t = time.time()
        subprocess.run(cmd, env=env, check=True)
        rows.append({"seed": seed, **pseudolabel_quality(store, out / "nnUNet_raw" / dataset / HELDOUT_LABELS),
                     "pseudolabel s": round(time.time() - t, 1)})
    summary = (out / "summary.md").read_text(encoding="utf-8") if (out / "summary.md").is_file() else ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                      ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])
    text = (f"# Semi-SAM+ benchmark ({PRESET}, seeds {a.seeds}, CPU)\n\n{summary}\n\n## Filtered pseudo-labels of "
            f"the trained student (Algorithm 2, N = {a.aug}, first of {a.pl_parts} shards of the unlabeled volumes)"
            f"\n\n{table}\n")
    atomic_write_text(out / "semisam_plus.md", text)
    atomic_write_json(out / "semisam_plus.json", {"rows": rows, "rc": rc})
    print(f"{text}\ntotal {time.time() - t0:.0f} s; {out / 'semisam_plus.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
