"""Prompts for SAM-family teachers: boxes and points derived from binary masks (METHODS.md §2.3, §5.4).

Conventions (METHODS.md §1.1): a 2D mask is `(H, W)` = (rows, cols); a box is `[x_min, y_min, x_max, y_max]` in
pixels with x = column, both ends inclusive; a 2D point is `(x, y)` (SAM's order). Volumes are `(Z, Y, X)` and
"slice-wise" means slices along Z. Every random choice takes an explicit `numpy.random.Generator`.

Empty masks are not an error: a mask with no component gives **no prompt** (an empty `(0, 4)` box array, or `None`
for a single point), which callers treat as "no pseudo-label" (METHODS.md §2.3, last item).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_semisam.errors import SemiSAMError

_STRUCT_8 = np.ones((3, 3), dtype=bool)  # 8-connectivity in 2D


def _as_binary(mask: np.ndarray, ndim: int, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != ndim:
        raise SemiSAMError(f"{name} must be {ndim}-D, got shape {mask.shape}")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise SemiSAMError(f"{name} contains NaN or inf values")
    return mask > 0


def box_from_mask(mask: np.ndarray) -> np.ndarray | None:
    """Tight box `[x_min, y_min, x_max, y_max]` around all foreground pixels of a 2D mask (whole-mask box).

    Returns an int64 array of shape (4,), or None for an empty mask (documented fallback: no prompt).
    """
    m = _as_binary(mask, 2)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.int64)


def grow_boxes(boxes: np.ndarray, hw: tuple[int, int], shift: np.ndarray | int) -> np.ndarray:
    """Move each side of each box outwards by `shift` px (an int, or (n, 4) per side), clipped to the image.

    boxes: (n, 4) `[x_min, y_min, x_max, y_max]`; hw: image (H, W). Returns a new int64 array (n, 4).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4).copy()
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), boxes.shape)
    h, w = hw
    boxes[:, 0] = np.maximum(0, boxes[:, 0] - shift[:, 0])
    boxes[:, 1] = np.maximum(0, boxes[:, 1] - shift[:, 1])
    boxes[:, 2] = np.minimum(w - 1, boxes[:, 2] + shift[:, 2])
    boxes[:, 3] = np.minimum(h - 1, boxes[:, 3] + shift[:, 3])
    return boxes


