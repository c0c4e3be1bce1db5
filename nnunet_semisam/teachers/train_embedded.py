"""Train the embedded stand-in teacher: a small SAM (`semisam_tiny`) for box/point-prompted lesion segmentation.

MedSAM weights cannot be downloaded here, so the package ships this model at
`nnunet_semisam/assets/semisam_tiny_teacher.pth`; `MedSAMTeacher.from_checkpoint(embedded_teacher_checkpoint())`
loads it through exactly the same code path as `medsam_vit_b.pth`. It is a **stand-in** for tests, the demo and CPU
runs, not a replacement for MedSAM: it has only seen synthetic 2D lesion images.

Architecture: `segment_anything` classes with MedSAM's geometry (1024² input, patch 16, 64×64 embedding grid, window
14, rel-pos), ViT width 24, depth 4, 1 head, window attention only, prompt/decoder width 64
(`sam_models.TINY_ARCH`). The embedding is (64, 64, 64) instead of MedSAM's (256, 64, 64).
Keeping MedSAM's 4096-token geometry is what makes CPU training slow (memory-bound skinny matmuls), hence the width.

Data: `nnunet_semisam.data.synthetic.synth_case` with kinds "2d-rgb" and "2d-mri", random shapes 48-144 px, random
lesion polarity, contrast U(0.35, 0.9) (clearer than the demo's 0.25), lower noise/texture/bias, from
`SeedSequence(10_000)` (training) and `SeedSequence(10_001)` (held-out evaluation), disjoint from the seeds 0..999 of
the demo and the tests. MRI images go through rule U (`to_uint8`, percentile scaling) on a random modality. Input
preprocessing is MedSAM's reference pipeline: the order-3 resize to 1024² is computed as an exact separable linear map
(`resize_matrix`, same uint8 result as `skimage.transform.resize`), which makes training ~100× cheaper than calling
skimage per image.

Prompts per image: 2, each either a per-component box (tight, or jittered by up to 8 % of the image side), the
whole-mask box, or 1-2 positive points plus 0-1 negative point; target = foreground inside the box (boxes) or the
clicked component (points). Loss: soft Dice + 0.5 x weighted BCE on the decoder's single-mask output, bilinearly
resized to the image size (the inference output); BCE weight 1 inside the box grown by 25 % (0.1 outside) and positives
up-weighted by the negative/positive ratio inside it (capped at 10), so that small lesions do not collapse to
background. AdamW, cosine LR over `max(step/steps, elapsed/time_budget)`.

Run: `python -m nnunet_semisam.teachers.train_embedded --out nnunet_semisam/assets/semisam_tiny_teacher.pth`
(≈25 min on 2 CPU cores). The held-out box-prompted Dice is measured with the exact reference pipeline and stored
in the checkpoint (`eval`) and in `semisam_tiny_teacher.json` beside it, for held-out images of the training
distribution (seed 10_001) and of the demo's default contrast 0.25 (seed 10_002, `eval.demo_contrast`).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_SEED = 10_000
EVAL_SEED = 10_001
SHAPES = ((48, 48), (64, 64), (96, 96), (128, 128), (64, 96), (112, 80), (144, 144))


@lru_cache(maxsize=32)
def resize_matrix(n: int, size: int = 1024) -> torch.Tensor:
    """(size, n) float64 matrix of skimage's order-3 `resize` along one axis (mode reflect, anti-aliasing off for
    upsampling). `A_y @ img @ A_x.T`, clipped to the input range and truncated, equals the reference uint8 image."""
    from skimage import transform

    m = transform.resize(np.eye(n), (size, n), order=3, preserve_range=True, anti_aliasing=True, clip=False)
    return torch.from_numpy(m)


def fast_reference_input(image: np.ndarray, size: int = 1024) -> torch.Tensor:
    """MedSAM reference input (3, 1024, 1024) float32 of a uint8 (H, W[, 3]) image via `resize_matrix` (float32
    here: the truncation to uint8 may differ from skimage in rare boundary cases, irrelevant for training)."""
    gray = image.ndim == 2
    img = image[:, :, None] if gray else image[:, :, :3]
    x = torch.from_numpy(np.ascontiguousarray(img)).float().permute(2, 0, 1)
    ay, ax = resize_matrix(img.shape[0], size).float(), resize_matrix(img.shape[1], size).float()
    out = ay @ x @ ax.T
    out = out.clamp(float(img.min()), float(img.max())).to(torch.uint8).float()
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-8)
    return out.expand(3, -1, -1) if gray else out


TRAIN_CONTRAST = (0.35, 0.9)  # clearer lesions than the demo's default 0.25: the tiny model has few steps to learn
DEMO_CONTRAST = (0.25, 0.25)


def make_sample(rng: np.random.Generator, contrast: tuple[float, float] = TRAIN_CONTRAST
                ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic training image: uint8 (H, W, 3) or (H, W), and its binary lesion mask (H, W) (never empty)."""
    from nnunet_semisam.data.synthetic import SynthParams, synth_case
    from nnunet_semisam.teachers.uint8_adapter import to_uint8

    while True:
        kind = "2d-rgb" if rng.random() < 0.5 else "2d-mri"
        shape = SHAPES[rng.integers(len(SHAPES))]
        params = SynthParams(contrast=float(rng.uniform(*contrast)), empty_fraction=0.0,
                             polarity=int(rng.choice([-1, 1])), num_lesions=(1, 3),
                             noise=float(rng.uniform(0.01, 0.04)), texture=float(rng.uniform(0.02, 0.06)),
                             bias=float(rng.uniform(0.1, 0.25)))
        img, lab = synth_case(rng, kind, shape, params)
        if lab.sum() < 4:
            continue
        if kind == "2d-rgb":
            return np.moveaxis(img, 0, -1), lab > 0
        ch = int(rng.integers(3))
        return to_uint8(img[:, None], ["ZScoreNormalization"] * 3, teacher_channel=ch)[0], lab > 0


