"""Weak/strong views: geometric part shared, photometric only on the strong view, extra channels follow geometry."""
import numpy as np
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_semisam.data.views import split_pipeline, unpack_views, weak_strong_pipeline


def _nnunet_pipeline():
    return nnUNetTrainer.get_training_transforms(
        (32, 32), (-np.pi, np.pi), None, (0, 1), False, use_mask_for_norm=None, is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)


def test_split_keeps_all_nnunet_steps_but_label_ones():
    pipe = _nnunet_pipeline()
    geometric, photometric = split_pipeline(pipe)
    n_label_only = sum(isinstance(t, RemoveLabelTansform) for t in pipe.transforms)
    assert len(geometric) + len(photometric) + n_label_only == len(pipe.transforms)
    assert any(isinstance(t, MirrorTransform) for t in geometric)
    assert len(photometric) == 7  # noise, blur, brightness, contrast, low-res, gamma (inverted), gamma


def test_weak_strong_aligned_and_extra_channels_follow_geometry():
    torch.manual_seed(0)
    img = torch.rand(2, 32, 32)
    extra = img[:1].clone()  # a "soft target" equal to channel 0
    seg = torch.zeros(1, 32, 32, dtype=torch.int16)
    mirror = MirrorTransform(allowed_axes=(0, 1))
    bright = RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=(2.0, 2.0), synchronize_channels=True,
                                                               p_per_channel=1), apply_probability=1.0)
    pipe = weak_strong_pipeline(ComposeTransforms([mirror, bright]), num_image_channels=2)
    out = pipe(image=torch.cat([img, extra]), segmentation=seg)["image"]
    assert out.shape == (5, 32, 32)
    weak, strong, ex = out[:2], out[2:4], out[4:]
    assert torch.allclose(strong, 2 * weak)  # photometric only on the strong view
    assert torch.allclose(ex, weak[:1])  # extra channel got the same mirroring, no brightness change
    flips = [torch.flip(img, d) for d in ([], [1], [2], [1, 2])]
    assert any(torch.allclose(weak, f) for f in flips)
    views = unpack_views(out[None], torch.full((1, 1, 32, 32), -1), 2)
    assert views["valid"].dtype == torch.bool and not views["valid"].any()
