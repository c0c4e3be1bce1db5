"""`nnunet-semisam convert` (public dataset -> nnU-Net raw dataset) and `nnunet-semisam split-labels` (label ratios)."""
from __future__ import annotations

import argparse

FORMATS = ("kvasir", "ham10000", "msd-brats2d", "la-h5", "pancreas-ct", "msd")


def run_convert(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.converters import convert_dataset

    convert_dataset(args.format, args.source, args.dataset_id, name=args.name, out_root=args.output,
                    seed=args.seed, resize=args.resize, test_fraction=args.test_fraction, num_test=args.num_test,
                    max_cases=args.max_cases, empty_fraction=args.empty_fraction, num_processes=args.np,
                    progress=not args.quiet)
    return 0


def run_split_labels(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.split_labels import resolve_raw_dataset, split_labels

    split_labels(resolve_raw_dataset(args.d), fraction=args.fraction, num_labeled=args.num_labeled, seed=args.seed,
                 force=args.force, by_case=args.by_case, num_processes=args.np, progress=not args.quiet,
                 clean_preprocessed=args.clean_preprocessed)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a public dataset (Kvasir-SEG, HAM10000, MSD, LA h5, Pancreas-CT) to nnU-Net raw",
        description="Convert a public dataset in its documented on-disk layout into $nnUNet_raw/DatasetNNN_Name "
                    "(imagesTr/labelsTr, imagesTs/labelsTs, dataset.json) with the seed papers' train/test split, "
                    "recorded in conversion.json. Rerun the same command to resume an interrupted conversion.")
    p.add_argument("format", choices=FORMATS, help="source dataset format")
    p.add_argument("source", metavar="SOURCE_DIR", help="folder holding the dataset as downloaded")
    p.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, required=True, help="nnU-Net dataset id N")
    p.add_argument("--name", default=None, help="dataset name (default: per format, e.g. KvasirSEG, Spleen)")
    p.add_argument("-o", "--output", default=None,
                   help="folder that receives DatasetNNN_Name (default: $nnUNet_raw)")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="2D formats: resize to S x S (bilinear images, nearest masks); [KD] uses 256. Off by default")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split and subsets (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--test-fraction", type=float, default=None, help="test share (default: the paper's split)")
    g.add_argument("--num-test", type=int, default=None, help="number of test cases (default: the paper's split)")
    p.add_argument("--max-cases", type=int, default=None,
                   help="seeded subset of the source before splitting ([KD] HAM10000: 6000)")
    p.add_argument("--empty-fraction", type=float, default=0.1,
                   help="msd-brats2d: share of tumour-free brain slices kept per patient (default 0.1)")
    p.add_argument("-np", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)

    s = sub.add_parser(
        "split-labels", help="keep a fraction/number of training cases labeled, move the rest to imagesUnlabeled",
        description="Produce the papers' label ratios (10%, 20%; 4, 6, 8 labeled volumes) from a fully labeled raw "
                    "dataset: seeded and stratified by lesion size (lesion-free cases included), whole patients for "
                    "sliced 3D data. Unlabeled images go to imagesUnlabeled/, their labels to "
                    "labelsUnlabeled_heldout/ (never read by training); the plan is split_labels.json.")
    s.add_argument("-d", required=True, help="dataset id or name under $nnUNet_raw")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="share of training units kept labeled, e.g. 0.1")
    g.add_argument("--num-labeled", type=int, help="number of training units kept labeled, e.g. 4")
    s.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    s.add_argument("--force", action="store_true", help="restore a previous split first, then split again")
    s.add_argument("--by-case", action="store_true",
                   help="count and pick cases even when conversion.json groups them by patient")
    s.add_argument("--clean-preprocessed", action="store_true",
                   help="when $nnUNet_preprocessed/DatasetXXX already holds preprocessed training cases or "
                        "splits_final.json (preprocessed before the split), delete the moved cases and "
                        "splits_final.json from it instead of refusing")
    s.add_argument("-np", type=int, default=1, help="processes for reading labels (default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run_split_labels)