def make_prompts(mask: np.ndarray, rng: np.random.Generator, k: int = 2):
    """Up to `k` (kind, prompt, target) triples for one mask; kind 'box' -> (4,) xyxy, 'points' -> (coords, labels)."""
    from scipy import ndimage

    from nnunet_semisam.teachers.prompts import boxes_from_mask, boxes_to_mask, jitter_boxes, sample_points

    h, w = mask.shape
    comps, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    out = []
    boxes = boxes_from_mask(mask, min_area=1, max_boxes=8)
    for _ in range(k):
        r = rng.random()
        if r < 0.6 and len(boxes):
            b = boxes[rng.integers(len(boxes))][None]
            if rng.random() < 0.5:
                b = jitter_boxes(b, (h, w), max(1, int(0.08 * max(h, w))), rng)
            out.append(("box", b[0], mask & boxes_to_mask(b, (h, w))))
        elif r < 0.75:
            b = boxes_from_mask(mask, min_area=1, per_component=False)
            out.append(("box", b[0], mask & boxes_to_mask(b, (h, w))))
        else:
            comp = comps == (1 + rng.integers(n))
            c, lab = sample_points(comp, rng, n_pos=int(rng.integers(1, 3)), n_neg=int(rng.integers(0, 2)),
                                   neg_margin=max(2, int(0.1 * max(h, w))))
            out.append(("points", (c, lab), comp))
    return out


def _loss_weights(target: np.ndarray, margin: float = 0.25, outside: float = 0.1, cap: float = 10.0) -> np.ndarray:
    """Per-pixel BCE weights: 1 in the target's box grown by `margin`, `outside` elsewhere; positives x neg/pos."""
    from nnunet_semisam.teachers.prompts import box_from_mask

    w = np.full(target.shape, outside, np.float32)
    b = box_from_mask(target)
    if b is None:
        return w
    h, wd = target.shape
    mx, my = int(margin * (b[2] - b[0] + 1)) + 1, int(margin * (b[3] - b[1] + 1)) + 1
    win = (slice(max(0, b[1] - my), min(h, b[3] + my + 1)), slice(max(0, b[0] - mx), min(wd, b[2] + mx + 1)))
    w[win] = 1.0
    pos = float(target[win].sum())
    neg = float(target[win].size - pos)
    w[target > 0] *= float(np.clip(neg / max(pos, 1.0), 1.0, cap))
    return w


