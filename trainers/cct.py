"""CCT, cross-consistency training (Ouali et al., CVPR 2020), on nnU-Net's plans as in SSL4MIS (METHODS.md §8.7;
[S4M] `train_cross_consistency_training_2D.py`, `UNet_CCT`), 2D and 3D.

Network (`networks.multi_decoder.cct_network`): the plans' encoder, the main decoder and three auxiliary decoders of
the same architecture; the auxiliary ones see perturbed copies of every encoder feature (FeatureNoise U(+-0.3),
Dropout(0.3), FeatureDropout; train mode only); no deep supervision. One forward pass over labeled + unlabeled rows:

    L = L_sup + w(t_it) * L_u
    L_sup = 1/4 sum_d DC_CE(z_d[labeled], y)                       nnU-Net's DC+CE, main and auxiliary decoders
    L_u   = 1/3 sum_a mean((p_main - p_aux,a)^2)                    unlabeled rows, no stop-gradient ([S4M])

with `w(t_it) = lambda_max ramp(t_it, T_it)`, lambda_max = 0.1 * s_sup = 0.2 (METHODS.md §1.4). Validation and
`nnUNetv2_predict` use the main decoder (the eval-mode forward of the rebuilt network). nnU-Net's optimizer and poly
schedule.
"""
import torch

from nnunet_semisam.losses.baselines import cct_consistency
from nnunet_semisam.networks.multi_decoder import cct_network
from nnunet_semisam.schedules import consistency_weight
from nnunet_semisam.trainers.mcnet_plus import MultiDecoderTrainerMixin
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


class CCTTrainer(MultiDecoderTrainerMixin, SemiSupervisedTrainer):
    loss_terms = ("supervised", "consistency")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_multi_decoder()
        self.consistency_max = 0.1 * 2  # lambda_max = [S4M] 0.1 x s_sup (METHODS.md §1.4)
        self.rampup_fraction = 1.0  # rho: the ramp spans the whole run

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """Shared encoder + main and three perturbed auxiliary decoders (METHODS.md §8.7); eval forward = main."""
        return cct_network(configuration_manager, num_input_channels, num_output_channels)

    def consistency_weight_now(self) -> float:
        return consistency_weight(self.global_step, self.consistency_max, self.total_iterations, self.rampup_fraction)

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        n = data.shape[0]
        logits = self.all_decoder_logits(torch.cat([data, self.student_view(batch_u)], 0))  # [main, aux 1..3]
        supervised = sum(self.loss(z[:n], target) for z in logits) / len(logits)
        probs_u = [torch.softmax(z[n:].float(), 1) for z in logits]
        return {"supervised": (1.0, supervised),
                "consistency": (self.consistency_weight_now(), cct_consistency(probs_u[0], probs_u[1:]))}


class CCTTrainer_smoke(CCTTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class CCTTrainer_demo(CCTTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class CCTTrainer_5epochs(CCTTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
