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


def test_soft_target_trainer_mixin_wraps_the_training_split_only_with_a_labeled_store(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunet_semisam.data.soft_targets import SoftTargetTrainerMixin

    folder = tmp_path / "pre"
    folder.mkdir()
    for case in ("a", "b"):
        nnUNetDatasetBlosc2.save_case(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 4, 4), np.int8),
                                      {"spacing": [1, 1, 1]}, str(folder / case))

    class Base:  # what the mixin needs from nnU-Net's trainer
        preprocessed_dataset_folder = unlabeled_folder = str(folder)
        folder_with_segs_from_previous_stage = None
        num_image_channels = 1

        def get_tr_and_val_datasets(self):
            return (nnUNetDatasetBlosc2(str(folder), ["a"]), nnUNetDatasetBlosc2(str(folder), ["b"]))

        def get_training_transforms(self):
            return ComposeTransforms([MultiplicativeBrightnessTransform((2.0, 2.0), True, 1)])

    class Unlabeled(SoftTargetTrainerMixin, Base):
        unlabeled_store_folder = str(tmp_path / "u")

    class Both(Unlabeled):
        labeled_store_folder = str(tmp_path / "l")

    tr, val = Unlabeled().get_tr_and_val_datasets()
    assert type(tr) is nnUNetDatasetBlosc2 and type(val) is nnUNetDatasetBlosc2
    tr, val = Both().get_tr_and_val_datasets()
    assert isinstance(tr, SoftTargetDataset) and tr.store_folder == str(tmp_path / "l")
    assert list(tr.identifiers) == ["a"] and type(val) is nnUNetDatasetBlosc2, "validation cases never carry maps"
    u = Both().unlabeled_dataset(["b"])
    assert isinstance(u, SoftTargetDataset) and u.store_folder == str(tmp_path / "u")
    image = torch.ones(4, 1, 4, 4)  # 1 image channel + q, conf, valid
    out = Both().get_training_transforms()(image=image.clone(), segmentation=torch.zeros(1, 1, 4, 4))["image"]
    assert torch.equal(out[0], 2 * image[0]) and torch.equal(out[1:], image[1:]), "intensity only on the image"


def test_teacher_features_responses_leave_bn_stats_alone_and_sigma_zero_gives_zero():
    """`TeacherFeatures.responses` (METHODS.md §4.1) with the real TinyMUNet and a small channels-last teacher: the
    student's perturbed re-run moves no BatchNorm statistic, σ = 0 gives exactly zero teacher responses, σ > 0 gives
    responses whose loss reaches the student."""
    import torch.nn.functional as F
    from nnunet_semisam.losses.fpkdm import FeatureProjector
    from nnunet_semisam.networks.tiny_munet import TinyMUNet
    from nnunet_semisam.teachers.feature_side import TeacherFeatures

    torch.manual_seed(0)
    net = TinyMUNet(1, 2, features_per_stage=(4, 8, 8, 8, 8, 8), strides=(1, 2, 2, 2, 2, 2),
                    n_mamba_layers_per_stage=(1, 1, 1, 1)).train()
    conv = torch.nn.Conv2d(1, 6, 3, stride=2, padding=1)

    class Teacher:
        def feature_input(self, x, channels, side):
            return F.interpolate(x[:, list(channels)], size=(side, side), mode="bilinear")

        def first_tap(self, image):
            return conv(image).permute(0, 2, 3, 1)

        def later_taps(self, t1, n):
            taps, t = [], t1.permute(0, 3, 1, 2)
            for _ in range(n):
                t = F.avg_pool2d(torch.tanh(t), 2)
                taps.append(t.permute(0, 2, 3, 1))
            return taps

    def bn_stats():
        return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}

    x = torch.randn(2, 1, 64, 64)
    background = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    _, feats = net(x, return_features=True)
    levels = 3
    projector = FeatureProjector(6, [f.shape[1] for f in feats[:levels]], [tuple(f.shape[2:]) for f in feats[:levels]])
    features = TeacherFeatures(Teacher(), (0,), 32, levels)
    before = bn_stats()
    t_d, s_d = features.responses(x, background, net, feats, projector, sigma=0.0)
    assert len(t_d) == len(s_d) == levels - 1
    assert all(float(d.abs().max()) == 0.0 for d in t_d)
    t_d, s_d = features.responses(x, background, net, feats, projector, sigma=0.1)
    after = bn_stats()
    assert before and all(torch.equal(before[k], after[k]) for k in before), "the re-run moved BatchNorm statistics"
    assert all(float(d.abs().max()) > 0 for d in t_d)
    sum((a - b).pow(2).mean() for a, b in zip(t_d, s_d)).backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


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


