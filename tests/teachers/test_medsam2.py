"""MedSAM2 teacher (METHODS.md §5.4) on a tiny randomly initialised SAM2.1 configuration (needs the optional sam2)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="optional extra nnunet-semisam[medsam2]")

from nnunet_semisam.errors import SemiSAMError  # noqa: E402
from nnunet_semisam.teachers.algorithm2 import algorithm2  # noqa: E402
from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher, SliceAffine, medsam2_pseudolabel_case  # noqa: E402
from nnunet_semisam.data.pseudolabel_store import PseudoLabelParams  # noqa: E402

TINY = ["++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,1,2]", "++model.image_encoder.trunk.global_att_blocks=[4]",
        "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]", "++model.memory_attention.num_layers=1",
        "++model.memory_attention.layer.dim_feedforward=64", "++model.num_maskmem=2"]


@pytest.fixture(scope="module")
def teacher():
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.manual_seed(0)
    return MedSAM2Teacher.from_checkpoint(None, image_size=64, hydra_overrides=TINY)


def _volume():
    return (np.random.default_rng(0).random((4, 40, 50)) * 255).astype(np.uint8)


def test_slice_affine_maps_prompts_and_back():
    a = SliceAffine((40, 50), 64)
    np.testing.assert_allclose(a.points([[25.0, 20.0]]), [[32.0, 32.0]])
    np.testing.assert_allclose(a.box([0, 0, 50, 40]), [0, 0, 64, 64])
    m = np.zeros((40, 50), bool)
    m[10:30, 5:25] = True
    back = a.inverse_prob(a.mask(m).float())  # nearest forward, bilinear back: equal away from the border
    assert back.shape == (40, 50) and ((back > 0.5).numpy() == m).mean() > 0.97
    const = a.inverse_prob(torch.full((2, 64, 64), 0.3))
    torch.testing.assert_close(const, torch.full((2, 40, 50), 0.3))


def test_mask_prompt_on_key_slice_is_reproduced_and_propagated(teacher):
    vol = _volume()
    m = np.zeros((40, 50), bool)
    m[10:20, 10:30] = True
    prob = teacher.propagate(vol, 2, mask=m)
    assert prob.shape == (4, 40, 50) and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1
    # SAM2.1 uses a mask input directly as the key slice's output: it must come back through A and A^-1
    assert ((prob[2] > 0.5) == m).mean() > 0.97
    p_box = teacher.propagate(vol, 1, box=[10, 10, 30, 25])
    p_pts = teacher.propagate(vol, 0, points=[[20, 15]], point_labels=[1])
    assert p_box.shape == p_pts.shape == (4, 40, 50)
    with pytest.raises(SemiSAMError, match="key slice"):
        teacher.propagate(vol, 9, box=[1, 1, 5, 5])


def test_algorithm2_and_case_function_with_medsam2(teacher):
    vol = _volume()
    mc = np.zeros((4, 40, 50), bool)
    mc[1:3, 10:22, 12:30] = True
    pseudo, conf = algorithm2(vol[None].astype(np.float32), mc, teacher, np.random.default_rng(0), n_aug=1,
                              point_mode="volume")
    assert pseudo.shape == conf.shape == (4, 40, 50) and conf.dtype == bool
    params = PseudoLabelParams(teacher="medsam2", aug=0)
    prob, conf = medsam2_pseudolabel_case(teacher, vol, mc, params, "c1")
    assert prob.shape == (4, 40, 50) and conf.all()
    prob, conf = medsam2_pseudolabel_case(teacher, vol, np.zeros_like(mc), params, "c1")
    assert not conf.any() and not prob.any()  # empty prompt mask: no pseudo-label, no teacher call


def test_checkpoint_loading_errors(teacher, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": teacher.predictor.state_dict()}, ckpt)
    ok = MedSAM2Teacher.from_checkpoint(ckpt, image_size=64, hydra_overrides=TINY)
    assert len(ok.checkpoint_sha1) == 40
    with pytest.raises(SemiSAMError, match="wrong architecture"):
        MedSAM2Teacher.from_checkpoint(ckpt, image_size=64)          # full Hiera-T config
    with pytest.raises(SemiSAMError, match="not found"):
        MedSAM2Teacher.from_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(SemiSAMError, match="uint8"):
        teacher.frames(np.zeros((2, 8, 8), np.float32))
