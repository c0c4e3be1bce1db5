"""Algorithm 2 teacher sets (METHODS.md §5.4): names -> teachers from local checkpoints, one-line errors, and the
2kN masks of a k-teacher set through Algorithm 2 (small random SAM-Med3D and MedSAM2 models saved to files)."""
import numpy as np
import pytest
import torch

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.algorithm2 import algorithm2
from nnunet_semisam.teachers.teacher_sets import build_teacher_set, check_teacher_set, point_mode

SMALL_SAM_MED3D = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1],
                       prompt_embed_dim=48, image_size=32, vit_patch_size=16)
TINY_SAM2 = ["++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
             "++model.image_encoder.trunk.stages=[1,1,1,2]", "++model.image_encoder.trunk.global_att_blocks=[4]",
             "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]", "++model.memory_attention.num_layers=1",
             "++model.memory_attention.layer.dim_feedforward=64", "++model.num_maskmem=2"]


@pytest.mark.parametrize("names, message", [
    ([], "empty"),
    (["litemedsam", "litemedsam"], "twice"),
    (["sam3"], "unknown Algorithm 2 teacher 'sam3'"),
    (["litemedsam", "sam-med3d"], r"\$SEMISAM_SAM_MED3D"),
    (["medsam2"], r"\$SEMISAM_MEDSAM2"),
    (["medsam"], r"\$SEMISAM_TEACHER"),
])
def test_bad_sets_are_one_line_errors(names, message, monkeypatch):
    for env in ("SEMISAM_SAM_MED3D", "SEMISAM_MEDSAM2", "SEMISAM_TEACHER"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(SemiSAMError, match=message) as e:
        check_teacher_set(names)
    assert "\n" not in str(e.value)


def test_missing_checkpoint_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMISAM_SAM_MED3D", str(tmp_path / "sam_med3d_turbo.pth"))
    with pytest.raises(SemiSAMError, match="sam_med3d_turbo.pth: the sam-med3d checkpoint does not exist"):
        check_teacher_set(["sam-med3d"])


def test_sam_med3d_and_medsam2_set_gives_4n_masks(monkeypatch, tmp_path):
    pytest.importorskip("medim")
    pytest.importorskip("sam2")
    from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher
    from nnunet_semisam.teachers.sam_med3d import SAMMed3DTeacher, build_sam_med3d

    torch.manual_seed(0)
    sam3d = build_sam_med3d(**SMALL_SAM_MED3D)
    torch.save({"model_state_dict": sam3d.state_dict()}, tmp_path / "tiny_sam_med3d.pth")
    medsam2 = MedSAM2Teacher.from_checkpoint(None, image_size=64, hydra_overrides=TINY_SAM2)
    torch.save({"model": medsam2.predictor.state_dict()}, tmp_path / "tiny_medsam2.pt")
    monkeypatch.setenv("SEMISAM_SAM_MED3D", str(tmp_path / "tiny_sam_med3d.pth"))
    monkeypatch.setenv("SEMISAM_MEDSAM2", str(tmp_path / "tiny_medsam2.pt"))

    teachers = build_teacher_set(["sam-med3d", "medsam2"], options={
        "sam-med3d": SMALL_SAM_MED3D, "medsam2": {"image_size": 64, "hydra_overrides": TINY_SAM2}})
    assert isinstance(teachers[0], SAMMed3DTeacher) and isinstance(teachers[1], MedSAM2Teacher)
    for k, v in sam3d.state_dict().items():  # loaded from the file named by the variable
        assert torch.equal(teachers[0].model.state_dict()[k], v), k

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (4, 24, 24)).astype(np.float32)
    coarse = np.zeros((4, 24, 24), bool)
    coarse[1:3, 8:16, 8:16] = True
    pseudo, conf, masks = algorithm2(volume, coarse, teachers, np.random.default_rng(1), n_aug=2,
                                     return_predictions=True)
    assert masks.shape == (2 * 2 * 2, 4, 24, 24)  # 2 teachers x 2 augmentations x (mask, point) = 4N
    assert pseudo.shape == conf.shape == (4, 24, 24)
    np.testing.assert_allclose(pseudo, masks.mean(0) * (masks.var(0) < 0.05), atol=1e-6)


def test_point_mode_follows_the_set():
    assert point_mode(["litemedsam"]) == point_mode(["litemedsam", "medsam2"]) == "slicewise"
    assert point_mode(["sam-med3d"]) == point_mode(["sam-med3d", "medsam2"]) == "volume"


@pytest.mark.parametrize("variant, names, env", [
    ("SemiSAMPlusTrainer", ("litemedsam",), None),
    ("SemiSAMPlusTrainer_medsam", ("medsam",), "SEMISAM_TEACHER"),
    ("SemiSAMPlusTrainer_samMed3d", ("sam-med3d",), "SEMISAM_SAM_MED3D"),
    ("SemiSAMPlusTrainer_medsam2", ("litemedsam", "medsam2"), "SEMISAM_MEDSAM2"),
    ("SemiSAMPlusTrainer_samMed3d_medsam2", ("sam-med3d", "medsam2"), "SEMISAM_SAM_MED3D"),
])
def test_semisam_plus_variants_name_their_sets_and_fail_at_start_without_weights(variant, names, env, monkeypatch):
    """One variant per teacher set; its start-up check (`preflight_checks` -> `check_teacher_set`) names the unset
    variable in one line."""
    from nnunet_semisam.trainers import semisam_plus_variants as semisam_plus

    cls = getattr(semisam_plus, variant)
    assert cls.teacher_set == names
    for var in ("SEMISAM_SAM_MED3D", "SEMISAM_MEDSAM2", "SEMISAM_TEACHER"):
        monkeypatch.delenv(var, raising=False)
    if env is None:
        check_teacher_set(cls.teacher_set)
    else:
        with pytest.raises(SemiSAMError, match=rf"\${env} = a local checkpoint"):
            check_teacher_set(cls.teacher_set)
