"""SAM-Med3D teacher (METHODS.md §5.4) with a small randomly initialised medim model and a saved state dict."""
import numpy as np
import pytest
import torch

pytest.importorskip("medim")

from nnunet_semisam.errors import SemiSAMError  # noqa: E402
from nnunet_semisam.teachers.algorithm2 import algorithm2  # noqa: E402
from nnunet_semisam.teachers.sam_med3d import SAMMed3DTeacher, build_sam_med3d  # noqa: E402

#: a tiny configuration of the same architecture: 32^3 cube, patch 16 -> 2^3 tokens, 2 blocks
SMALL = dict(encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1],
             prompt_embed_dim=48, image_size=32, vit_patch_size=16)
#: key names of the official SAM-Med3D checkpoint (`sam_med3d_turbo.pth`, `model_state_dict`), as published
OFFICIAL_KEYS = ["image_encoder.pos_embed", "image_encoder.patch_embed.proj.weight",
                 "image_encoder.blocks.0.attn.qkv.weight", "image_encoder.blocks.0.attn.rel_pos_d",
                 "image_encoder.neck.0.weight", "prompt_encoder.point_embeddings.0.weight",
                 "prompt_encoder.mask_downscaling.0.weight", "prompt_encoder.no_mask_embed.weight",
                 "mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "mask_decoder.iou_token.weight",
                 "mask_decoder.output_upscaling.0.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_sam_med3d(**SMALL)
    path = tmp_path_factory.mktemp("sam_med3d") / "tiny_sam_med3d.pth"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 0}, path)  # the official file's layout
    return path, model


def test_state_dict_names_match_the_official_checkpoint(ckpt):
    keys = set(ckpt[1].state_dict())
    assert set(OFFICIAL_KEYS) <= keys


def test_loads_strictly_and_reproduces_the_model(ckpt):
    path, model = ckpt
    teacher = SAMMed3DTeacher.from_checkpoint(path, **SMALL)
    for k, v in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v), k
    assert teacher.size == 32 and teacher.mask_grid == (8, 8, 8)
    with pytest.raises(SemiSAMError, match="does not fit the model configuration"):
        SAMMed3DTeacher.from_checkpoint(path, **{**SMALL, "encoder_depth": 3})
    with pytest.raises(SemiSAMError, match="does not exist"):
        SAMMed3DTeacher.from_checkpoint(path.parent / "missing.pth")


def test_prompts_shapes_and_algorithm2(ckpt):
    teacher = SAMMed3DTeacher.from_checkpoint(ckpt[0], **SMALL)
    rng = np.random.default_rng(0)
    vol = rng.random((1, 6, 10, 12)).astype(np.float32)
    mask = np.zeros((6, 10, 12), bool)
    mask[2:4, 3:7, 4:8] = True
    e = teacher.encode(vol)
    pm = teacher.decode(e, mask=mask)
    pp = teacher.decode(e, points=np.array([[3, 5, 6]]))
    for p in (pm, pp):
        assert p.shape == (6, 10, 12) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
    assert not np.allclose(pm, pp)  # the prompt reaches the decoder
    pseudo, conf = algorithm2(vol, mask, teacher, rng, n_aug=2, point_mode="volume")
    assert pseudo.shape == conf.shape == (6, 10, 12)
