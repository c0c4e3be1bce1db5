"""Rule U: nnU-Net preprocessed arrays -> the uint8 images MedSAM expects (METHODS.md §2.4).

Bit-exactness of the teacher is defined relative to the uint8 image this rule gives.
- RGB stored with `RGBTo01Normalization` (all of the first 3 channels): `u = round(x * 255)` per channel, clipped to
  [0, 255]; output (*spatial, 3).
- CT (`CTNormalization`): nnU-Net stores clipped, z-scored HU; HU are recovered with the plans' foreground mean/std
  of the channel, windowed at level 40 / width 400, min-max scaled to [0, 255] over the case, `np.uint8`
  (MedSAM `pre_CT_MR.py`).
- Everything else (z-score MR, no normalization, ...): channel `teacher_channel`; percentiles p0.5 / p99.5 over
  the voxels != the case minimum, clip, min-max to [0, 255], voxels equal to the case minimum set to 0, `np.uint8`
  (truncation). Multi-modal data: the teacher sees only `teacher_channel` (replicated to 3 channels by MedSAM).
Grayscale output is (*spatial,). Statistics are per case (the whole volume), so slices of one case share a scale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError

CT_WINDOW = (40.0, 400.0)  # level, width ([MS] defaults)


def _minmax_uint8(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros(x.shape, np.uint8)
    return np.uint8((x - lo) / (hi - lo) * 255.0)


def to_uint8(
    data: np.ndarray,
    normalization_schemes: Sequence[str],
    teacher_channel: int = 0,
    intensity_properties: dict | None = None,
    ct_window: tuple[float, float] = CT_WINDOW,
) -> np.ndarray:
    """uint8 teacher image(s) from one preprocessed case `data` (C, *spatial) float (rule U, METHODS.md §2.4).

    normalization_schemes: the plans configuration's `normalization_schemes` (one name per channel).
    intensity_properties: plans' `foreground_intensity_properties_per_channel` (needed for CT only).
    Returns (*spatial, 3) for RGB data, else (*spatial,). Raises SemiSAMError for NaN/inf or missing CT statistics.
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise SemiSAMError(f"to_uint8 expects a case array (C, *spatial), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise SemiSAMError("preprocessed case contains NaN or inf values; re-run preprocessing on a clean image")
    schemes = list(normalization_schemes)
    if len(schemes) != data.shape[0]:
        raise SemiSAMError(f"{len(schemes)} normalization schemes for {data.shape[0]} channels; plans and data differ")
    if data.shape[0] >= 3 and all(s == "RGBTo01Normalization" for s in schemes[:3]):
        rgb = np.clip(np.round(data[:3].astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.moveaxis(rgb, 0, -1)
    if not 0 <= teacher_channel < data.shape[0]:
        raise SemiSAMError(f"teacher_channel {teacher_channel} out of range for {data.shape[0]} channels")
    x = data[teacher_channel].astype(np.float64)
    scheme = schemes[teacher_channel]
    if scheme == "CTNormalization":
        props = (intensity_properties or {}).get(str(teacher_channel)) or (intensity_properties or {}).get(
            teacher_channel)
        if props is None:
            raise SemiSAMError("CT data needs the plans' foreground_intensity_properties_per_channel to undo the "
                               f"z-score (channel {teacher_channel})")
        hu = x * max(float(props["std"]), 1e-8) + float(props["mean"])
        level, width = ct_window
        return _minmax_uint8(np.clip(hu, level - width / 2, level + width / 2))
    if scheme == "RGBTo01Normalization":  # a single RGB-normalized channel: grayscale in [0, 1]
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    vmin = x.min()
    fg = x[x != vmin]
    if fg.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = np.percentile(fg, 0.5), np.percentile(fg, 99.5)
    pre = np.clip(x, lo, hi)
    span = pre.max() - pre.min()
    pre = (pre - pre.min()) / span * 255.0 if span > 0 else np.zeros_like(pre)
    pre[x == vmin] = 0
    return np.uint8(pre)
