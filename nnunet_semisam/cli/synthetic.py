"""`nnunet-semisam make-synthetic`: write a synthetic lesion dataset in nnU-Net v2 raw format."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-synthetic",
        help="write a synthetic lesion dataset (nnU-Net raw format, with imagesUnlabeled/)",
        description="Write DatasetXXX_<Name>/ under OUT with imagesTr/labelsTr, imagesUnlabeled/, imagesTs/labelsTs "
                    "and dataset.json. Usually OUT is $nnUNet_raw, e.g.: "
                    "nnunet-semisam make-synthetic $nnUNet_raw --dataset-id 901 --kind 2d-rgb. "
                    "The same arguments give byte-identical files.",
    )
    p.add_argument("out", metavar="OUT", help="folder that receives DatasetXXX_<Name>/ (usually $nnUNet_raw)")
    p.add_argument("--dataset-id", "-d", type=int, required=True, help="nnU-Net dataset id (1..999)")
    p.add_argument("--kind", choices=("2d-rgb", "2d-mri", "3d"), default="2d-rgb",
                   help="2d-rgb: dermoscopy-like PNG; 2d-mri: FLAIR/T1/T2 2D NIfTI; 3d: 1-channel NIfTI volume "
                        "(default: %(default)s)")
    p.add_argument("--num-labeled", type=int, default=4, help="labeled training cases (default: %(default)s)")
    p.add_argument("--num-unlabeled", type=int, default=16, help="unlabeled cases (default: %(default)s)")
    p.add_argument("--num-test", type=int, default=8, help="test cases with labels (default: %(default)s)")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                   help="image size: Y X for 2D kinds, Z Y X for 3d (default: 128 128 or 32 64 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--name", default=None, help="dataset name after the id (default: SynthRGB, SynthMRI, Synth3D)")
    p.add_argument("-np", type=int, default=1, dest="num_processes",
                   help="worker processes; the output does not depend on it (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty dataset folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    folder = make_synthetic_dataset(
        args.out, args.dataset_id, kind=args.kind, num_labeled=args.num_labeled, num_unlabeled=args.num_unlabeled,
        num_test=args.num_test, shape=args.size, seed=args.seed, name=args.name,
        num_processes=args.num_processes, progress=not args.no_progress, overwrite=args.overwrite,
    )
    print(folder)
    return 0
