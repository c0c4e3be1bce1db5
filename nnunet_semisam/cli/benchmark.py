"""`nnunet-semisam benchmark`: methods x label protocols x seeds, resumable, with the papers' tables (issue 15)."""
from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.benchmark import BenchmarkOptions, run_benchmark

    return run_benchmark(BenchmarkOptions(
        out=args.o, dataset=args.d, preset=args.preset, configuration=args.c, trainers=args.tr,
        fractions=args.fractions, labeled=args.labeled, seeds=args.seeds, fold=args.f, schedule=args.schedule,
        device=args.device, jobs=args.jobs, dry_run=args.dry_run, emit_slurm=args.emit_slurm,
        run_index=args.run_index, aggregate_only=args.aggregate_only, id_base=args.id_base,
        reference=not args.no_reference, num_processes=args.np, predict_workers=args.predict_workers,
        quiet=args.quiet, argv=["nnunet-semisam", *sys.argv[1:]]))


def register(sub: argparse._SubParsersAction) -> None:
    from nnunet_semisam.benchmark.presets import PRESETS
    from nnunet_semisam.benchmark.plan import SCHEDULES

    p = sub.add_parser(
        "benchmark", help="methods x label ratios x seeds: split, shared plans, train, predict, evaluate, tables",
        description="For every label protocol and seed: derive the split with split-labels (seeded, stratified), "
                    "move the full dataset's plans onto it (nnUNetv2_move_plans_between_datasets), preprocess, "
                    "train each trainer and the supervised nnUNetTrainer baseline (plus a fully labeled reference), "
                    "predict imagesTs and evaluate against labelsTs. Resumable: re-run the same command. Writes "
                    "results.csv, summary.csv, summary.md, plots/ and provenance.json to -o.",
        epilog="presets: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("-d", default=None, help="source dataset: id or name in $nnUNet_raw, or a DatasetXXX_Name folder "
                                            "(fully labeled, with imagesTs/labelsTs)")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="a table layout (values given here win)")
    p.add_argument("-c", default=None, help="configuration: 2d or 3d_fullres (default 2d)")
    p.add_argument("-tr", nargs="+", default=None, metavar="TRAINER",
                   help="trainers to compare (without schedule suffix); nnUNetTrainer is added automatically")
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="labeled fractions, e.g. 0.1 0.2")
    p.add_argument("--labeled", type=int, nargs="+", default=None, help="labeled case counts, e.g. 4 8 16")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="split seeds (default 0)")
    p.add_argument("-f", default="all", help="fold: 'all' (every labeled case trains; default) or a number")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help="trainer variant: smoke, demo, bench, 5epochs, or full (the trainer itself; default)")
    p.add_argument("-device", default="cuda", help="cuda (default), cpu or mps")
    p.add_argument("-o", required=True, metavar="OUT", help="output folder (its own nnU-Net raw/preprocessed tree)")
    p.add_argument("--dry-run", action="store_true", help="print the plan of runs and exit")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (one per GPU when several are visible)")
    p.add_argument("--emit-slurm", default=None, metavar="FILE", help="write a SLURM job-array script and exit")
    p.add_argument("--run-index", type=int, default=None, help="execute only this run of the plan (SLURM task)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables from the complete runs")
    p.add_argument("--id-base", type=int, default=900, help="first id of the derived datasets (default 900)")
    p.add_argument("--no-reference", action="store_true", help="leave out the fully labeled reference run")
    p.add_argument("-np", type=int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("--predict-workers", type=int, default=None,
                   help="nnUNetv2_predict -npp/-nps (default 0 = sequential on cpu, 3 otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
