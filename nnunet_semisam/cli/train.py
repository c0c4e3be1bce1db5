"""`nnunet-semisam train`: nnU-Net's training command for torchrun, any number of processes and nodes (METHODS.md §1.6).

Same arguments as `nnUNetv2_train` (without `-num_gpus`: torchrun decides the process count). Launched by torchrun
(`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT` in the environment: `env://` rendezvous) it joins the
process group (NCCL on CUDA, gloo on CPU; collectives wait `$nnUNet_semisam_ddp_timeout_min`, default 6 h), puts this
process on `cuda:$LOCAL_RANK`, and runs nnU-Net's own loop (`maybe_load_checkpoint`, `run_training`, the final
validation) with any trainer of this plugin or nnU-Net's own (`distributed.with_distributed_fixes`). Started without
torchrun it is `nnUNetv2_train` on one device. `nnUNet_extTrainer` defaults to this plugin's trainers.
"""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="nnUNetv2_train for torchrun: DDP over any number of processes / nodes, GPU or CPU",
        description="nnUNetv2_train's arguments; launch with torchrun for multi-GPU / multi-node training, e.g. "
                    "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
                    "$(which nnunet-semisam) train 990 2d 0 -tr MeanTeacherTrainer")
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold", help="0-4 or all")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class (this plugin's or nnU-Net's)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to start from")
    p.add_argument("--npz", action="store_true", help="save softmax predictions of the final validation")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint (any number of processes)")
    p.add_argument("--val", action="store_true", help="only run the final validation")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (NCCL, one GPU per process) or cpu (gloo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.cli.trainers_path import trainers_path
    from nnunet_semisam.launch import train

    os.environ.setdefault("nnUNet_extTrainer", trainers_path())
    train(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.device,
          pretrained_weights=args.pretrained_weights, export_npz=args.npz, continue_training=args.c,
          only_validation=args.val, val_with_best=args.val_best, disable_checkpointing=args.disable_checkpointing)
    return 0
