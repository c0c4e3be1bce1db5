"""Foreground-biased unlabeled crops from saved pseudo-masks (M&N, METHODS.md §7.4).

`save_pseudo_mask` writes a case's mask `(Z, Y, X)` (uint8 labels on the preprocessed grid) atomically to
`<folder>/<case>.npz` with, per foreground label, up to `MAX_LOCATIONS` voxel coordinates in nnU-Net's
`class_locations` format (`(N, 4)`: channel 0, z, y, x), sampled with a fixed seed. `PseudoMaskDataset` is
nnU-Net's blosc2 dataset of the unlabeled cases whose `properties['class_locations']` come from the latest saved mask
(read at every load, so a refreshed mask reaches the next crop of a fresh loader; none saved or an empty mask: no
locations). `RandomForegroundDataLoader` forces a foreground crop with probability `oversample_foreground_percent`
per sample (nnU-Net's own loader forces it for a fixed share of batch slots instead); a forced crop of a case without
locations falls back to a uniform crop (nnU-Net's behaviour).
"""
from __future__ import annotations

import os

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path

MAX_LOCATIONS = 10000


def mask_path(folder: str, case: str) -> str:
    return os.path.join(folder, f"{case}.npz")


def foreground_locations(mask: np.ndarray, max_locations: int = MAX_LOCATIONS, seed: int = 1234) -> dict:
    """{label: (N, 4) coordinates (0, z, y, x)} for every label > 0 present in `mask`."""
    rng = np.random.RandomState(seed)
    out = {}
    for label in np.unique(mask):
        if label == 0:
            continue
        coords = np.argwhere(mask[None] == label)
        if len(coords) > max_locations:
            coords = coords[rng.choice(len(coords), max_locations, replace=False)]
        out[int(label)] = coords
    return out


def save_pseudo_mask(folder: str, case: str, mask: np.ndarray) -> str:
    mask = np.asarray(mask, dtype=np.uint8)
    locations = foreground_locations(mask)
    path = mask_path(folder, case)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, mask=mask, labels=np.array(sorted(locations), dtype=np.int64),
                                **{f"locations_{k}": v for k, v in locations.items()})
    return path


def load_locations(folder: str, case: str) -> dict:
    path = mask_path(folder, case)
    if not os.path.isfile(path):
        return {}
    try:
        with np.load(path) as f:
            return {int(k): f[f"locations_{int(k)}"] for k in f["labels"]}
    except (OSError, KeyError, ValueError) as e:
        raise SemiSAMError(f"{path}: unreadable pseudo-mask file ({e}); delete it to have it recomputed") from None


class PseudoMaskDataset(nnUNetDatasetBlosc2):
    """Unlabeled blosc2 cases whose class locations come from the saved pseudo-masks in `mask_folder`."""

    def __init__(self, folder: str, identifiers=None, folder_with_segs_from_previous_stage=None,
                 mask_folder: str | None = None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.mask_folder = mask_folder

    def load_case(self, identifier):
        data, seg, seg_prev, properties = super().load_case(identifier)
        properties = dict(properties)
        properties["class_locations"] = load_locations(self.mask_folder, identifier) if self.mask_folder else {}
        return data, seg, seg_prev, properties


class RandomForegroundDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with a per-sample foreground draw of probability `oversample_foreground_percent`."""

    def get_do_oversample(self, sample_idx: int) -> bool:
        return bool(np.random.uniform() < self.oversample_foreground_percent)
