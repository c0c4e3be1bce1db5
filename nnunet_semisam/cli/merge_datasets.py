"""`nnunet-semisam merge-datasets`: one multi-task nnU-Net raw dataset from several (VerSemi, METHODS.md §6.1)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-datasets",
        help="merge several nnU-Net raw datasets into one multi-task dataset (VerSemi)",
        description="Write $nnUNet_raw/DatasetYYY_<NAME>/ from the source datasets: task k = k-th source, each "
                    "labeled case keeps its own task's mask (value k), images are normalised per source as nnU-Net "
                    "would for that source alone, a last constant input channel carries the task id, and "
                    "versemi_tasks.json records the task of every case. Example: "
                    "nnunet-semisam merge-datasets -d 11 12 13 -o 20 --name Multi",
    )
    p.add_argument("-d", "--datasets", nargs="+", required=True, metavar="ID",
                   help="source dataset ids or names, in task order (task 1 = first)")
    p.add_argument("-o", "--output-id", type=int, required=True, help="id of the merged dataset (1..999)")
    p.add_argument("--name", required=True, help="name of the merged dataset (DatasetYYY_<NAME>)")
    p.add_argument("--prefix-cases", action="store_true",
                   help="prefix every case name with t<task>_ (needed when sources share case names)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged dataset")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)

    q = sub.add_parser(
        "versemi-inputs",
        help="new images of one task -> inputs of a merged dataset's VerSemi model (normalised + task channel)",
        description="Normalise new images (source format, CASE_XXXX<ending>) as merge-datasets normalised their "
                    "task's source and add the task channel, so that nnUNetv2_predict -d MERGED -tr VerSemiTrainer "
                    "prompts them with TASK. Example: nnunet-semisam versemi-inputs -d 20 --task 2 -i new -o new_in",
    )
    q.add_argument("-d", "--dataset", required=True, help="the merged dataset (id or name)")
    q.add_argument("--task", type=int, required=True, help="task id of the images (1..K)")
    q.add_argument("-i", "--input", required=True, help="folder of new images in the task source's format")
    q.add_argument("-o", "--output", required=True, help="folder for the model inputs (NIfTI)")
    q.set_defaults(func=run_inputs)


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.merge_datasets import merge_datasets

    folder = merge_datasets(args.datasets, args.output_id, args.name, prefix_cases=args.prefix_cases,
                            overwrite=args.overwrite, progress=not args.no_progress)
    print(folder)
    return 0


def run_inputs(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.merge_datasets import prepare_images

    ids = prepare_images(args.dataset, args.task, args.input, args.output)
    print(f"{len(ids)} case(s) -> {args.output}")
    return 0
