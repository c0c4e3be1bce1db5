"""Shared primitives of the semi-supervised baselines (METHODS.md §1.4): soft Dice variants, sharpening, entropy
uncertainty and its threshold schedule, the largest-connected-component filter and the copy-paste box mask.

Tensors follow METHODS.md §1.1: probabilities and one-hot targets `(B, K, *spatial)`, label maps `(B, *spatial)` or
`(B, 1, *spatial)`. Each function is tested against hand-computed values in `tests/losses/test_primitives.py`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_semisam.schedules import sigmoid_rampup


def _labels(labels: torch.Tensor, spatial_ndim: int | None = None) -> torch.Tensor:
    """(B, *spatial) long from (B, 1, *spatial) or (B, *spatial)."""
    if spatial_ndim is not None and labels.ndim == spatial_ndim + 2:
        labels = labels[:, 0]
    elif spatial_ndim is None and labels.ndim >= 3 and labels.shape[1] == 1:
        labels = labels[:, 0]
    return labels.long()


def one_hot(labels: torch.Tensor, num_classes: int, spatial_ndim: int | None = None) -> torch.Tensor:
    """Float one-hot `(B, K, *spatial)` of integer labels `(B, 1, *spatial)` or `(B, *spatial)`; give `spatial_ndim`
    when a spatial size may be 1 (otherwise a size-1 second axis is taken for the channel axis)."""
    lab = _labels(labels, spatial_ndim)
    return F.one_hot(lab, num_classes).movedim(-1, 1).float()


def dice_sq(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """`D_sq` ([S4M] `DiceLoss`): per class k, sums over batch and space,
    `1 - (2 Σ P_k Y_k + s) / (Σ P_k² + Σ Y_k² + s)`; mean over all K classes, background included."""
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = (probs * probs).sum(dims) + (target * target).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def dice_lin(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
             smooth: float = 1e-5) -> torch.Tensor:
    """`D_lin(mask)` ([BCP] `mask_DiceLoss`): per sample n and class k, sums over space inside `mask`,
    `1 - (2 Σ m P Y + s) / (Σ m (P + Y) + s)`; mean over n and k. `mask` is (B, 1, *spatial), (B, *spatial) or
    (*spatial) and broadcasts over classes; None = everywhere."""
    if mask is None:
        m = torch.ones_like(probs[:, :1])
    else:
        m = mask.to(probs.dtype)
        while m.ndim < probs.ndim:
            m = m.unsqueeze(0) if m.ndim < probs.ndim - 1 else m.unsqueeze(1)
    dims = list(range(2, probs.ndim))
    inter = (m * probs * target).sum(dims)
    denom = (m * (probs + target)).sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def dice_vnet(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`D_vnet` ([MN]): per class k over batch and space, `1 - 2 Σ P Y / max(Σ P² + Σ Y², 1e-6)`; mean over k."""
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = torch.clamp((probs * probs).sum(dims) + (target * target).sum(dims), min=1e-6)
    return (1 - 2 * inter / denom).mean()


def binary_dice_loss(p_fg: torch.Tensor, y_fg: torch.Tensor, smooth: float = 1e-8) -> torch.Tensor:
    """MC-Net+ 3D Dice ([MCN] `Binary_dice_loss`) on the foreground channel: `1 - (2ΣPY + s) / (ΣP + ΣY + s)`."""
    y = y_fg.to(p_fg.dtype)
    return 1 - (2 * (p_fg * y).sum() + smooth) / (p_fg.sum() + y.sum() + smooth)


def sharpen(p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """MC-Net+ sharpening ([MCN]): `p^{1/T} / (p^{1/T} + (1 - p)^{1/T})` per channel, not renormalised over classes."""
    a = p ** (1.0 / temperature)
    return a / (a + (1 - p) ** (1.0 / temperature))


def entropy_uncertainty(mean_probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """UA-MT's uncertainty ([S4M]): `U = -Σ_c p̄_c log(p̄_c + eps)`, shape (B, 1, *spatial)."""
    return -(mean_probs * torch.log(mean_probs + eps)).sum(1, keepdim=True)


def uamt_threshold(t_it: int, total_iterations: int) -> float:
    """UA-MT's threshold (METHODS.md §8.2): `(0.75 + 0.25 ramp(t_it, T_it)) ln 2`, the ramp over the full run."""
    return (0.75 + 0.25 * sigmoid_rampup(t_it, total_iterations)) * math.log(2)


def largest_connected_component(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per sample and per foreground class, keep only the largest connected component (full connectivity, as
    skimage's `label` default in [BCP] `get_ACDC_LargestCC`); other voxels of that class become background.
    Accepts (B, *spatial) or (B, 1, *spatial) integer tensors and returns the same shape, dtype and device."""
    from scipy import ndimage

    squeeze = labels.ndim >= 3 and labels.shape[1] == 1
    lab = (labels[:, 0] if squeeze else labels).detach().cpu().numpy()
    out = np.zeros_like(lab)
    structure = np.ones((3,) * (lab.ndim - 1), dtype=bool)
    for n in range(lab.shape[0]):
        for c in range(1, num_classes):
            components, count = ndimage.label(lab[n] == c, structure=structure)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())[1:]
            out[n][components == 1 + int(np.argmax(sizes))] = c
    result = torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)
    return result[:, None] if squeeze else result


def copy_paste_box_mask(spatial_shape: Sequence[int], fraction: float = 2 / 3,
                        generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """BCP's box mask (METHODS.md §8.4): one box of side `floor(fraction * S_d)` on every spatial dim, starting
    uniformly in `{0, ..., S_d - side - 1}` (0 when that set is empty); returns a float tensor of `spatial_shape`
    that is 0 inside the box and 1 outside."""
    mask = torch.ones(tuple(int(s) for s in spatial_shape), device=device)
    box = []
    for s in spatial_shape:
        side = int(math.floor(fraction * int(s)))
        high = int(s) - side  # randint's upper bound is exclusive: starts 0 .. S - side - 1
        start = int(torch.randint(0, high, (1,), generator=generator)) if high > 0 else 0
        box.append(slice(start, start + side))
    mask[tuple(box)] = 0
    return mask
