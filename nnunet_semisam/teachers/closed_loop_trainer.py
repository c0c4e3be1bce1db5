"""The trainer side of the closed pseudo-label loop (METHODS.md §4.5).

`ClosedLoopTrainerMixin` runs `teachers.closed_loop.ClosedLoopTargets` inside an nnU-Net trainer that reads its
targets through `data.soft_targets.SoftTargetTrainerMixin`, kept out of `MedSAMMambaKDTrainer` so that the trainer
reads like its method:

- the two target stores live in the fold folder: `pseudolabels/labeled` (GT-box maps of the training cases) and
  `pseudolabels/unlabeled` (the maps of the last refresh);
- `start_closed_loop` (from the trainer's `on_train_start`) computes the labeled targets, or reuses them, and the
  teacher threshold (`teacher_threshold`: a number, or "calibrate" for t* from the labels; restored by `--c`);
- a refresh runs at the start of joint epochs `pl_start`, `pl_start + pl_every`, ... (joint epoch = epoch -
  `init_epochs`): the student's sliding-window foreground gives boxes, the teacher re-segments every unlabeled case
  from cached embeddings, and the unlabeled loader restarts so that no batch carries the old maps;
- the round number and the threshold are checkpoint state; the round is also logged per epoch;
- `preflight_checks` refuses a negative `student_box_margin` (one-line error) before the teacher is loaded.

The trainer provides `teacher` (loaded), `init_epochs`, `pl_start`, `pl_every`, `teacher_threshold`,
`teacher_channel`, `student_box_margin`, `student_box_refine` and `student_fusion`.
"""
from __future__ import annotations

import os
from typing import Sequence

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.closed_loop import ClosedLoopTargets
from nnunet_semisam.teachers.pseudolabels import CaseSource


class ClosedLoopTrainerMixin:
    """For a soft-target trainer with a frozen teacher whose unlabeled targets are refreshed in training (module
    docstring)."""

    targets: ClosedLoopTargets | None = None
    threshold: float | None = None  # the teacher threshold in use (t* once calibrated)
    pl_round = 0  # closed-loop rounds completed

    def preflight_checks(self) -> None:
        """The checks of the classes after this one (the trainer's own), then the loop's box margin."""
        super().preflight_checks()
        if int(self.student_box_margin) < 0:
            raise SemiSAMError(f"{self.__class__.__name__}.student_box_margin = {self.student_box_margin}: must be "
                               ">= 0 px")

    def _term_log_keys(self) -> list[str]:  # registered with nnU-Net's logger at construction
        return [*super()._term_log_keys(), "pseudolabel_round"]

    @property
    def targets_root(self) -> str:
        return os.path.join(self.output_folder, "pseudolabels")

    @property
    def labeled_store_folder(self) -> str:  # training cases carry their GT-box teacher maps
        return os.path.join(self.targets_root, "labeled")

    @property
    def unlabeled_store_folder(self) -> str:
        return os.path.join(self.targets_root, "unlabeled")

    def start_closed_loop(self, labeled_ids: Sequence[str]) -> None:
        """The loop's stores, the labeled cases' GT-box targets and the teacher threshold (each logged)."""
        self.targets = ClosedLoopTargets(
            self.teacher, self.targets_root, self.configuration_manager.normalization_schemes,
            self.plans_manager.foreground_intensity_properties_per_channel, self.teacher_channel,
            log=self.print_to_log_file, box_refine_rounds=self.student_box_refine, student_fusion=self.student_fusion,
            box_margin=self.student_box_margin)
        labeled = [CaseSource(k, self.preprocessed_dataset_folder, True) for k in labeled_ids]
        self.print_to_log_file(self.targets.labeled_start(labeled))
        if self.threshold is None:  # not restored by `--c`
            self.threshold, line = self.targets.teacher_threshold(self.teacher_threshold, labeled)
            self.print_to_log_file(line)
        self.targets.fusion_threshold = self.threshold  # fused maps recalibrate to max(q', p_s) (§4.5)

    def is_refresh_epoch(self, epoch: int) -> bool:
        """Joint epochs pl_start, pl_start + pl_every, ... (§4.5)."""
        joint = epoch - self.init_epochs
        return joint >= self.pl_start and (joint - self.pl_start) % self.pl_every == 0

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.is_refresh_epoch(self.current_epoch):
            self.refresh_pseudolabels()

    def refresh_pseudolabels(self) -> None:
        """One closed-loop round: student boxes -> teacher (cached embeddings) for every unlabeled case."""
        cases = [CaseSource(k, self.unlabeled_folder, False) for k in self.unlabeled_cases]
        self.print_to_log_file(f"pseudo-label round {self.pl_round + 1}: student boxes -> teacher for {len(cases)} "
                               "unlabeled cases")
        self.print_to_log_file(self.targets.student_round(
            self.network, cases, self.pl_round + 1, plans_manager=self.plans_manager,
            configuration_manager=self.configuration_manager, dataset_json=self.dataset_json,
            trainer_name=self.__class__.__name__, device=self.device))
        self.restart_unlabeled_loader()  # batches prepared before the refresh carry the old maps
        self.pl_round += 1

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self.logger.log("pseudolabel_round", self.pl_round, self.current_epoch)

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "pseudolabel_round": self.pl_round,
                "teacher_threshold": self.threshold}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.pl_round, self.threshold = int(state["pseudolabel_round"]), state.get("teacher_threshold")
        self.print_to_log_file(f"restored pseudo-label round {self.pl_round}, teacher threshold {self.threshold}")
