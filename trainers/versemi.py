"""VerSemi (seed 002): one nnU-Net model over several datasets, task-prompted head, CutMix synthetic task
(METHODS.md §6).

Data: a dataset made by `nnunet-semisam merge-datasets` (§6.1): labels background / task 1..K / union K+1, the
task id of every case in `versemi_tasks.json`, a last constant task channel. Network (§6.2): nnU-Net's plans
network with the dynamic head (`networks.dynamic_head`), no deep supervision. Each step (§6.3-6.5), with the labeled
batch x_l (own tasks t, binary masks y), its halves a/b and the unlabeled batch x_u (nnU-Net's full augmentation):

    M ~ context_mask(r),  r = 2/3 in phase A, r ~ U(0.3, 0.6) in phase B;  x_mix = mix(x_a, x_b, M)
    phase A:  L = L_sup + L_syn + L_aux
    phase B:  L = L_sup + L_syn + L_aux + w(t) (L_u + L_mixlab),  x_cu = mix(x_u, x_l, M_u),  w = sigmoid ramp
              over the first 5 % of phase B

The backbone runs once over [x_l; x_mix; x_cu]; only the head is re-applied per prompt (§6.5). Phase A is the
first half of the run (by optimizer step, so `--c` resumes in the right phase). Adam(1e-3, betas (0.5, 0.999),
wd 0), constant learning rate. Validation and `nnUNetv2_predict` prompt each case with its task channel (or
`$nnUNet_semisam_versemi_task`, §6.6).
"""
from __future__ import annotations

import os
import shutil

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_semisam.data.merge_datasets import SIDECAR, load_sidecar
from nnunet_semisam.distributed import per_rank_share
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.versemi import (aggregated_target, aux_loss, context_mask, fg_prob, mix, mix_ratio,
                                           mixlab_loss, supervised_loss, synthetic_loss, unlabeled_loss)
from nnunet_semisam.networks.dynamic_head import TASK_ENV, versemi_network
from nnunet_semisam.schedules import sigmoid_rampup
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


class VerSemiTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "synthetic", "aux", "unlabeled", "mixlab")
    compile_network = False
    compile_off_reason = "the training step calls the dynamic head with several prompt groups"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # the dynamic head has one full-resolution output (§6.2)
        self.initial_lr = 1e-3  # Adam, constant (§6.5)
        self.adam_betas = (0.5, 0.999)
        self.weight_decay = 0.0
        self.phase_a_fraction = 0.5  # phase A: first half of the run (§6.5)
        self.rampup_fraction_b = 0.05  # w(t): sigmoid ramp over the first 5 % of phase B (§6.4)
        self.tasks: dict | None = None  # versemi_tasks.json

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """nnU-Net's plans network + dynamic head; K = labels - 2 (background, tasks, union)."""
        return versemi_network(configuration_manager, num_input_channels, num_output_channels)

    def set_deep_supervision_enabled(self, enabled: bool):
        """No deep-supervision outputs to switch (the head replaces the seg layers)."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, betas=self.adam_betas,
                                     weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)  # constant

    # ------------------------------------------------------------------------------------------------ tasks
    def preflight_checks(self) -> None:
        super().preflight_checks()
        raw = os.path.join(os.environ.get("nnUNet_raw", ""), self.plans_manager.dataset_name, SIDECAR)
        copy = os.path.join(self.preprocessed_dataset_folder_base, SIDECAR)
        if os.path.isfile(raw):
            if self.local_rank == 0:
                tmp = f"{copy}.tmp-{os.getpid()}"
                shutil.copyfile(raw, tmp)
                os.replace(tmp, copy)  # next to the preprocessed data, so training works without nnUNet_raw
        elif not os.path.isfile(copy):
            raise SemiSAMError(f"{raw} does not exist (nor {copy}): VerSemiTrainer needs a dataset made by "
                               f"`nnunet-semisam merge-datasets`")
        self.tasks = load_sidecar(os.path.dirname(raw if os.path.isfile(raw) else copy))
        heads = self.label_manager.num_segmentation_heads
        if heads != self.tasks["num_tasks"] + 2 or self.tasks["task_channel"] != self.num_image_channels - 1:
            raise SemiSAMError(f"{SIDECAR} says {self.tasks['num_tasks']} tasks and task channel "
                               f"{self.tasks['task_channel']}, but dataset.json has {heads} labels and "
                               f"{self.num_image_channels} channels: re-run merge-datasets")
        missing = sorted(set(self.labeled_case_ids()) - set(self.tasks["cases"]))
        if missing:
            raise SemiSAMError(f"labeled case {missing[0]!r} has no task id in {SIDECAR}")
        if per_rank_share(self.configuration_manager.batch_size) < 2:
            raise SemiSAMError(f"VerSemi mixes pairs of labeled samples: the plans' batch size "
                               f"{self.configuration_manager.batch_size} leaves fewer than 2 per process, need at "
                               f"least 2")
        if os.environ.get(TASK_ENV):
            self.print_to_log_file(f"{TASK_ENV}={os.environ[TASK_ENV]}: validation prompts that task")

    def task_ids(self, keys) -> torch.Tensor:
        return torch.tensor([int(self.tasks["cases"][k]) for k in keys], device=self.device)

    # ------------------------------------------------------------------------------------------------ schedule
    def phase(self) -> str:
        return "A" if self.global_step < self.phase_a_fraction * self.total_iterations else "B"

    def unlabeled_weight_now(self) -> float:
        """w(t) of §6.4: sigmoid ramp over the first 5 % of phase B."""
        start = self.phase_a_fraction * self.total_iterations
        length = self.rampup_fraction_b * (self.total_iterations - start)
        return sigmoid_rampup(self.global_step - start, length)

    # ------------------------------------------------------------------------------------------------ losses
    def train_step(self, batch: dict) -> dict:
        self._labeled_keys = list(batch["keys"])
        return super().train_step(batch)

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        K, union = self.tasks["num_tasks"], self.tasks["num_tasks"] + 1
        t = self.task_ids(self._labeled_keys)
        y = (target[:, 0] > 0).float()  # each case's own task, binary
        B, h, spatial, phase = data.shape[0], data.shape[0] // 2, data.shape[2:], self.phase()
        r = mix_ratio(phase)
        m = context_mask(h, spatial, r, device=data.device)
        x_mix = mix(data[:h], data[h:2 * h], m)
        y_mix = mix(y[:h], y[h:2 * h], m[:, 0])
        full = lambda n, k: torch.full((n,), k, dtype=torch.long, device=data.device)  # noqa: E731
        inputs = [data, x_mix]
        prompts = [(0, B, t), (B, B + h, full(h, union)), (B, B + h, t[:h]), (B, B + h, t[h:2 * h])]
        if phase == "B":
            x_u = self.student_view(batch_u)[:B]
            m_u = context_mask(x_u.shape[0], spatial, r, device=data.device)
            x_cu = mix(x_u, data[:x_u.shape[0]], m_u)
            a = B + h
            inputs.append(x_cu)
            prompts += [(a, a + len(x_cu), full(len(x_cu), k)) for k in range(1, union + 1)]
        out = self.network(torch.cat(inputs, 0), prompts=prompts)
        terms: LossTerms = {
            "supervised": (1.0, supervised_loss(out[0], y)),
            "synthetic": (1.0, synthetic_loss(out[1], y_mix)),
            "aux": (1.0, aux_loss(out[2], out[3], y[:h], y[h:2 * h], m, t[:h], t[h:2 * h])),
        }
        if phase == "B":
            w = self.unlabeled_weight_now()
            p_agg = aggregated_target([fg_prob(o) for o in out[4:4 + K]])
            logits_union = out[4 + K]
            terms["unlabeled"] = (w, unlabeled_loss(logits_union, p_agg))
            terms["mixlab"] = (w, mixlab_loss(logits_union, y[:len(logits_union)], m_u))
        return terms


class VerSemiTrainer_smoke(VerSemiTrainer):
    """2 epochs x 10 iterations (phase A = epoch 0, phase B = epoch 1), for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class VerSemiTrainer_demo(VerSemiTrainer):
    """The schedule of `nnUNetTrainer_demo`."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)
