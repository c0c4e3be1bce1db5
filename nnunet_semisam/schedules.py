"""Ramp-up schedules for unsupervised loss weights (METHODS.md §1.4).

Plain functions of the iteration counter; trainers pass `t_it` (global iteration, 0-based) and the run length.
"""
from __future__ import annotations

import math


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
