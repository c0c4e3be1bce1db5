"""Variants of `SemiSAMPlusTrainer` (METHODS.md §5), as plain subclasses: the offline pseudo-label variant (§5.4),
one per Algorithm 2 teacher set (§5.4), the MedSAM ViT-B student encoder (§5.2) and the short schedules."""
from __future__ import annotations

import torch

from nnunet_semisam.data.soft_targets import SoftTargetTrainerMixin
from nnunet_semisam.losses.semisam_plus import offline_rs_consistency
from nnunet_semisam.trainers.semisam_plus import SemiSAMPlusTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, apply_schedule


class SemiSAMPlusTrainer_offline(SoftTargetTrainerMixin, SemiSAMPlusTrainer):
    """L_rs-con against the stored pseudo-labels of `nnunet-semisam pseudolabel --aug N` (same plans and
    configuration), on every Phase-1 step; the rest is `SemiSAMPlusTrainer`."""

    @property
    def unlabeled_store_folder(self) -> str:
        from nnunet_semisam.data.pseudolabel_store import pseudolabel_folder
        return str(pseudolabel_folder(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                      self.configuration_name))

    def preflight_checks(self) -> None:
        import os
        from nnunet_semisam.errors import SemiSAMError
        super().preflight_checks()
        store = self.unlabeled_store_folder
        if not os.path.isfile(os.path.join(store, "manifest.json")):
            raise SemiSAMError(f"{store} holds no pseudo-labels: run nnunet-semisam pseudolabel -d "
                               f"{self.dataset_id} -c {self.configuration_name} -p {self.plans_manager.plans_name} "
                               "--cases unlabeled --prompts student --aug 4 first")

    def rs_consistency_now(self, logits_u: torch.Tensor, batch_u: dict) -> torch.Tensor:
        """L_rs-con against the stored Pseudo / M_conf (foreground = 1 - p_background), every Phase-1 step."""
        p_fg = 1 - torch.softmax(logits_u.float(), 1)[:, 0]
        loss, share = offline_rs_consistency(p_fg, batch_u["extra"])
        self.pl_stats.append((share, 0.0))
        return loss


class SemiSAMPlusTrainer_medsam(SemiSAMPlusTrainer):
    """MedSAM ViT-B slice-wise from `$SEMISAM_TEACHER` (§5.4 teacher sets)."""
    teacher_set = ("medsam",)


class SemiSAMPlusTrainer_samMed3d(SemiSAMPlusTrainer):
    """SAM-Med3D from `$SEMISAM_SAM_MED3D`, the manual's default teacher (2N masks)."""
    teacher_set = ("sam-med3d",)


class SemiSAMPlusTrainer_medsam2(SemiSAMPlusTrainer):
    """LiteMedSAM + MedSAM2 from `$SEMISAM_MEDSAM2` (4N masks)."""
    teacher_set = ("litemedsam", "medsam2")


class SemiSAMPlusTrainer_samMed3d_medsam2(SemiSAMPlusTrainer):
    """SAM-Med3D + MedSAM2, the manual's full setting (4N masks)."""
    teacher_set = ("sam-med3d", "medsam2")


class SemiSAMPlusTrainer_medsamEncoder(SemiSAMPlusTrainer):
    """The manual's student: MedSAM ViT-B (`$SEMISAM_TEACHER`, a local checkpoint) as the frozen slice encoder at
    S = 256 (§5.2: pos_embed resized to 16 x 16, three up-stages); a GPU-sized setting."""
    slice_encoder = "medsam"
    sam_slice_size = 256


class SemiSAMPlusTrainer_smoke(SemiSAMPlusTrainer):
    """4 epochs x 3 iterations (phases: epoch 0 / 1-2 / 3), slice size 16, one teacher call per Phase-1 epoch on one
    sample, a 2-slice slab, N = 1: the mechanics in about a minute on a CPU, for tests."""
    sam_slice_size = 16

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, dict(num_epochs=4, num_iterations_per_epoch=3, num_val_iterations_per_epoch=1))
        self.rampup_epochs, self.rampdown_epochs = 1.0, 4.0
        self.n_aug, self.teacher_every, self.teacher_max_samples, self.teacher_slab = 1, 3, 1, 2

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.inference_allowed_mirroring_axes = None  # no test-time mirroring in the final validation: 8x fewer passes
        super().perform_actual_validation(save_probabilities)


class SemiSAMPlusTrainer_offline_smoke(SemiSAMPlusTrainer_offline, SemiSAMPlusTrainer_smoke):
    """`_offline` on the smoke schedule (the stored pseudo-labels instead of the teacher), for tests."""


class SemiSAMPlusTrainer_demo(SemiSAMPlusTrainer):
    """The schedule of `nnUNetTrainer_demo`, slice size 32, the teacher every 5th Phase-1 step, N = 2."""
    sam_slice_size = 32

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)
        self.rampup_epochs, self.rampdown_epochs = 2.0, 8.0
        self.n_aug, self.teacher_every, self.teacher_max_samples, self.teacher_slab = 2, 5, 1, 4
