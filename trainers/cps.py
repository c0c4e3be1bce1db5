"""CPS, cross pseudo supervision (Chen et al., CVPR 2021), on nnU-Net as in SSL4MIS (METHODS.md §8.3).

Two networks of the plans' architecture, initialised differently, each with its own optimizer and poly schedule:

    L = sum_{i=1,2} [ L_sup,i + w(t) CE(z_i(x_u), argmax sg(p_{3-i}(x_u))) ]

with L_sup,i nnU-Net's DC+CE (deep supervision) of network i on the labeled batch, x_u the strong unlabeled view, the
pseudo-supervision on the unlabeled rows only and on z^0 ([S4M]), and `w(t) = lambda_max ramp(t_it, T_it)`,
lambda_max = 0.1 * s_sup = 0.2. Initialisation: network 1 is nnU-Net's (He / kaiming-normal); network 2 is a second
build, drawn after the first (2D: default init with another draw of the RNG), re-initialised xavier-normal in 3D
([S4M] 3D script). The sum of the four terms is backpropagated once; each network's gradients are clipped and stepped
by its own optimizer (`optimizers_and_parameters`).

Checkpoint: `network_weights` / `optimizer_state` are network 1's (nnUNetv2_predict uses network 1); network 2's
weights and optimizer state are `semisam.network2` / `semisam.optimizer2`, restored by `--c`. The poly schedule is a
function of the epoch, so it needs no state. Under DDP network 2 is wrapped like network 1 (`wrap_ddp`).
"""
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from nnunet_semisam.distributed import unwrap
from nnunet_semisam.losses.baselines import cps_pseudo_supervision
from nnunet_semisam.schedules import consistency_weight
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer, full_resolution, split_batch
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule


def xavier_normal_init(module: nn.Module) -> None:
    """Xavier-normal conv weights and zero biases ([S4M] 3D CPS `xavier_normal_init_weight`)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CPSTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "supervised_2", "cps_1", "cps_2")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.consistency_max = 0.1 * 2  # lambda_max = [S4M] 0.1 x s_sup (METHODS.md §1.4)
        self.rampup_fraction = 1.0
        self.network2: nn.Module | None = None
        self.optimizer2 = None
        self.lr_scheduler2 = None

    def initialize(self):
        super().initialize()
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                              self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        if len(self.configuration_manager.patch_size) == 3:
            xavier_normal_init(net)
        net = net.to(self.device)
        self.optimizer2 = torch.optim.SGD(net.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                          momentum=0.99, nesterov=True)  # nnU-Net's configure_optimizers
        self.lr_scheduler2 = PolyLRScheduler(self.optimizer2, self.initial_lr, self.num_epochs)
        self.network2 = self.wrap_ddp(net)  # DDP on this rank's device, like the network (distributed.py)

    def optimizers_and_parameters(self):
        return [(self.optimizer, list(self.network.parameters())), (self.optimizer2, list(self.network2.parameters()))]

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network2.train()
        self.lr_scheduler2.step(self.current_epoch)

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        if self.network2 is not None:
            unwrap(self.network2).decoder.deep_supervision = enabled

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        n = data.shape[0]
        x = torch.cat([data, self.student_view(batch_u)], 0)
        out1_l, out1_u = split_batch(self.network(x), n)
        out2_l, out2_u = split_batch(self.network2(x), n)
        z1, z2 = full_resolution(out1_u), full_resolution(out2_u)
        w = consistency_weight(self.global_step, self.consistency_max, self.total_iterations, self.rampup_fraction)
        return {"supervised": (1.0, self.loss(out1_l, target)), "supervised_2": (1.0, self.loss(out2_l, target)),
                "cps_1": (w, cps_pseudo_supervision(z1, z2)), "cps_2": (w, cps_pseudo_supervision(z2, z1))}

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "network2": unwrap(self.network2).state_dict(),
                "optimizer2": self.optimizer2.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        unwrap(self.network2).load_state_dict(state["network2"])
        self.optimizer2.load_state_dict(state["optimizer2"])
        total = sum(float(v.double().sum()) for v in unwrap(self.network2).state_dict().values())
        self.print_to_log_file(f"CPS network 2 and its optimizer restored (sum of weights {total:.10e})")


class CPSTrainer_smoke(CPSTrainer):
    """2 epochs x 10 iterations: the schedule of `nnUNetTrainer_smoke`, for tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)


class CPSTrainer_demo(CPSTrainer):
    """The schedule of `nnUNetTrainer_demo` (`nnunet-semisam demo`)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)


class CPSTrainer_5epochs(CPSTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
