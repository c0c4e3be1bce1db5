"""Ramp-up schedules for unsupervised loss weights (METHODS.md §1.4) and the cosine learning rate of §4.6.

Plain functions of the iteration counter; trainers pass `t_it` (global iteration, 0-based) and the run length.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Sigmoid ramp-up of Laine & Aila (2017), [S4M] `utils/ramps.py`: `exp(-5 (1 - clip(c, 0, L)/L)^2)`, 1 if L == 0.

    Returns a factor in [0, 1]: exp(-5) ~= 0.0067 at c = 0, 1 at c >= L.
    """
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(rampup_length)) / float(rampup_length)
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(t_it: int, lambda_max: float, total_iterations: int, rampup_fraction: float = 1.0) -> float:
    """SSL4MIS consistency weight rescaled to the run length (METHODS.md §1.4 Interpretation):

    `w(t_it) = lambda_max * ramp(t_it, rho * T_it)`, where `T_it` is the total number of iterations of the run and
    `rho` (`rampup_fraction`) the part of the run the ramp spans.
    """
    return float(lambda_max) * sigmoid_rampup(t_it, rampup_fraction * total_iterations)


def cosine_lr(step: float, initial_lr: float, max_steps: int, min_lr: float = 0.0) -> float:
    """CosineAnnealingLR's closed form: `min_lr + (initial_lr - min_lr) (1 + cos(pi step / max_steps)) / 2`."""
    step = min(max(float(step), 0.0), float(max_steps))
    return float(min_lr + (initial_lr - min_lr) * (1.0 + math.cos(math.pi * step / max_steps)) / 2.0)


class CosineLRScheduler(LRScheduler):
    """Cosine annealing per epoch with nnU-Net's scheduler interface (`step(current_epoch)`, like PolyLRScheduler).

    METHODS.md §4.6: CosineAnnealingLR(T_max = total epochs, eta_min = 1e-5), stepped per epoch; every param group
    gets the same learning rate (weight decay differs per group, the rate does not).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, min_lr: float = 0.0):
        self.initial_lr, self.max_steps, self.min_lr = float(initial_lr), int(max_steps), float(min_lr)
        self.ctr = 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = cosine_lr(current_step, self.initial_lr, self.max_steps, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


class EpochLR:
    """nnU-Net's `lr_scheduler.step(current_epoch)` protocol over any function of the epoch: every param group of
    `optimizer` gets `lr_at(epoch)` (Semi-SAM+'s `losses.semisam_plus.phase_lr`, METHODS.md §5.7)."""

    def __init__(self, optimizer, lr_at):
        self.optimizer, self.lr_at = optimizer, lr_at

    def step(self, current_epoch: int) -> None:
        lr = float(self.lr_at(current_epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