def _decode(sam, emb: torch.Tensor, prompts, hw) -> torch.Tensor:
    """Logits (n, H, W) for the prompts of one image, decoded one at a time (boxes and points differ in length)."""
    h, w = hw
    outs = []
    for kind, p, _ in prompts:
        if kind == "box":
            box = torch.as_tensor(np.asarray(p, np.float64)[None] / np.array([w, h, w, h]) * 1024,
                                  dtype=torch.float)[:, None]
            sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        else:
            c, lab = p
            pts = torch.as_tensor(c[None] / np.array([w, h]) * 1024, dtype=torch.float)
            sparse, dense = sam.prompt_encoder(points=(pts, torch.as_tensor(lab[None], dtype=torch.int)),
                                               boxes=None, masks=None)
        low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        outs.append(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(outs)


def evaluate(checkpoint: str, n_images: int = 40, seed: int = EVAL_SEED, progress: bool = False,
             contrast: tuple[float, float] = TRAIN_CONTRAST) -> dict:
    """Box-prompted Dice of a checkpoint on held-out synthetic images with the exact MedSAM reference pipeline.

    Boxes per §2.3 (per 8-connected component, area >= 10 px, at most 5, tight); prediction = union (max) of the box
    probabilities > 0.5. Returns mean Dice over images (each has >= 1 box) and the count.
    """
    from tqdm import tqdm

    from nnunet_semisam.teachers.medsam import MedSAMTeacher
    from nnunet_semisam.teachers.prompts import boxes_from_mask

    teacher = MedSAMTeacher.from_checkpoint(checkpoint)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    dices = []
    for _ in tqdm(range(n_images), desc="held-out Dice", disable=not progress):
        img, mask = make_sample(rng, contrast)
        boxes = boxes_from_mask(mask, min_area=10, max_boxes=5)
        if len(boxes) == 0:
            continue
        prob = teacher.predict(img, boxes).amax(0).cpu().numpy()
        pred = prob > 0.5
        dices.append(2 * (pred & mask).sum() / max(pred.sum() + mask.sum(), 1))
    return {"box_dice_mean": float(np.mean(dices)), "box_dice_std": float(np.std(dices)), "n_images": len(dices),
            "eval_seed": seed, "contrast": list(contrast),
            "pipeline": "MedSAM reference (exact), tight per-component boxes (>= 10 px, <= 5), union, > 0.5"}


def train(out: str, steps: int = 6000, time_budget: float = 25 * 60, batch: int = 2, lr: float = 3e-3,
          seed: int = TRAIN_SEED, threads: int = 2, log_every: int = 10, eval_images: int = 40) -> dict:
    """Train `semisam_tiny` from scratch and save it (package checkpoint format) to `out`; returns the eval dict."""
    from nnunet_semisam.teachers.sam_models import TINY_ARCH, build_sam_custom, save_sam_checkpoint

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    sam = build_sam_custom(**TINY_ARCH).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    t0, step, warm = time.time(), 0, 20
    hist, train_dice = [], []
    while step < steps:
        progress = max(step / steps, (time.time() - t0) / time_budget)
        if progress >= 1:
            break
        f = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        samples = [make_sample(rng) for _ in range(batch)]
        x = torch.stack([fast_reference_input(img) for img, _ in samples])
        emb = sam.image_encoder(x)
        losses = []
        for b, (img, mask) in enumerate(samples):
            prompts = make_prompts(mask, rng)
            logits = _decode(sam, emb[b:b + 1], prompts, mask.shape)
            target = torch.as_tensor(np.stack([t for _, _, t in prompts]), dtype=torch.float32)
            weight = torch.as_tensor(np.stack([_loss_weights(t) for _, _, t in prompts]), dtype=torch.float32)
            bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum()
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
            train_dice.append(float(1 - dice.mean().detach()))
            losses.append(0.5 * bce + dice.mean())
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        hist.append(float(loss.detach()))
        step += 1
        if step % log_every == 0 or step <= 3:
            print(f"step {step} loss {np.mean(hist[-log_every:]):.4f} "
                  f"dice {np.mean(train_dice[-2 * log_every:]):.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"elapsed {time.time() - t0:.0f}s", flush=True)
    sam.eval()
    info = {"train_steps": step, "train_seconds": round(time.time() - t0, 1), "train_seed": seed, "batch": batch,
            "final_loss": float(np.mean(hist[-20:])) if hist else None}
    save_sam_checkpoint(sam, out, "semisam_tiny", arch=TINY_ARCH, extra={"train": info})
    ev = evaluate(out, n_images=eval_images, progress=False)
    ev["demo_contrast"] = evaluate(out, n_images=eval_images, seed=EVAL_SEED + 1, contrast=DEMO_CONTRAST)
    save_sam_checkpoint(sam, out, "semisam_tiny", arch=TINY_ARCH, extra={"train": info, "eval": ev})
    from nnunet_semisam.io import atomic_write_json

    atomic_write_json(Path(out).with_suffix(".json"), {"model_type": "semisam_tiny", "arch": TINY_ARCH,
                                                        "train": info, "eval": ev})
    print(json.dumps(ev), flush=True)
    return ev


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint path to write (.pth)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--time-budget", type=float, default=25 * 60, help="seconds; the LR schedule also ends here")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=40)
    ap.add_argument("--eval-only", action="store_true", help="only measure the held-out Dice of --out")
    a = ap.parse_args(argv)
    if a.eval_only:
        print(json.dumps(evaluate(a.out, a.eval_images, progress=True)))
        return
    train(a.out, a.steps, a.time_budget, a.batch, a.lr, threads=a.threads, eval_images=a.eval_images)


if __name__ == "__main__":
    main()
