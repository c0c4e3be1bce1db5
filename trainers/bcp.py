"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), on nnU-Net (METHODS.md §8.4; [BCP] `ACDC_BCP_train.py`,
`LA_BCP_train.py`).

One box per iteration, shared across the batch: side floor(2/3 S_d) on every spatial axis, M = 0 inside, 1 outside
(`copy_paste_box_mask`). Labeled rows split into halves a, b (and unlabeled rows likewise).

Pre-training (the first 25 % of the iterations in 2D, 12 % in 3D; labeled only):
    x = x_a M + x_b (1 - M),   L = l(x; y_a outside, y_b inside; weights 1, 1)
Self-training (the rest; at the switch the EMA teacher is a copy of the pre-trained student, then plain EMA 0.99):
    y_hat = LCC(argmax softmax(z_ema(x_u)))                            largest component per foreground class
    x_mixl = x_l^a M + x_u^a (1 - M),  x_mixu = x_u^b M + x_l^b (1 - M)
    L = l(x_mixl; y_a outside w 1, y_hat_a inside w 0.5) + l(x_mixu; y_hat_b outside w 0.5, y_b inside w 1)
with l the region loss `bcp_region_loss` = 1/2 sum_R w_R (D_lin(P, Y_R, m_R) + CE_R); no separate supervised term.

Interpretations: every BCP loss uses z^0, so the network runs without deep supervision (nnU-Net's plain output);
nnU-Net's optimizer and poly schedule span both phases (the official code restarts SGD for self-training); the
unlabeled rows are the weak view (geometric augmentation only), for the teacher and the mix alike, like the
official loaders; an odd batch drops its last row from the mix, and a batch below 2 is refused. The EMA teacher
and the switch step are checkpoint state (`semisam.bcp_ema`), restored by `--c` (a resume after the switch reloads
the teacher, it is not re-copied from the student).
"""
import torch

from nnunet_semisam.distributed import per_rank_share, world_size
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.baselines import bcp_region_loss
from nnunet_semisam.losses.primitives import copy_paste_box_mask, largest_connected_component
from nnunet_semisam.teachers.ema import EMATeacher
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


def paste(outside: torch.Tensor, inside: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """`outside * M + inside * (1 - M)` for (B, C, *spatial) tensors and a spatial box mask M (1 outside)."""
    return outside * box_mask + inside * (1 - box_mask)


class BCPTrainer(SemiSupervisedTrainer):
    loss_terms = ("pretrain", "mix_l", "mix_u")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # every BCP loss uses z^0 (§8.4)
        is_2d = len(self.configuration_manager.patch_size) == 2
        self.pretrain_fraction = 0.25 if is_2d else 0.12  # official 10k/40k (ACDC), 2k/17k (LA) iterations
        self.box_fraction = 2 / 3
        self.ema_decay = 0.99
        self.pseudo_label_weight = 0.5  # alpha, `u_weight`
        self.ema: EMATeacher | None = None

    @property
    def switch_step(self) -> int:
        """t_it of the first self-training iteration."""
        return int(round(self.pretrain_fraction * self.total_iterations))

    def preflight_checks(self) -> None:
        super().preflight_checks()
        batch = per_rank_share(self.configuration_manager.batch_size)  # the plans' batch, or this DDP rank's part
        if batch < 2:
            where = f" split over {world_size()} processes is {batch} per process" if world_size() > 1 else ""
            raise SemiSAMError(f"{self.__class__.__name__} mixes the two halves of a batch: the plans' batch size "
                               f"{self.configuration_manager.batch_size}{where}; it needs at least 2")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        first, last = self.current_epoch * self.num_iterations_per_epoch, (self.current_epoch + 1) * \
            self.num_iterations_per_epoch
        phase = ("pre-training" if last <= self.switch_step else "self-training" if first >= self.switch_step
                 else f"pre-training, self-training from t_it={self.switch_step}")
        self.print_to_log_file(f"BCP phase: {phase}")

    def start_self_training(self) -> None:
        """The switch: the EMA teacher becomes a copy of the pre-trained student (plain EMA from here on)."""
        self.ema = EMATeacher(self.network, self.ema_decay, warmup=False).to(self.device)
        self.print_to_log_file(f"BCP: pre-training done at t_it={self.global_step}; EMA teacher initialised from "
                               "the pre-trained student")

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        half = data.shape[0] // 2
        box = copy_paste_box_mask(data.shape[2:], self.box_fraction, device=data.device)
        x_a, x_b, y_a, y_b = data[:half], data[half:2 * half], target[:half], target[half:2 * half]
        if self.global_step < self.switch_step:
            logits = self.network(paste(x_a, x_b, box))
            return {"pretrain": (1.0, bcp_region_loss(logits, y_a, y_b, box, 1.0, 1.0))}
        if self.ema is None:
            self.start_self_training()
        x_u = batch_u["weak"]
        with torch.no_grad():
            pseudo = torch.argmax(self.ema(x_u), 1)
            pseudo = largest_connected_component(pseudo, self.label_manager.num_segmentation_heads)[:, None]
        u_a, u_b, p_a, p_b = x_u[:half], x_u[half:2 * half], pseudo[:half], pseudo[half:2 * half]
        out = self.network(torch.cat([paste(x_a, u_a, box), paste(u_b, x_b, box)], 0))
        w = self.pseudo_label_weight
        return {"mix_l": (1.0, bcp_region_loss(out[:half], y_a, p_a, box, 1.0, w)),
                "mix_u": (1.0, bcp_region_loss(out[half:], p_b, y_b, box, w, 1.0))}

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.network, self.global_step)

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "switch_step": self.switch_step,
                "bcp_ema": None if self.ema is None else self.ema.model.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        if state.get("bcp_ema") is not None:
            self.ema = EMATeacher(self.network, self.ema_decay, warmup=False).to(self.device)
            self.ema.model.load_state_dict(state["bcp_ema"])
            total = sum(float(v.double().sum()) for v in self.ema.model.state_dict().values())
            self.print_to_log_file(f"BCP: self-training phase restored with its EMA teacher (sum of weights "
                                   f"{total:.10e})")
        else:
            self.print_to_log_file("BCP: pre-training phase restored")


class BCPTrainer_smoke(BCPTrainer):
    """2 epochs x 10 iterations (2D: 5 pre-training iterations), for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class BCPTrainer_demo(BCPTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class BCPTrainer_5epochs(BCPTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
