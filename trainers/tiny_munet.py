"""TinyMUNetTrainer: the KD student trained by nnU-Net alone, the architecture control of MedSAMMambaKDTrainer
(METHODS.md §3.3, §4.8).

`nnUNetv2_train DATASET 2d 0 -tr TinyMUNetTrainer` trains exactly the network MedSAMMambaKDTrainer distils into
(`networks.kd_student.build_kd_student`: the planned TinyMUNet with `-p nnUNetPlans_TinyMUNet`, otherwise TinyMUNet
built for the default plans' patch size, channels and classes, per-image z-scored input, one output) with
nnU-Net's supervised loss (DC+CE, no deep supervision) on the labeled cases only, and the KD trainer's optimiser
(SGD, momentum 0.99, nesterov, lr 1e-2 with nnU-Net's poly schedule, weight decay 3e-5 except on Mamba's `A_log` and
`D`). No teacher, no unlabeled data.

Against nnUNetTrainer (PlainConvUNet) it measures what the student architecture costs or gains; against
MedSAMMambaKDTrainer on the same plans and labels, what the distillation adds. The accuracy benchmark
(`benchmarks/bench_medsam_mamba_kd.py`) reports all three side by side.
"""
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.networks.kd_student import KDStudentTrainerMixin, student_parameter_groups
from nnunet_semisam.trainers.short_schedules import (BENCH, DEMO, SMOKE, apply_schedule,
                                                    final_validation_skipped)


class TinyMUNetTrainer(KDStudentTrainerMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise SemiSAMError(f"{self.__class__.__name__} trains the 2D KD student (METHODS.md §3.3); configuration "
                               f"'{configuration}' is {len(self.configuration_manager.patch_size)}D: train '2d'")
        self.enable_deep_supervision = False  # Tiny-MUNet has a single output (§1.3)

    def configure_optimizers(self):
        """MedSAMMambaKDTrainer's SGD without its projectors: no weight decay for `A_log` and `D` (§4.6)."""
        optimizer = torch.optim.SGD(student_parameter_groups(self.network, self.weight_decay), lr=self.initial_lr,
                                    momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):  # `_smoke` only (`short_schedules`)
            super().perform_actual_validation(save_probabilities)

    def _do_i_compile(self) -> bool:
        """Off, as in MedSAMMambaKDTrainer, so that the control runs the student exactly as the KD run does."""
        return False


class TinyMUNetTrainer_smoke(TinyMUNetTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class TinyMUNetTrainer_demo(TinyMUNetTrainer):
    """The demo schedule of `nnUNetTrainer_demo`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class TinyMUNetTrainer_bench(TinyMUNetTrainer):
    """The accuracy benchmark's schedule of `nnUNetTrainer_bench` (40 epochs x 25 iterations)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, BENCH)
