"""Soft targets that travel with their sample through nnU-Net's data loading (METHODS.md §1.2).

Stored teacher pseudo-labels (read through `nnunet_semisam.data.pseudolabel_store`: `prob` and `conf`, (1, *spatial)
on the case's preprocessed grid) are appended to the image as extra channels `[q, conf, valid]` by
`SoftTargetDataset`. `valid` is 1 inside nnU-Net's own mask (`seg >= 0`: nnU-Net marks the voxels outside the nonzero /
normalisation mask with -1) and 0 outside. nnU-Net's cropping, padding (0 = no pseudo-label, not valid) and spatial
transforms then move the three channels with the image (linear interpolation, like image channels; rotated-out
areas become 0), and `image_channels_only` keeps every intensity transform off them. After augmentation `conf` is a
soft weight in [0, 1] and `valid > 0.5` is the image area of the patch: the background mask of rule U and of the FBVM
valid mask (METHODS.md §2.4 correction, §4.2), which a value test on the z-scored image cannot find (0 is the mean
of the tissue there, not its minimum).

The store is read at every load and its files are replaced atomically, so a worker sees the old or the new map of a
case. Batches the workers prepared before a pseudo-label refresh (closed loop, METHODS.md §4.5) still carry the old
maps: the trainer restarts its unlabeled loader after a refresh (`SemiSupervisedTrainer.restart_unlabeled_loader`).
A case without a pseudo-label gets `q = 0, conf = 0` (its KD term is skipped).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_semisam.data.pseudolabel_store import soft_target_channels
from nnunet_semisam.data.views import GEOMETRIC, LABEL_ONLY

NUM_EXTRA_CHANNELS = 3  # q, conf, valid


class SoftTargetDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset whose `data` carries `[q, conf, valid]` after the image channels (module docstring)."""

    def __init__(self, folder: str, identifiers: Sequence[str] | None = None,
                 folder_with_segs_from_previous_stage: str | None = None, store_folder: str | None = None):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.store_folder = store_folder

    def soft_target(self, identifier: str, spatial: Sequence[int]) -> np.ndarray:
        """(2, *spatial) float32 `[q, conf]` of a case, zeros if it has no (complete, matching) pseudo-label."""
        return soft_target_channels(self.store_folder, identifier, spatial)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = super().load_case(identifier)
        data = np.asarray(data[:], dtype=np.float32)
        valid = (np.asarray(seg[:1]) >= 0).astype(np.float32)
        data = np.concatenate([data, self.soft_target(identifier, data.shape[1:]), valid], axis=0)
        return data, seg, seg_prev, properties


class SoftTargetTrainerMixin:
    """For a `SemiSupervisedTrainer` whose batches carry stored teacher maps: the unlabeled cases read them from
    `unlabeled_store_folder`, the labeled training cases from `labeled_store_folder` when it is not None (validation
    cases never), and the intensity transforms stay off the appended channels (`image_channels_only`). The loss then
    splits the batch with `split_soft_targets`."""

    labeled_store_folder: str | None = None

    @property
    def unlabeled_store_folder(self) -> str:
        raise NotImplementedError

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.labeled_store_folder is not None:
            dataset_tr = SoftTargetDataset(self.preprocessed_dataset_folder, list(dataset_tr.identifiers),
                                           self.folder_with_segs_from_previous_stage,
                                           store_folder=self.labeled_store_folder)
        return dataset_tr, dataset_val

    def unlabeled_dataset(self, cases: list[str]):
        return SoftTargetDataset(self.unlabeled_folder, cases, store_folder=self.unlabeled_store_folder)

    def get_training_transforms(self, *args, **kwargs):
        return image_channels_only(super().get_training_transforms(*args, **kwargs), self.num_image_channels)


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


def split_soft_targets(data: torch.Tensor, num_image_channels: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C + 3, *sp) -> image (B, C, *sp), q (B, 1, *sp) clipped to [0, 1], conf weight (B, 1, *sp) in [0, 1],
    background (B, 1, *sp) bool (True outside nnU-Net's mask, in padding and in rotated-out areas)."""
    c = num_image_channels
    if data.shape[1] != c + NUM_EXTRA_CHANNELS:
        raise ValueError(f"expected {c} image + {NUM_EXTRA_CHANNELS} soft-target channels, got {data.shape[1]}")
    return (data[:, :c], data[:, c:c + 1].clamp(0, 1), data[:, c + 1:c + 2].clamp(0, 1),
            data[:, c + 2:c + 3] <= 0.5)
