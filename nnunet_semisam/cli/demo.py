"""`nnunet-semisam demo`: synthetic data -> plan/preprocess -> train baselines and semi-supervised trainers -> table."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.demo import DEFAULT_TRAINERS, run_demo

    run_demo(args.output, trainers=args.trainers or DEFAULT_TRAINERS, num_train=args.num_train,
             num_test=args.num_test, size=args.size, seed=args.seed, device=args.device, quiet=args.quiet)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole workflow on a synthetic 2D lesion dataset (CPU, < 10 min)",
                       description="Make a synthetic 2D lesion dataset with 10% labeled cases, plan and preprocess "
                                   "it with nnU-Net, train the supervised baseline and the semi-supervised trainers "
                                   "on short schedules with the real nnU-Net commands, predict the test set, "
                                   "evaluate, and print a comparison table. Re-running resumes.")
    p.add_argument("-o", "--output", default="nnunet_semisam_demo", help="demo folder (default ./nnunet_semisam_demo)")
    p.add_argument("-tr", "--trainers", nargs="+", default=None, help="trainers to compare")
    p.add_argument("--num-train", type=int, default=60, help="training images (10%% labeled)")
    p.add_argument("--num-test", type=int, default=12, help="test images")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--quiet", action="store_true", help="only step headers")
    p.set_defaults(func=run)
