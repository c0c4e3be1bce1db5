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


def test_mask_for_norm_zeroes_both_views_outside_nonzero_mask_like_labeled_images():
    """`use_mask_for_norm` configurations: nnU-Net's MaskImageTransform zeroes the masked image channels outside the
    nonzero mask (segmentation slot < 0) after the intensity augmentation; both unlabeled views get the same, the
    unmasked channel and the extra channels do not, and without `use_mask_for_norm` nothing is zeroed."""
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform

    from nnunet_semisam.data.views import masking_steps

    torch.manual_seed(0)
    img = torch.rand(2, 32, 32) + 1.0  # nonzero everywhere, so a zero comes from masking (or padding)
    seg = torch.zeros(1, 32, 32, dtype=torch.int16)
    seg[:, :, :12] = -1  # outside nnU-Net's nonzero mask
    # nnU-Net's own pipeline, with and without use_mask_for_norm (channel 0 only)
    for use_mask in ([True, False], None):
        pipe = nnUNetTrainer.get_training_transforms(
            (32, 32), (0.0, 0.0), None, None, False, use_mask_for_norm=use_mask, is_cascaded=False,
            foreground_labels=[1], regions=None, ignore_label=None)
        assert bool(masking_steps(pipe)) == (use_mask is not None)
        _, photometric = split_pipeline(pipe)
        assert not any(isinstance(t, MaskImageTransform) for t in photometric)
        out = weak_strong_pipeline(pipe, num_image_channels=2)(image=img.clone(), segmentation=seg.clone())
        views = unpack_views(out["image"][None], out["segmentation"][None], 2)
        outside = ~views["valid"][0, 0]
        assert outside.any() and (~outside).any()
        for name in ("weak", "strong"):
            v = views[name][0]
            if use_mask is None:
                assert (v[0][outside] != 0).any(), name  # not masked
            else:
                assert (v[0][outside] == 0).all() and (v[0][~outside] != 0).any(), name  # masked channel
                assert (v[1][outside] != 0).any(), name  # the channel without use_mask_for_norm is not

    # a hand-built pipeline: masking comes after the photometric step of the strong view, extra channels untouched
    noise = RandomTransform(GaussianNoiseTransform(noise_variance=(0.5, 0.5), p_per_channel=1,
                                                   synchronize_channels=True), apply_probability=1.0)
    pipe = ComposeTransforms([MirrorTransform(allowed_axes=(0, 1)), noise, MaskImageTransform([0, 1])])
    extra = torch.full((1, 32, 32), 0.5)  # e.g. a stored soft target
    out = weak_strong_pipeline(pipe, num_image_channels=2)(image=torch.cat([img, extra]), segmentation=seg.clone())
    views = unpack_views(out["image"][None], out["segmentation"][None], 2)
    outside = ~views["valid"][0, 0]
    assert outside.sum() == 12 * 32
    assert (views["weak"][0][:, outside] == 0).all() and (views["strong"][0][:, outside] == 0).all()
    assert not torch.allclose(views["strong"][0][:, ~outside], views["weak"][0][:, ~outside])  # noise inside only
    assert torch.all(views["extra"] == 0.5)
