"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on nnU-Net, as in SSL4MIS (METHODS.md §8.1).

Step loss: `L_sup + w(t) * mean_{v,c} (p_s(x_u) - p_ema(x_u + noise))^2`, where L_sup is nnU-Net's DC+CE with deep
supervision on the labeled batch, x_u the student's augmented unlabeled patch, noise `clip(N(0, 0.1^2), +-0.2)`,
p_ema the EMA teacher (alpha = 0.99 with the warm-up decay of METHODS.md §1.4), and
`w(t) = lambda_max * ramp(t_it, T_it)` the sigmoid ramp over the whole run with lambda_max = 0.1 * s_sup = 0.2.
For 2D configurations the consistency term is 0 for the first `mt_hard_warmup_fraction` = 1000/30000 of the run
([S4M] 2D script). `network_weights` in the checkpoint is the student (used by nnUNetv2_predict); the EMA teacher's
weights are saved under `semisam.ema_teacher` and restored by `--c`.
"""
import torch

from nnunet_semisam.losses.consistency import gaussian_input_noise, softmax_mse
from nnunet_semisam.schedules import consistency_weight
from nnunet_semisam.teachers.ema import EMATeacher
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


class MeanTeacherTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "consistency")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ema_decay = 0.99  # alpha, METHODS.md §1.4
        self.consistency_max = 0.1 * 2  # lambda_max = [S4M] 0.1 x s_sup (METHODS.md §1.4)
        self.rampup_fraction = 1.0  # rho: the ramp spans the whole run
        self.mt_hard_warmup_fraction = 1000 / 30000 if len(self.configuration_manager.patch_size) == 2 else 0.0
        self.ema: EMATeacher | None = None

    def initialize(self):
        super().initialize()
        self.ema = EMATeacher(self.network, self.ema_decay).to(self.device)

    def consistency_weight_now(self) -> float:
        """w(t_it) of METHODS.md §1.4 / §8.1 (0 during the 2D hard warm-up)."""
        if self.global_step < self.mt_hard_warmup_fraction * self.total_iterations:
            return 0.0
        return consistency_weight(self.global_step, self.consistency_max, self.total_iterations, self.rampup_fraction)

    def unlabeled_loss_terms(self, student_logits_u: torch.Tensor, batch_u: dict) -> LossTerms:
        x_u = self.student_view(batch_u)
        teacher_logits = self.ema(gaussian_input_noise(x_u))
        return {"consistency": (self.consistency_weight_now(), softmax_mse(student_logits_u, teacher_logits))}

    def after_optimizer_step(self) -> None:
        self.ema.update(self.network, self.global_step)

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "ema_teacher": self.ema.model.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.ema.model.load_state_dict(state["ema_teacher"])
        total = sum(float(v.double().sum()) for v in self.ema.model.state_dict().values())
        self.print_to_log_file(f"EMA teacher restored (sum of weights {total:.10e})")


class MeanTeacherTrainer_smoke(MeanTeacherTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)
        self.mt_hard_warmup_fraction = 0.0  # a 20-iteration run has no room for a warm-up


class MeanTeacherTrainer_demo(MeanTeacherTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class MeanTeacherTrainer_5epochs(MeanTeacherTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
