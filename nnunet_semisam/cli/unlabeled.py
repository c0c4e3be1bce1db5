"""`nnunet-semisam preprocess-unlabeled` and `nnunet-semisam verify-unlabeled` (unlabeled cases of a dataset)."""
from __future__ import annotations

import argparse


def run_preprocess(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.unlabeled import preprocess_unlabeled, unlabeled_preprocessed_folder

    for c in args.c:
        r = preprocess_unlabeled(args.d, c, plans_identifier=args.p, num_processes=args.np,
                                 verify=not args.no_verify, overwrite=args.overwrite, progress=not args.quiet,
                                 transductive=args.transductive)
        folder = unlabeled_preprocessed_folder(args.d, args.p, c)
        notes = [f"{len(r.changed)} redone because their raw files changed"] if r.changed else []
        notes += [f"{len(r.removed)} removed (no longer in imagesUnlabeled/)"] if r.removed else []
        print(f"{c}: preprocessed {len(r.processed)} unlabeled case(s) now" + (f" ({'; '.join(notes)})" if notes
              else "") + f"; {r.num_done} of {r.num_expected} done; folder {folder}")
        if args.transductive:
            print(f"{c}: transductive: unlabeled cases may be the test images (imagesTs), as requested")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.nnunet_paths import raw_dataset_folder
    from nnunet_semisam.data.unlabeled import verify_unlabeled

    n = verify_unlabeled(raw_dataset_folder(args.d), num_processes=args.np, require_nonempty=True,
                         progress=not args.quiet, transductive=args.transductive)
    print(f"imagesUnlabeled OK: {n} case(s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess-unlabeled", help="preprocess imagesUnlabeled/ with the plans' preprocessing",
                       description="Apply exactly the plans' preprocessing to the dataset's imagesUnlabeled/ cases "
                                   "and store them next to the labeled preprocessed data "
                                   "(<data_identifier>_unlabeled). "
                                   "Re-running skips finished cases whose raw files are unchanged, redoes changed "
                                   "ones and removes cases no longer in imagesUnlabeled/.")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", nargs="+", default=["2d"], help="configuration(s), default 2d")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, default nnUNetPlans")
    p.add_argument("-np", type=int, default=1, help="number of worker processes")
    p.add_argument("--overwrite", action="store_true", help="rebuild the folder from scratch")
    p.add_argument("--no-verify", action="store_true", help="skip the integrity check of imagesUnlabeled/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--transductive", action="store_true",
                   help="allow unlabeled cases that are also test cases (imagesTs): transductive use, recorded in "
                        "the manifest and stated in the training log")
    p.set_defaults(func=run_preprocess)

    v = sub.add_parser("verify-unlabeled", help="integrity check of imagesUnlabeled/",
                       description="Check naming, file ending, channel count, readable geometry and NaN/Inf of "
                                   "every case in imagesUnlabeled/.")
    v.add_argument("-d", required=True, help="dataset id or name")
    v.add_argument("-np", type=int, default=1, help="number of worker processes")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--transductive", action="store_true", help="allow unlabeled cases that are also imagesTs cases")
    v.set_defaults(func=run_verify)
