"""Synthetic lesion-segmentation datasets in nnU-Net v2 raw format, for tests, demos and benchmarks.

Three kinds, each a binary lesion task (labels `{"background": 0, "lesion": 1}`):

- ``"2d-rgb"``: dermoscopy/endoscopy-like uint8 photos `(3, Y, X)`: a coloured skin texture, illumination bias,
  vignetting, dark hair strands as distractors; lesions darker (default) and browner than the skin.
- ``"2d-mri"``: brain-MRI-like float32 slices with three modalities `(FLAIR, T1, T2)`: head outline, grey/white
  matter texture, ventricles, per-modality bias fields and Rician noise. The lesion is brighter in FLAIR and T2 and
  darker in T1 (default polarity; `polarity=-1` flips all three).
- ``"3d"``: a single-channel MRI-like float32 volume `(1, Z, Y, X)` with anisotropic spacing (default 1.5 x 1 x 1 mm
  in z, y, x); lesion geometry is drawn in millimetres, so lesions are round in physical space.

Lesions are round, lobulated or irregular (thresholded smooth noise), several per image, some tiny (1-2.5 voxel
radius), and a fraction of images has none. Foreground/background contrast is low compared with the texture, bias
and noise, so that a global threshold (Otsu) does not solve the task while a small U-Net can (lesions are coherent
regions at a scale between the fine texture and the slow bias field).

`make_synthetic_dataset` writes `DatasetXXX_<Name>/` with `imagesTr/labelsTr` (labeled), `imagesUnlabeled/` (the
plugin's unlabeled pool, METHODS.md §1.2), `imagesTs/labelsTs` and `dataset.json`. Every case comes from its own
child seed of `np.random.SeedSequence(seed)`, so the files do not depend on `num_processes`, and the same arguments
give byte-identical files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path

KINDS = ("2d-rgb", "2d-mri", "3d")
DEFAULT_SHAPES = {"2d-rgb": (128, 128), "2d-mri": (128, 128), "3d": (32, 64, 64)}
DEFAULT_NAMES = {"2d-rgb": "SynthRGB", "2d-mri": "SynthMRI", "3d": "Synth3D"}
DEFAULT_SPACINGS = {"2d-rgb": (1.0, 1.0), "2d-mri": (1.0, 1.0), "3d": (1.5, 1.0, 1.0)}
DEFAULT_POLARITY = {"2d-rgb": -1, "2d-mri": 1, "3d": 1}
CHANNEL_NAMES = {
    "2d-rgb": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},  # R, G, B: RGBTo01Normalization (rule U)
    "2d-mri": {"0": "FLAIR", "1": "T1", "2": "T2"},
    "3d": {"0": "MRI"},
}
FILE_ENDINGS = {"2d-rgb": ".png", "2d-mri": ".nii.gz", "3d": ".nii.gz"}

# MRI tissue intensities (white matter, grey matter, CSF) and lesion sign per modality; a lesion with polarity +1
# multiplies the tissue by (1 + sign * strength): hyperintense in FLAIR and T2, hypointense in T1.
_MRI_TISSUE = {"FLAIR": (0.55, 0.66, 0.12), "T1": (0.80, 0.60, 0.20), "T2": (0.45, 0.60, 0.95),
               "MRI": (0.55, 0.66, 0.12)}
_MRI_LESION_SIGN = {"FLAIR": 1.0, "T1": -0.7, "T2": 0.8, "MRI": 1.0}
# relative darkening of R, G, B inside a (dark) skin lesion: blue and green drop more, so lesions look brown
_RGB_LESION_TINT = np.array([1.0, 1.25, 1.45])

_CASE_PREFIX = "synth"


@dataclass(frozen=True)
class SynthParams:
    """Knobs of the lesion generator. Intensities are relative to the local tissue/skin intensity.

    contrast: mean relative intensity change inside a lesion (each lesion draws 0.6-1.4 x this).
    noise: std of the additive (2d-rgb) or Rician (MRI kinds) noise, relative to the tissue intensity.
    texture: std of the fine background texture (skin pores, grey/white matter pattern), relative.
    bias: amplitude of the smooth multiplicative bias field (illumination, coil sensitivity), relative.
    num_lesions: inclusive range of lesions in a non-empty image.
    size: lesion radius range, as a fraction of the smallest physical side of the image (log-uniform draw).
    tiny_fraction: probability that a lesion is tiny, radius drawn from `tiny_radius` in voxels.
    empty_fraction: probability that an image has no lesion at all.
    polarity: +1 lesions brighter than tissue, -1 darker; None = kind default (-1 for 2d-rgb, +1 for MRI kinds).
    edge_blur: std in voxels of the blur of lesion borders (partial volume); the label is the sharp mask.
    distractors: inclusive range of lesion-like distractors (hair strands in 2d-rgb, opposite-polarity spots in MRI).
    spacing: voxel spacing in mm, (Z,) Y, X; None = kind default (1, 1) or (1.5, 1, 1).
    """

    contrast: float = 0.25
    noise: float = 0.04
    texture: float = 0.06
    bias: float = 0.25
    num_lesions: tuple[int, int] = (1, 4)
    size: tuple[float, float] = (0.04, 0.16)
    tiny_fraction: float = 0.2
    tiny_radius: tuple[float, float] = (1.0, 2.5)
    empty_fraction: float = 0.1
    polarity: int | None = None
    edge_blur: float = 1.0
    distractors: tuple[int, int] = (0, 3)
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for f in ("contrast", "noise", "texture", "bias", "edge_blur"):
            if getattr(self, f) < 0:
                raise SemiSAMError(f"SynthParams.{f} must be >= 0, got {getattr(self, f)}")
        for f in ("tiny_fraction", "empty_fraction"):
            if not 0 <= getattr(self, f) <= 1:
                raise SemiSAMError(f"SynthParams.{f} must be in [0, 1], got {getattr(self, f)}")
        for f in ("num_lesions", "size", "tiny_radius", "distractors"):
            lo, hi = getattr(self, f)
            if lo < 0 or hi < lo:
                raise SemiSAMError(f"SynthParams.{f} must be a range (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")
        if self.num_lesions[1] < 1:
            raise SemiSAMError(f"SynthParams.num_lesions must allow at least one lesion, got {self.num_lesions}")
        if self.polarity not in (None, 1, -1):
            raise SemiSAMError(f"SynthParams.polarity must be +1, -1 or None, got {self.polarity}")
        if self.spacing is not None and any(s <= 0 for s in self.spacing):
            raise SemiSAMError(f"SynthParams.spacing must be positive, got {self.spacing}")


# ----------------------------------------------------------------------------------------------------------------
# random fields and geometry


def _coords(shape: Sequence[int], spacing: Sequence[float], center: Sequence[float]) -> list[np.ndarray]:
    """Broadcastable physical coordinates (mm) relative to `center` (voxel units), one array per axis."""
    out = []
    for ax, (n, s, c) in enumerate(zip(shape, spacing, center)):
        v = (np.arange(n, dtype=np.float64) - c) * s
        out.append(v.reshape([-1 if a == ax else 1 for a in range(len(shape))]))
    return out


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """Uniformly random rotation matrix (ndim, ndim) from the QR decomposition of a Gaussian matrix."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_mm: float,
                  spacing: Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise with physical correlation length `sigma_mm`, rescaled to zero mean, unit std."""
    white = rng.standard_normal(tuple(shape))
    sig = [max(sigma_mm / s, 1e-3) for s in spacing]
    f = ndimage.gaussian_filter(white, sig, mode="reflect")
    f -= f.mean()
    std = f.std()
    return f / std if std > 0 else f


def _bias_field(rng: np.random.Generator, shape: Sequence[int], n_waves: int = 4) -> np.ndarray:
    """Slow field in about [-1, 1]: a sum of random cosines with 0.3-1.2 periods across the image."""
    ndim = len(shape)
    grids = [(np.arange(n) / max(n - 1, 1)).reshape([-1 if a == ax else 1 for a in range(ndim)])
             for ax, n in enumerate(shape)]
    field = np.zeros(tuple(shape))
    for _ in range(n_waves):
        direction = rng.standard_normal(ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        freq = rng.uniform(0.3, 1.2)
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(direction[a] * grids[a] for a in range(ndim))
        field = field + np.cos(2 * np.pi * freq * arg + phase)
    return field / np.sqrt(n_waves / 2)


def _ellipsoid_distance(shape: Sequence[int], spacing: Sequence[float], center: Sequence[float],
                        radii_mm: Sequence[float], rot: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) of every voxel; rotation `rot` maps image to body axes."""
    c = _coords(shape, spacing, center)
    d2 = 0.0
    for i, r in enumerate(radii_mm):
        u = sum(rot[a, i] * c[a] for a in range(len(shape)))
        d2 = d2 + (u / r) ** 2
    return np.sqrt(d2)


