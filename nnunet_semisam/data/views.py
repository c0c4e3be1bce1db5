"""Weak and strong views of one unlabeled patch, built from nnU-Net's own training augmentation.

nnU-Net's training pipeline (`nnUNetTrainer.get_training_transforms`) is split into its geometric part (spatial
transform with rotation/scaling, mirroring, pseudo-2D conversion) and its photometric part (noise, blur, brightness,
contrast, low resolution, gamma). The geometric part is applied once; then

- `weak`   = the geometrically augmented patch, no intensity change,
- `strong` = the same patch after nnU-Net's photometric transforms (what nnU-Net feeds a network in training).

Both views are voxel-aligned: the transform relating them is the identity, so a prediction on one is a target for
the other without resampling. Channels appended after the image channels (`num_image_channels`) - e.g. stored
pseudo-label probabilities - follow the geometric transform (linear interpolation) and skip the photometric one
(METHODS.md §1.2). The segmentation slot carries nnU-Net's nonzero mask (0 inside, -1 outside/padding).

Masking. For configurations with `use_mask_for_norm`, nnU-Net's pipeline ends its intensity part with
`MaskImageTransform` (image channels set to 0 where the segmentation is < 0, i.e. outside the nonzero mask and in
padding). The same step is applied to both views here, after the photometric transforms of the strong view, so a
labeled and an unlabeled image of one forward pass are masked alike; configurations without it are not masked.
"""
from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

GEOMETRIC = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform)
#: steps that need a label or the segmentation slot; `split_pipeline` drops them, `masking_steps` keeps the masking
LABEL_ONLY = (RemoveLabelTansform, DownsampleSegForDSTransform, MaskImageTransform)


def split_pipeline(pipeline: ComposeTransforms) -> tuple[list[BasicTransform], list[BasicTransform]]:
    """Split an nnU-Net training pipeline into (geometric, photometric) transform lists, in order.

    Label-only steps (label removal, deep-supervision downsampling, masking) are dropped: unlabeled patches have
    no label; the masking step is taken separately by `masking_steps`. Mirroring moves behind the photometric steps'
    position, which is equivalent because every photometric transform of nnU-Net is voxel-wise or mirror-symmetric
    (Gaussian blur, low-resolution simulation).
    """
    geometric, photometric = [], []
    for t in pipeline.transforms:
        inner = t.transform if isinstance(t, RandomTransform) else t
        if isinstance(inner, GEOMETRIC):
            geometric.append(t)
        elif isinstance(inner, LABEL_ONLY):
            continue
        else:
            photometric.append(t)
    return geometric, photometric


def masking_steps(pipeline: ComposeTransforms) -> list[MaskImageTransform]:
    """nnU-Net's `MaskImageTransform` step(s) of a pipeline: present only for `use_mask_for_norm` configurations."""
    out = []
    for t in pipeline.transforms:
        inner = t.transform if isinstance(t, RandomTransform) else t
        if isinstance(inner, MaskImageTransform):
            out.append(inner)
    return out


class WeakStrongViews(BasicTransform):
    """Stack `[weak, strong, extra]` along the channel axis of `image` (see module docstring).

    masking: `MaskImageTransform` steps applied to the image channels of both views after the photometric
    transforms (their `apply_to_channels` index the C image channels of one view; extra channels are untouched).
    """

    def __init__(self, photometric: list[BasicTransform], num_image_channels: int | None = None,
                 masking: list[MaskImageTransform] | tuple = ()):
        super().__init__()
        self.photometric = ComposeTransforms(list(photometric))
        self.num_image_channels = num_image_channels
        self.masking = list(masking)

    def apply(self, data_dict: dict, **params) -> dict:
        img = data_dict["image"]
        c = img.shape[0] if self.num_image_channels is None else self.num_image_channels
        weak, extra = img[:c], img[c:]
        strong = self.photometric(image=weak.clone())["image"]
        if self.masking:
            weak = weak.clone()
            for mask in self.masking:
                weak = mask(image=weak, segmentation=data_dict["segmentation"])["image"]
                strong = mask(image=strong, segmentation=data_dict["segmentation"])["image"]
        data_dict["image"] = torch.cat([weak, strong, extra], dim=0)
        return data_dict


def weak_strong_pipeline(pipeline: ComposeTransforms, num_image_channels: int | None = None) -> ComposeTransforms:
    """Geometric part of `pipeline` followed by `WeakStrongViews` with its photometric part and, when the pipeline
    has one (`use_mask_for_norm`), nnU-Net's masking step on both views."""
    geometric, photometric = split_pipeline(pipeline)
    return ComposeTransforms([*geometric, WeakStrongViews(photometric, num_image_channels, masking_steps(pipeline))])


def unpack_views(data: torch.Tensor, valid_seg: torch.Tensor, num_image_channels: int) -> dict[str, torch.Tensor]:
    """Split a collated batch `(B, 2C + E, *spatial)` into `weak`, `strong`, `extra` and the `valid` mask.

    `valid` is `(B, 1, *spatial)` bool: True inside nnU-Net's nonzero mask and not padding.
    """
    c = num_image_channels
    if isinstance(valid_seg, (list, tuple)):
        valid_seg = valid_seg[0]
    return {"weak": data[:, :c], "strong": data[:, c:2 * c], "extra": data[:, 2 * c:], "valid": valid_seg >= 0}
