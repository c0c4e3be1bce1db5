"""The unsupervised (and BCP's mixed) losses of the baselines, one function per method (METHODS.md §8.2-8.7).

Inputs are probabilities `(B, K, *spatial)` unless named logits; each function is tested against a hand-computed case
in `tests/losses/test_baseline_losses.py`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from nnunet_semisam.losses.primitives import _labels, binary_dice_loss, dice_lin, dice_sq, one_hot, sharpen


def uamt_consistency(p_student: torch.Tensor, p_teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UA-MT (§8.2): `Σ mask (p_s - p_t)² / (2 Σ mask + 1e-16)`; `mask` (B, 1, *spatial) broadcasts over channels.
    The literal 2 is [S4M]'s (its C = 2 channels); the teacher side is detached."""
    dist = (p_student - p_teacher.detach()) ** 2
    return (mask * dist).sum() / (2 * mask.expand_as(dist[:, :1]).sum() + 1e-16)


def cps_pseudo_supervision(logits_i: torch.Tensor, logits_j: torch.Tensor) -> torch.Tensor:
    """CPS (§8.3): `CE(z_i, argmax sg(softmax(z_j)))`, mean over voxels."""
    target = torch.argmax(logits_j.detach(), dim=1)
    return F.cross_entropy(logits_i, target)


def bcp_region_loss(logits: torch.Tensor, target_outside: torch.Tensor, target_inside: torch.Tensor,
                    box_mask: torch.Tensor, weight_outside: float, weight_inside: float) -> torch.Tensor:
    """BCP's loss on one mixed image (§8.4, [BCP] `mix_loss`):
    `½ Σ_R ω_R (D_lin(P, onehot(Y_R), m_R) + CE_R)`, `CE_R = Σ m_R CE / (Σ m_R + 1e-16)`, regions
    outside (m = M) and inside (m = 1 - M) of the box, `box_mask` M = 1 outside the box (spatial or (B, 1, ...))."""
    k = logits.shape[1]
    spatial = logits.ndim - 2
    probs = torch.softmax(logits, 1)
    m = box_mask.to(logits.dtype)
    if m.ndim == spatial:  # one box shared across the batch
        m = m.expand(logits.shape[0], *m.shape)
    elif m.ndim == spatial + 2:
        m = m[:, 0]
    loss = logits.new_zeros(())
    for target, region, weight in ((target_outside, m, weight_outside), (target_inside, 1 - m, weight_inside)):
        y = _labels(target, spatial)
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_r = (region * ce).sum() / (region.sum() + 1e-16)
        loss = loss + weight * (dice_lin(probs, one_hot(y, k, spatial), region[:, None]) + ce_r)
    return loss / 2


def urpc_loss(probs_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """URPC (§8.5): `p̄ = mean_s p_s`, `D_s = Σ_c p̄ (log p̄ - log p_s)`, `ω_s = exp(-D_s)`,
    `L_s = mean(ω_s (p̄ - p_s)²) / (mean(ω_s) + 1e-8) + mean(D_s)`, mean over s; no stop-gradient."""
    p_bar = torch.stack(list(probs_list)).mean(0)
    total = 0.0
    for p in probs_list:
        d = (p_bar * (torch.log(p_bar + 1e-8) - torch.log(p + 1e-8))).sum(1, keepdim=True)
        w = torch.exp(-d)
        total = total + (w * (p_bar - p) ** 2).mean() / (w.mean() + 1e-8) + d.mean()
    return total / len(probs_list)


def mcnet_mutual_consistency(probs_list: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """MC-Net+ (§8.6): `Σ_{i≠j} mean((P_i - sharpen(P_j))²)`, no stop-gradient (the targets stay in the graph)."""
    total = 0.0
    for i, p_i in enumerate(probs_list):
        for j, p_j in enumerate(probs_list):
            if i != j:
                total = total + torch.mean((p_i - sharpen(p_j, temperature)) ** 2)
    return total


def mcnet_supervised_dice(probs_list: Sequence[torch.Tensor], labels: torch.Tensor, binary: bool) -> torch.Tensor:
    """MC-Net+'s supervised term (§8.6): `Σ_i Dice(P_i, Y)` over the decoders, no CE. `binary` ([MCN] 3D):
    `binary_dice_loss(P_i[:, c], Y == c)` averaged over the foreground classes c (the fg channel when K = 2);
    otherwise ([MCN] 2D) `D_sq(P_i, onehot(Y))` with the factor 2. `labels` (B, 1, *spatial) or (B, *spatial)."""
    k, spatial = probs_list[0].shape[1], probs_list[0].ndim - 2
    y = _labels(labels, spatial)
    total = 0.0
    for p in probs_list:
        if binary:
            total = total + sum(binary_dice_loss(p[:, c], y == c) for c in range(1, k)) / (k - 1)
        else:
            total = total + dice_sq(p, one_hot(y, k, spatial))
    return total


def cct_consistency(p_main: torch.Tensor, p_aux_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """CCT (§8.7): `(1/A) Σ_a mean((p_main - p_aux,a)²)`, no stop-gradient ([S4M])."""
    return sum(torch.mean((p_main - p) ** 2) for p in p_aux_list) / len(p_aux_list)