def _draw_lesion(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                 center: Sequence[float], radius_mm: float, tiny: bool) -> np.ndarray:
    """Boolean mask of one lesion: round, lobulated (low-frequency boundary) or irregular (thresholded noise)."""
    ndim = len(shape)
    if tiny:
        mask = _ellipsoid_distance(shape, spacing, center, [radius_mm] * ndim, np.eye(ndim)) <= 1.0
    else:
        aspect = np.exp(rng.uniform(-0.35, 0.35, ndim))
        radii = radius_mm * aspect / np.prod(aspect) ** (1.0 / ndim)
        d = _ellipsoid_distance(shape, spacing, center, radii, _rotation(rng, ndim))
        morphology = rng.choice(["round", "lobulated", "irregular"], p=[0.3, 0.35, 0.35])
        if morphology == "round":
            field = d
        elif morphology == "lobulated":
            field = d + 0.35 * _smooth_noise(rng, shape, 0.45 * radius_mm, spacing)
        else:
            field = 0.7 * d + 0.45 * _smooth_noise(rng, shape, 0.2 * radius_mm, spacing) + 0.3
        mask = field < 1.0
        comp, n = ndimage.label(mask)
        if n > 1:  # one lesion body: keep the largest piece (specks of noise are not lesions)
            mask = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)
        mask = ndimage.binary_fill_holes(mask)
    idx = tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(center, shape))
    mask[idx] = True  # a lesion always contains its centre voxel
    return mask


