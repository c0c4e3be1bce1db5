"""FBVM: the self-supervised foreground/background variance-mean loss of [KD] Eq. (3)-(5) (METHODS.md §4.2).

The student's own soft foreground splits its input image into a soft foreground and a soft background; the loss
asks for small intensity variance inside each and a large (sigmoid-squashed) mean gap between them, in the direction
given by a per-channel polarity estimated once from labelled cases (`estimate_polarity`). Padding is left out with
a valid mask: `valid_from_background` (nnU-Net's own mask carried with the augmented sample, METHODS.md §2.4
correction) or the older value test `nonmin_valid_mask`. 2D and 3D.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_semisam.errors import SemiSAMError


def nonmin_valid_mask(image: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Valid mask V of METHODS.md §4.2 ("nonmin"): V(v) = some channel c has x_c(v) > min_v x_c + tol.

    Args:
        image: (B, C, *spatial); the minimum is per sample and channel over all voxels.
    Returns:
        (B, 1, *spatial) bool. No gradient.
    """
    x = image.detach()
    mins = x.flatten(2).amin(dim=2).view(*x.shape[:2], *([1] * (x.ndim - 2)))
    return (x > mins + tol).any(dim=1, keepdim=True)


def valid_from_background(background: torch.Tensor) -> torch.Tensor:
    """Valid mask V of METHODS.md §4.2 from the rule-U background (METHODS.md §2.4 correction): V = 1 − background.

    "nonmin" cannot find the padding of z-scored data: nnU-Net pads and rotates out with 0, the mean of the tissue,
    not its minimum. The trainer therefore carries the mask with the sample: a `valid` channel, ones on
    nnU-Net's mask (`seg >= 0`) of the preprocessed case, is appended to the image before augmentation; nnU-Net's
    loader pads it with 0 and the spatial transform rotates it out with 0 (and interpolates it), so after
    augmentation `valid > 0.5` is the image area of the patch, and `background = valid <= 0.5`
    (`nnunet_semisam.data.soft_targets.split_soft_targets`).

    Args:
        background: (B, 1, *spatial), bool (True = background) or float in [0, 1] (background where >= 0.5, i.e.
            `1 − valid` with the same threshold as `valid > 0.5`).
    Returns:
        (B, 1, *spatial) float32 in {0, 1}, 1 = valid, on `background`'s device, for `fbvm_loss(valid=...)`.
        No gradient.
    """
    if background.ndim < 3 or background.shape[1] != 1:
        raise ValueError(f"background must be (B, 1, *spatial), got {tuple(background.shape)}")
    bg = background.detach()
    bg = bg if bg.dtype == torch.bool else bg >= 0.5
    return (~bg).float()


VALID_MASK_MODES = ("background", "nonmin", "none")


def fbvm_valid_mask(mode: str, image: torch.Tensor, background: torch.Tensor) -> torch.Tensor | None:
    """V of METHODS.md §4.2 by the trainer's `fbvm_valid_mask` setting: "background" (`valid_from_background`, the
    default), "nonmin" (`nonmin_valid_mask` of the student's `image`) or "none" (every pixel valid: None)."""
    if mode == "background":
        return valid_from_background(background)
    if mode == "nonmin":
        return nonmin_valid_mask(image)
    if mode == "none":
        return None
    raise ValueError(f"fbvm_valid_mask must be one of {VALID_MASK_MODES}, got {mode!r}")


def _polarity_tensor(polarity, n_channels: int, device: torch.device) -> torch.Tensor | None:
    """None -> +1 per channel; "abs" -> None (use |μF − μB|); a sequence/tensor of C values in {-1, 0, +1}."""
    if isinstance(polarity, str):
        if polarity != "abs":
            raise ValueError(f"polarity must be None, 'abs' or {n_channels} values in {{-1, 0, 1}}, got {polarity!r}")
        return None
    if polarity is None:
        return torch.ones(n_channels, device=device)
    s = torch.as_tensor(np.asarray(polarity.detach().cpu() if isinstance(polarity, torch.Tensor) else polarity,
                                   dtype=np.float32)).reshape(-1)
    if s.numel() != n_channels or not bool(torch.isin(s, torch.tensor([-1.0, 0.0, 1.0])).all()):
        raise ValueError(f"polarity must have one value in {{-1, 0, 1}} per image channel ({n_channels}), "
                         f"got {s.tolist()}")
    return s.to(device)


