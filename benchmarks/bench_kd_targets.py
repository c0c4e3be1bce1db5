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

- `teacher +m px` / `fused +m px`: the same with every student box widened by m px per side (`--margins`;
  `boxes_from_mask(margin=m)`, the closed loop's `box_margin`, `MedSAMMambaKDTrainer.student_box_margin`): a student
  trained on a few labels under-segments, and LiteMedSAM only segments inside its box.

`--probe` adds a box-free question: does LiteMedSAM's image encoder itself separate lesions from background? A linear
probe (scikit-learn's class-balanced logistic regression, C = 1) is fitted per pixel on the *labeled* training images'
embeddings (the valid part of the 64x64 grid, bilinear to the image) and scored at 0.5 on every unlabeled image, next
to the same probe on the RGB values alone. This is what feature distillation (L_RD) could pass on without a prompt.

`--demo D` scores the runs of an `nnunet-semisam demo -o D` folder instead (fold 0 of each trained
`nnUNet_results/Dataset501_DemoLesions/<trainer>__nnUNetPlans__2d`). The demo keeps no labels of its unlabeled images;
they are regenerated from the `synthetic` record of its dataset.json (same generator, seed, shape and parameters,
every case labeled) into `D/heldout/`, after checking that the regenerated images are byte-identical to the demo's.

The teacher reads the raw RGB image (rule U inverts `RGBTo01Normalization` to the same bytes). CPU, single process:
    python benchmarks/bench_kd_targets.py --out OUT [--runs nnUNetTrainer TinyMUNetTrainer] [--margins 0 2]
    python benchmarks/bench_kd_targets.py --demo D [--runs TinyMUNetTrainer_demo] [--margins 0 1 2 3] [--probe]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks, the project's metric (strict convention: two empty masks score 1)."""
    from nnunet_semisam.evaluation.metrics import binary_metrics

    return binary_metrics(a, b)["dice"]


@dataclass
class Layout:
    """Where the images, the held-out labels and the trained 10 % runs are, and how a run predicts."""

    raw: Path                        # imagesTr / labelsTr / imagesUnlabeled
    heldout: Path                    # labels of imagesUnlabeled, never read by training
    runs: dict[str, tuple[Path, str, dict]]  # name -> (trained model folder, fold, environment)
    scratch: Path                    # predictions and the JSON go here


def pixel_features(embedding, hw: tuple[int, int]) -> np.ndarray:
    """(H*W, C) per-pixel features from a LiteMedSAM embedding (1, C, 64, 64): the grid cells that cover the resized
    image (METHODS.md §2.8: longest side to 256, padded bottom-right), bilinear to the image's own H x W."""
    import torch.nn.functional as F

    from nnunet_semisam.teachers.litemedsam import LITE_SIZE, resized_hw

    grid = embedding.shape[-1]
    nh, nw = (-(-n * grid // LITE_SIZE) for n in resized_hw(hw))
    x = F.interpolate(embedding[..., :nh, :nw].float(), size=tuple(hw), mode="bilinear", align_corners=False)
    return x[0].flatten(1).T.numpy()


def linear_probe(train: list[tuple[np.ndarray, np.ndarray]], test: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean Dice (%) on `test` of a class-balanced logistic regression fitted on `train`; items (features (H*W, C),
    mask (H, W)). Features are standardised with the training pixels' mean and spread."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([f for f, _ in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000)
    clf.fit((x - mu) / sd, np.concatenate([m.reshape(-1) for _, m in train]))
    return 100 * float(np.mean([dice(clf.predict((f - mu) / sd).reshape(m.shape) > 0, m) for f, m in test]))


def bench_layout(out: Path) -> Layout:
    """`bench_medsam_mamba_kd.py accuracy --out OUT`: the 10 % split and its runs (fold `all`)."""
    from nnunet_semisam.benchmark import runner

    split = next((out / "nnUNet_raw").glob("Dataset*_10pct_s*"), None)
    if split is None or not (split / "labelsUnlabeled_heldout").is_dir():
        sys.exit(f"error: no 10 % split with held-out labels under {out / 'nnUNet_raw'}")
    dataset_id = int(split.name[len("Dataset"):].split("_")[0])
    runs = {}
    for r in sorted((out / "runs").glob("10pct_s*_*")):
        models = [m for m in (r / "nnUNet_results").glob("*/*__*__2d")
                  if (m / "fold_all/checkpoint_final.pth").is_file()]
        if models:
            env = runner.Context(out, split, dataset_id, split.name, "2d", "cpu").env(r / "nnUNet_results")
            runs[r.name] = (models[0], "all", env)
    return Layout(split, split / "labelsUnlabeled_heldout", runs, out)


def demo_layout(folder: Path) -> Layout:
    """`nnunet-semisam demo -o D`: its dataset, fold 0 of each trained run, labels regenerated (module docstring)."""
    from nnunet_semisam.data.synthetic import SynthParams, make_synthetic_dataset
    from nnunet_semisam.demo import DATASET_ID, demo_env

    raw = next((folder / "nnUNet_raw").glob(f"Dataset{DATASET_ID}_*"), None)
    if raw is None or not (raw / "imagesUnlabeled").is_dir():
        sys.exit(f"error: no demo dataset with imagesUnlabeled/ under {folder / 'nnUNet_raw'}")
    meta = json.loads((raw / "dataset.json").read_text())
    syn = meta["synthetic"]
    n_total = meta["numTraining"] + meta["numUnlabeled"] + meta["numTest"]
    regen = folder / "heldout" / raw.name
    if not (regen / "dataset.json").is_file():
        make_synthetic_dataset(folder / "heldout", DATASET_ID, kind=syn["kind"], num_labeled=n_total, num_unlabeled=0,
                               num_test=0, shape=syn["shape"], seed=syn["seed"], name=raw.name.split("_", 1)[1],
                               params=SynthParams(**syn["params"]), progress=False, overwrite=True)
    for f in (raw / "imagesUnlabeled").glob("*"):
        if f.read_bytes() != (regen / "imagesTr" / f.name).read_bytes():
            sys.exit(f"error: the regenerated {f.name} differs from the demo's: cannot recover its label")
    env = demo_env(folder, "cpu")
    models = sorted((folder / "nnUNet_results" / raw.name).glob("*__*__2d"))
    runs = {m.name.split("__")[0]: (m, "0", env) for m in models if (m / "fold_0/checkpoint_final.pth").is_file()}
    return Layout(raw, regen / "labelsTr", runs, folder)


def predict_unlabeled(layout: Layout, name: str, dest: Path) -> Path:
    """`nnUNetv2_predict` of a run's final checkpoint on imagesUnlabeled, with probabilities."""
    model, fold, env = layout.runs[name]
    if not any(dest.glob("*.npz")):
        subprocess.run(["nnUNetv2_predict", "-i", str(layout.raw / "imagesUnlabeled"), "-o", str(dest), "-d",
                        model.parent.name, "-c", "2d", "-f", fold, "-tr", model.name.split("__")[0], "-device", "cpu",
                        "-npp", "0", "-nps", "0", "--save_probabilities", "--disable_progress_bar"],
                       env=env, check=True, capture_output=True, text=True)
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--out", help="output folder of bench_medsam_mamba_kd.py accuracy")
    src.add_argument("--demo", help="output folder of nnunet-semisam demo")
    p.add_argument("--runs", nargs="*", default=None, help="trainer names of the 10 %% runs (default: all)")
    p.add_argument("--margins", nargs="*", type=int, default=[0, 2],
                   help="px added to every side of the student's boxes, one column pair each (default: 0 2)")
    p.add_argument("--probe", action="store_true",
                   help="also fit a linear probe on the teacher's embeddings of the labeled images (docstring)")
    a = p.parse_args()
    from PIL import Image

    from nnunet_semisam.io import atomic_write_json
    from nnunet_semisam.teachers.closed_loop import fuse_with_student
    from nnunet_semisam.teachers.factory import load_teacher
    from nnunet_semisam.teachers.prompts import boxes_from_mask

    layout = bench_layout(Path(a.out).resolve()) if a.out else demo_layout(Path(a.demo).resolve())
    split = layout.raw
    names = [n for n in layout.runs if not a.runs or n.split("_", 2)[-1] in a.runs or n in a.runs]
    margins = sorted(set(a.margins) | {0})
    teacher = load_teacher(None)
    cases = sorted(f.name[: -len("_0000.png")] for f in (split / "imagesUnlabeled").glob("*_0000.png"))
    images = {c: np.asarray(Image.open(split / "imagesUnlabeled" / f"{c}_0000.png").convert("RGB")) for c in cases}
    gts = {c: np.asarray(Image.open(layout.heldout / f"{c}.png")) > 0 for c in cases}
    embeddings = {c: teacher.embed(images[c]) for c in cases}

    def teacher_map(c: str, mask: np.ndarray, min_area: int, margin: int = 0) -> np.ndarray | None:
        """Max over the §2.3 boxes of `mask` (labeled targets use min_area 1, student boxes 10), widened by `margin`
        px; None: no box."""
        boxes = boxes_from_mask(mask, min_area=min_area, max_boxes=5, margin=margin)
        return teacher.segment(embeddings[c], boxes, mask.shape).amax(0).numpy() if len(boxes) else None

    # t*: the threshold that best reproduces the labeled images' masks from their GT boxes (training labels only)
    lab_cases = sorted(f.name[: -len("_0000.png")] for f in (split / "imagesTr").glob("*_0000.png"))
    lab_gt = {c: np.asarray(Image.open(split / "labelsTr" / f"{c}.png")) > 0 for c in lab_cases}
    lab_images = {c: np.asarray(Image.open(split / "imagesTr" / f"{c}_0000.png").convert("RGB")) for c in lab_cases}
    lab_q = {}
    for c in lab_cases:
        embeddings[c] = teacher.embed(lab_images[c])
        lab_q[c] = teacher_map(c, lab_gt[c], 1)
    lab_q = {c: q for c, q in lab_q.items() if q is not None}
    lab_dice = {t: float(np.mean([dice(q > t, lab_gt[c]) for c, q in lab_q.items()])) for t in THRESHOLDS}
    t_star = max(THRESHOLDS, key=lambda t: (lab_dice[t], t))
    area = float(np.mean([(q > 0.5).sum() / max(1, lab_gt[c].sum()) for c, q in lab_q.items()]))

    probe = {}
    if a.probe:
        for name, feats in (("teacher embedding", lambda c, img: pixel_features(embeddings[c], img.shape[:2])),
                            ("RGB", lambda c, img: img.reshape(-1, 3).astype(np.float32))):
            probe[name] = linear_probe([(feats(c, lab_images[c]), lab_gt[c]) for c in lab_cases],
                                       [(feats(c, images[c]), gts[c]) for c in cases])

    rows = {}
    gt_box, gt_box_t = [], []
    for c in cases:
        q = teacher_map(c, gts[c], 1)
        gt_box.append(dice(np.zeros_like(gts[c]) if q is None else q > 0.5, gts[c]))
        gt_box_t.append(dice(np.zeros_like(gts[c]) if q is None else q > t_star, gts[c]))
    columns = ["student", "teacher", "fused", "teacher @ t*", "fused @ t*"] + [
        f"{k} +{m} px" for m in margins if m for k in ("teacher", "fused")]
    for name in names:
        pred = predict_unlabeled(layout, name, layout.scratch / "kd_targets" / name)
        scores = {k: [] for k in columns}
        boxed, all_images = 0, []
        for c in cases:
            mask = np.asarray(Image.open(pred / f"{c}.png")) > 0
            with np.load(pred / f"{c}.npz") as z:
                p_fg = 1.0 - z["probabilities"][0, 0].astype(np.float32)  # (C, 1, H, W): 1 - background
            all_images.append(dice(mask, gts[c]))
            q = teacher_map(c, mask, 10)
            if q is None:  # no box: the trainer marks the image unavailable (no target)
                continue
            boxed += 1
            scores["student"].append(dice(mask, gts[c]))
            for m in margins:
                qm = q if m == 0 else teacher_map(c, mask, 10, m)
                tag = "" if m == 0 else f" +{m} px"
                fused = fuse_with_student(qm, np.ones_like(mask), p_fg)
                scores["teacher" + tag].append(dice(qm > 0.5, gts[c]))
                scores["fused" + tag].append(dice(fused > 0.5, gts[c]))
                if m == 0:
                    scores["teacher @ t*"].append(dice(q > t_star, gts[c]))
                    scores["fused @ t*"].append(dice(fused > t_star, gts[c]))
        rows[name] = {k: 100 * float(np.mean(v)) for k, v in scores.items()}
        rows[name]["with a box"] = boxed
        rows[name]["student, every image"] = 100 * float(np.mean(all_images))
    print(f"{len(lab_q)} labeled training images, teacher from GT boxes: area / label area at 0.5 = {area:.2f}; "
          "Dice % by threshold: " + ", ".join(f"{t}: {100 * d:.2f}" for t, d in lab_dice.items()) + f"; t* = {t_star}")
    print(f"{len(cases)} unlabeled training images of {split.name}; teacher from GT boxes: "
          f"{100 * np.mean(gt_box):.2f} % Dice at 0.5, {100 * np.mean(gt_box_t):.2f} at t*\n")
    for name, d in probe.items():
        print(f"linear probe on the {name}, fitted on the {len(lab_cases)} labeled images: {d:.2f} % Dice on the "
              f"{len(cases)} unlabeled images (no box)")
    for name, r in rows.items() if probe else ():
        print(f"{name}'s own mask on the same {len(cases)} images: {r['student, every image']:.2f} % Dice")
    print("Dice % on the images with a box (teacher / fused: from the student's boxes; at 0.5 unless noted):\n")
    print("| 10 % run | " + " | ".join(columns) + " | images with a box |\n|---|" + "---|" * (len(columns) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in columns) + f" | {r['with a box']}/{len(cases)} |")
    atomic_write_json(layout.scratch / "kd_targets.json", {
        "teacher_gt_boxes": 100 * float(np.mean(gt_box)), "teacher_gt_boxes_t_star": 100 * float(np.mean(gt_box_t)),
        "t_star": t_star, "labeled_dice_by_threshold": {str(t): 100 * d for t, d in lab_dice.items()},
        "labeled_area_ratio": area, "linear_probe": probe, "runs": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
