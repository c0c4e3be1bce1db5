"""Soft targets that travel with their sample through nnU-Net's data loading (METHODS.md §1.2).

Stored teacher pseudo-labels (`nnunet_semisam.teachers.pseudolabels`: `prob` and `conf`, (1, *spatial) on the case's
preprocessed grid) are appended to the image as two extra channels `[q, conf]` by `SoftTargetDataset`. nnU-Net's
cropping, padding (0 = no pseudo-label) and spatial transforms then move them with the image (linear interpolation,
like image channels), and `image_channels_only` keeps every intensity transform off them. After augmentation, `conf`
is a soft weight in [0, 1] (interpolated at the edges of the available region).

The store is read at every load and its files are replaced atomically, so a worker sees the old or the new map of a
case. Batches the workers prepared before a pseudo-label refresh (closed loop, METHODS.md §4.5) still carry the old
maps: the trainer restarts its unlabeled loader after a refresh (`SemiSupervisedTrainer.restart_unlabeled_loader`).
A case without a pseudo-label gets `q = 0, conf = 0` (its KD term is skipped).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_semisam.data.views import GEOMETRIC, LABEL_ONLY

NUM_SOFT_CHANNELS = 2  # q, conf


class SoftTargetDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset whose `data` carries `[q, conf]` from `store_folder` after the image channels."""

    def __init__(self, folder: str, identifiers: Sequence[str] | None = None,
                 folder_with_segs_from_previous_stage: str | None = None, store_folder: str | None = None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.store_folder = store_folder

    def soft_target(self, identifier: str, spatial: Sequence[int]) -> np.ndarray:
        """(2, *spatial) float32 `[q, conf]` of a case, zeros if it has no (complete, matching) pseudo-label."""
        out = np.zeros((NUM_SOFT_CHANNELS, *spatial), np.float32)
        if self.store_folder is None:
            return out
        f = os.path.join(self.store_folder, f"{identifier}.npz")
        try:
            with np.load(f) as z:
                prob, conf = z["prob"], z["conf"]
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return out
        if tuple(prob.shape[1:]) == tuple(spatial):
            out[0] = prob[0]
            out[1] = conf[0]
        return out

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data = np.asarray(data[:], dtype=np.float32)
        data = np.concatenate([data, self.soft_target(identifier, data.shape[1:])], axis=0)
        return data, seg, seg_prev, properties


class ImageChannelsOnly(BasicTransform):
    """Apply `transform` to the first `num_image_channels` image channels; the others pass through unchanged."""

    def __init__(self, transform: BasicTransform, num_image_channels: int):
        super().__init__()
        self.transform = transform
        self.num_image_channels = num_image_channels

    def apply(self, data_dict: dict, **params) -> dict:
        img = data_dict["image"]
        c = self.num_image_channels
        if img.shape[0] == c:
            return self.transform(**data_dict)
        rest = img[c:]
        data_dict["image"] = img[:c]
        data_dict = self.transform(**data_dict)
        data_dict["image"] = torch.cat([data_dict["image"], rest], dim=0)
        return data_dict


def image_channels_only(pipeline: ComposeTransforms, num_image_channels: int) -> ComposeTransforms:
    """nnU-Net's training pipeline with every intensity (non-geometric, non-label) transform restricted to the image
    channels, so appended soft-target channels only follow the spatial transforms."""
    out = []
    for t in pipeline.transforms:
        inner = t.transform if isinstance(t, RandomTransform) else t
        if isinstance(inner, GEOMETRIC) or isinstance(inner, LABEL_ONLY):
            out.append(t)
        else:
            out.append(ImageChannelsOnly(t, num_image_channels))
    return ComposeTransforms(out)


def split_soft_targets(data: torch.Tensor, num_image_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C + 2, *sp) -> image (B, C, *sp), q (B, 1, *sp) clipped to [0, 1], conf weight (B, 1, *sp) in [0, 1]."""
    c = num_image_channels
    return data[:, :c], data[:, c:c + 1].clamp(0, 1), data[:, c + 1:c + 2].clamp(0, 1)
