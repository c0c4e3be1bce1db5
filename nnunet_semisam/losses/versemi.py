"""VerSemi's synthetic CutMix task and losses (METHODS.md §6.3, §6.4).

Notation: `F(x, t)` the head's 2-class logits with prompt t, `P_t = softmax(F)_1`; binary masks `y` are (B, *S)
floats; the context mask `M` is (B, 1, *S), 0 inside one box per sample and 1 outside; `Dice` is the squared-
denominator foreground Dice loss over the whole batch (smooth 1e-5).

    x_mix  = x_a M + x_b (1 - M),  y_mix = y_a M + y_b (1 - M)                  labeled halves a, b
    L_sup  = Dice(P_t(x_l), y_l) + CE(F(x_l, t), y_l)                           own task t per sample
    L_syn  = Dice(P_{K+1}(x_mix), y_mix)
    L_aux  = 1/2 [l(F(x_mix, t_a), y_a M) + l(F(x_mix, t_b), y_b (1 - M))],  l = Dice + CE; y_mix for t_a = t_b
    x_cu   = x_u M + x_l (1 - M)
    L_u    = Dice(P_{K+1}(x_cu), sg(clip(max_k P_k(x_cu), 0, 1)))              stop-gradient on the target
    L_mixlab = Dice(P_{K+1}(x_cu) (1 - M), y_l (1 - M))                         each sample with its own mask

The official `L_mixlab` multiplies a (B, *S) tensor by the (B, 1, *S) mask, which broadcasts to (B, B, *S) and pairs
sample j's prediction with sample i's mask; here the mask's channel axis is dropped first.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

#: CutMix box side ratio r: fixed in phase A, one draw of U(0.3, 0.6) per iteration in phase B (§6.3)
PHASE_A_RATIO = 2.0 / 3.0
PHASE_B_RATIO_RANGE = (0.3, 0.6)
DICE_SMOOTH = 1e-5


def mix_ratio(phase: str, generator: torch.Generator | None = None) -> float:
    """r of the context mask for phase "A" or "B"."""
    if phase == "A":
        return PHASE_A_RATIO
    if phase != "B":
        raise ValueError(f"phase must be 'A' or 'B', got {phase!r}")
    lo, hi = PHASE_B_RATIO_RANGE
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def context_mask(batch: int, spatial: Sequence[int], ratio: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 1, *S) float mask: per sample one box of sides floor(r S_d) at a start uniform in {0, ..., S_d - s_d - 1}
    (0 when the box fills the dim) set to 0, 1 elsewhere (§6.3)."""
    mask = torch.ones(batch, 1, *spatial, device=device)
    for b in range(batch):
        box = []
        for size in spatial:
            side = int(math.floor(ratio * size))
            start = int(torch.randint(0, max(size - side, 1), (), generator=generator))
            box.append(slice(start, start + side))
        mask[(b, 0, *box)] = 0.0
    return mask


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a M + b (1 - M); mask (B, 1, *S) broadcasts over a (B, C, *S) image; for (B, *S) masks pass mask[:, 0]."""
    return a * mask + b * (1 - mask)


def dice_fg(p: torch.Tensor, y: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 - (2 sum(p y) + s) / (sum p^2 + sum y^2 + s) over the whole batch ([VS] `dice_loss`)."""
    y = y.to(p.dtype)
    return 1 - (2 * (p * y).sum() + smooth) / ((p * p).sum() + (y * y).sum() + smooth)


def fg_prob(logits2: torch.Tensor) -> torch.Tensor:
    """P = softmax(F)_1, (B, *S)."""
    return torch.softmax(logits2.float(), 1)[:, 1]


def dice_ce(logits2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dice(P, y) + CE(F, y) for a binary target y (B, *S)."""
    return dice_fg(fg_prob(logits2), y) + F.cross_entropy(logits2.float(), y.round().long())


def supervised_loss(logits_own: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_sup: each sample with its own task's prompt."""
    return dice_ce(logits_own, y)


def synthetic_loss(logits_union: torch.Tensor, y_mix: torch.Tensor) -> torch.Tensor:
    """L_syn = Dice(P_{K+1}(x_mix), y_mix)."""
    return dice_fg(fg_prob(logits_union), y_mix)


def aux_targets(y_a: torch.Tensor, y_b: torch.Tensor, mask: torch.Tensor, t_a: torch.Tensor,
                t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the two task prompts on x_mix: y_a M and y_b (1 - M), or y_mix for both where t_a = t_b."""
    m = mask[:, 0]
    y_mix = mix(y_a, y_b, m)
    same = (t_a == t_b).view(-1, *([1] * (y_a.ndim - 1))).to(y_a.device)
    return torch.where(same, y_mix, y_a * m), torch.where(same, y_mix, y_b * (1 - m))


def aux_loss(logits_ta: torch.Tensor, logits_tb: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
             mask: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    """L_aux (§6.4, with l = Dice + CE as the paper says)."""
    target_a, target_b = aux_targets(y_a, y_b, mask, t_a, t_b)
    return 0.5 * (dice_ce(logits_ta, target_a) + dice_ce(logits_tb, target_b))


def aggregated_target(task_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sg(clip(max_k P_k, 0, 1)) over the K task prompts' foreground probabilities (each (B, *S))."""
    return torch.stack(list(task_probs), 0).amax(0).clamp(0, 1).detach()


def unlabeled_loss(logits_union_cu: torch.Tensor, p_agg: torch.Tensor) -> torch.Tensor:
    """L_u = Dice(P_{K+1}(x_cu), sg(P_agg))."""
    return dice_fg(fg_prob(logits_union_cu), p_agg.detach())


def mixlab_loss(logits_union_cu: torch.Tensor, y_l: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_mixlab = Dice(P_{K+1}(x_cu) (1 - M), y_l (1 - M)), each sample with its own mask (B, 1, *S)."""
    inside = 1 - mask[:, 0]
    return dice_fg(fg_prob(logits_union_cu) * inside, y_l * inside)
