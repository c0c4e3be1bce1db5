"""Whole preprocessed cases as arrays, for statistics computed once before training (METHODS.md §4.2, §4.5)."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2


def zscored_image_label_pairs(folder: str, keys: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image z-scored per channel over the case (C, *spatial) float64, foreground mask (*spatial) bool) per case.

    The per-image standardisation the KD student applies to its input (`networks.kd_student.standardize_per_image`),
    so statistics such as the FBVM polarity s_c (METHODS.md §4.2) are measured on what the student sees.
    """
    ds = nnUNetDatasetBlosc2(folder, list(keys))
    for k in keys:
        data, seg, _, _ = ds.load_case(k)
        x = np.asarray(data[:], np.float64)
        axes = tuple(range(1, x.ndim))
        x = (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-8)
        yield x, np.asarray(seg[0]) > 0


def foreground_masks(folder: str, keys: Sequence[str]) -> Iterator[np.ndarray]:
    """The foreground mask `seg > 0` (*spatial, bool) of each preprocessed case in `keys`, in order (the mask the
    GT boxes of the KD teacher targets come from, METHODS.md §4.5)."""
    ds = nnUNetDatasetBlosc2(folder, list(keys))
    for k in keys:
        yield np.asarray(ds.load_case(k)[1][0]) > 0
