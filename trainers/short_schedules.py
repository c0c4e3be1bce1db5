"""Short-schedule variants of nnU-Net's own trainer, for smoke tests, the demo and benchmarks.

nnU-Net's convention (`nnUNetTrainer_5epochs`): a variant only sets schedule attributes and calls `super()`.
`nnUNetTrainer_smoke` is the supervised baseline used by this plugin's tests (2 epochs of 10 iterations);
`nnUNetTrainer_demo` the baseline of `nnunet-semisam demo`, `nnUNetTrainer_bench` that of the accuracy benchmark. Semi-supervised trainers have their own variants with the
same schedule in their modules (e.g. `MeanTeacherTrainer_smoke`), so comparisons are like for like.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SMOKE = dict(num_epochs=2, num_iterations_per_epoch=10, num_val_iterations_per_epoch=3)
DEMO = dict(num_epochs=12, num_iterations_per_epoch=25, num_val_iterations_per_epoch=5)
# benchmarks/bench_medsam_mamba_kd.py: long enough that 10 % labels overfit and full labels keep improving
BENCH = dict(num_epochs=40, num_iterations_per_epoch=25, num_val_iterations_per_epoch=5)


def apply_schedule(trainer: nnUNetTrainer, schedule: dict) -> None:
    """Set nnU-Net's schedule attributes (`num_epochs`, iterations per epoch) from a dict."""
    for key, value in schedule.items():
        setattr(trainer, key, value)


class nnUNetTrainer_smoke(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


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
