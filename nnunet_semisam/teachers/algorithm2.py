"""Semi-SAM+ Algorithm 2: uncertainty-filtered pseudo-labels from a promptable teacher (METHODS.md §5.4).

Pure function over a teacher interface (`PromptableTeacher`: `encode(image) -> E`, `decode(E, points=None,
mask=None) -> prob`), so SAM-Med3D-like 3D teachers, MedSAM slice-wise (`MedSAMSliceTeacher`) and test doubles
plug in alike. Per sample, no gradient (numpy in, numpy out):

1. for j = 1..N: `T_j` = random flips along z, y, x (p = 0.5 each) then in-plane `rot90^k` (k in {0..3} if Y == X,
   else {0, 2}) — an exact lattice transform with an exact inverse; `img_j = weak_aug(T_j(x))` (gamma U(0.9, 1.1) and
   Gaussian noise sigma 0.01, both on the min-max-normalized intensities, mapped back to the input range);
   `M_j = T_j(M_c)`; `p_j = sample_interior_point(M_j)` (RITM rule); `E = encode(img_j)`;
   append `T_j^-1(decode(E, mask=M_j))` and `T_j^-1(decode(E, points=[p_j]))`.
2. `Var` = population variance over the 2N predictions; `M_conf = Var < u_th` (u_th = 0.05);
   `Pseudo = mean * M_conf`.
3. Empty `M_c`: no teacher call, `Pseudo = 0`, `M_conf = 0` (the sample is skipped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from nnunet_semisam.teachers.prompts import boxes_from_mask, sample_interior_point


class PromptableTeacher(Protocol):
    """Teacher interface of METHODS.md §5.4 (all arrays numpy; spatial shape (Z, Y, X))."""

    def encode(self, image: np.ndarray) -> Any:
        """image (C, Z, Y, X) float -> opaque embedding E."""

    def decode(self, embedding: Any, points: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (Z, Y, X) in [0, 1] for a mask prompt (bool (Z, Y, X)) or point prompts (k, 3) index coords
        (z, y, x), all positive."""


@dataclass(frozen=True)
class LatticeTransform:
    """Flips (z, y, x) then `rot90^k` in the (y, x) plane; acts on the last 3 axes of an array."""

    flips: tuple[bool, bool, bool]
    k: int

    @staticmethod
    def random(rng: np.random.Generator, spatial_shape: Sequence[int]) -> "LatticeTransform":
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
        ks = (0, 1, 2, 3) if spatial_shape[-1] == spatial_shape[-2] else (0, 2)
        return LatticeTransform(flips, int(ks[rng.integers(len(ks))]))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        axes = [a.ndim - 3 + i for i, f in enumerate(self.flips) if f]
        out = np.flip(a, axis=axes) if axes else a
        return np.ascontiguousarray(np.rot90(out, self.k, axes=(a.ndim - 2, a.ndim - 1)))

    def inverse(self, a: np.ndarray) -> np.ndarray:
        out = np.rot90(a, -self.k, axes=(a.ndim - 2, a.ndim - 1))
        axes = [a.ndim - 3 + i for i, f in enumerate(self.flips) if f]
        return np.ascontiguousarray(np.flip(out, axis=axes) if axes else out)


def weak_aug(image: np.ndarray, rng: np.random.Generator, gamma: tuple[float, float] = (0.9, 1.1),
             noise_sigma: float = 0.01) -> np.ndarray:
    """Gamma U(gamma) and N(0, sigma²) noise on the min-max-normalized image (all channels jointly), mapped back."""
    x = image.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else 1.0
    x01 = (x - lo) / span
    x01 = np.clip(x01, 0, 1) ** rng.uniform(*gamma) + rng.normal(0.0, noise_sigma, x.shape)
    return (np.clip(x01, 0, 1) * span + lo).astype(np.float32)