@pytest.mark.parametrize("schedule, refresh", [("demo", 4), ("bench", 8)])
def test_combined_schedule_variant_takes_both_parents_settings(monkeypatch, schedule, refresh):
    """`_calibratedFuseKDOnly_<schedule>` inherits from `_<schedule>` and `_calibratedFuseKDOnly`: one instance carries
    the schedule and the variant's settings (cooperative `__init__`s; the base trainer's own set-up stubbed out)."""
    import nnunet_semisam.trainers.medsam_mamba_kd_variants as v

    sched = getattr(v, f"MedSAMMambaKDTrainer_{schedule}")
    base = next(c for c in sched.__mro__ if c.__name__ == "MedSAMMambaKDTrainer")
    monkeypatch.setattr(base, "__init__", lambda self, *args, **kwargs: None)
    t = getattr(v, f"MedSAMMambaKDTrainer_calibratedFuseKDOnly_{schedule}")({}, "2d", 0, {})
    ref = sched({}, "2d", 0, {})
    assert (t.num_epochs, t.pl_start, t.pl_every) == (ref.num_epochs, refresh, refresh)
    assert (t.teacher_threshold, t.student_fusion, t.use_fpkdm, t.use_fbvm) == ("calibrate", True, False, False)


def test_closed_loop_mixin_schedule_stores_refresh_and_checkpoint_state(tmp_path):
    """`ClosedLoopTrainerMixin` (METHODS.md §4.5) on its own: refreshes at joint epochs pl_start, pl_start + pl_every,
    ... after `init_epochs`; the stores in the fold folder; a refresh hands the student and the unlabeled cases to
    `ClosedLoopTargets.student_round`, restarts the unlabeled loader and counts the round; the round is logged per
    epoch under a key registered at construction; a negative box margin fails the start-up checks; round and threshold
    survive the checkpoint state, with their restore line."""
    from nnunet_semisam.teachers.closed_loop_trainer import ClosedLoopTrainerMixin

    calls = []

    class Targets:
        def student_round(self, network, cases, round_index, **kwargs):
            calls.append((network, [(c.case_id, c.folder, c.labeled) for c in cases], round_index,
                          kwargs["trainer_name"]))
            return f"round {round_index} done"

    class Logger:
        def __init__(self):
            self.local_logger = type("L", (), {"my_fantastic_logging": {}})()

        def log(self, key, value, epoch):
            self.local_logger.my_fantastic_logging[key].append((epoch, value))

    class Base:  # what the mixin needs from nnU-Net's trainer
        output_folder, unlabeled_folder, unlabeled_cases = str(tmp_path), str(tmp_path / "u"), ["x", "y"]
        network, plans_manager, configuration_manager, dataset_json, device = "net", None, None, {}, "cpu"

        def __init__(self):
            self.lines, self.restarts, self.epoch_starts, self.logger = [], 0, 0, Logger()

        def print_to_log_file(self, line):
            self.lines.append(line)

        def restart_unlabeled_loader(self):
            self.restarts += 1

        def on_train_epoch_start(self):
            self.epoch_starts += 1

        def on_train_epoch_end(self, outputs):
            pass

        def extra_checkpoint_state(self):
            return {"base": 1}

        def _term_log_keys(self):
            return ["loss_x"]

        def preflight_checks(self):
            self.lines.append("base checks")

        def load_extra_checkpoint_state(self, state):
            pass

    class Trainer(ClosedLoopTrainerMixin, Base):
        init_epochs, pl_start, pl_every, student_box_margin = 2, 3, 4, 0

    t = Trainer()
    assert t._term_log_keys() == ["loss_x", "pseudolabel_round"]
    for key in t._term_log_keys():  # what SemiSupervisedTrainer.__init__ does with them
        t.logger.local_logger.my_fantastic_logging.setdefault(key, [])
    t.preflight_checks()
    t.student_box_margin = -1
    with pytest.raises(SemiSAMError, match=r"^Trainer\.student_box_margin = -1: must be >= 0 px$"):
        t.preflight_checks()
    assert t.lines == ["base checks", "base checks"], "the trainer's own checks run first"
    t.lines.clear()
    assert [e for e in range(20) if t.is_refresh_epoch(e)] == [5, 9, 13, 17]  # joint epochs 3, 7, 11, 15
    assert t.labeled_store_folder == str(tmp_path / "pseudolabels" / "labeled")
    assert t.unlabeled_store_folder == str(tmp_path / "pseudolabels" / "unlabeled")

    t.targets = Targets()
    for epoch in range(10):
        t.current_epoch = epoch
        t.on_train_epoch_start()
        t.on_train_epoch_end([])
    assert t.epoch_starts == 10 and t.restarts == 2 and t.pl_round == 2
    assert calls == [("net", [("x", str(tmp_path / "u"), False), ("y", str(tmp_path / "u"), False)], r, "Trainer")
                     for r in (1, 2)]
    assert "round 2 done" in t.lines
    assert t.logger.local_logger.my_fantastic_logging["pseudolabel_round"] == [(e, int(e >= 5) + int(e >= 9))
                                                                               for e in range(10)]

    t.threshold = 0.07
    state = t.extra_checkpoint_state()
    assert state == {"base": 1, "pseudolabel_round": 2, "teacher_threshold": 0.07}
    fresh = Trainer()
    fresh.load_extra_checkpoint_state(state)
    assert (fresh.pl_round, fresh.threshold) == (2, 0.07)
    assert fresh.lines == ["restored pseudo-label round 2, teacher threshold 0.07"]
