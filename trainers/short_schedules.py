"""Short-schedule variants of nnU-Net's own trainer, for smoke tests, the demo and benchmarks.

nnU-Net's convention (`nnUNetTrainer_5epochs`): a variant only sets schedule attributes and calls `super()`.
`nnUNetTrainer_smoke` is the supervised baseline used by this plugin's tests (2 epochs of 10 iterations);
`nnUNetTrainer_demo` the baseline of `nnunet-semisam demo`, `nnUNetTrainer_bench` that of the accuracy benchmark.
Semi-supervised trainers have their own variants with the same schedule in their modules (e.g.
`MeanTeacherTrainer_smoke`), so comparisons are like for like.

`_smoke` runs skip nnU-Net's final validation (`skip_final_validation`): it spawns two worker processes (export and
metrics), each re-importing torch and nnU-Net, about 17 s of a 40 s smoke run on 2 cores, and the tests predict the
test images with `nnUNetv2_predict` anyway. `$nnUNet_semisam_smoke_validation=1` keeps it (the DDP test checks the
validation split over ranks; `_demo` and `_bench` runs always validate).
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SMOKE = dict(num_epochs=2, num_iterations_per_epoch=10, num_val_iterations_per_epoch=3, skip_final_validation=True)
#: set to 1 to run nnU-Net's final validation in `_smoke` runs too
SMOKE_VALIDATION_ENV = "nnUNet_semisam_smoke_validation"
DEMO = dict(num_epochs=12, num_iterations_per_epoch=25, num_val_iterations_per_epoch=5)
# benchmarks/bench_medsam_mamba_kd.py: long enough that 10 % labels overfit and full labels keep improving
BENCH = dict(num_epochs=40, num_iterations_per_epoch=25, num_val_iterations_per_epoch=5)


def apply_schedule(trainer: nnUNetTrainer, schedule: dict) -> None:
    """Set nnU-Net's schedule attributes (`num_epochs`, iterations per epoch) from a dict."""
    for key, value in schedule.items():
        setattr(trainer, key, value)
    if os.environ.get(SMOKE_VALIDATION_ENV) == "1":
        trainer.skip_final_validation = False


def final_validation_skipped(trainer: nnUNetTrainer) -> bool:
    """True (with a log line) when `trainer.skip_final_validation` is set, i.e. a `_smoke` run (module docstring)."""
    if not getattr(trainer, "skip_final_validation", False):
        return False
    trainer.print_to_log_file(f"final validation skipped (smoke schedule; ${SMOKE_VALIDATION_ENV}=1 runs it)")
    return True


class nnUNetTrainer_smoke(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)


class nnUNetTrainer_demo(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class nnUNetTrainer_bench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, BENCH)
