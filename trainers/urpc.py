"""URPC, uncertainty rectified pyramid consistency (Luo et al., MICCAI 2021), on nnU-Net as in SSL4MIS
(METHODS.md §8.5).

The pyramid is nnU-Net's own deep-supervision output list: the first S = min(4, number of DS outputs) logits
`z^0 .. z^{S-1}` (z^0 at full resolution), each nearest-upsampled to full resolution (`F.interpolate` defaults, as
[S4M] does), `p_s = softmax(up(z^s))`. Step loss:

    L = L_sup + w(t_it) * L_u,
    L_sup = 1/S sum_s DC_CE(up(z^s)_l, y)                    nnU-Net's DC+CE vs the full-resolution labels
    p_bar = 1/S sum_s p_s,  D_s = sum_c p_bar (log p_bar - log p_s),  w_s = exp(-D_s)
    L_u = 1/S sum_s [mean(w_s (p_bar - p_s)^2) / (mean(w_s) + 1e-8) + mean(D_s)]      on the unlabeled sub-batch

with `w(t_it) = lambda_max * ramp(t_it, T_it)`, lambda_max = 0.1 * s_sup = 0.2 (METHODS.md §1.4), no stop-gradient.
Labeled and unlabeled patches go through the network in one forward pass.

Perturbations (`urpc_perturb`, default on; [S4M] `Decoder_URPC`): the inputs of the decoder's 1x1 output convs
(`seg_layers`) are perturbed in train mode only, from the coarsest level used upward: Dropout(p = 0.5), FeatureDropout,
FeatureNoise; z^0 is never perturbed. With S = 3 (a 4-stage plan) that is z^2 Dropout, z^1 FeatureDropout. They are
forward pre-hooks on nnU-Net's network, so its state dict and `nnUNetv2_predict` are unchanged, and they act only on
what the head sees (the decoder's features go on unperturbed).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_semisam.distributed import unwrap
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.baselines import urpc_loss
from nnunet_semisam.networks.perturbations import FeatureDropout, FeatureNoise
from nnunet_semisam.schedules import consistency_weight
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer, full_resolution
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


def upsample_pyramid(outputs: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
    """Each logit map `(B, K, *s_i)` nearest-upsampled to `size` (`F.interpolate` defaults, METHODS.md §8.5)."""
    return [F.interpolate(z, size=tuple(size)) for z in outputs]


def pyramid_supervised_loss(loss: nn.Module, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """L_sup of METHODS.md §8.5: mean over the upsampled outputs `(B, K, *S)` of `loss(z, target)`."""
    return sum(loss(z, target) for z in logits) / len(logits)


def head_perturbations(num_outputs: int) -> dict[int, nn.Module]:
    """{pyramid level s: perturbation of the input of its output conv}, coarsest level used first (METHODS.md §8.5)."""
    ops = (nn.Dropout(p=0.5), FeatureDropout(), FeatureNoise())
    return {s: op for s, op in zip(range(num_outputs - 1, 0, -1), ops)}


def _perturb_input_in_train_mode(perturbation: nn.Module):
    def hook(module: nn.Module, args: tuple):
        if not module.training:
            return None
        return (perturbation(args[0]),) + tuple(args[1:])
    return hook


def install_head_perturbations(decoder: nn.Module, perturbations: dict[int, nn.Module]) -> list:
    """Forward pre-hooks on `decoder.seg_layers` (level s is `seg_layers[-1 - s]`, `seg_layers[-1]` at full
    resolution); each perturbs its head's input while that head is in train mode. Returns the hook handles."""
    handles = []
    for s, op in perturbations.items():
        op.train()  # the hook decides by the network's mode; the op itself always perturbs
        handles.append(decoder.seg_layers[-1 - s].register_forward_pre_hook(_perturb_input_in_train_mode(op)))
    return handles


class URPCTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "urpc")
    compile_network = False
    compile_off_reason = "the head-input perturbations are forward pre-hooks on the decoder's output convolutions"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_max = 0.1 * 2  # lambda_max = [S4M] 0.1 x s_sup (METHODS.md §1.4)
        self.rampup_fraction = 1.0  # rho: the ramp spans the whole run
        self.urpc_max_outputs = 4  # z^0..z^3, METHODS.md §8.5
        self.urpc_perturb = True  # head-input perturbations, METHODS.md §8.5 Interpretation
        self.num_pyramid_outputs = 0  # S, set from the network in `initialize`
        self.pyramid_loss: nn.Module | None = None
        self._perturbation_hooks: list = []

    def initialize(self):
        super().initialize()
        if not self.enable_deep_supervision or self.label_manager.has_regions:
            raise SemiSAMError(f"{self.__class__.__name__} needs nnU-Net's deep-supervision pyramid and softmax "
                               "labels (enable_deep_supervision on, no region-based training)")
        self.pyramid_loss = self.build_pyramid_loss()
        self.setup_pyramid()

    def setup_pyramid(self) -> None:
        """S = min(4, DS outputs of `self.network`), the head-input hooks (if `urpc_perturb`), one log line."""
        decoder = unwrap(self.network).decoder
        available = len(decoder.seg_layers)
        self.num_pyramid_outputs = min(self.urpc_max_outputs, available)
        perturbations = head_perturbations(self.num_pyramid_outputs) if self.urpc_perturb else {}
        self._perturbation_hooks = install_head_perturbations(decoder, perturbations)
        names = ", ".join(f"z^{s} {type(op).__name__}" for s, op in perturbations.items()) or "none"
        self.print_to_log_file(f"URPC: pyramid z^0..z^{self.num_pyramid_outputs - 1} ({self.num_pyramid_outputs} of "
                               f"{available} deep-supervision outputs), head-input perturbations: {names}")

    def build_pyramid_loss(self) -> nn.Module:
        """nnU-Net's DC+CE with the settings of `nnUNetTrainer._build_loss`, without the DeepSupervisionWrapper."""
        loss = DC_and_CE_loss({'batch_dice': self.configuration_manager.batch_dice, 'smooth': 1e-5, 'do_bg': False,
                               'ddp': self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        return loss

    def consistency_weight_now(self) -> float:
        """w(t_it) of METHODS.md §1.4 / §8.5."""
        return consistency_weight(self.global_step, self.consistency_max, self.total_iterations, self.rampup_fraction)

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        n = data.shape[0]
        outputs = self.network(torch.cat([data, self.student_view(batch_u)], 0))
        pyramid = upsample_pyramid(outputs[:self.num_pyramid_outputs], data.shape[2:])
        supervised = pyramid_supervised_loss(self.pyramid_loss, [z[:n] for z in pyramid], full_resolution(target))
        probs_u = [torch.softmax(z[n:].float(), 1) for z in pyramid]
        return {"supervised": (1.0, supervised), "urpc": (self.consistency_weight_now(), urpc_loss(probs_u))}


class URPCTrainer_smoke(URPCTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class URPCTrainer_demo(URPCTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class URPCTrainer_5epochs(URPCTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
