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
from nnunet_semisam.teachers.pseudolabels import save_pseudolabel


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


def test_split_soft_targets_clips():
    data = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 1, 4, 4), 1.2), torch.full((2, 1, 4, 4), -0.1)], 1)
    x, q, w = split_soft_targets(data, 3)
    assert x.shape == (2, 3, 4, 4) and float(q.max()) == 1.0 and float(w.min()) == 0.0


def test_soft_target_dataset_appends_store_and_ignores_mismatch(tmp_path):
    folder = tmp_path / "pre"
    folder.mkdir()
    data = np.random.rand(3, 1, 8, 8).astype(np.float32)
    seg = np.zeros((1, 1, 8, 8), np.int8)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    nnUNetDatasetBlosc2.save_case(data, seg, {"spacing": [1, 1, 1]}, str(folder / "c1"))
    store = tmp_path / "store"
    prob = np.random.rand(1, 1, 8, 8).astype(np.float32)
    save_pseudolabel(store, "c1", prob, np.ones_like(prob, bool), "sha1")
    ds = SoftTargetDataset(str(folder), ["c1"], store_folder=str(store))
    d, s, _, _ = ds.load_case("c1")
    assert d.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(d[:3], data)
    np.testing.assert_allclose(d[3], prob[0], atol=1e-3)  # stored as float16
    assert (d[4] == 1).all()
    save_pseudolabel(store, "c1", np.zeros((1, 1, 4, 4), np.float32), np.ones((1, 1, 4, 4), bool), "sha1")
    d2 = ds.load_case("c1")[0]
    assert (d2[3:] == 0).all(), "a map of another shape is not used (no pseudo-label)"


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


def test_fpkdm_teacher_size_follows_the_student_f1_grid():
    """`teacher_input_size="f1"`: ViT patch x max(F1 grid), capped at MedSAM's 1024 (the paper's 256² -> 1024²)."""
    from types import SimpleNamespace

    from nnunet_semisam.trainers.medsam_mamba_kd import MedSAMMambaKDTrainer

    proj = SimpleNamespace(kernel_size=(16, 16))
    fake = SimpleNamespace(teacher=SimpleNamespace(sam=SimpleNamespace(image_encoder=SimpleNamespace(
        patch_embed=SimpleNamespace(proj=proj)))), teacher_input_size="f1")
    size = MedSAMMambaKDTrainer.fpkdm_teacher_size
    assert size(fake, (64, 64)) == 1024  # paper: 256² input, F1 64²
    assert size(fake, (16, 16)) == 256  # 64² patches
    assert size(fake, (12, 20)) == 320  # non-square: the finer side decides
    assert size(fake, (128, 128)) == 1024  # never above MedSAM's native side
    fake.teacher_input_size = 1024  # the default
    assert size(fake, (16, 16)) == 1024
