"""`nnunet-semisam evaluate PRED GT`: Dice, Jaccard, HD, HD95, ASD (mm and voxels) of a prediction folder
(METHODS.md §9)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.evaluation.metrics import evaluate_folders

    result = evaluate_folders(args.pred, args.gt, labels=args.labels, output_dir=args.o, empty_mode=args.empty_mode,
                              num_processes=args.np, file_ending=args.file_ending, progress=not args.quiet)
    print(result["markdown"], end="")
    files = result["files"]
    print(f"{result['n_cases']} case(s), empty mode {result['empty_mode']}; wrote {files['json']}, {files['csv']}, "
          f"{files['md']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="segmentation metrics of a prediction folder against a reference folder",
        description="Compare each reference segmentation in GT with the same-named file in PRED: Dice, Jaccard and "
                    "medpy-compatible HD, HD95, ASD (prediction to reference), ASSD, in mm and in voxels, per label. "
                    "Writes metrics.json, metrics.csv and metrics.md (table of the means) to -o (default PRED).")
    p.add_argument("pred", metavar="PRED", help="folder of predicted segmentations")
    p.add_argument("gt", metavar="GT", help="folder of reference segmentations (e.g. labelsTs)")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="foreground labels to evaluate (default: dataset.json in PRED or GT, else all labels > 0 "
                        "found in GT)")
    p.add_argument("-o", default=None, metavar="OUTDIR", help="output folder (default PRED)")
    p.add_argument("--empty-mode", choices=["strict", "paper"], default="strict",
                   help="empty-mask convention: strict = image-diagonal penalty (default), paper = SSL4MIS/VerSemi")
    p.add_argument("-np", type=int, default=1, help="number of worker processes (default 1)")
    p.add_argument("--file-ending", default=None,
                   help="segmentation file ending, e.g. .nii.gz (default: dataset.json, else the files in GT)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
