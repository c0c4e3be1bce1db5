"""The small pieces MedSAMMambaKDTrainer is composed of, each on its own (no nnU-Net training run)."""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

from nnunet_semisam.data.soft_targets import SoftTargetDataset, image_channels_only, split_soft_targets
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.networks.kd_student import (StandardizedTinyMUNet, standardize_per_image,
                                                tiny_munet_kwargs_from_plans)
from nnunet_semisam.schedules import CosineLRScheduler, cosine_lr
from nnunet_semisam.data.pseudolabel_store import save_pseudolabel


def test_cosine_lr_hand_computed_and_equal_to_torch():
    assert cosine_lr(0, 1e-3, 100, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(50, 1e-3, 100, 1e-5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert cosine_lr(100, 1e-3, 100, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(25, 1.0, 100, 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    p = [torch.nn.Parameter(torch.zeros(1))]
    ours = torch.optim.SGD([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0}],
                           lr=1e-3)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = CosineLRScheduler(ours, 1e-3, 10, 1e-5)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=10, eta_min=1e-5)
    for epoch in range(10):  # nnU-Net calls step(current_epoch) at the start of every epoch
        sched.step(epoch)
        assert all(g["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-9) for g in ours.param_groups)
        ref.step()
        ref_sched.step()


def test_standardize_per_image_and_student_wrapper():
    x = torch.randn(2, 3, 16, 16) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7
    z = standardize_per_image(x)
    assert torch.allclose(z.mean((2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(z.var((2, 3), unbiased=False), torch.ones(2, 3), atol=2e-3)  # eps = 1e-5 against var 0.01
    # hand-computed: [0, 2] -> mean 1, var 1 -> [-1, 1]
    assert torch.allclose(standardize_per_image(torch.tensor([[[[0.0, 2.0]]]]), eps=0.0),
                          torch.tensor([[[[-1.0, 1.0]]]]))
    net = StandardizedTinyMUNet(3, 2, features_per_stage=(8, 8, 16), strides=[[1, 1], [2, 2], [2, 2]],
                                kernel_sizes=[[3, 3]] * 3, n_mamba_layers_per_stage=(1,))
    net.eval()
    with torch.no_grad():  # per-image affine changes of intensity do not change the output
        assert torch.allclose(net(x), net(3 * x - 2), atol=1e-3)


def test_image_channels_only_keeps_soft_targets_out_of_intensity_transforms():
    pipe = ComposeTransforms([MultiplicativeBrightnessTransform((2.0, 2.0), synchronize_channels=True, p_per_channel=1),
                              MirrorTransform(allowed_axes=(1,))])
    wrapped = image_channels_only(pipe, num_image_channels=2)
    img = torch.rand(4, 6, 5)  # 2 image channels + [q, conf]
    torch.manual_seed(0)
    out = wrapped(image=img.clone(), segmentation=torch.zeros(1, 6, 5))["image"]
    flipped = torch.equal(out[2:], img[2:].flip(-1))
    assert flipped or torch.equal(out[2:], img[2:]), "soft targets follow the geometry only"
    ref_img = img[:2].flip(-1) if flipped else img[:2]
    assert torch.allclose(out[:2], 2 * ref_img), "image channels get the intensity transform"


def test_split_soft_targets_clips_and_thresholds_the_valid_channel():
    valid = torch.tensor([1.0, 0.7, 0.4, 0.0]).view(1, 1, 1, 4).expand(2, 1, 4, 4)  # interpolated at a border
    data = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 1, 4, 4), 1.2), torch.full((2, 1, 4, 4), -0.1),
                      valid], 1)
    x, q, w, bg = split_soft_targets(data, 3)
    assert x.shape == (2, 3, 4, 4) and float(q.max()) == 1.0 and float(w.min()) == 0.0
    assert bg.dtype == torch.bool and bg[0, 0, 0].tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="soft-target channels"):
        split_soft_targets(data[:, :5], 3)


def test_soft_target_dataset_appends_store_and_ignores_mismatch(tmp_path):
    folder = tmp_path / "pre"
    folder.mkdir()
    data = np.random.rand(3, 1, 8, 8).astype(np.float32)
    seg = np.zeros((1, 1, 8, 8), np.int8)
    seg[..., :2] = -1  # outside nnU-Net's nonzero / normalisation mask
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    nnUNetDatasetBlosc2.save_case(data, seg, {"spacing": [1, 1, 1]}, str(folder / "c1"))
    store = tmp_path / "store"
    prob = np.random.rand(1, 1, 8, 8).astype(np.float32)
    save_pseudolabel(store, "c1", prob, np.ones_like(prob, bool), "sha1")
    ds = SoftTargetDataset(str(folder), ["c1"], store_folder=str(store))
    d, s, _, _ = ds.load_case("c1")
    assert d.shape == (6, 1, 8, 8)
    np.testing.assert_allclose(d[:3], data)
    np.testing.assert_allclose(d[3], prob[0], atol=1e-3)  # stored as float16
    assert (d[4] == 1).all()
    assert (d[5, ..., :2] == 0).all() and (d[5, ..., 2:] == 1).all(), "valid = inside nnU-Net's mask (seg >= 0)"
    save_pseudolabel(store, "c1", np.zeros((1, 1, 4, 4), np.float32), np.ones((1, 1, 4, 4), bool), "sha1")
    d2 = ds.load_case("c1")[0]
    assert (d2[3:5] == 0).all(), "a map of another shape is not used (no pseudo-label)"


class _CM:
    def __init__(self, patch, cls, kwargs, req=()):
        self.patch_size = patch
        self.network_arch_class_name = cls
        self.network_arch_init_kwargs = kwargs
        self.network_arch_init_kwargs_req_import = list(req)
        self.configuration = {"data_identifier": "x"}


def test_student_kwargs_from_default_plans_and_refusals():
    plain = dict(n_stages=7, features_per_stage=[32] * 7, strides=[[1, 1]] + [[2, 2]] * 6,
                 kernel_sizes=[[3, 3]] * 7)
    kw, planned = tiny_munet_kwargs_from_plans(_CM([256, 256], "x.PlainConvUNet", plain))
    assert not planned and kw["strides"] == plain["strides"][:6]
    assert tuple(kw["features_per_stage"]) == (32, 64, 64, 96, 128, 192)
    with pytest.raises(SemiSAMError, match="2D method"):
        tiny_munet_kwargs_from_plans(_CM([32, 64, 64], "x.PlainConvUNet", plain))
    with pytest.raises(SemiSAMError, match="at least 3"):
        tiny_munet_kwargs_from_plans(_CM([8, 8], "x.PlainConvUNet", dict(plain, n_stages=2)))


def test_feature_side_settings():
    """`teacher_input_size`: native / patch / windows / f1 / auto / int (teachers.feature_side)."""
    from types import SimpleNamespace

    from nnunet_semisam.teachers.feature_side import feature_side

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    vit = SimpleNamespace(native_size=1024, tap_stride=16)  # MedSAM: no resizable encoder
    lite = SimpleNamespace(native_size=256, tap_stride=2, feature_multiple=64, window_multiple=56,
                           encoder_for=lambda s: None)
    assert feature_side(vit, "f1", (256, 256), (64, 64), cpu) == 1024  # paper: 256² input, F1 64²
    assert feature_side(vit, "f1", (64, 64), (16, 16), cpu) == 256
    assert feature_side(vit, "f1", (60, 100), (12, 20), cpu) == 320  # non-square: the finer side decides
    assert feature_side(vit, "auto", (64, 64), (16, 16), cpu) == 1024 and feature_side(vit, "patch", (64, 64),
                                                                                       (16, 16), cpu) == 1024
    assert feature_side(lite, "auto", (64, 64), (16, 16), cpu) == 56  # CPU path: whole attention windows
    assert feature_side(lite, "windows", (130, 120), (32, 30), cpu) == 112  # the largest multiple <= the patch
    assert feature_side(lite, "windows", (48, 48), (12, 12), cpu) == 64  # patch below one multiple: "patch"
    assert feature_side(lite, "windows", (512, 512), (128, 128), cpu) == 256  # never above the native side
    assert feature_side(vit, "windows", (64, 64), (16, 16), cpu) == 1024  # not resizable: native
    assert feature_side(lite, "auto", (64, 64), (16, 16), cuda) == 256  # native on CUDA
    assert feature_side(lite, "patch", (80, 100), (20, 25), cpu) == 128  # rounded up to the encoder's multiple
    assert feature_side(lite, "patch", (512, 512), (128, 128), cpu) == 256  # never above the native side
    assert feature_side(lite, "native", (64, 64), (16, 16), cpu) == 256 and feature_side(lite, 128, (64, 64),
                                                                                         (16, 16), cpu) == 128
    with pytest.raises(SemiSAMError, match="teacher_input_size"):
        feature_side(lite, "huge", (64, 64), (16, 16), cpu)


def test_side_setting_check_names_the_value():
    """Every named side of `feature_side` and any positive side pass; anything else is a one-line error."""
    from nnunet_semisam.teachers.feature_side import SIDE_SETTINGS, check_side_setting

    for ok in (*SIDE_SETTINGS, 1, 128, "128"):
        check_side_setting(ok)
    for bad in ("huge", 0, -64, "0", "-1", True, None, 1.5):
        with pytest.raises(SemiSAMError, match=r"^Trainer.side = .*: expected 'auto', 'native', 'patch', 'windows', "
                                               r"'f1' or a positive side in pixels$"):
            check_side_setting(bad, "Trainer.side")


def test_fill_background_sets_the_valid_minimum():
    from nnunet_semisam.teachers.feature_side import fill_background

    x = torch.tensor([[[[0.0, -2.0, 3.0, 0.0]]], [[[5.0, 5.0, 5.0, 5.0]]]])
    bg = torch.tensor([[[[True, False, False, True]]], [[[True, True, True, True]]]])
    out = fill_background(x, bg)
    assert out[0, 0, 0].tolist() == [-2.0, -2.0, 3.0, -2.0], "z-scored zeros outside the mask become the minimum"
    assert out[1].tolist() == x[1].tolist(), "an all-background image is left as it is"
    assert fill_background(x, None) is x


def test_variants_are_plain_subclasses():
    """nnU-Net's convention: every variant is a class statement in trainers/ (found by `grep class`)."""
    import inspect

    import nnunet_semisam.trainers.medsam_mamba_kd_variants as v

    # by name: nnU-Net's trainer lookup may have imported the trainer module under another name in this session
    classes = [c for _, c in inspect.getmembers(v, inspect.isclass) if c.__name__ != "MedSAMMambaKDTrainer"
               and "MedSAMMambaKDTrainer" in [b.__name__ for b in c.__mro__]]
    src = open(v.__file__, encoding="utf-8").read()
    assert len(classes) >= 20
    for c in classes:
        assert f"class {c.__name__}(" in src and c.__module__ == v.__name__