def _sample_lesions(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                    allowed: np.ndarray, p: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Draw the lesions of one image: (label uint8 (*shape), strength float (*shape), 0 outside lesions).

    `strength` is the blurred per-lesion contrast (partial volume at the border); the label is the union of the
    sharp masks inside `allowed`.
    """
    label = np.zeros(tuple(shape), dtype=bool)
    strength = np.zeros(tuple(shape))
    if rng.random() < p.empty_fraction:
        return label.astype(np.uint8), strength
    n = int(rng.integers(p.num_lesions[0], p.num_lesions[1] + 1))
    n = max(n, 1)
    side_mm = min(a * s for a, s in zip(shape, spacing))
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        return label.astype(np.uint8), strength
    for _ in range(n):
        center = candidates[rng.integers(len(candidates))].astype(np.float64) + rng.uniform(-0.5, 0.5, len(shape))
        tiny = rng.random() < p.tiny_fraction
        if tiny:
            radius_mm = rng.uniform(*p.tiny_radius) * min(spacing)
        else:
            lo, hi = p.size
            radius_mm = float(np.exp(rng.uniform(np.log(max(lo, 1e-3)), np.log(max(hi, 1e-3))))) * side_mm
        m = _draw_lesion(rng, shape, spacing, center, radius_mm, tiny) & allowed
        if not m.any():
            continue
        c = p.contrast * rng.uniform(0.6, 1.4) * (1.4 if tiny else 1.0)
        blur = p.edge_blur * (0.5 if tiny else 1.0)
        soft = ndimage.gaussian_filter(m.astype(np.float64), [blur] * len(shape)) if blur > 0 else m * 1.0
        strength = np.maximum(strength, c * np.maximum(soft, 0.6 * m))
        label |= m
    return label.astype(np.uint8), strength


# ----------------------------------------------------------------------------------------------------------------
# renderers


def _render_rgb(rng: np.random.Generator, shape: Sequence[int], p: SynthParams,
                polarity: int) -> tuple[np.ndarray, np.ndarray]:
    """Dermoscopy-like uint8 image (3, Y, X) and its lesion label (Y, X)."""
    spacing = p.spacing or DEFAULT_SPACINGS["2d-rgb"]
    allowed = np.ones(tuple(shape), dtype=bool)
    label, strength = _sample_lesions(rng, shape, spacing, allowed, p)

    r = rng.uniform(175, 225)
    skin = np.array([r, r * rng.uniform(0.66, 0.80), r * rng.uniform(0.52, 0.70)])
    lum = 0.55 * _smooth_noise(rng, shape, 0.8, spacing) + 0.85 * _smooth_noise(rng, shape, 2.5, spacing)
    lum *= p.texture / np.hypot(0.55, 0.85)
    bias = 1.0 + p.bias * 0.5 * _bias_field(rng, shape)
    # vignetting: darker towards a randomly shifted optical centre's periphery
    vc = [n / 2 + rng.uniform(-0.15, 0.15) * n for n in shape]
    rr = sum(((np.arange(n) - c) / (n / 2)).reshape([-1 if a == ax else 1 for a in range(2)]) ** 2
             for ax, (n, c) in enumerate(zip(shape, vc)))
    vignette = np.clip(1.0 - rng.uniform(0.15, 0.4) * rr, 0.3, 1.0)
    heterogeneity = 1.0 + 0.35 * _smooth_noise(rng, shape, 1.5, spacing)  # pigment network inside lesions

    hair = np.zeros(tuple(shape))
    for _ in range(int(rng.integers(p.distractors[0], p.distractors[1] + 1))):
        hair = np.maximum(hair, _hair(rng, shape))

    img = np.empty((3, *shape))
    for ch in range(3):
        chan_tex = 0.3 * p.texture * _smooth_noise(rng, shape, 1.5, spacing)
        lesion = 1.0 + polarity * strength * _RGB_LESION_TINT[ch] * heterogeneity
        hair_f = 1.0 - hair * rng.uniform(0.25, 0.4) * (1.0 + 0.2 * ch)
        img[ch] = skin[ch] * (1.0 + lum + chan_tex) * bias * vignette * lesion * hair_f
    img += p.noise * skin.mean() * rng.standard_normal(img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label


def _hair(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Soft mask (Y, X) of one hair strand: a thin quadratic Bezier curve crossing the image."""
    h, w = shape
    pts = np.stack([rng.uniform(-0.1, 1.1, 3) * h, rng.uniform(-0.1, 1.1, 3) * w], axis=1)
    t = np.linspace(0, 1, 4 * (h + w))[:, None]
    curve = (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t ** 2 * pts[2]
    idx = np.round(curve).astype(int)
    keep = (idx[:, 0] >= 0) & (idx[:, 0] < h) & (idx[:, 1] >= 0) & (idx[:, 1] < w)
    line = np.ones((h, w), dtype=bool)
    line[idx[keep, 0], idx[keep, 1]] = False
    if line.all():
        return np.zeros((h, w))
    dist = ndimage.distance_transform_edt(line)
    width = rng.uniform(0.5, 1.0)
    return np.exp(-((dist / width) ** 2))


def _render_mri(rng: np.random.Generator, shape: Sequence[int], p: SynthParams, polarity: int,
                modalities: Sequence[str], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Brain-MRI-like float32 image (len(modalities), *shape) and lesion label (*shape); works in 2D and 3D."""
    ndim = len(shape)
    side_mm = min(a * s for a, s in zip(shape, spacing))
    center = [n / 2 - 0.5 + rng.uniform(-0.04, 0.04) * n for n in shape]
    head_radii = [n * s * rng.uniform(0.36, 0.44) for n, s in zip(shape, spacing)]
    head_d = _ellipsoid_distance(shape, spacing, center, head_radii, np.eye(ndim))
    head_d = head_d + 0.04 * _smooth_noise(rng, shape, 0.15 * side_mm, spacing)
    brain = head_d < 1.0
    brain_soft = np.clip((1.0 - head_d) / 0.03, 0.0, 1.0)  # 1-2 voxel partial volume at the brain border
    # grey/white matter pattern and two ventricles (CSF) near the centre
    gm = 1.0 / (1.0 + np.exp(-3.0 * _smooth_noise(rng, shape, 0.035 * side_mm, spacing)))
    csf = np.zeros(tuple(shape))
    for sign in (-1.0, 1.0):
        vc = list(center)
        vc[-1] = center[-1] + sign * rng.uniform(0.05, 0.09) * shape[-1]
        vr = [r * rng.uniform(0.10, 0.18) for r in head_radii]
        vr[-2] *= 1.8
        vd = _ellipsoid_distance(shape, spacing, vc, vr, np.eye(ndim))
        csf = np.maximum(csf, np.clip((1.0 - vd) / 0.25, 0.0, 1.0))
    tissue_ok = brain & (csf < 0.1) & (head_d < 0.92)
    label, strength = _sample_lesions(rng, shape, spacing, tissue_ok, p)

    # distractors: small spots of the opposite polarity (old infarcts, vessels) that are not lesions
    distract = np.zeros(tuple(shape))
    cand = np.argwhere(tissue_ok & (label == 0))
    for _ in range(int(rng.integers(p.distractors[0], p.distractors[1] + 1))):
        if len(cand) == 0:
            break
        c = cand[rng.integers(len(cand))]
        rad = rng.uniform(1.0, 2.5) * min(spacing)
        d = _ellipsoid_distance(shape, spacing, c, [rad] * ndim, np.eye(ndim))
        distract = np.maximum(distract, p.contrast * rng.uniform(0.8, 1.5) * np.clip(1.5 - d, 0, 1))
    distract *= label == 0

    heterogeneity = 1.0 + 0.3 * _smooth_noise(rng, shape, 1.5 * min(spacing), spacing)
    texture = p.texture * _smooth_noise(rng, shape, 0.8 * min(spacing), spacing)
    img = np.empty((len(modalities), *shape))
    for ch, mod in enumerate(modalities):
        wm, gmv, csfv = _MRI_TISSUE[mod]
        tis = (wm * (1 - gm) + gmv * gm) * (1.0 + texture)
        tis = tis * (1 - csf) + csfv * csf
        tis = tis * (1.0 + polarity * _MRI_LESION_SIGN[mod] * strength * heterogeneity)
        tis = tis * (1.0 - polarity * _MRI_LESION_SIGN[mod] * distract)
        tis = tis * brain_soft
        tis = tis * (1.0 + p.bias * 0.5 * _bias_field(rng, shape))
        sigma = p.noise * wm
        n_re, n_im = sigma * rng.standard_normal(tis.shape), sigma * rng.standard_normal(tis.shape)
        noisy = np.sqrt((tis + n_re) ** 2 + n_im ** 2)  # Rician magnitude noise
        img[ch] = noisy * rng.uniform(400.0, 1200.0)  # arbitrary scanner units per modality and case
    return img.astype(np.float32), label


def synth_case(rng: np.random.Generator, kind: str, shape: Sequence[int],
               params: SynthParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic case: image `(C, *shape)` and binary lesion mask `(*shape)` uint8.

    kind "2d-rgb": C=3 uint8 photo, shape (Y, X); "2d-mri": C=3 float32 (FLAIR, T1, T2), shape (Y, X);
    "3d": C=1 float32 volume, shape (Z, Y, X). Deterministic given the state of `rng`.
    """
    if kind not in KINDS:
        raise SemiSAMError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    shape = tuple(int(s) for s in shape)
    want = len(DEFAULT_SHAPES[kind])
    if len(shape) != want or min(shape) < 8:
        raise SemiSAMError(f"shape {shape} is invalid for kind {kind!r}: need {want} sizes, each >= 8")
    p = params or SynthParams()
    spacing = tuple(p.spacing) if p.spacing is not None else DEFAULT_SPACINGS[kind]
    if len(spacing) != want:
        raise SemiSAMError(f"SynthParams.spacing {spacing} has {len(spacing)} values; kind {kind!r} needs {want}")
    polarity = p.polarity if p.polarity is not None else DEFAULT_POLARITY[kind]
    if kind == "2d-rgb":
        return _render_rgb(rng, shape, dataclasses.replace(p, spacing=spacing), polarity)
    modalities = [CHANNEL_NAMES[kind][str(i)] for i in range(len(CHANNEL_NAMES[kind]))]
    return _render_mri(rng, shape, p, polarity, modalities, spacing)


# ----------------------------------------------------------------------------------------------------------------
# dataset writer


def _case_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Child seed of case `index`: independent of how many cases are generated and of the worker that runs it."""
    return np.random.SeedSequence(entropy=seed, spawn_key=(index,))


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _write_nifti(path: Path, arr: np.ndarray, spacing_zyx: Sequence[float]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


def _generate_and_write(job: tuple) -> int:
    """Worker: generate case `index`, write its image file(s) (and label if `label_dir`); return its lesion count."""
    index, seed, kind, shape, params, image_dir, label_dir = job
    rng = np.random.default_rng(_case_seed(seed, index))
    image, label = synth_case(rng, kind, shape, params)
    case = f"{_CASE_PREFIX}_{index:04d}"
    ending = FILE_ENDINGS[kind]
    if kind == "2d-rgb":
        _write_png(Path(image_dir) / f"{case}_0000{ending}", np.ascontiguousarray(image.transpose(1, 2, 0)))
        if label_dir is not None:
            _write_png(Path(label_dir) / f"{case}{ending}", label)
    else:
        spacing = params.spacing if params.spacing is not None else DEFAULT_SPACINGS[kind]
        for ch in range(image.shape[0]):
            _write_nifti(Path(image_dir) / f"{case}_{ch:04d}{ending}", image[ch], spacing)
        if label_dir is not None:
            _write_nifti(Path(label_dir) / f"{case}{ending}", label, spacing)
    return int(ndimage.label(label)[1])


_SUBFOLDERS = ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")


def make_synthetic_dataset(out_root: str | Path, dataset_id: int, kind: str = "2d-rgb", num_labeled: int = 4,
                           num_unlabeled: int = 16, num_test: int = 8, shape: Sequence[int] | None = None,
                           seed: int = 0, name: str | None = None, params: SynthParams | None = None,
                           num_processes: int = 1, progress: bool = True, overwrite: bool = False) -> Path:
    """Write a synthetic nnU-Net v2 raw dataset `out_root/DatasetXXX_<Name>/` and return its folder.

    Layout: `imagesTr/labelsTr` (num_labeled cases), `imagesUnlabeled/` (num_unlabeled, images only, same
    `CASE_0000.ext` naming; METHODS.md §1.2), `imagesTs/labelsTs` (num_test) and `dataset.json` (nnU-Net's
    `generate_dataset_json` plus `numUnlabeled`, `numTest` and a `synthetic` record of the arguments). Cases are
    `synth_0000, ...` in that order, unique across the three groups. 2d-rgb is stored as RGB PNG (nnU-Net's
    NaturalImage2DIO convention, labels 0/1), 2d-mri as one 2D NIfTI per modality, 3d as NIfTI with spacing
    `params.spacing` (default 1.5, 1, 1 in z, y, x). Files are written atomically, dataset.json last.
    Raises SemiSAMError before writing anything if the target folder is non-empty (unless `overwrite`, which first
    deletes the dataset's own sub-folders and dataset.json) or another `DatasetXXX_*` with the same id exists.
    """
    from tqdm import tqdm

    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if kind not in KINDS:
        raise SemiSAMError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 1 <= int(dataset_id) <= 999:
        raise SemiSAMError(f"dataset id must be in 1..999 (nnU-Net's DatasetXXX naming), got {dataset_id}")
    if num_labeled < 1 or num_unlabeled < 0 or num_test < 0:
        raise SemiSAMError(f"need num_labeled >= 1, num_unlabeled >= 0, num_test >= 0; got "
                           f"{num_labeled}, {num_unlabeled}, {num_test}")
    if num_labeled + num_unlabeled + num_test > 10000:
        raise SemiSAMError("at most 10000 synthetic cases (case names are synth_0000..synth_9999)")
    name = name or DEFAULT_NAMES[kind]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SemiSAMError(f"dataset name {name!r} must contain only letters, digits, '_' and '-'")
    shape = tuple(int(s) for s in (shape if shape is not None else DEFAULT_SHAPES[kind]))
    params = params or SynthParams()
    spacing = tuple(params.spacing) if params.spacing is not None else DEFAULT_SPACINGS[kind]
    params = dataclasses.replace(params, spacing=spacing)
    ndim = len(DEFAULT_SHAPES[kind])
    if len(shape) != ndim or min(shape) < 8:
        raise SemiSAMError(f"shape {shape} is invalid for kind {kind!r}: need {ndim} sizes, each >= 8")
    if len(spacing) != ndim:
        raise SemiSAMError(f"SynthParams.spacing {spacing} has {len(spacing)} values; kind {kind!r} needs {ndim}")

    out_root = Path(out_root)
    folder = out_root / f"Dataset{int(dataset_id):03d}_{name}"
    if out_root.is_dir():
        clash = sorted(p.name for p in out_root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != folder.name)
        if clash:
            raise SemiSAMError(f"{out_root / clash[0]} already uses dataset id {dataset_id}; pick another --dataset-id")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise SemiSAMError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        for sub in _SUBFOLDERS:
            shutil.rmtree(folder / sub, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(folder / "dataset.json")

    groups = (("imagesTr", "labelsTr", num_labeled), ("imagesUnlabeled", None, num_unlabeled),
              ("imagesTs", "labelsTs", num_test))
    jobs, index = [], 0
    for image_sub, label_sub, count in groups:
        (folder / image_sub).mkdir(parents=True, exist_ok=True)
        if label_sub is not None:
            (folder / label_sub).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            jobs.append((index, int(seed), kind, shape, params, str(folder / image_sub),
                         None if label_sub is None else str(folder / label_sub)))
            index += 1

    bar = dict(desc=f"make-synthetic {folder.name}", total=len(jobs), disable=not progress)
    if num_processes > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            list(tqdm(pool.imap(_generate_and_write, jobs), **bar))
    else:
        for job in tqdm(jobs, **bar):
            _generate_and_write(job)

    extra = dict(
        numUnlabeled=num_unlabeled,
        numTest=num_test,
        synthetic=dict(kind=kind, seed=int(seed), shape=list(shape), params=dataclasses.asdict(params)),
    )
    tmp_dir = tempfile.mkdtemp(prefix=".tmp_dataset_json_", dir=folder)
    try:
        generate_dataset_json(
            tmp_dir, dict(CHANNEL_NAMES[kind]), {"background": 0, "lesion": 1}, num_labeled, FILE_ENDINGS[kind],
            dataset_name=folder.name, license="synthetic data generated by nnunet-semisam (no restrictions)",
            description=f"synthetic {kind} lesion segmentation, seed {seed}",
            converted_by="nnunet-semisam make-synthetic", **extra,
        )
        os.replace(os.path.join(tmp_dir, "dataset.json"), folder / "dataset.json")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return folder
