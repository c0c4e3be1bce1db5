"""One shared encoder, several decoders: the networks of MC-Net+ (METHODS.md §8.6) and CCT (§8.7) on nnU-Net's plans.

The encoder is the one of nnU-Net's own network for the configuration (`get_network_from_plans` with the plans'
`network_arch_class_name` / `network_arch_init_kwargs`, deep supervision off), so every plans family that uses
dynamic_network_architectures' `UNetDecoder` (PlainConvUNet, ResidualEncoderUNet) works. Each decoder is a
`UNetDecoder(encoder, K, n_conv_per_stage_decoder, deep_supervision=False)` with its own output conv.

    skips = E(x);   z_d = D_d(pi_d(skips)),  d = 0..M-1     (pi_d: a perturbation of every skip, identity for d = 0)
    forward(x)     = z_0                                   (validation, nnUNetv2_predict: the main decoder only)
    forward_all(x) = [z_0, ..., z_{M-1}]                   (training)

A trainer sets `train_all_decoders = True`: `forward` then returns `forward_all(x)` in train mode (and still z_0 in
eval mode), so the training step goes through the module's own `forward` (what DDP's wrapper and torch.compile
see). A network built by `nnUNetv2_predict` keeps the default False.

`network.decoder` is the main decoder D_0, so nnU-Net's `set_deep_supervision_enabled` (which writes
`network.decoder.deep_supervision`) keeps working; the trainers keep deep supervision off.

- MC-Net+ (`mcnet_plus_network`): 3 decoders differing only in their upsampling op: nnU-Net's transposed conv
  (kernel = stride), or `Upsample(scale_factor = stride, linear (align_corners=True) | nearest)` followed by a 1x1
  conv to the skip's channels (`UpsampleUNetDecoder`). Order as [MCN]: 3D transposed / trilinear / nearest, 2D
  bilinear / transposed / nearest; decoder 1 is the main one. No perturbations.
- CCT (`cct_network`): 4 decoders with nnU-Net's transposed convs; the 3 auxiliary ones see perturbed copies of all
  skips: FeatureNoise (U(+-0.3)), `nn.Dropout(0.3)`, FeatureDropout, each active in train mode only (§8.7
  Interpretation: the official Dropout also acts at test time, irrelevant here because predict uses D_0 only).
"""
from __future__ import annotations

from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_semisam.networks.perturbations import FeatureDropout, FeatureNoise

#: [MCN] `mcnet3d_v2` / `mcnet2d_v2` decoder order (METHODS.md §8.6); "linear" is bilinear in 2D, trilinear in 3D
MCNET_UPSAMPLING = {2: ("linear", "transposed", "nearest"), 3: ("transposed", "linear", "nearest")}


class UpsampleUNetDecoder(UNetDecoder):
    """`UNetDecoder` whose transposed convs are replaced by `Upsample(scale_factor=stride) + 1x1 conv`
    (METHODS.md §8.6). `mode` is "linear" (bilinear / trilinear by dimension, align_corners=True) or "nearest"."""

    def __init__(self, encoder: nn.Module, num_classes: int, n_conv_per_stage, mode: str):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision=False)
        if mode not in ("linear", "nearest"):
            raise ValueError(f"upsampling mode must be 'linear' or 'nearest', got {mode!r}")
        ndim = len(encoder.strides[0])
        self.upsampling_mode = mode
        ups = []
        n_stages = len(encoder.output_channels)
        for s in range(1, n_stages):
            stride = tuple(float(v) for v in encoder.strides[-s])
            if mode == "linear":
                up = nn.Upsample(scale_factor=stride, mode="bilinear" if ndim == 2 else "trilinear", align_corners=True)
            else:
                up = nn.Upsample(scale_factor=stride, mode="nearest")
            conv = encoder.conv_op(encoder.output_channels[-s], encoder.output_channels[-(s + 1)], 1, 1, 0,
                                   bias=encoder.conv_bias)
            ups.append(nn.Sequential(up, conv))
        self.transpconvs = nn.ModuleList(ups)


