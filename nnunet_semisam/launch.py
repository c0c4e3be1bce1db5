"""One nnU-Net training process, alone or as one rank of a torchrun job (METHODS.md §1.6; `nnunet-semisam train`).

`train` does what `nnUNetv2_train` does in each of its processes (nnU-Net's `run_training` / `run_ddp`), with the
process group taken from torchrun's environment instead of nnU-Net's single-node `mp.spawn`: gloo on CPU, NCCL on
CUDA with `cuda:$LOCAL_RANK`, and the trainer class given `DistributedTrainerMixin` (the device and DDP wrap of this
rank). nnU-Net's own functions do the rest (`recursive_find_trainer_class_by_name`, `maybe_load_checkpoint`,
`run_training`, `perform_actual_validation`).
"""
from __future__ import annotations

import multiprocessing
import os

import torch
import torch.distributed as dist

from nnunet_semisam.distributed import local_device, process_group_timeout, with_distributed_fixes


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_trainer(dataset_name_or_id: str, configuration: str, fold: int | str, trainer_name: str,
                  plans_identifier: str, continue_training: bool, device: torch.device):
    """The trainer `nnUNetv2_train` would build (nnU-Net's `get_trainer_from_args`), its class with the DDP fixes."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer_class = with_distributed_fixes(recursive_find_trainer_class_by_name(trainer_name))
    if not str(dataset_name_or_id).startswith("Dataset"):
        dataset_name_or_id = int(dataset_name_or_id)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset_name_or_id))
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = continue_training
    return trainer_class(plans=plans, configuration=configuration, fold=fold,
                         dataset_json=load_json(join(folder, "dataset.json")), device=device)


def train(dataset_name_or_id: str, configuration: str, fold: int | str, trainer_name: str = "nnUNetTrainer",
          plans_identifier: str = "nnUNetPlans", device: str = "cuda", pretrained_weights: str | None = None,
          export_npz: bool = False, continue_training: bool = False, only_validation: bool = False,
          val_with_best: bool = False, disable_checkpointing: bool = False) -> None:
    """Train (and validate) one fold in this process; under torchrun as one rank of the job."""
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from torch.backends import cudnn

    fold = fold if fold == "all" else int(fold)
    requested = torch.device(device)
    distributed = _launched_by_torchrun()
    if requested.type == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    else:  # the machine's cores shared by the processes of this node
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // local))
    if distributed:
        backend = "nccl" if requested.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=process_group_timeout())
        if requested.type == "cuda":
            torch.cuda.set_device(local_device(requested))
    try:
        trainer = build_trainer(dataset_name_or_id, configuration, fold, trainer_name, plans_identifier,
                                continue_training, requested)
        trainer.disable_checkpointing = disable_checkpointing
        maybe_load_checkpoint(trainer, continue_training, only_validation, pretrained_weights)
        if torch.cuda.is_available():
            cudnn.deterministic = False
            cudnn.benchmark = True
        if not only_validation:
            trainer.run_training()
        if val_with_best:
            trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
        trainer.perform_actual_validation(export_npz)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
