"""The embedded stand-in teacher ships in the package and loads through MedSAM's code path (issue 4, part 5)."""

import os

import numpy as np
import torch
from skimage import transform

from nnunet_semisam.teachers.medsam import MedSAMTeacher
from nnunet_semisam.teachers.sam_models import TINY_ARCH, build_sam_custom, embedded_teacher_checkpoint
from nnunet_semisam.teachers.train_embedded import EVAL_SEED, TRAIN_SEED, make_prompts, make_sample, resize_matrix


def test_checkpoint_is_shipped_small_and_self_describing():
    path = embedded_teacher_checkpoint()
    assert os.path.getsize(path) <= 20 * 2 ** 20
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["model_type"] == "semisam_tiny" and obj["eval"]["n_images"] >= 20
    assert 0 <= obj["eval"]["box_dice_mean"] <= 1
    t = MedSAMTeacher.from_checkpoint(path)            # no model_type: read from the file, same path as MedSAM
    assert t.model_type == "semisam_tiny" and t.embedding_shape == (TINY_ARCH["prompt_embed_dim"], 64, 64)
    assert t.tap_blocks == (0, 1, 2, 3)
    assert (sum(p.numel() for p in t.sam.parameters()) ==
            sum(p.numel() for p in build_sam_custom(**TINY_ARCH).parameters()))


def test_embedded_teacher_segments_a_synthetic_lesion():
    t = MedSAMTeacher.from_checkpoint(embedded_teacher_checkpoint())
    rng = np.random.default_rng(np.random.SeedSequence(EVAL_SEED + 1000))  # not a training or evaluation image
    img, mask = make_sample(rng)
    from nnunet_semisam.teachers.prompts import boxes_from_mask
    prob = t.predict(img, boxes_from_mask(mask, min_area=1)).amax(0).numpy()
    assert prob.shape == mask.shape and 0 <= prob.min() and prob.max() <= 1


def test_training_data_helpers():
    assert TRAIN_SEED >= 10_000 and EVAL_SEED >= 10_000  # disjoint from the demo/test seeds 0..999
    img = (np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8)
    ref = transform.resize(img, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
    lin = resize_matrix(20).numpy() @ img.astype(np.float64) @ resize_matrix(30).numpy().T
    np.testing.assert_allclose(np.clip(lin, img.min(), img.max()), ref, atol=1e-9)  # order-3 resize is this linear map
    rng = np.random.default_rng(1)
    _, mask = make_sample(rng)
    for kind, prompt, target in make_prompts(mask, rng, k=6):
        assert target.shape == mask.shape and target.any() and not (target & ~mask).any()
