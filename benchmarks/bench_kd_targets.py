"""How good would the closed loop's unlabeled targets be, by prompt rule? An offline diagnosis of a finished KD accuracy
run (`bench_medsam_mamba_kd.py accuracy --out OUT`), not a result table.

For each 10 %-labeled run of OUT that trained a student (`nnUNetTrainer`, `TinyMUNetTrainer`, `MedSAMMambaKDTrainer`,
...), the trained network predicts the *unlabeled training images* (`nnUNetv2_predict --save_probabilities`), and
each target rule of METHODS.md §4.5 is scored against the labels `split-labels` kept aside (never read by training),
mean Dice (%) over the unlabeled images that get a target in training, i.e. whose student mask has a §2.3 box (an
empty target on a lesion-free image counts 100):

- `student`:        the student's own mask (`argmax != 0`), what self-training would use;
- `teacher`:        LiteMedSAM from the §2.3 boxes of the student's mask, max over boxes (the default closed loop);
- `fused`:          `closed_loop.fuse_with_student` of the two, thresholded at 0.5 (`_fuseStudent`);
- `teacher, GT boxes`: LiteMedSAM from the held-out labels' boxes (what perfect prompts would give);
- `teacher @ t*` / `fused @ t*`: the same maps thresholded at `t*` instead of 0.5, where `t*` (from 0.5, 0.4, ..., 0.05)
  maximises the teacher's mean Dice on the *labeled* training images from their GT boxes, with the teacher's
  area / label area there: is the teacher's boundary convention (not its prompts) the loss? Only training labels
  choose `t*`.

The teacher reads the raw RGB image (rule U inverts `RGBTo01Normalization` to the same bytes). CPU, single process:
    python benchmarks/bench_kd_targets.py --out OUT [--runs nnUNetTrainer TinyMUNetTrainer]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks, the project's metric (strict convention: two empty masks score 1)."""
    from nnunet_semisam.evaluation.metrics import binary_metrics

    return binary_metrics(a, b)["dice"]


