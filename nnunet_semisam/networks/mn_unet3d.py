"""[MN]'s simple 3D U-Net, the alternative g of M&N (METHODS.md §7.1, `MNCoTrainer_unet3d`).

The network the M&N paper trains from scratch as its 3D model, written from its description and the official
`model.py`: five levels of 32, 64, 128, 256, 512 features; every level two (Conv3d 3x3x3 -> InstanceNorm -> ReLU);
2x max-pooling down; up-steps of trilinear x2 upsampling -> Conv3d 3x3x3 -> InstanceNorm -> ReLU to the skip's width,
concatenation with the skip, two convolutions; a final 3x3x3 convolution to the classes. One output (no deep
supervision).

Interpretations for nnU-Net's plans, whose patches need not be divisible by 16: pooling uses `ceil_mode` (a side of
3 pools to 2, never to 0) and each upsampling goes to the skip's exact size instead of a fixed factor 2; for the
official crop (64, 160, 160) both are identical to the official operations. `decoder.deep_supervision` exists only
so that nnU-Net's `set_deep_supervision_enabled` finds it; it changes nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

FEATURES = (32, 64, 128, 256, 512)


def conv_in_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out), nn.ReLU(inplace=True)]


class _Decoder(nn.Module):
    def __init__(self, features: Sequence[int], num_classes: int):
        super().__init__()
        deep = list(reversed(features))  # 512, 256, 128, 64, 32
        self.up = nn.ModuleList(nn.Sequential(*conv_in_relu(a, b)) for a, b in zip(deep[:-1], deep[1:]))
        self.fuse = nn.ModuleList(nn.Sequential(*conv_in_relu(2 * b, b), *conv_in_relu(b, b)) for b in deep[1:])
        self.head = nn.Conv3d(features[0], num_classes, 3, padding=1)
        self.deep_supervision = False  # attribute for nnU-Net; the network has a single output

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = up(F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False))
            x = fuse(torch.cat([skip, x], 1))
        return self.head(x)


class MNUNet3D(nn.Module):
    """[MN]'s 3D U-Net (module docstring); `features` defaults to the paper's (32, 64, 128, 256, 512)."""

    def __init__(self, in_channels: int, num_classes: int, features: Sequence[int] = FEATURES):
        super().__init__()
        widths = [in_channels, *features]
        self.encoder = nn.ModuleList(nn.Sequential(*conv_in_relu(a, b), *conv_in_relu(b, b))
                                     for a, b in zip(widths[:-1], widths[1:]))
        self.decoder = _Decoder(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            if i:
                x = F.max_pool3d(x, 2, 2, ceil_mode=True)
            x = stage(x)
            skips.append(x)
        return self.decoder(skips[-1], skips[:-1])
