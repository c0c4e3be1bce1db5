"""UA-MT, uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019), on nnU-Net as in SSL4MIS (METHODS.md §8.2).

Mean Teacher (§8.1) whose consistency is restricted to the voxels the teacher is sure about. Per iteration, on the
unlabeled sub-batch x_u (the strong view):

    p_bar = 1/T sum_t softmax(z_ema(x_u + noise_t)),  T = 8 (4 rounds of the batch duplicated, §1.4 noise)
    U = -sum_c p_bar_c log(p_bar_c + 1e-6),   th(t_it) = (0.75 + 0.25 ramp(t_it, T_it)) ln 2,   mask = 1[U < th]
    L_u = sum(mask (p_s - p_ema)^2) / (2 sum(mask) + 1e-16)

where p_ema is the single noisy-teacher prediction of Mean Teacher and the literal 2 is [S4M]'s; the step loss is
`L_sup + w(t) L_u` with Mean Teacher's weight (lambda_max 0.2, ramp over the run). The share of unlabeled voxels the
mask keeps and the threshold are logged as the diagnostic terms `kept` and `threshold` (weight 0).
"""
import torch

from nnunet_semisam.losses.baselines import uamt_consistency
from nnunet_semisam.losses.consistency import gaussian_input_noise
from nnunet_semisam.losses.primitives import entropy_uncertainty, uamt_threshold
from nnunet_semisam.trainers.mean_teacher import MeanTeacherTrainer
from nnunet_semisam.trainers.semi_supervised import LossTerms
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


class UAMTTrainer(MeanTeacherTrainer):
    loss_terms = ("supervised", "consistency", "kept", "threshold")
    #: logged for the reader, never added to the loss (weight 0)
    diagnostic_terms = ("kept", "threshold")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.uncertainty_rounds = 4  # [S4M]: T = 8 passes = 4 rounds of the batch duplicated
        self.uncertainty_copies = 2

    @torch.no_grad()
    def teacher_mean_probs(self, x_u: torch.Tensor) -> torch.Tensor:
        """p_bar: mean softmax of the EMA teacher over `rounds x copies` noisy copies of x_u (§8.2)."""
        b = x_u.shape[0]
        repeated = x_u.repeat(self.uncertainty_copies, *([1] * (x_u.ndim - 1)))
        total = 0.0
        for _ in range(self.uncertainty_rounds):
            probs = torch.softmax(self.ema(gaussian_input_noise(repeated)).float(), 1)
            total = total + probs.view(self.uncertainty_copies, b, *probs.shape[1:]).sum(0)
        return total / (self.uncertainty_rounds * self.uncertainty_copies)

    def unlabeled_loss_terms(self, student_logits_u: torch.Tensor, batch_u: dict) -> LossTerms:
        x_u = self.student_view(batch_u)
        p_ema = torch.softmax(self.ema(gaussian_input_noise(x_u)).float(), 1)
        threshold = uamt_threshold(self.global_step, self.total_iterations)
        mask = (entropy_uncertainty(self.teacher_mean_probs(x_u)) < threshold).float()
        p_s = torch.softmax(student_logits_u.float(), 1)
        loss = uamt_consistency(p_s, p_ema, mask)
        return {"consistency": (self.consistency_weight_now(), loss),
                "kept": (0.0, mask.mean()), "threshold": (0.0, torch.tensor(threshold))}


class UAMTTrainer_smoke(UAMTTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)
        self.mt_hard_warmup_fraction = 0.0  # a 20-iteration run has no room for a warm-up


class UAMTTrainer_demo(UAMTTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class UAMTTrainer_5epochs(UAMTTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