def slicewise_interior_points(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One interior point (z, y, x) per non-empty Z-slice of a (Z, Y, X) mask: (k, 3) int64 (for 2D teachers)."""
    pts = [[z, *sample_interior_point(mask[z], rng)] for z in range(mask.shape[0]) if mask[z].any()]
    return np.asarray(pts, np.int64).reshape(-1, 3)


def algorithm2(
    image: np.ndarray,
    coarse_mask: np.ndarray,
    teacher: PromptableTeacher | Sequence[PromptableTeacher],
    rng: np.random.Generator,
    n_aug: int = 4,
    u_th: float = 0.05,
    use_weak_aug: bool = True,
    point_mode: str = "volume",
    return_predictions: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-SAM+ Algorithm 2 (METHODS.md §5.4) for one sample.

    image: (C, Z, Y, X) (or (Z, Y, X), taken as C = 1); coarse_mask: M_c (Z, Y, X) binary; n_aug: N;
    teacher: one teacher or several (the manual's 2N / 4N masks: every teacher gets the same augmented image and
    prompts, and the variance and the mean run over all 2N x len(teachers) masks);
    u_th: variance threshold; point_mode: "volume" (one RITM point in the 3D mask, for 3D teachers) or "slicewise"
    (one per non-empty slice, for 2D teachers applied slice by slice).
    Returns (pseudo float32 (Z, Y, X) = mean * M_conf, conf bool (Z, Y, X)) and, if asked, the 2N (x teachers)
    inverse-mapped predictions (2N, Z, Y, X). No gradient anywhere (numpy).
    """
    img = image[None] if image.ndim == 3 else image
    m = np.asarray(coarse_mask) > 0
    if m.shape != img.shape[1:]:
        raise ValueError(f"coarse mask {m.shape} and image {img.shape[1:]} differ in spatial shape")
    if not m.any():
        z = np.zeros(m.shape, np.float32), np.zeros(m.shape, bool)
        return (*z, np.zeros((0, *m.shape), np.float32)) if return_predictions else z
    preds = []
    for _ in range(n_aug):
        t = LatticeTransform.random(rng, m.shape)
        img_j = t(img)
        if use_weak_aug:
            img_j = weak_aug(img_j, rng)
        m_j = t(m)
        if point_mode == "volume":
            pts = sample_interior_point(m_j, rng)[None]
        elif point_mode == "slicewise":
            pts = slicewise_interior_points(m_j, rng)
        else:
            raise ValueError(f"point_mode must be 'volume' or 'slicewise', got {point_mode!r}")
        for one in (teacher if isinstance(teacher, (list, tuple)) else (teacher,)):
            emb = one.encode(img_j)
            preds.append(t.inverse(np.asarray(one.decode(emb, mask=m_j), np.float32)))
            preds.append(t.inverse(np.asarray(one.decode(emb, points=pts), np.float32)))
    stack = np.stack(preds)
    var = stack.var(axis=0)
    conf = var < u_th
    pseudo = (stack.mean(axis=0) * conf).astype(np.float32)
    return (pseudo, conf, stack) if return_predictions else (pseudo, conf)


def slab_around_largest_slice(mask: np.ndarray, k: int | None) -> slice:
    """Z-range of a (Z, Y, X) mask that the teacher sees (METHODS.md §5.4, CPU cost control): every slice when `k`
    is None / 0 or at least Z, else the `k` slices centred on the slice with the most mask voxels, shifted to stay
    inside the volume."""
    z = mask.shape[0]
    if not k or k >= z:
        return slice(0, z)
    z0 = int(np.clip(int(mask.sum((1, 2)).argmax()) - k // 2, 0, z - k))
    return slice(z0, z0 + k)


def algorithm2_batch(volumes: Sequence[np.ndarray], coarse_masks: np.ndarray,
                     teacher: PromptableTeacher | Sequence[PromptableTeacher], rng: np.random.Generator,
                     slab: int | None = None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`algorithm2` on each sample of a batch, for one class, inside `slab_around_largest_slice(M_c, slab)`.

    volumes: m teacher inputs (Z, Y, X) (or (C, Z, Y, X)); coarse_masks: M_c (m, Z, Y, X) bool; `kwargs` go to
    `algorithm2` (n_aug, u_th, point_mode, ...); the samples draw from `rng` in order. Returns Pseudo (m, Z, Y, X)
    float32 and M_conf (m, Z, Y, X) bool, 0 / False outside each sample's slab (no pseudo-label there).
    """
    pseudo, conf = np.zeros(coarse_masks.shape, np.float32), np.zeros(coarse_masks.shape, bool)
    for b, volume in enumerate(volumes):
        zs = slab_around_largest_slice(coarse_masks[b], slab)
        pseudo[b][zs], conf[b][zs] = algorithm2(volume[..., zs, :, :], coarse_masks[b][zs], teacher, rng, **kwargs)
    return pseudo, conf


class MedSAMSliceTeacher:
    """`PromptableTeacher` over a 2D `MedSAMTeacher`, slice by slice along Z (2D data: Z = 1).

    encode: keeps the image; each slice is embedded lazily on first use (slices without prompts never run the
    encoder), images are rounded/clipped back to uint8 (rule U output + weak aug). decode(mask=...): MedSAM-native box
    prompts from the slice's mask (§2.3: per component, `box_min_area`, `max_boxes`), union of the box probabilities
    (`mask_prompt="box"`, default; MedSAM was trained on boxes only), or the mask as a dense prompt ("mask"), or both
    ("box+mask"). decode(points=...): the slice's points, positive, in one prompt. Slices without a prompt get 0.
    """

    def __init__(self, teacher: Any, mask_prompt: str = "box", box_min_area: int = 10, max_boxes: int = 5) -> None:
        if mask_prompt not in ("box", "mask", "box+mask"):
            raise ValueError(f"mask_prompt must be 'box', 'mask' or 'box+mask', got {mask_prompt!r}")
        self.teacher = teacher
        self.mask_prompt = mask_prompt
        self.box_min_area = box_min_area
        self.max_boxes = max_boxes

    def encode(self, image: np.ndarray) -> dict:
        img = image[None] if image.ndim == 3 else image
        u8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
        u8 = u8[0] if u8.shape[0] == 1 else np.moveaxis(u8[:3], 0, -1)  # (Z, Y, X) or (Z, Y, X, 3)
        return {"image": u8, "emb": {}}

    def _emb(self, e: dict, z: int):
        if z not in e["emb"]:
            e["emb"][z] = self.teacher.embed(e["image"][z])
        return e["emb"][z]

    def decode(self, embedding: dict, points: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        zyx = embedding["image"].shape[:3]
        out = np.zeros(zyx, np.float32)
        hw = zyx[1:]
        if mask is not None:
            for z in range(zyx[0]):
                if not mask[z].any():
                    continue
                boxes = boxes_from_mask(mask[z], min_area=self.box_min_area, max_boxes=self.max_boxes)
                if self.mask_prompt == "mask":
                    prob = self.teacher.segment(self._emb(embedding, z), None, hw, mask_prompt=mask[z][None])
                elif len(boxes) == 0:
                    continue
                else:
                    mp = np.repeat(mask[z][None], len(boxes), 0) if self.mask_prompt == "box+mask" else None
                    prob = self.teacher.segment(self._emb(embedding, z), boxes, hw, mask_prompt=mp)
                out[z] = prob.amax(0).cpu().numpy()
        elif points is not None:
            pts = np.asarray(points).reshape(-1, 3)
            for z in np.unique(pts[:, 0]):
                sel = pts[pts[:, 0] == z][:, 1:][:, ::-1].astype(np.float64)  # (row, col) -> (x, y)
                prob = self.teacher.segment(self._emb(embedding, int(z)), None, hw, points=sel[None],
                                            point_labels=np.ones((1, len(sel)), np.int64))
                out[int(z)] = prob[0].cpu().numpy()
        return out
