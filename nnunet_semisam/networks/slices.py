"""Slice-volume conversion for 2D models inside a 3D method (METHODS.md §7.2).

A 3D batch `(n, C, Z, Y, X)` becomes the 2D batch `(n*Z, C, Y, X)` of its Z-slices, sample-major (all slices of
sample 0, then sample 1, ...); `slices_to_volume` is the exact inverse reshape. Both are views/permutes, no copy of
values is changed, so a 2D model's slice outputs stacked back line up voxel for voxel with the 3D crop.
"""
from __future__ import annotations

import torch


def volume_to_slices(x: torch.Tensor) -> torch.Tensor:
    """(n, C, Z, Y, X) -> (n*Z, C, Y, X), sample-major then slice."""
    if x.ndim != 5:
        raise ValueError(f"volume_to_slices expects (n, C, Z, Y, X), got shape {tuple(x.shape)}")
    n, c, z, y, xx = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * z, c, y, xx)


def slices_to_volume(s: torch.Tensor, n: int) -> torch.Tensor:
    """(n*Z, C, Y, X) -> (n, C, Z, Y, X): the inverse of `volume_to_slices` for a batch of n samples."""
    if s.ndim != 4 or s.shape[0] % n:
        raise ValueError(f"slices_to_volume: {tuple(s.shape)} is not n={n} stacks of 2D slices")
    nz, c, y, x = s.shape
    return s.reshape(n, nz // n, c, y, x).permute(0, 2, 1, 3, 4)


def apply_slicewise(model, x: torch.Tensor) -> torch.Tensor:
    """Run a 2D model on every Z-slice of a 3D batch and stack its outputs back to `(n, K, Z, Y, X)`."""
    return slices_to_volume(model(volume_to_slices(x)), x.shape[0])