class MultiDecoderUNet(nn.Module):
    """Shared encoder + decoders (module docstring). `perturbations[d]` is applied to every skip before decoder d
    (None = none); the main decoder 0 never has one."""

    def __init__(self, encoder: nn.Module, decoders: Sequence[nn.Module],
                 perturbations: Sequence[nn.Module | None] | None = None):
        super().__init__()
        perturbations = list(perturbations) if perturbations is not None else [None] * len(decoders)
        if len(perturbations) != len(decoders) or perturbations[0] is not None:
            raise ValueError("one perturbation (or None) per decoder, None for the main decoder 0")
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.perturbations = nn.ModuleList(p if p is not None else nn.Identity() for p in perturbations)
        #: train mode: `forward` returns every decoder's logits (set by the MC-Net+ / CCT trainers)
        self.train_all_decoders = False

    @property
    def decoder(self) -> nn.Module:
        """The main decoder D_0 (what nnU-Net's `set_deep_supervision_enabled` addresses)."""
        return self.decoders[0]

    @property
    def num_decoders(self) -> int:
        return len(self.decoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Main decoder logits `(B, K, *S)`: what validation and `nnUNetv2_predict` use; `forward_all(x)` instead in
        train mode when `train_all_decoders` is set."""
        if self.training and self.train_all_decoders:
            return self.forward_all(x)
        return self.decoders[0](self.encoder(x))

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every decoder, `[z_0, ..., z_{M-1}]`, from one encoder pass."""
        skips = self.encoder(x)
        return [decoder([perturb(s) for s in skips]) for decoder, perturb in zip(self.decoders, self.perturbations)]


def plans_network(configuration_manager, num_input_channels: int, num_output_channels: int) -> nn.Module:
    """nnU-Net's network for the configuration (initialised as nnU-Net does), deep supervision off."""
    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True, deep_supervision=False)


def _new_decoder(net: nn.Module, num_output_channels: int, n_conv, mode: str) -> nn.Module:
    if mode == "transposed":
        decoder = UNetDecoder(net.encoder, num_output_channels, n_conv, deep_supervision=False)
    else:
        decoder = UpsampleUNetDecoder(net.encoder, num_output_channels, n_conv, mode)
    decoder.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its U-Nets
    return decoder


def _decoder_convs(configuration_manager):
    return configuration_manager.network_arch_init_kwargs["n_conv_per_stage_decoder"]


def mcnet_plus_network(configuration_manager, num_input_channels: int, num_output_channels: int) -> MultiDecoderUNet:
    """MC-Net+'s three decoders (METHODS.md §8.6), in the [MCN] order of the configuration's dimension."""
    net = plans_network(configuration_manager, num_input_channels, num_output_channels)
    modes = MCNET_UPSAMPLING[len(net.encoder.strides[0])]
    n_conv = _decoder_convs(configuration_manager)
    decoders = [net.decoder if m == "transposed" else _new_decoder(net, num_output_channels, n_conv, m)
                for m in modes]
    return MultiDecoderUNet(net.encoder, decoders)


def cct_perturbations() -> list[nn.Module | None]:
    """CCT's skip perturbations per decoder (METHODS.md §8.7): none, FeatureNoise, Dropout(0.3), FeatureDropout."""
    return [None, FeatureNoise(0.3), nn.Dropout(p=0.3), FeatureDropout()]


def cct_network(configuration_manager, num_input_channels: int, num_output_channels: int) -> MultiDecoderUNet:
    """CCT's main + three auxiliary decoders (METHODS.md §8.7), all with nnU-Net's transposed convs."""
    net = plans_network(configuration_manager, num_input_channels, num_output_channels)
    n_conv = _decoder_convs(configuration_manager)
    decoders = [net.decoder] + [_new_decoder(net, num_output_channels, n_conv, "transposed") for _ in range(3)]
    return MultiDecoderUNet(net.encoder, decoders, cct_perturbations())
