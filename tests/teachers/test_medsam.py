"""MedSAMTeacher against the official MedSAM inference (METHODS.md §2.2), checkpoint loading, taps, cache, rule U.

The official pipeline is re-implemented below line by line from `MedSAM_Inference.py` (METHODS.md §2.2 steps 1-9)
and run on a small randomly initialised `Sam` made from segment_anything's own classes (1024² geometry).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import transform

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.cache import EmbeddingCache
from nnunet_semisam.teachers.medsam import MedSAMTeacher, medsam_preprocess
from nnunet_semisam.teachers.sam_models import build_sam_custom, load_sam_checkpoint, save_sam_checkpoint
from nnunet_semisam.teachers.uint8_adapter import to_uint8

SMALL = dict(encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=(1,),
             prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def small_sam(seed: int = 0):
    torch.manual_seed(seed)
    sam = build_sam_custom(**SMALL)
    with torch.no_grad():  # random init leaves pos_embed / rel-pos at 0: perturb everything so outputs vary
        for p in sam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sam.eval()


@torch.no_grad()
def official_embed(sam, img_np: np.ndarray) -> tuple[torch.Tensor, int, int]:
    """`MedSAM_Inference.py` main body up to `image_embedding` (METHODS.md §2.2 steps 1-5)."""
    if len(img_np.shape) == 2:
        img_3c = np.repeat(img_np[:, :, None], 3, axis=-1)
    else:
        img_3c = img_np
    H, W, _ = img_3c.shape
    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    img_1024_tensor = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    return sam.image_encoder(img_1024_tensor), H, W


@torch.no_grad()
def official_medsam_inference(sam, img_embed, box_np: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """`box_1024` scaling + `medsam_inference` of `MedSAM_Inference.py` (steps 6-9), one box; returns (prob, mask)."""
    box_1024 = box_np / np.array([W, H, W, H]) * 1024
    box_torch = torch.as_tensor(box_1024, dtype=torch.float)
    if len(box_torch.shape) == 2:
        box_torch = box_torch[:, None, :]
    sparse, dense = sam.prompt_encoder(points=None, boxes=box_torch, masks=None)
    low_res_logits, _ = sam.mask_decoder(image_embeddings=img_embed, image_pe=sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
    low_res_pred = torch.sigmoid(low_res_logits)
    low_res_pred = F.interpolate(low_res_pred, size=(H, W), mode="bilinear", align_corners=False)
    low_res_pred = low_res_pred.squeeze().cpu().numpy()
    return low_res_pred, (low_res_pred > 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def sam():
    return small_sam()


def _image(rgb: bool, h: int = 50, w: int = 70) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - 20) ** 2 + (xx - 30) ** 2 < 120) * 120.0
    img = 40 + blob + rng.normal(0, 10, (h, w))
    if rgb:
        img = np.stack([img, img * 0.8, img * 0.6 + 20], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("rgb", [False, True])
def test_bit_identical_to_official_pipeline(sam, rgb):
    img = _image(rgb)
    teacher = MedSAMTeacher(sam, "cpu")
    emb = teacher.embed(img)
    boxes = np.array([[18, 8, 44, 33], [0, 0, 69, 49]])
    prob = teacher.segment(emb, boxes, img.shape[:2]).numpy()
    assert prob.shape == (2, 50, 70) and prob.dtype == np.float32
    ref_emb, H, W = official_embed(sam, img)
    assert torch.equal(emb, ref_emb)
    for i, box in enumerate(boxes):
        ref_prob, ref_mask = official_medsam_inference(sam, ref_emb, box[None], H, W)
        np.testing.assert_array_equal(prob[i], ref_prob)                 # bitwise (stricter than 1e-5)
        np.testing.assert_array_equal((prob[i] > 0.5).astype(np.uint8), ref_mask)
    assert prob.std() > 1e-4  # the comparison is not between constants
    # batched (fast) mode: same numbers to 1e-5, same masks away from the threshold
    fast = teacher.segment(emb, boxes, img.shape[:2], batched=True).numpy()
    np.testing.assert_allclose(fast, prob, atol=1e-5)


def test_preprocess_drops_alpha_and_replicates_gray():
    g = _image(False)
    np.testing.assert_array_equal(medsam_preprocess(g), medsam_preprocess(np.repeat(g[:, :, None], 3, -1)))
    rgba = np.concatenate([_image(True), np.full((50, 70, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(medsam_preprocess(rgba), medsam_preprocess(_image(True)))
    out = medsam_preprocess(g)
    assert out.dtype == np.float64 and out.shape == (1024, 1024, 3) and out.min() == 0 and out.max() == 1


def test_point_and_mask_prompts_match_manual_sam_calls(sam):
    img = _image(False)
    teacher = MedSAMTeacher(sam, "cpu")
    emb = teacher.embed(img)
    pts, labels = np.array([[[30.0, 20.0], [5.0, 45.0]]]), np.array([[1, 0]])
    prob = teacher.segment(emb, None, (50, 70), points=pts, point_labels=labels)
    mask = np.zeros((1, 50, 70), bool)
    mask[0, 10:30, 20:40] = True
    prob_m = teacher.segment(emb, None, (50, 70), mask_prompt=mask)
    with torch.no_grad():
        c = torch.tensor(pts / np.array([70, 50]) * 1024, dtype=torch.float)
        sp, de = sam.prompt_encoder(points=(c, torch.tensor(labels, dtype=torch.int)), boxes=None, masks=None)
        lo, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sp, de, False)
        ref = F.interpolate(torch.sigmoid(lo), size=(50, 70), mode="bilinear", align_corners=False)[:, 0]
        m256 = F.interpolate(torch.tensor(mask, dtype=torch.float)[:, None], size=(256, 256), mode="nearest")
        sp, de = sam.prompt_encoder(points=None, boxes=None, masks=m256)
        lo, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sp, de, False)
        ref_m = F.interpolate(torch.sigmoid(lo), size=(50, 70), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(prob, ref, rtol=0, atol=0)
    torch.testing.assert_close(prob_m, ref_m, rtol=0, atol=0)
    assert not torch.equal(prob, prob_m)
    with pytest.raises(SemiSAMError):
        teacher.segment(emb, None, (50, 70))  # no prompt at all


def test_checkpoint_roundtrip_detection_and_errors(sam, tmp_path):
    path = tmp_path / "small.pth"
    save_sam_checkpoint(sam, path, "custom_small", arch=SMALL)
    t = MedSAMTeacher.from_checkpoint(path)  # model type and architecture read from the file
    assert t.model_type == "custom_small" and len(t.checkpoint_sha1) == 40
    img = _image(False)
    np.testing.assert_array_equal(t.predict(img, [[18, 8, 44, 33]]).numpy(),
                                  MedSAMTeacher(sam).predict(img, [[18, 8, 44, 33]]).numpy())
    # a plain state dict (MedSAM's format) of a non-registered architecture cannot be detected
    plain = tmp_path / "plain.pth"
    torch.save(sam.state_dict(), plain)
    with pytest.raises(SemiSAMError, match="cannot detect"):
        MedSAMTeacher.from_checkpoint(plain)
    with pytest.raises(SemiSAMError, match="wrong architecture"):
        MedSAMTeacher.from_checkpoint(plain, model_type="semisam_tiny")
    with pytest.raises(SemiSAMError, match="not found"):
        MedSAMTeacher.from_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SemiSAMError, match="cannot read"):
        load_sam_checkpoint(junk)


def test_bad_images(sam):
    t = MedSAMTeacher(sam)
    bad = _image(False).astype(np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(SemiSAMError, match="NaN"):
        t.embed(bad)
    with pytest.raises(SemiSAMError, match="uint8"):
        t.embed(_image(False).astype(np.float32))
    with pytest.raises(SemiSAMError, match="NaN"):
        to_uint8(bad[None, None], ["ZScoreNormalization"])


def test_embedding_cache_skips_encoder_and_is_exact(sam, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", max_items=1)
    t = MedSAMTeacher(sam, checkpoint_sha1="abc", cache=cache)
    calls = []
    h = sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        img = _image(False)
        e1 = t.embed(img, case_id="c1", slice_idx=0)
        e2 = t.embed(img, case_id="c1", slice_idx=0)
        t.embed(_image(True), case_id="c2", slice_idx=0)   # evicts c1 from memory (max_items=1) ...
        e3 = t.embed(img, case_id="c1", slice_idx=0)        # ... but it is still on disk
        assert len(calls) == 2 and cache.hits == 2
        assert torch.equal(e1, e2) and torch.equal(e1, e3)
        e4 = t.embed(img, case_id="c1", slice_idx=1)        # another key: encoder runs
        assert len(calls) == 3 and torch.equal(e4, e1)
    finally:
        h.remove()
    small = EmbeddingCache(tmp_path / "lru", max_bytes=1, max_items=0)  # disk limit: keeps nothing older
    small.put("a" * 40, e1[0])
    small.put("b" * 40, e1[0])
    assert len(small) <= 1


def test_block_taps_and_reinjection(sam):
    t = MedSAMTeacher(sam)
    assert t.tap_blocks == (1,)  # the global-attention block of this small model
    x = torch.rand(2, 3, 256, 256)
    taps = t.block_features(x, blocks=(0, 1))
    assert [tuple(f.shape) for f in taps] == [(2, 16, 16, 16)] * 2  # 256² input -> 16x16 grid (§2.5 check)
    again = t.forward_blocks(taps[0], start=1, blocks=(1,))
    torch.testing.assert_close(again[0], taps[1])
    t.tap_blocks = (0, 1)  # two taps: re-injection from the first, and `count` stops after the taps asked for
    torch.testing.assert_close(t.later_taps(taps[0])[0], taps[1])
    assert len(t.later_taps(taps[0], 1)) == 1 and t.later_taps(taps[0], 0) == []
    x1024 = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        full = t.neck(t.block_features(x1024, blocks=(1,))[0])
        torch.testing.assert_close(full, sam.image_encoder(x1024))


def test_fast_path_preprocess():
    x = torch.rand(2, 4, 32, 48) * 5 - 1
    out = MedSAMTeacher.fast_preprocess(x, channels=[2], size=64)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    assert out.amin() >= 0 and out.amax() <= 1
    ref = F.interpolate(((x[:, 2:3] - x[:, 2:3].amin((1, 2, 3), keepdim=True))
                         / (x[:, 2:3].amax((1, 2, 3), keepdim=True) - x[:, 2:3].amin((1, 2, 3), keepdim=True))),
                        size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :1], ref)


def test_rule_u():
    rgb = np.random.default_rng(0).random((3, 1, 5, 6)).astype(np.float32)
    u = to_uint8(rgb, ["RGBTo01Normalization"] * 3)
    assert u.shape == (1, 5, 6, 3) and u.dtype == np.uint8
    np.testing.assert_array_equal(u, np.moveaxis(np.round(rgb * 255), 0, -1).astype(np.uint8))
    # z-score: percentiles over voxels != min, min-max to 255, minimum voxels -> 0, truncation
    x = np.full((1, 1, 10, 10), -3.0)
    x[0, 0, 2:8, 2:8] = np.linspace(0, 1, 36).reshape(6, 6)
    v = x[0][x[0] != -3.0]
    lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    ref = ((np.clip(x[0], lo, hi) - np.clip(x[0], lo, hi).min()) /
           (np.clip(x[0], lo, hi).max() - np.clip(x[0], lo, hi).min()) * 255)
    ref[x[0] == -3.0] = 0
    np.testing.assert_array_equal(to_uint8(x, ["ZScoreNormalization"]), np.uint8(ref))
    # CT: undo the z-score with the plans' stats, window 40/400 ([-160, 240] HU), min-max
    hu = np.array([[[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]]])
    ct = to_uint8((hu - 100.0) / 50.0, ["CTNormalization"], intensity_properties={"0": {"mean": 100.0, "std": 50.0}})
    np.testing.assert_array_equal(ct, [[[0, 0, 127, 255, 255]]])
    with pytest.raises(SemiSAMError, match="CT"):
        to_uint8(hu, ["CTNormalization"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast path needs CUDA")
def test_autocast_on_cuda_close_to_fp32(sam):
    img = _image(True)
    ref = MedSAMTeacher(sam, "cpu").predict(img, [[18, 8, 44, 33]])
    for dt in (torch.bfloat16, torch.float16):
        t = MedSAMTeacher(small_sam(), "cuda", amp_dtype=dt)
        out = t.predict(img, [[18, 8, 44, 33]]).cpu()
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05
