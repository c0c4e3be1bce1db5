"""Feature perturbations of the multi-head baselines (METHODS.md §1.4, §8.5 URPC, §8.7 CCT; [S4M] `networks/unet.py`).

Both act only in train mode (identity in `eval()`), so that validation and `nnUNetv2_predict` see the plain network.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureNoise(nn.Module):
    """Multiplicative uniform noise `f + f * n`, `n ~ U(-r, r)` of shape (C, *spatial), shared over the batch
    ([S4M] `FeatureNoise`, r = 0.3)."""

    def __init__(self, uniform_range: float = 0.3):
        super().__init__()
        self.uniform_range = float(uniform_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        noise = torch.empty(x.shape[1:], device=x.device, dtype=x.dtype).uniform_(-self.uniform_range,
                                                                                 self.uniform_range)
        return x + x * noise


class FeatureDropout(nn.Module):
    """Drops the most attended positions ([S4M] `FeatureDropout`): `a = mean_c(f)`; per sample, positions with
    `a >= t * max(a)`, `t ~ U(low, high)` = U(0.7, 0.9), are set to 0 in every channel."""

    def __init__(self, low: float = 0.7, high: float = 0.9):
        super().__init__()
        self.low, self.high = float(low), float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        attention = x.mean(1, keepdim=True)
        peak = attention.flatten(1).amax(1).view(-1, *([1] * (x.ndim - 1)))
        threshold = peak * torch.empty_like(peak).uniform_(self.low, self.high)
        return x * (attention < threshold).to(x.dtype)
