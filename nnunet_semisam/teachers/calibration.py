"""Teacher threshold calibration on the labeled cases (METHODS.md §4.5, "calibrated teacher maps"; ours).

A foundation-model teacher's 0.5 boundary is its own convention, not the dataset's: on the KD benchmark LiteMedSAM's
mask from ground-truth boxes covers about 0.8 of the label's area, so a student trained to match its map learns
masks that are too small, the boxes drawn from those masks shrink, and the closed loop feeds that back.
The labeled cases say where the dataset's boundary lies in the teacher's map:

- `calibrate_threshold`: `t* = argmax_t mean_i Dice(q_i > t, y_i)` over the labeled cases that have a GT-box target
  (training labels only), on the grid `THRESHOLDS`; ties go to the larger t (closer to the teacher's own 0.5).
- `recalibrate`: the map the student is trained on, `q' = sigmoid(logit(q) - logit(t*))`: monotone in q, so the
  teacher's ranking of pixels is kept, and `q' = 0.5` exactly where `q = t*` (t* = 0.5 gives q back).
- `to_teacher_scale`: its inverse, `sigmoid(logit(p) + logit(t*))`, for a probability that is already on the
  dataset's scale (the student's) and is stored next to the teacher's raw maps: `recalibrate` then gives p back.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from nnunet_semisam.errors import SemiSAMError

THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02)
EPS = 1e-6  # q is clamped to [EPS, 1 - EPS] before the logit


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice in `evaluation.metrics.binary_metrics`' strict convention (two empty masks: 1), overlap only: the
    surface distances that function also computes are not needed for ten thresholds per case."""
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else float(2.0 * inter / total)


def calibrate_threshold(pairs: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Iterable[float] = THRESHOLDS
                        ) -> tuple[float, dict[float, float], int]:
    """(t*, {t: mean Dice}, number of cases) from (teacher map q, label mask y) pairs of the same shape.

    Dice of two empty masks is 1. Raises SemiSAMError when no pair is given, a shape differs or a threshold is not
    in (0, 1).
    """
    grid = [float(t) for t in thresholds]
    bad = [t for t in grid if not 0.0 < t < 1.0]
    if bad or not grid:
        raise SemiSAMError(f"calibration thresholds must lie in (0, 1), got {grid}")
    sums = dict.fromkeys(grid, 0.0)
    n = 0
    for q, y in pairs:
        q, y = np.asarray(q, np.float32), np.asarray(y, bool)
        if q.shape != y.shape:
            raise SemiSAMError(f"calibrate_threshold: teacher map {q.shape} and label {y.shape} differ in shape")
        for t in grid:
            sums[t] += _dice(q > t, y)
        n += 1
    if n == 0:
        raise SemiSAMError("calibrate_threshold: no labeled case with a teacher map to calibrate on")
    dice = {t: s / n for t, s in sums.items()}
    return max(grid, key=lambda t: (dice[t], t)), dice, n


def _threshold_logit(threshold: float) -> float:
    """logit(threshold), the shift of `recalibrate` and `to_teacher_scale`; a threshold outside (0, 1) is an error."""
    if not 0.0 < threshold < 1.0:
        raise SemiSAMError(f"teacher threshold must lie in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def recalibrate(q: torch.Tensor, threshold: float) -> torch.Tensor:
    """`sigmoid(logit(q) - logit(threshold))` (module docstring); q is returned unchanged for threshold 0.5."""
    shift = _threshold_logit(threshold)
    if shift == 0.0:
        return q
    return torch.sigmoid(torch.logit(q.float().clamp(EPS, 1.0 - EPS)) - shift).to(q.dtype)


def to_teacher_scale(p: np.ndarray, threshold: float) -> np.ndarray:
    """`sigmoid(logit(p) + logit(threshold))` (float32), the inverse of `recalibrate`: a student probability p
    mapped onto the teacher's scale at t*, so that a map fused from both in the teacher's scale recalibrates to
    `max(recalibrate(q), p)` (`closed_loop.fuse_with_student`); p is returned as float32 for threshold 0.5."""
    shift = _threshold_logit(threshold)
    p = np.asarray(p, np.float32)
    if shift == 0.0:
        return p
    p = np.clip(p.astype(np.float64), EPS, 1.0 - EPS)
    return (1.0 / (1.0 + np.exp(-(np.log(p / (1.0 - p)) + shift)))).astype(np.float32)


def check_threshold_setting(value, name: str) -> None:
    """A trainer's `teacher_threshold`: "calibrate" or a number in (0, 1); otherwise a one-line error naming it."""
    ok = value == "calibrate" or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1)
    if not ok:
        raise SemiSAMError(f"{name} = {value!r}: expected 'calibrate' or a threshold in (0, 1)")
