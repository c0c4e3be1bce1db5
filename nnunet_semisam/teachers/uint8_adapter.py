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

Background (METHODS.md §2.4, "Correction (turn 2)"): with `use_mask_for_norm` nnU-Net sets the voxels outside its
mask to 0, the *mean* of the z-scored tissue, so "voxels != the case minimum" takes the background for tissue (it
maps to mid-grey and the teacher sees no outline). `to_uint8(..., background=...)` takes the background from
nnU-Net's own mask instead (`background_from_seg`: the preprocessed `seg < 0` voxels; for an augmented patch also
its padded / rotated-out area):
- percentile branch: p0.5 / p99.5 over the voxels NOT in `background`, min-max over those voxels, `background` set
  to 0 (the minimum rule is not applied then);
- CT: the window is unchanged, the min-max is taken over the non-background voxels and `background` is set to 0;
- RGB: `background` is set to 0 (black) in all 3 channels.
METHODS.md keeps the old rule "where no mask exists (CT, RGB)": that is `background=None`, the default, which gives
exactly the old result for every scheme. Applying a mask that *is* given to CT and RGB too is our choice: a padded
or rotated-out area is not image in any modality, and 0 is what MedSAM's own preprocessing gives outside the image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError

CT_WINDOW = (40.0, 400.0)  # level, width ([MS] defaults)


def _minmax_uint8(x: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """min-max of `x` to [0, 255], `np.uint8` (truncation); with `background`, the range is that of the other voxels
    and the background voxels are 0. All-background or constant input gives zeros."""
    inside = x if background is None else x[~background]
    if inside.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = float(inside.min()), float(inside.max())
    if hi - lo <= 0:
        return np.zeros(x.shape, np.uint8)
    out = np.clip((x - lo) / (hi - lo) * 255.0, 0.0, 255.0)
    if background is not None:
        out[background] = 0
    return np.uint8(out)


def background_from_seg(seg: np.ndarray) -> np.ndarray | None:
    """Rule-U background of one preprocessed case (METHODS.md §2.4 correction) from nnU-Net's `seg` (1, *spatial).

    nnU-Net marks the voxels outside its nonzero / normalisation mask with -1, so the background is `seg[0] < 0`.
    Returns that (*spatial) bool array, or None when no voxel is < 0 (no mask: e.g. CT, RGB, or a mask that covers
    the whole case), so that `to_uint8(..., background=background_from_seg(seg))` keeps the old rule there.
    """
    s = np.asarray(seg)
    if s.ndim < 2:
        raise SemiSAMError(f"background_from_seg expects nnU-Net's seg (1, *spatial), got shape {s.shape}")
    bg = s[0] < 0
    return bg if bg.any() else None


def to_uint8(
    data: np.ndarray,
    normalization_schemes: Sequence[str],
    teacher_channel: int = 0,
    intensity_properties: dict | None = None,
    ct_window: tuple[float, float] = CT_WINDOW,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 teacher image(s) from one preprocessed case `data` (C, *spatial) float (rule U, METHODS.md §2.4).

    normalization_schemes: the plans configuration's `normalization_schemes` (one name per channel).
    intensity_properties: plans' `foreground_intensity_properties_per_channel` (needed for CT only).
    background: optional (*spatial) bool, True outside nnU-Net's mask (`background_from_seg`, plus the padded /
        rotated-out area of an augmented patch). Excluded from the statistics and set to 0 (module docstring and
        METHODS.md §2.4 correction); None keeps the old rule exactly.
    Returns (*spatial, 3) for RGB data, else (*spatial,). Raises SemiSAMError for NaN/inf, missing CT statistics or a
    `background` of the wrong shape.
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise SemiSAMError(f"to_uint8 expects a case array (C, *spatial), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise SemiSAMError("preprocessed case contains NaN or inf values; re-run preprocessing on a clean image")
    schemes = list(normalization_schemes)
    if len(schemes) != data.shape[0]:
        raise SemiSAMError(f"{len(schemes)} normalization schemes for {data.shape[0]} channels; plans and data differ")
    if background is not None:
        background = np.asarray(background)
        if background.shape != data.shape[1:]:
            raise SemiSAMError(f"background must have the case's spatial shape {data.shape[1:]}, got "
                               f"{background.shape}")
        background = background.astype(bool)
    if data.shape[0] >= 3 and all(s == "RGBTo01Normalization" for s in schemes[:3]):
        rgb = np.clip(np.round(data[:3].astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        if background is not None:
            rgb[:, background] = 0
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
        return _minmax_uint8(np.clip(hu, level - width / 2, level + width / 2), background)
    if scheme == "RGBTo01Normalization":  # a single RGB-normalized channel: grayscale in [0, 1]
        gray = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
        if background is not None:
            gray[background] = 0
        return gray
    if background is not None:  # METHODS.md §2.4 correction: nnU-Net's mask, not the case minimum
        inside = x[~background]
        if inside.size == 0:
            return np.zeros(x.shape, np.uint8)
        lo, hi = np.percentile(inside, 0.5), np.percentile(inside, 99.5)
        return _minmax_uint8(np.clip(x, lo, hi), background)
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
