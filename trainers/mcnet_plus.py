"""MC-Net+, mutual consistency of three decoders (Wu et al., MedIA 2022), on nnU-Net's plans (METHODS.md §8.6;
[MCN] `train_mcnet_{2d,3d}.py`).

Network (`networks.multi_decoder.mcnet_plus_network`): the plans' encoder shared by three decoders that differ only
in their upsampling (2D: bilinear, transposed conv, nearest; 3D: transposed conv, trilinear, nearest); no deep
supervision. Labeled and unlabeled patches go through it in one forward pass; `P_i = softmax(z_i)` over all rows:

    L = lambda * sum_i Dice(P_i[labeled], y) + w(t_it) * sum_{i != j} mean((P_i - sharpen(P_j, T = 0.1))^2)

Dice is [MCN]'s: 3D the binary Dice on the foreground channel (averaged over foreground classes when K > 2), 2D the
multi-class D_sq with its factor 2 (`losses.baselines.mcnet_supervised_dice`); CE is not added ([MCN] computes it
and drops it). lambda = 0.5 (3D) / 1 (2D). The mutual consistency runs over labeled and unlabeled rows with no
stop-gradient (`mcnet_mutual_consistency`). `w(t_it) = w_max ramp(t_it, rho T_it)`: 3D w_max = 1, rho = 0.4; 2D
w_max = 0.1, rho = 1 (the [MCN] `//150` ramps rescaled to the run; no s_sup, the supervised term is [MCN]'s own).
Validation and `nnUNetv2_predict` use decoder 1 (`build_network_architecture` rebuilds the three-decoder network, whose
eval-mode forward is decoder 1). nnU-Net's optimizer and poly schedule.
"""
import torch

from nnunet_semisam.distributed import unwrap
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.baselines import mcnet_mutual_consistency, mcnet_supervised_dice
from nnunet_semisam.networks.multi_decoder import mcnet_plus_network
from nnunet_semisam.schedules import consistency_weight
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


class MultiDecoderTrainerMixin:
    """What MC-Net+ and CCT share: the multi-decoder network from the plans, deep supervision off (METHODS.md §1.3),
    every decoder's logits in train mode, and the one-line refusal of region-based plans."""

    def init_multi_decoder(self) -> None:
        self.enable_deep_supervision = False  # a single output per decoder (METHODS.md §1.3)

    def initialize(self):
        super().initialize()
        unwrap(self.network).train_all_decoders = True  # train-mode forward: [z_1, ..., z_M]

    def all_decoder_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[z_1, ..., z_M]` from one train-mode forward of the network (through DDP / torch.compile wrappers)."""
        logits = self.network(x)
        if not isinstance(logits, (list, tuple)):
            raise SemiSAMError(f"{self.__class__.__name__}: the network returned one output in training; it must be "
                               "a MultiDecoderUNet in train mode with train_all_decoders set (see `initialize`)")
        return list(logits)

    def preflight_checks(self) -> None:
        super().preflight_checks()
        if self.label_manager.has_regions:
            raise SemiSAMError(f"{self.__class__.__name__} needs softmax labels: region-based plans are not supported")


class MCNetPlusTrainer(MultiDecoderTrainerMixin, SemiSupervisedTrainer):
    loss_terms = ("supervised", "consistency")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_multi_decoder()
        self.is_3d = len(self.configuration_manager.patch_size) == 3
        self.supervised_weight = 0.5 if self.is_3d else 1.0  # lambda ([MCN] `lamda`)
        self.consistency_max = 1.0 if self.is_3d else 0.1  # [MCN] consistency weight (no s_sup, §8.6)
        self.rampup_fraction = 0.4 if self.is_3d else 1.0  # rho: 3D ramp ends at 40 % of the run
        self.sharpen_temperature = 0.1

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """Shared encoder + three decoders (METHODS.md §8.6); eval-mode forward = decoder 1."""
        return mcnet_plus_network(configuration_manager, num_input_channels, num_output_channels)

    def consistency_weight_now(self) -> float:
        return consistency_weight(self.global_step, self.consistency_max, self.total_iterations, self.rampup_fraction)

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        n = data.shape[0]
        logits = self.all_decoder_logits(torch.cat([data, self.student_view(batch_u)], 0))  # [z_1, z_2, z_3]
        probs = [torch.softmax(z.float(), 1) for z in logits]
        supervised = mcnet_supervised_dice([p[:n] for p in probs], target, binary=self.is_3d)
        consistency = mcnet_mutual_consistency(probs, self.sharpen_temperature)
        return {"supervised": (self.supervised_weight, supervised),
                "consistency": (self.consistency_weight_now(), consistency)}


class MCNetPlusTrainer_smoke(MCNetPlusTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class MCNetPlusTrainer_demo(MCNetPlusTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class MCNetPlusTrainer_5epochs(MCNetPlusTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