def jitter_boxes(boxes: np.ndarray, hw: tuple[int, int], max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Enlarge each box by a random integer 0..max_shift px per side, clipped to the image (MedSAM training style).

    boxes: (n, 4) `[x_min, y_min, x_max, y_max]`; hw: image (H, W). Returns a new int64 array (n, 4).
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if max_shift <= 0 or len(boxes) == 0:
        return boxes.copy()
    return grow_boxes(boxes, hw, rng.integers(0, max_shift + 1, size=boxes.shape))


def boxes_from_mask(
    mask: np.ndarray,
    min_area: int = 10,
    max_boxes: int = 5,
    per_component: bool = True,
    jitter: int = 0,
    rng: np.random.Generator | None = None,
    margin: int = 0,
) -> np.ndarray:
    """Boxes from a 2D binary mask (METHODS.md §2.3).

    per_component=True: one tight box per 8-connected component with area >= `min_area`, at most `max_boxes`, largest
    component first (ties: lower label first). per_component=False: one whole-mask box, if the mask has >= `min_area`
    foreground pixels. `margin > 0` moves every side outwards by `margin` px (clipped to the image; components are
    selected on the tight boxes first), `jitter > 0` then by a further random 0..jitter px (needs `rng`); the default
    is tight.

    Returns int64 `(n, 4)`, n = 0 when there is no component (empty mask: no prompt, not an error).
    """
    m = _as_binary(mask, 2)
    if per_component:
        labels, n = ndimage.label(m, structure=_STRUCT_8)
        if n == 0:
            return np.zeros((0, 4), dtype=np.int64)
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = sorted((i for i in range(n) if areas[i] >= min_area), key=lambda i: (-areas[i], i))[:max_boxes]
        slices = ndimage.find_objects(labels)
        boxes = [[slices[i][1].start, slices[i][0].start, slices[i][1].stop - 1, slices[i][0].stop - 1]
                 for i in order]
        out = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    else:
        out = np.zeros((0, 4), dtype=np.int64)
        if m.sum() >= max(min_area, 1):
            out = box_from_mask(m)[None]
    if margin < 0:
        raise SemiSAMError(f"boxes_from_mask: margin must be >= 0 px, got {margin}")
    if margin > 0 and len(out):
        out = grow_boxes(out, m.shape, margin)
    if jitter > 0 and len(out):
        if rng is None:
            raise SemiSAMError("boxes_from_mask: jitter > 0 needs an rng (numpy.random.Generator)")
        out = jitter_boxes(out, m.shape, jitter, rng)
    return out


def boxes_from_mask_slicewise(mask: np.ndarray, **kwargs) -> dict[int, np.ndarray]:
    """`boxes_from_mask` on every Z-slice of a `(Z, Y, X)` mask; returns {z: (n, 4)} for slices with n >= 1 only."""
    m = _as_binary(mask, 3)
    out: dict[int, np.ndarray] = {}
    for z in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)):
        b = boxes_from_mask(m[z], **kwargs)
        if len(b):
            out[int(z)] = b
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest connected component (full connectivity: 8 in 2D, 26 in 3D) of a binary mask, as bool."""
    m = np.asarray(mask) > 0
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    if n <= 1:
        return m
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    return labels == int(np.argmax(areas))


def sample_interior_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One positive point deep inside the largest blob (RITM rule used by SemiSAM; METHODS.md §5.4 step 1.4).

    Euclidean distance transform inside the largest component; a uniform random voxel among those with
    EDT > max(EDT)/2 (>= for single-voxel blobs). Works for any ndim. Returns array-index coordinates (ndim,) int64
    (for 2D: (row, col)), or None for an empty mask.
    """
    m = largest_component(mask)
    if not m.any():
        return None
    edt = ndimage.distance_transform_edt(np.pad(m, 1))[(slice(1, -1),) * m.ndim]
    peak = edt.max()
    cand = np.argwhere(edt > peak / 2) if peak > 1 else np.argwhere(m)
    return cand[rng.integers(len(cand))].astype(np.int64)


def sample_points(
    mask: np.ndarray,
    rng: np.random.Generator,
    n_pos: int = 1,
    n_neg: int = 0,
    interior: bool = True,
    neg_margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positive/negative point prompts from a 2D mask, in SAM order `(x, y)` with labels 1 / 0.

    Positive points: the first is `sample_interior_point` (if `interior`), the rest uniform over the foreground.
    Negative points: uniform over the background; with `neg_margin`, only within the whole-mask box grown by that many
    pixels (hard negatives near the object). Returns (coords float32 (n, 2), labels int64 (n,)); n = 0 for an empty
    mask (no prompt).
    """
    m = _as_binary(mask, 2)
    coords: list[np.ndarray] = []
    labels: list[int] = []
    if not m.any():
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    fg = np.argwhere(m)
    for k in range(n_pos):
        p = sample_interior_point(m, rng) if (k == 0 and interior) else fg[rng.integers(len(fg))]
        coords.append(p[::-1])
        labels.append(1)
    if n_neg > 0:
        bg_mask = ~m
        if neg_margin is not None:
            x0, y0, x1, y1 = box_from_mask(m)
            win = np.zeros_like(m)
            win[max(0, y0 - neg_margin): y1 + neg_margin + 1, max(0, x0 - neg_margin): x1 + neg_margin + 1] = True
            bg_mask &= win
        bg = np.argwhere(bg_mask)
        for _ in range(n_neg if len(bg) else 0):
            coords.append(bg[rng.integers(len(bg))][::-1])
            labels.append(0)
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int64)


def sample_points_slicewise(mask: np.ndarray, rng: np.random.Generator, **kwargs
                            ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """`sample_points` on every non-empty Z-slice of a `(Z, Y, X)` mask: {z: (coords (n, 2) as (x, y), labels)}."""
    m = _as_binary(mask, 3)
    return {int(z): sample_points(m[z], rng, **kwargs)
            for z in np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))}


def boxes_to_mask(boxes: Sequence[Sequence[int]], hw: tuple[int, int]) -> np.ndarray:
    """Filled-box mask (H, W) bool: the union of the inclusive boxes (used to turn box-only prompts into masks)."""
    out = np.zeros(hw, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        out[y0: y1 + 1, x0: x1 + 1] = True
    return out
