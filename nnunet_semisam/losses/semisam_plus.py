"""Semi-SAM+ loss pieces and schedules (METHODS.md §5.5, §5.7).

- `rs_consistency`: L_rs-con = per sample `sum_v M_conf (p_fg - Pseudo)^2 / max(sum_v M_conf, 1)`, averaged over
  samples (a sample with an empty confidence mask contributes 0).
- `lambda_rampup`: lambda(t) = lambda_max * exp(-5 (1 - min(t, T_r)/T_r)^2) (the standard sigmoid ramp-up).
- `beta_rampdown`: beta(t) = beta_max * exp(-t / T_d).
- `phase_bounds` / `phase_at`: Phase 0 (warm-up), 1 (semi-supervised), 2 (fine-tune) by fraction of the run's epochs.
t is measured in epochs since Phase 1 started (fractional: iterations / iterations per epoch).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def rs_consistency(p_fg: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    """L_rs-con of METHODS.md §5.5. p_fg (B, *spatial) student foreground probability (gets the gradient);
    pseudo (B, *spatial) in [0, 1]; conf (B, *spatial) {0, 1}. Returns a scalar."""
    if p_fg.shape != pseudo.shape or p_fg.shape != conf.shape:
        raise ValueError(f"p_fg {tuple(p_fg.shape)}, pseudo {tuple(pseudo.shape)} and conf {tuple(conf.shape)} "
                         "must have the same shape")
    c = conf.to(p_fg.dtype).flatten(1)
    sq = (p_fg.flatten(1) - pseudo.detach().to(p_fg.dtype).flatten(1)) ** 2
    per_sample = (c * sq).sum(1) / c.sum(1).clamp_min(1.0)
    return per_sample.mean()


def lambda_rampup(t: float, lambda_max: float = 1.0, t_r: float = 10.0) -> float:
    """lambda(t) = lambda_max exp(-5 (1 - min(t, T_r)/T_r)^2); lambda_max for T_r <= 0; 0 for t < 0."""
    if t < 0:
        return 0.0
    if t_r <= 0:
        return float(lambda_max)
    phase = 1.0 - min(float(t), t_r) / t_r
    return float(lambda_max * math.exp(-5.0 * phase * phase))


def beta_rampdown(t: float, beta_max: float = 0.3, t_d: float = 40.0) -> float:
    """beta(t) = beta_max exp(-t / T_d); 0 for t < 0."""
    if t < 0:
        return 0.0
    return float(beta_max * math.exp(-float(t) / t_d))


def phase_bounds(num_epochs: int, fractions: Sequence[float] = (0.25, 0.5, 0.25)) -> tuple[int, int]:
    """(first epoch of Phase 1, first epoch of Phase 2) for a run of `num_epochs`: Phase 0 = epochs [0, e1),
    Phase 1 = [e1, e2), Phase 2 = [e2, num_epochs). Fractions (f0, f1, f2) are normalised; the manual's 50/100/50
    epochs give (0.25, 0.5, 0.25). Boundaries round half up."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"phase fractions must be three non-negative numbers, got {tuple(fractions)}")
    total = float(sum(fractions))
    e1 = int(math.floor(num_epochs * fractions[0] / total + 0.5))
    e2 = int(math.floor(num_epochs * (fractions[0] + fractions[1]) / total + 0.5))
    return e1, max(e1, e2)


def phase_at(epoch: int, num_epochs: int, fractions: Sequence[float] = (0.25, 0.5, 0.25)) -> int:
    """0, 1 or 2: the phase of `epoch` (0-based)."""
    e1, e2 = phase_bounds(num_epochs, fractions)
    return 0 if epoch < e1 else (1 if epoch < e2 else 2)


def phase_lr(epoch: int, num_epochs: int, fractions: Sequence[float] = (0.25, 0.5, 0.25), lr0: float = 2e-3,
             lr_finetune: float = 2e-4, exponent: float = 0.9) -> float:
    """Learning rate of `epoch` (METHODS.md §5.7): Phase 0 `lr0` constant; Phase 1 `lr0 (1 - i/n1)^0.9` with i the
    epoch's index in the phase and n1 its length; Phase 2 the same poly from `lr_finetune`."""
    e1, e2 = phase_bounds(num_epochs, fractions)
    if epoch < e1:
        return float(lr0)
    if epoch < e2:
        return float(lr0 * (1 - (epoch - e1) / (e2 - e1)) ** exponent)
    return float(lr_finetune * (1 - (epoch - e2) / max(num_epochs - e2, 1)) ** exponent)


def offline_rs_consistency(p_fg: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, float]:
    """L_rs-con against stored Algorithm-2 pseudo-labels carried as extra channels `[q, conf, valid]` (B, 3, *spatial)
    of the augmented patch (`nnunet_semisam.data.soft_targets`): Pseudo = q, M_conf = (conf > 0.5) & (valid > 0.5)
    (the channels were interpolated by the spatial augmentation). Returns (loss, confident share of the voxels)."""
    q, conf = extra[:, 0], (extra[:, 1] > 0.5) & (extra[:, 2] > 0.5)
    return rs_consistency(p_fg, q, conf), float(conf.float().mean())
