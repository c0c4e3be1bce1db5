"""Semi-SAM+ on nnU-Net (METHODS.md §5.1-5.7): Slicing-SAM3D student, foundation-model teacher, EMA, three phases.

Student: `SlicingSAM3D` (§5.2; a frozen 2D encoder per Z-slice at side `sam_slice_size`, trainable 3D decoder; the
encoder is LiteMedSAM's TinyViT, or MedSAM ViT-B from `$SEMISAM_TEACHER` in `SemiSAMPlusTrainer_medsamEncoder` /
plans key `sam_encoder`), built from the plans in `build_network_architecture`, so `nnUNetv2_predict` rebuilds it.
Per step:

- Phase 0 (warm-up, first 25 % of the epochs): `L_sup` (nnU-Net DC + CE) on the labeled batch, lr 2e-3 constant.
- Phase 1 (semi-supervised, next 50 %): `L_sup + lambda(t) L_con + beta(t) L_rs-con`. `L_con` = MSE between the
  student's softmax on the strong view and the EMA's on the weak view + clipped noise (§5.5). Algorithm 1 (§5.3): the
  coarse mask `M_c = p_s > 0.5` of the strong-view forward (the same forward feeds L_rs-con). Algorithm 2 (§5.4) on
  the weak view (rule-U uint8, `teacher_channel`) with the teacher(s), N = `n_aug` lattice transforms, mask and
  point prompts, variance filter `u_th`, giving Pseudo and M_conf; `L_rs-con` (§5.5) per foreground class.
  t = epochs since Phase 1 began; lr 2e-3 with poly 0.9 over the phase.
- Phase 2 (fine-tune, last 25 %): `L_sup + lambda_max L_con(theta'_frozen)` against the EMA frozen at the end of
  Phase 1, no foundation-model call, lr 2e-4 poly.
The EMA (alpha 0.99, over the decoder; the frozen encoder is identical) equals the student during Phase 0, so it is
theta at the start of Phase 1 (§5.6). Validation, `checkpoint_best` (by the EMA's pseudo-Dice), `checkpoint_final`
and `nnUNetv2_predict` use the EMA: `network_weights` in every checkpoint is theta'; the student, the frozen target
and the phase are in `semisam`, so `--c` resumes mid-phase. Optimizer AdamW (0.9, 0.999), wd 1e-4 (§5.7).
CPU cost: `teacher_every` runs Algorithm 2 on every k-th Phase-1 step only (steps in between have no L_rs-con term;
1 = the manual's every step), on at most `teacher_max_samples` samples of the unlabeled batch and, with
`teacher_slab` = k, on the k slices around M_c's largest slice (M_conf = 0 elsewhere); the defaults are the manual's.
Variants (`semisam_plus_variants.py`): `_offline` reads Pseudo / M_conf made beforehand by `nnunet-semisam
pseudolabel --aug N` (Algorithm 2 with prompts from a trained student) through the pseudo-label store, carried with
each unlabeled patch as extra channels (`nnunet_semisam.data.soft_targets`); no teacher runs during training.
"""
from __future__ import annotations

import numpy as np
import torch

from nnunet_semisam.distributed import unwrap
from nnunet_semisam.losses.consistency import gaussian_input_noise, softmax_mse
from nnunet_semisam.losses.semisam_plus import (beta_rampdown, lambda_rampup, phase_at, phase_bounds, phase_lr,
                                                rs_consistency)
from nnunet_semisam.networks.slicing_sam3d import SlicingSAM3D, build_slice_encoder
from nnunet_semisam.schedules import EpochLR
from nnunet_semisam.teachers.algorithm2 import algorithm2_batch
from nnunet_semisam.teachers.ema import EMATeacher
from nnunet_semisam.teachers.teacher_sets import build_teacher_set, check_teacher_set, point_mode
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer, split_batch

PHASE_NAMES = ("warm-up (labeled only)", "semi-supervised", "fine-tune against the frozen EMA")


class SemiSAMPlusTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "consistency", "rs_consistency")
    compile_network = False
    compile_off_reason = "validation and checkpoints swap in the EMA decoder"
    sam_slice_size = 64  # S of the student's encoder input; plans key `sam_slice_size` overrides (256 on a GPU)
    slice_encoder = "litemedsam"  # the frozen student encoder (`SLICE_ENCODERS`); plans key `sam_encoder` overrides
    teacher_set: tuple[str, ...] = ("litemedsam",)  # Algorithm 2 teachers (`teachers.teacher_sets`, §5.4)
    teacher_options: dict = {}  # per teacher: model configuration of a non-default checkpoint

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one output (§5.5: L_sup single output)
        self.initial_lr, self.finetune_lr, self.weight_decay = 2e-3, 2e-4, 1e-4
        self.phase_fractions = (0.25, 0.5, 0.25)  # 50 / 100 / 50 epochs of the manual
        self.ema_decay = 0.99
        self.lambda_max, self.beta_max, self.rampup_epochs, self.rampdown_epochs = 1.0, 0.3, 10.0, 40.0
        self.n_aug, self.u_th, self.teacher_channel = 4, 0.05, 0
        self.teacher_every, self.teacher_max_samples = 1, None
        self.teacher_slab: int | None = None  # None: the whole patch; k: the k slices around M_c's largest slice
        self.ema: EMATeacher | None = None
        self.frozen_target: EMATeacher | None = None
        self.teachers = None
        self.rng = np.random.default_rng(12345 + (fold if isinstance(fold, int) else 5))  # fold 'all': 12350
        self.pl_stats: list[tuple[float, float]] = []  # per teacher call: (coverage of M_conf, mean Pseudo)

    # ------------------------------------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """SlicingSAM3D with the frozen encoder `sam_encoder` at side `sam_slice_size` (plans, else the class
        defaults `slice_encoder`, `sam_slice_size`)."""
        cfg = configuration_manager.configuration
        size = int(cfg.get("sam_slice_size", cls.sam_slice_size))
        encoder = build_slice_encoder(str(cfg.get("sam_encoder", cls.slice_encoder)), size)
        return SlicingSAM3D(encoder, num_output_channels, size, sam_channel=int(cfg.get("sam_channel", 0)))

    def set_deep_supervision_enabled(self, enabled: bool):
        """No deep supervision in this network."""

    def initialize(self):
        super().initialize()
        self.ema = EMATeacher(self.network, self.ema_decay, warmup=False).to(self.device)
        self.print_to_log_file(unwrap(self.network).parameter_report())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(unwrap(self.network).decoder_parameters(), lr=self.initial_lr, betas=(0.9, 0.999),
                                weight_decay=self.weight_decay)
        return opt, EpochLR(opt, lambda epoch: phase_lr(epoch, self.num_epochs, self.phase_fractions,
                                                        self.initial_lr, self.finetune_lr))

    # ------------------------------------------------------------------------------------------------ teachers
    def preflight_checks(self) -> None:
        """The base checks, then the teacher set: known names, their checkpoint variables and files (one line)."""
        super().preflight_checks()
        check_teacher_set(self.teacher_set)

    def build_teachers(self) -> list:
        """The Algorithm 2 teachers of `teacher_set` (default: LiteMedSAM slice-wise, the reference 256 path, §2.8)."""
        teachers = build_teacher_set(self.teacher_set, self.device, self.teacher_options)
        self.print_to_log_file(f"Algorithm 2 teachers: {', '.join(self.teacher_set)} ({2 * len(teachers)}N masks, "
                               f"points {point_mode(self.teacher_set)})")
        return teachers

    def teacher_volume(self, x: np.ndarray) -> np.ndarray:
        """(C, Z, Y, X) weak view -> rule-U uint8-valued float volume (Z, Y, X) of `teacher_channel` (§2.4)."""
        from nnunet_semisam.teachers.uint8_adapter import to_uint8
        u8 = to_uint8(x, self.configuration_manager.normalization_schemes, self.teacher_channel,
                      self.plans_manager.plans.get("foreground_intensity_properties_per_channel"))
        return u8.astype(np.float32) if u8.ndim == 3 else u8[..., 0].astype(np.float32)

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def phase(self) -> int:
        return phase_at(self.current_epoch, self.num_epochs, self.phase_fractions)

    def epochs_in_phase1(self) -> float:
        """t of §5.5: epochs (fractional) since Phase 1 began."""
        e1, _ = phase_bounds(self.num_epochs, self.phase_fractions)
        return (self.global_step - e1 * self.num_iterations_per_epoch) / self.num_iterations_per_epoch

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.phase == 2 and self.frozen_target is None:  # theta'_frozen = the EMA at the end of Phase 1
            self.frozen_target = EMATeacher(self.ema.model, 0.0, warmup=False).to(self.device)
            self.print_to_log_file("Semi-SAM+: Phase 1 done; EMA frozen as the Phase-2 target")
        self.print_to_log_file(f"Semi-SAM+ phase {self.phase}: {PHASE_NAMES[self.phase]}")
        self.pl_stats = []

    # ------------------------------------------------------------------------------------------------ losses
    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        phase, n = self.phase, data.shape[0]
        if phase == 0:
            return {"supervised": (1.0, self.loss(self.network(data), target))}
        x_u = self.student_view(batch_u)
        out_l, out_u = split_batch(self.network(torch.cat([data, x_u], 0)), n)
        terms: LossTerms = {"supervised": (1.0, self.loss(out_l, target))}
        noisy_weak = gaussian_input_noise(batch_u["weak"])
        if phase == 2:
            terms["consistency"] = (self.lambda_max, softmax_mse(out_u, self.frozen_target(noisy_weak)))
            return terms
        t = self.epochs_in_phase1()
        terms["consistency"] = (lambda_rampup(t, self.lambda_max, self.rampup_epochs),
                                softmax_mse(out_u, self.ema(noisy_weak)))
        rs = self.rs_consistency_now(out_u, batch_u)
        if rs is not None:
            terms["rs_consistency"] = (beta_rampdown(t, self.beta_max, self.rampdown_epochs), rs)
        return terms

    def rs_consistency_now(self, logits_u: torch.Tensor, batch_u: dict) -> torch.Tensor | None:
        """L_rs-con of this Phase-1 step, or None on steps where the teacher does not run (`teacher_every`)."""
        step_in_phase = self.global_step - phase_bounds(self.num_epochs, self.phase_fractions)[0] * \
            self.num_iterations_per_epoch
        if step_in_phase % max(1, self.teacher_every):
            return None
        return self.rs_consistency_term(logits_u, batch_u["weak"])

    def rs_consistency_term(self, logits_u: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
        """Algorithm 1 (M_c = the strong-view argmax; binary: p_fg > 0.5), Algorithm 2 on the weak view inside
        `teacher_slab`, L_rs-con (§5.3-5.5) per foreground class, averaged over the classes."""
        if self.teachers is None:
            self.teachers = self.build_teachers()
        probs = torch.softmax(logits_u.float(), 1)
        m = probs.shape[0] if self.teacher_max_samples is None else min(probs.shape[0], self.teacher_max_samples)
        labels = probs[:m].detach().argmax(1).cpu().numpy()
        volumes = [self.teacher_volume(w) for w in weak[:m].detach().float().cpu().numpy()]
        losses = []
        for c in range(1, probs.shape[1]):
            pseudo, conf = algorithm2_batch(volumes, labels == c, self.teachers, self.rng, slab=self.teacher_slab,
                                            n_aug=self.n_aug, u_th=self.u_th, point_mode=point_mode(self.teacher_set))
            self.pl_stats += [(float(k.mean()), float(p[k].mean()) if k.any() else 0.0) for p, k in zip(pseudo, conf)]
            losses.append(rs_consistency(probs[:m, c], torch.from_numpy(pseudo).to(probs.device),
                                         torch.from_numpy(conf).to(probs.device)))
        return torch.stack(losses).mean()

    def after_optimizer_step(self) -> None:
        if self.phase == 0:  # theta' = theta until Phase 1 starts (§5.6)
            self.ema.model.load_state_dict(unwrap(self.network).state_dict())
        else:
            self.ema.update(self.network, self.global_step)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.pl_stats:
            cov = np.mean([s[0] for s in self.pl_stats])
            self.print_to_log_file(f"Semi-SAM+ pseudo-labels: {len(self.pl_stats)} sample(s), confident coverage "
                                   f"{cov:.4f}")

    # ------------------------------------------------------------------------------------------------ EMA everywhere
    def validation_step(self, batch: dict) -> dict:
        student, self.network = self.network, self.ema.model
        try:
            return super().validation_step(batch)
        finally:
            self.network = student

    def perform_actual_validation(self, save_probabilities: bool = False):
        unwrap(self.network).load_state_dict(self.ema.model.state_dict())  # the final model is theta' (§5.6)
        super().perform_actual_validation(save_probabilities)

    def save_checkpoint(self, filename: str) -> None:
        self._student_state = {k: v.detach().cpu().clone() for k, v in unwrap(self.network).state_dict().items()}
        student, self.network = self.network, self.ema.model
        try:
            super().save_checkpoint(filename)  # network_weights = theta'
        finally:
            self.network, self._student_state = student, None

    def extra_checkpoint_state(self) -> dict:
        state = {**super().extra_checkpoint_state(), "phase": self.phase,
                 "student": self._student_state or unwrap(self.network).state_dict()}
        if self.frozen_target is not None:
            state["frozen_target"] = self.frozen_target.model.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.ema.model.load_state_dict(unwrap(self.network).state_dict())  # network_weights held theta'
        unwrap(self.network).load_state_dict(state["student"])
        if "frozen_target" in state:
            self.frozen_target = EMATeacher(self.ema.model, 0.0, warmup=False).to(self.device)
            self.frozen_target.model.load_state_dict(state["frozen_target"])
        self.print_to_log_file(f"Semi-SAM+ resumed in phase {state['phase']} at t_it={self.global_step}; EMA, "
                               f"student{' and frozen target' if 'frozen_target' in state else ''} restored")
