"""The frozen teacher of a distillation trainer and its FPKDM feature path (METHODS.md §2.8, §4.1).

`KDTeacherTrainerMixin` is the teacher side of `MedSAMMambaKDTrainer`, kept out of the trainer so that the trainer
reads like its method: it checks the teacher settings at the end of the start-up checks (`preflight_checks`), loads
the teacher once (`teachers.factory.load_training_teacher`, embedding cache in the fold folder), builds the teacher
features with their projectors (`teachers.feature_side.fpkdm_pair`) and keeps the projectors in the checkpoint. The
trainer provides the settings as attributes: `teacher_spec`, `teacher_weights`, `teacher_channel`,
`teacher_input_size`, `teacher_threshold`, `use_fpkdm`, `projector_dropout`.
"""
from __future__ import annotations

import os

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.calibration import check_threshold_setting
from nnunet_semisam.teachers.factory import load_training_teacher
from nnunet_semisam.teachers.feature_side import TeacherFeatures, check_side_setting, fpkdm_pair


class KDTeacherTrainerMixin:
    """For an nnU-Net trainer with a frozen foundation-model teacher (module docstring)."""

    teacher = None
    features: TeacherFeatures | None = None
    projector = None

    def preflight_checks(self) -> None:
        """The trainer's own checks (folders, `SETTINGS`), then `check_teacher`: the teacher is loaded last."""
        super().preflight_checks()
        self.check_teacher()

    def check_teacher(self) -> None:
        """`teacher_input_size` (`teachers.feature_side`), `teacher_threshold` (`teachers.calibration`), the teacher
        channel, then the teacher itself, loaded here once (a missing, truncated or foreign
        checkpoint, or no `$SEMISAM_SAM_CHECKPOINT` for the SAM ablation, is a one-line error)."""
        name = self.__class__.__name__
        check_side_setting(self.teacher_input_size, f"{name}.teacher_input_size")
        check_threshold_setting(self.teacher_threshold, f"{name}.teacher_threshold")
        if not 0 <= int(self.teacher_channel) < self.num_image_channels:
            raise SemiSAMError(f"{name}.teacher_channel = {self.teacher_channel}: the dataset has "
                               f"{self.num_image_channels} image channel(s) ({self.dataset_json['channel_names']})")
        self.load_teacher_once()

    def load_teacher_once(self):
        """The frozen teacher with its embedding cache in the fold folder (`teachers.factory`), loaded at the first
        call (preflight, or `initialize` when resuming with `--c`)."""
        if self.teacher is None:
            self.teacher, spec = load_training_teacher(self.teacher_spec, self.teacher_weights, os.path.join(
                self.output_folder, "teacher_embeddings"), self.device)
            self.print_to_log_file(f"teacher: {spec} (model type {self.teacher.model_type}, sha1 "
                                   f"{(self.teacher.checkpoint_sha1 or '')[:12]})")
        return self.teacher

    def setup_teacher(self) -> None:
        """The teacher, and FPKDM's teacher features and projectors P_l (§4.1, `teachers.feature_side.fpkdm_pair`)."""
        self.load_teacher_once()
        if self.use_fpkdm:
            self.features, self.projector, line = fpkdm_pair(
                self.teacher, self.network, self.num_input_channels, self.configuration_manager,
                self.teacher_input_size, self.teacher_channel, self.projector_dropout, self.device)
            self.print_to_log_file(line)

    def extra_checkpoint_state(self) -> dict:
        state = super().extra_checkpoint_state()
        if self.projector is not None:
            state["projector"] = self.projector.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        if self.projector is not None and "projector" in state:
            self.projector.load_state_dict(state["projector"])
            total = sum(float(v.double().sum()) for v in self.projector.state_dict().values())
            self.print_to_log_file(f"restored FPKDM projectors (sum of weights {total:.10e})")