def fbvm_loss(image: torch.Tensor, fg_prob: torch.Tensor, k: float = 1.0, valid: torch.Tensor | None = None,
              polarity: Sequence[float] | torch.Tensor | str | None = None, eps: float = 1e-6) -> torch.Tensor:
    """L_FBVM = S_var − S_mean, [KD] Eq. (3)-(5) with soft regions (METHODS.md §4.2).

    Per sample b and channel c, with w^F = V·p and w^B = V·(1 − p):
    μ^F_c = Σ w^F x_c / (Σ w^F + ε), Var^F_c = Σ w^F (x_c − μ^F_c)² / (Σ w^F + ε), and the same with w^B;
    S_var = mean_b mean_c (Var^F_c + Var^B_c), S_mean = mean_b mean_c sigmoid(k · s_c · (μ^F_c − μ^B_c))
    (`polarity="abs"`: sigmoid(k · |μ^F_c − μ^B_c|)).

    Args:
        image: (B, C, *spatial) the student input (augmented, z-scored); treated as data (detached).
        fg_prob: (B, 1, *spatial) the student's soft foreground p in [0, 1]; receives the gradient.
        k: slope of the mean-gap sigmoid (`fbvm_k`; 1 for z-scored inputs).
        valid: (B, 1, *spatial) bool or float mask V, or None (V ≡ 1). See `valid_from_background`
            (nnU-Net's mask, the default way) and `nonmin_valid_mask`.
        polarity: None (s_c = +1 for every channel: lesion brighter), C values s_c in {-1, 0, +1} (0 makes that
            channel's mean term the constant 1/2), or "abs".
        eps: ε in the denominators.
    Returns:
        Scalar (float32); the gradient flows only into `fg_prob` (through the weights and the means).
    """
    if image.ndim < 3:
        raise ValueError(f"image must be (B, C, *spatial), got {tuple(image.shape)}")
    expected = (image.shape[0], 1, *image.shape[2:])
    if tuple(fg_prob.shape) != expected:
        raise ValueError(f"fg_prob must be (B, 1, *spatial) = {expected}, got {tuple(fg_prob.shape)}")
    if valid is not None and tuple(valid.shape) != expected:
        raise ValueError(f"valid must be (B, 1, *spatial) = {expected}, got {tuple(valid.shape)}")
    s = _polarity_tensor(polarity, image.shape[1], image.device)

    x = image.detach().float().flatten(2)  # (B, C, N)
    p = fg_prob.float().flatten(2)  # (B, 1, N)
    v = torch.ones_like(p) if valid is None else valid.detach().to(device=p.device, dtype=p.dtype).flatten(2)
    stats = []
    for w in (v * p, v * (1.0 - p)):  # foreground, background
        denom = w.sum(dim=2) + eps  # (B, 1)
        mu = (w * x).sum(dim=2) / denom  # (B, C)
        var = (w * (x - mu[..., None]) ** 2).sum(dim=2) / denom  # (B, C)
        stats.append((mu, var))
    (mu_f, var_f), (mu_b, var_b) = stats
    s_var = (var_f + var_b).mean()
    gap = mu_f - mu_b
    s_mean = torch.sigmoid(k * (gap.abs() if s is None else s * gap)).mean()
    return s_var - s_mean


def estimate_polarity(pairs: Iterable[tuple[np.ndarray, np.ndarray]], threshold: float = 0.1, *,
                      progress: bool = False) -> np.ndarray:
    """FBVM channel polarity s_c from labelled cases (METHODS.md §4.2, our Interpretation of [KD]).

    Per case and channel the mean foreground intensity minus the mean background intensity; the mean of that over
    the cases; s_c = its sign, or 0 where its absolute value is below `threshold`. Cases whose mask has no
    foreground or no background are skipped. Pass images normalised as the student sees them (z-scored).

    Args:
        pairs: iterable of (image (C, *spatial) array, mask (*spatial) bool array), e.g. a lazy generator over cases.
        threshold: |mean difference| below which s_c = 0.
        progress: show a tqdm bar over the cases.
    Returns:
        (C,) float64 array of values in {-1, 0, 1}.
    Raises:
        SemiSAMError: no usable case, a mask that does not match its image, or cases with different channel counts.
    """
    diffs = []
    n_seen = 0
    for image, mask in tqdm(pairs, desc="FBVM polarity", disable=not progress):
        n_seen += 1
        image = np.asarray(image, dtype=np.float64)
        mask = np.asarray(mask).astype(bool)
        if image.ndim < 2 or mask.shape != image.shape[1:]:
            raise SemiSAMError(f"estimate_polarity: case {n_seen}: mask shape {mask.shape} does not match image "
                               f"shape {image.shape} (expected image (C, *spatial) and mask (*spatial))")
        if diffs and image.shape[0] != diffs[0].shape[0]:
            raise SemiSAMError(f"estimate_polarity: case {n_seen} has {image.shape[0]} channels, earlier cases "
                               f"{diffs[0].shape[0]}")
        if not mask.any() or mask.all():
            continue
        x = image.reshape(image.shape[0], -1)
        m = mask.reshape(-1)
        diffs.append(x[:, m].mean(axis=1) - x[:, ~m].mean(axis=1))
    if not diffs:
        raise SemiSAMError(f"estimate_polarity: none of the {n_seen} labelled cases has both foreground and "
                           "background voxels; set fbvm_polarity to +1 or 'abs' instead of 'estimate'")
    mean = np.mean(diffs, axis=0)
    return np.where(np.abs(mean) < threshold, 0.0, np.sign(mean))
