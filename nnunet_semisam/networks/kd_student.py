"""The Tiny-MUNet student of MedSAMMambaKDTrainer, built from any nnU-Net 2D plans (METHODS.md §3.3, §4).

- `standardize_per_image(x)`: [KD] "mean 0, std 1" — each image and channel z-scored on the fly, so RGB data stored
  with nnU-Net's `RGBTo01Normalization` (rule U stays invertible, METHODS.md §2.4) reaches the student z-scored,
  and already z-scored data is left (almost) unchanged.
- `StandardizedTinyMUNet`: TinyMUNet whose forward starts with `standardize_per_image`. No parameters are added, so
  its state dict is TinyMUNet's; `nnUNetv2_predict -tr MedSAMMambaKDTrainer` rebuilds it through the trainer's
  `build_network_architecture` and gets the same function.
- `KDStudentTrainerMixin`: the trainer side, shared by MedSAMMambaKDTrainer and its control TinyMUNetTrainer so both
  build and describe exactly the same student: `build_network_architecture` (also what `nnUNetv2_predict` calls)
  and the `student: ...` line of the training log.
- `tiny_munet_kwargs_from_plans(configuration_manager)`: TinyMUNet arguments for a configuration. With
  `nnUNetPlans_TinyMUNet` (planned by `TinyMUNetPlanner`) the planned `arch_kwargs`; with nnU-Net's default plans
  (PlainConvUNet / ResEnc) the paper channel plan (METHODS.md §3.3: 32, 64 | 64, 96, 128, 192) on the first
  `min(6, n_stages)` strides and kernel sizes of the planned U-Net. nnU-Net picks the patch size divisible by the
  product of all its strides, so it is divisible by the product of the ones TinyMUNet uses.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.networks.tiny_munet import PAPER_ARCH_KWARGS, TinyMUNet

TINY_MUNET_CLASS = "nnunet_semisam.networks.tiny_munet.TinyMUNet"


def standardize_per_image(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, *spatial) -> per-sample, per-channel `(x - mean) / sqrt(var + eps)` (biased variance, no parameters)."""
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


class StandardizedTinyMUNet(TinyMUNet):
    """TinyMUNet on per-image z-scored inputs (module docstring); same arguments and state dict as TinyMUNet."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return super().forward(standardize_per_image(x), return_features=return_features)


def tiny_munet_kwargs_from_plans(configuration_manager) -> tuple[dict, bool]:
    """(TinyMUNet keyword arguments for this configuration, True if they come from TinyMUNet plans).

    Raises SemiSAMError for 3D configurations (the MedSAM teacher is 2D; no 3D variant of the method exists yet) and
    for plans too shallow for a Mamba stage.
    """
    cm = configuration_manager
    if len(cm.patch_size) != 2:
        raise SemiSAMError(f"MedSAMMambaKDTrainer is a 2D method (MedSAM teacher, METHODS.md §4): configuration "
                           f"'{cm.configuration.get('data_identifier', '?')}' has a {len(cm.patch_size)}D patch "
                           f"{list(cm.patch_size)}; train the '2d' configuration")
    kwargs = dict(cm.network_arch_init_kwargs)
    req_import = set(cm.network_arch_init_kwargs_req_import)
    if cm.network_arch_class_name == TINY_MUNET_CLASS:
        return _import_classes(kwargs, req_import), True
    n = min(6, int(kwargs["n_stages"]))
    if n < 3:
        raise SemiSAMError(f"the planned U-Net has {n} stages; TinyMUNet needs at least 3 (2 conv + 1 Mamba stage)")
    strides = list(kwargs["strides"])[:n]
    kernels = list(kwargs["kernel_sizes"])[:n]
    out = dict(PAPER_ARCH_KWARGS)
    out.update(features_per_stage=tuple(PAPER_ARCH_KWARGS["features_per_stage"][:n]), strides=strides,
               kernel_sizes=kernels,
               n_mamba_layers_per_stage=tuple(PAPER_ARCH_KWARGS["n_mamba_layers_per_stage"][:n - 2]))
    return out, False


def _import_classes(kwargs: dict, req_import: set) -> dict:
    import pydoc

    out = dict(kwargs)
    for key in req_import:
        if isinstance(out.get(key), str):
            out[key] = pydoc.locate(out[key])
    return out


def build_kd_student(configuration_manager, num_input_channels: int, num_output_channels: int) -> nn.Module:
    """StandardizedTinyMUNet for this configuration, initialised. No deep supervision (METHODS.md §1.3: Tiny-MUNet
    has a single output)."""
    kwargs, _ = tiny_munet_kwargs_from_plans(configuration_manager)
    net = StandardizedTinyMUNet(num_input_channels, num_output_channels, deep_supervision=False, **kwargs)
    net.apply(TinyMUNet.initialize)
    return net


def describe_kd_student(configuration_manager, network: nn.Module, num_input_channels: int,
                        num_output_channels: int) -> str:
    """One line for the training log: which TinyMUNet the plans gave `network` (built by `build_kd_student`)."""
    kwargs, planned = tiny_munet_kwargs_from_plans(configuration_manager)
    n_params = sum(p.numel() for p in network.parameters())
    where = "the planned TinyMUNet (nnUNetPlans_TinyMUNet)" if planned else (
        f"TinyMUNet in place of the planned {configuration_manager.network_arch_class_name.split('.')[-1]}, with the "
        f"paper channel plan on its first {len(kwargs['features_per_stage'])} strides")
    return (f"student: {where}; patch {list(configuration_manager.patch_size)}, {num_input_channels} input "
            f"channels, {num_output_channels} outputs, {n_params:,} parameters, per-image z-scored input")


def no_decay_parameter(name: str) -> bool:
    """Mamba's `A_log` and `D` get no weight decay (mamba_ssm's `_no_weight_decay`, METHODS.md §4.6)."""
    return name.rsplit(".", 1)[-1] in ("A_log", "D")


def student_parameter_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups of the student: `weight_decay` for every parameter except `A_log` and `D`, which
    get none (METHODS.md §4.6); in that order."""
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        (no_decay if no_decay_parameter(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def feature_shapes(network: nn.Module, num_input_channels: int, patch_size, device: torch.device
                   ) -> list[tuple[int, tuple[int, ...]]]:
    """(channels, grid) of each encoder level F_1..F_L of the student at `patch_size`, from one eval-mode probe
    (the FPKDM projectors are sized from it, METHODS.md §4.1). The network's train/eval mode is restored."""
    was_training = network.training
    network.eval()
    try:
        probe = torch.zeros(1, num_input_channels, *patch_size, device=device)
        _, feats = network(probe, return_features=True)
    finally:
        network.train(was_training)
    return [(int(f.shape[1]), tuple(int(s) for s in f.shape[2:])) for f in feats]


class KDStudentTrainerMixin:
    """For nnU-Net trainers whose network is the KD student (module docstring); put it before the trainer base.
    The trainer sets `enable_deep_supervision = False` itself (Tiny-MUNet has one output, METHODS.md §1.3)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The student for these plans (`build_kd_student`); no deep supervision."""
        return build_kd_student(configuration_manager, num_input_channels, num_output_channels)

    def initialize(self):
        super().initialize()
        self.print_to_log_file(describe_kd_student(self.configuration_manager, self.network, self.num_input_channels,
                                                   self.label_manager.num_segmentation_heads))