def predict_unlabeled(out: Path, run: Path, split: Path, dest: Path) -> Path:
    """`nnUNetv2_predict` of the run's final checkpoint on the split's imagesUnlabeled, with probabilities, in the
    benchmark machinery's environment for OUT (`runner.Context.env`)."""
    from nnunet_semisam.benchmark import runner

    results = run / "nnUNet_results"
    model = next(results.glob("*/*__*__2d"))
    if not any(dest.glob("*.npz")):
        dataset_id = int(split.name[len("Dataset"):].split("_")[0])
        env = runner.Context(out, split, dataset_id, split.name, "2d", "cpu").env(results)
        subprocess.run(["nnUNetv2_predict", "-i", str(split / "imagesUnlabeled"), "-o", str(dest), "-d",
                        model.parent.name, "-c", "2d", "-f", "all", "-tr", model.name.split("__")[0], "-device", "cpu",
                        "-npp", "0", "-nps", "0", "--save_probabilities", "--disable_progress_bar"],
                       env=env, check=True, capture_output=True, text=True)
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder of bench_medsam_mamba_kd.py accuracy")
    p.add_argument("--runs", nargs="*", default=None, help="trainer names of the 10 %% runs (default: all)")
    a = p.parse_args()
    from PIL import Image

    from nnunet_semisam.teachers.closed_loop import fuse_with_student
    from nnunet_semisam.teachers.factory import load_teacher
    from nnunet_semisam.teachers.prompts import boxes_from_mask

    out = Path(a.out).resolve()
    split = next((out / "nnUNet_raw").glob("Dataset*_10pct_s*"), None)
    if split is None or not (split / "labelsUnlabeled_heldout").is_dir():
        sys.exit(f"error: no 10 % split with held-out labels under {out / 'nnUNet_raw'}")
    runs = sorted(r for r in (out / "runs").glob("10pct_s*_*") if (r / "nnUNet_results").is_dir() and any(
        (r / "nnUNet_results").glob("*/*/fold_all/checkpoint_final.pth")))
    if a.runs:
        runs = [r for r in runs if r.name.split("_", 2)[2] in a.runs]
    teacher = load_teacher(None)
    cases = sorted(f.name[: -len("_0000.png")] for f in (split / "imagesUnlabeled").glob("*_0000.png"))
    images = {c: np.asarray(Image.open(split / "imagesUnlabeled" / f"{c}_0000.png").convert("RGB")) for c in cases}
    gts = {c: np.asarray(Image.open(split / "labelsUnlabeled_heldout" / f"{c}.png")) > 0 for c in cases}
    embeddings = {c: teacher.embed(images[c]) for c in cases}

    def teacher_map(c: str, mask: np.ndarray, min_area: int) -> np.ndarray | None:
        """Max over the §2.3 boxes of `mask` (labeled targets use min_area 1, student boxes 10); None: no box."""
        boxes = boxes_from_mask(mask, min_area=min_area, max_boxes=5)
        return teacher.segment(embeddings[c], boxes, mask.shape).amax(0).numpy() if len(boxes) else None

    # t*: the threshold that best reproduces the labeled images' masks from their GT boxes (training labels only)
    lab_cases = sorted(f.name[: -len("_0000.png")] for f in (split / "imagesTr").glob("*_0000.png"))
    lab_gt = {c: np.asarray(Image.open(split / "labelsTr" / f"{c}.png")) > 0 for c in lab_cases}
    lab_q = {}
    for c in lab_cases:
        embeddings[c] = teacher.embed(np.asarray(Image.open(split / "imagesTr" / f"{c}_0000.png").convert("RGB")))
        lab_q[c] = teacher_map(c, lab_gt[c], 1)
    lab_q = {c: q for c, q in lab_q.items() if q is not None}
    lab_dice = {t: float(np.mean([dice(q > t, lab_gt[c]) for c, q in lab_q.items()])) for t in THRESHOLDS}
    t_star = max(THRESHOLDS, key=lambda t: (lab_dice[t], t))
    area = float(np.mean([(q > 0.5).sum() / max(1, lab_gt[c].sum()) for c, q in lab_q.items()]))

    rows = {}
    gt_box, gt_box_t = [], []
    for c in cases:
        q = teacher_map(c, gts[c], 1)
        gt_box.append(dice(np.zeros_like(gts[c]) if q is None else q > 0.5, gts[c]))
        gt_box_t.append(dice(np.zeros_like(gts[c]) if q is None else q > t_star, gts[c]))
    for run in runs:
        pred = predict_unlabeled(out, run, split, out / "kd_targets" / run.name)
        scores = {"student": [], "teacher": [], "fused": [], "teacher @ t*": [], "fused @ t*": []}
        boxed = 0
        for c in cases:
            mask = np.asarray(Image.open(pred / f"{c}.png")) > 0
            with np.load(pred / f"{c}.npz") as z:
                p_fg = 1.0 - z["probabilities"][0, 0].astype(np.float32)  # (C, 1, H, W): 1 - background
            q = teacher_map(c, mask, 10)
            if q is None:  # no box: the trainer marks the image unavailable (no target)
                continue
            boxed += 1
            scores["student"].append(dice(mask, gts[c]))
            scores["teacher"].append(dice(q > 0.5, gts[c]))
            fused = fuse_with_student(q, np.ones_like(mask), p_fg)
            scores["fused"].append(dice(fused > 0.5, gts[c]))
            scores["teacher @ t*"].append(dice(q > t_star, gts[c]))
            scores["fused @ t*"].append(dice(fused > t_star, gts[c]))
        rows[run.name] = {k: 100 * float(np.mean(v)) for k, v in scores.items()}
        rows[run.name]["with a box"] = boxed
    print(f"{len(lab_q)} labeled training images, teacher from GT boxes: area / label area at 0.5 = {area:.2f}; "
          "Dice % by threshold: " + ", ".join(f"{t}: {100 * d:.2f}" for t, d in lab_dice.items()) + f"; t* = {t_star}")
    print(f"{len(cases)} unlabeled training images of {split.name}; teacher from GT boxes: "
          f"{100 * np.mean(gt_box):.2f} % Dice at 0.5, {100 * np.mean(gt_box_t):.2f} at t*\n")
    print("Dice % on the images with a box:\n")
    print("| 10 % run | student | teacher (student boxes) | fused | teacher @ t* | fused @ t* | images with a box |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['student']:.2f} | {r['teacher']:.2f} | {r['fused']:.2f} | {r['teacher @ t*']:.2f} | "
              f"{r['fused @ t*']:.2f} | {r['with a box']}/{len(cases)} |")
    (out / "kd_targets.json").write_text(json.dumps({
        "teacher_gt_boxes": 100 * float(np.mean(gt_box)), "teacher_gt_boxes_t_star": 100 * float(np.mean(gt_box_t)),
        "t_star": t_star, "labeled_dice_by_threshold": {str(t): 100 * d for t, d in lab_dice.items()},
        "labeled_area_ratio": area, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
