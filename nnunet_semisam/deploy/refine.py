"""`nnunet-semisam refine`: correct one slice of a prediction with a box or a click (METHODS.md §5.8).

A user looks at slice z of a predicted label map (any nnU-Net prediction) and gives a box `[x0, y0, x1, y1]` or a
click `(x, y)` on it; a SAM-family teacher re-segments the object there and label k is replaced on that slice only
(or on the slices z - N .. z + N with `propagate=N`). Coordinates are 0-based voxel indices of the image's own grid:
x = first index (column), y = second index (row), z = third index (slice), i.e. SimpleITK's (i, j, k) and nibabel's
array indices `[x, y, z]`; box ends are inclusive.

1. Teacher image (rule U, METHODS.md §2.4, on the raw image): `intensity="auto"` min-max scales the p0.5 / p99.5
   percentiles of the voxels above the volume's minimum (the rule for MR and other non-CT data, statistics over the
   whole volume); `intensity="ct"` clips HU to a window (level 40, width 400 by default) and min-max scales it. A
   uint8 RGB image (2D natural images) is used as it is.
2. Prompt. LiteMedSAM answers box prompts (points alone give empty maps, METHODS.md §2.8), so a click becomes a box:
   on a voxel of label k, the bounding box of its 8-connected component of label k on that slice, widened by
   `CLICK_MARGIN` pixels (a correction of a too-small mask should be drawn as a box); on any other voxel (an object
   the prediction missed), a square of `CLICK_BOX` pixels centred on the click. Boxes are clipped to the slice.
3. Teacher. Default LiteMedSAM with its official inference (METHODS.md §2.8); with N > 0 its official slice-to-slice
   propagation (`LiteMedSAMTeacher.segment_volume` over z - N .. z + N: slice z from the box, each further slice from
   the box of its neighbour's mask, the key box again where that mask is empty). MedSAM ViT-B (single slice) or
   MedSAM2 (key-slice box propagated by its memory attention through z - N .. z + N only) from local checkpoints.
   Mask = probability > 0.5.
4. Replacement on each edited slice s with new mask M_s (`replace_label`): the 8-connected components of label k
   that touch the box or M_s are cleared, then M_s is set to k where the voxel is background or was just cleared.
   Other labels are never overwritten; label-k objects elsewhere on the slice and every other slice stay as they are
   (bit for bit).
5. The label map is written atomically with the prediction's geometry and pixel type (to `output`, default: over
   the prediction file itself, so successive corrections accumulate).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.uint8_adapter import CT_WINDOW, to_uint8

CLICK_BOX = 32  # side (pixels) of the box centred on a click outside label k
CLICK_MARGIN = 5  # pixels added on each side of the clicked component's bounding box
TEACHERS = ("litemedsam", "medsam", "medsam2")
_STRUCT_8 = np.ones((3, 3), dtype=bool)


@dataclass
class RefineResult:
    """What `refine_prediction` did: the file written, the box used, and per edited slice the number of voxels of
    the label before and after."""

    output: Path
    box: tuple[int, int, int, int]
    slices: dict[int, tuple[int, int]] = field(default_factory=dict)
    changed_voxels: int = 0


# ------------------------------------------------------------------------------------------------------ prompts

def box_from_click(label_slice: np.ndarray, click: Sequence[int], click_box: int = CLICK_BOX,
                   margin: int = CLICK_MARGIN) -> np.ndarray:
    """Box `[x0, y0, x1, y1]` (int64, inclusive, clipped to the slice) for a click `(x, y)` on a boolean (H, W) slice
    of label k, x = column (module docstring, step 2)."""
    from scipy import ndimage

    m = np.asarray(label_slice, dtype=bool)
    x, y = int(click[0]), int(click[1])
    if m[y, x]:
        comp, _ = ndimage.label(m, structure=_STRUCT_8)
        ys, xs = np.nonzero(comp == comp[y, x])
        box = np.array([xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin])
    else:
        half = click_box // 2
        box = np.array([x - half, y - half, x - half + click_box - 1, y - half + click_box - 1])
    return np.clip(box, 0, [m.shape[1] - 1, m.shape[0] - 1] * 2).astype(np.int64)


def replace_label(seg_slice: np.ndarray, new_mask: np.ndarray, label: int, box: Sequence[int]) -> np.ndarray:
    """The slice with label `label`'s object at `box` replaced by `new_mask` (module docstring, step 4).

    seg_slice: (H, W) integer labels; new_mask: (H, W) bool; box `[x0, y0, x1, y1]` inclusive, x = column
    (METHODS.md §1.1). Returns a new array of seg_slice's dtype.
    """
    from scipy import ndimage

    seg = np.asarray(seg_slice)
    new = np.asarray(new_mask, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    region = new.copy()
    region[y0:y1 + 1, x0:x1 + 1] = True
    comp, _ = ndimage.label(seg == label, structure=_STRUCT_8)
    touched = np.setdiff1d(np.unique(comp[region]), [0])
    cleared = np.isin(comp, touched)
    out = seg.copy()
    out[cleared] = 0
    out[new & ((seg == 0) | cleared)] = label
    return out


# ------------------------------------------------------------------------------------------------------ teacher

def teacher_volume(image: np.ndarray, intensity: str = "auto",
                   ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """uint8 teacher volume (Z, Y, X) (or (Z, Y, X, 3) for uint8 RGB) from a raw image (Z, Y, X[, C]) (step 1)."""
    img = np.asarray(image)
    if img.ndim == 4:
        if img.shape[-1] == 3 and img.dtype == np.uint8:
            return img
        raise SemiSAMError(f"image with {img.shape[-1]} components per voxel: give one channel (or an RGB uint8 "
                           "image)")
    if intensity == "ct":
        return to_uint8(img[None].astype(np.float64), ["CTNormalization"],
                        intensity_properties={"0": {"mean": 0.0, "std": 1.0}}, ct_window=ct_window)
    if intensity != "auto":
        raise SemiSAMError(f"unknown intensity rule {intensity!r}; use auto or ct")
    return to_uint8(img[None].astype(np.float64), ["NoNormalization"])


def load_refine_teacher(name: str = "litemedsam", checkpoint: str | None = None, device: str | None = None,
                        medsam2_config: str | None = None, medsam2_image_size: int = 512) -> Any:
    """The teacher `refine` uses: `litemedsam` (bundled weights, or a fine-tune given as `checkpoint`), `medsam`
    (a local medsam_vit_b.pth) or `medsam2` (a local MedSAM2 .pt with its config). Nothing is downloaded."""
    import torch

    if name not in TEACHERS:
        raise SemiSAMError(f"unknown teacher {name!r}; use one of {', '.join(TEACHERS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SemiSAMError("-device cuda but no CUDA device is available; use -device cpu")
    if name != "litemedsam" and not checkpoint:
        raise SemiSAMError(f"--teacher {name} needs --checkpoint (a local "
                           f"{'medsam_vit_b.pth' if name == 'medsam' else 'MedSAM2 .pt'}; nothing is downloaded)")
    if name == "medsam2":
        from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher

        return MedSAM2Teacher.from_checkpoint(checkpoint, config=medsam2_config, device=dev,
                                              image_size=medsam2_image_size)
    from nnunet_semisam.teachers.factory import load_teacher

    return load_teacher(checkpoint, device=dev)  # the checkpoint's kind (LiteMedSAM or SAM ViT) is detected


def segment_slices(teacher: Any, volume_u8: np.ndarray, z: int, box: Sequence[int], propagate: int = 0
                   ) -> dict[int, np.ndarray]:
    """Slice index -> teacher mask (Y, X) bool for the slices z - N .. z + N (clipped), from `box` on slice z
    (module docstring, step 3). volume_u8: (Z, Y, X[, 3]); box `[x0, y0, x1, y1]` in (x, y) = (column, row) pixels
    of the (Y, X) slice arrays."""
    Z = volume_u8.shape[0]
    lo, hi = max(0, z - propagate), min(Z - 1, z + propagate)
    box = np.asarray(box, dtype=np.float64)
    if hasattr(teacher, "segment_volume"):  # LiteMedSAM: the official propagation (one slice when N = 0)
        prob = teacher.segment_volume(volume_u8, [box[0], box[1], z - propagate, box[2], box[3], z + propagate])
        prob = prob.cpu().numpy()
    elif hasattr(teacher, "propagate"):  # MedSAM2 on the slices z - N .. z + N only
        prob = np.zeros(volume_u8.shape[:3], np.float32)
        prob[lo:hi + 1] = teacher.propagate(volume_u8[lo:hi + 1], z - lo, box=box)
    elif propagate == 0 and hasattr(teacher, "predict"):
        prob = np.zeros(volume_u8.shape[:3], np.float32)
        prob[z] = teacher.predict(volume_u8[z], boxes_xyxy=box[None])[0].cpu().numpy()
    else:
        raise SemiSAMError(f"--propagate needs LiteMedSAM or MedSAM2; {type(teacher).__name__} segments single "
                           "slices")
    return {s: prob[s] > 0.5 for s in range(lo, hi + 1)}


# ------------------------------------------------------------------------------------------------------- refine

def _read(path: Path) -> tuple[Any, np.ndarray]:
    """(SimpleITK image, array (Z, Y, X[, C])) with a 2D image as one slice."""
    import SimpleITK as sitk

    if not path.is_file():
        raise SemiSAMError(f"file not found: {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise SemiSAMError(f"cannot read {path}: {str(e).strip().splitlines()[-1][:160]}") from None
    arr = sitk.GetArrayFromImage(img)
    return img, (arr[None] if img.GetDimension() == 2 else arr)


def _check_inside(what: str, values: Sequence[int], limits: Sequence[int]) -> None:
    for v, n in zip(values, limits):
        if not 0 <= int(v) < n:
            raise SemiSAMError(f"{what} {tuple(int(x) for x in values)} lies outside the image (x < {limits[0]}, "
                               f"y < {limits[1]})")


def refine_prediction(prediction: str | os.PathLike, image: str | os.PathLike, slice_index: int,
                      box: Sequence[int] | None = None, click: Sequence[int] | None = None, label: int = 1,
                      propagate: int = 0, output: str | os.PathLike | None = None, teacher: Any = None,
                      intensity: str = "auto", ct_window: tuple[float, float] = CT_WINDOW,
                      click_box: int = CLICK_BOX, teacher_factory: Callable[[], Any] | None = None
                      ) -> RefineResult:
    """Re-segment label `label` on slice `slice_index` of `prediction` (module docstring) and write the result.

    prediction / image: label map and the image it was predicted from (same voxel grid; SimpleITK-readable, 3D or
    2D). Exactly one of `box` ([x0, y0, x1, y1], inclusive) or `click` ((x, y)). teacher: a loaded teacher; else
    `teacher_factory()` loads one (default `load_refine_teacher()`, LiteMedSAM) once the inputs are checked. The
    output is written atomically (default: over `prediction`).
    """
    import SimpleITK as sitk

    from nnunet_semisam.data.converters.common import write_sitk
    from nnunet_semisam.deploy.export import check_same_grid

    pred_path, image_path = Path(prediction), Path(image)
    pred_img, seg = _read(pred_path)
    img, arr = _read(image_path)
    if pred_img.GetNumberOfComponentsPerPixel() != 1 or seg.dtype.kind not in "iu":
        raise SemiSAMError(f"{pred_path} is not an integer label map ({pred_img.GetPixelIDTypeAsString()})")
    check_same_grid(pred_img, img, f"prediction {pred_path}", str(image_path))
    Z, Y, X = seg.shape
    if not 0 <= int(slice_index) < Z:
        raise SemiSAMError(f"--slice {slice_index} outside the volume's {Z} slices (0..{Z - 1})")
    if not 0 < int(label) <= np.iinfo(seg.dtype).max:
        raise SemiSAMError(f"--label {label} must be a foreground label (1..{np.iinfo(seg.dtype).max})")
    if propagate < 0:
        raise SemiSAMError(f"--propagate {propagate} must be >= 0")
    if (box is None) == (click is None):
        raise SemiSAMError("give exactly one prompt: a box (x0 y0 x1 y1) or a click (x y)")
    z, label = int(slice_index), int(label)
    if click is not None:
        _check_inside("click", click, (X, Y))
        box_xy = box_from_click(seg[z] == label, click, click_box)
    else:
        b = np.asarray(box, dtype=np.int64).reshape(-1)
        if b.size != 4 or b[0] > b[2] or b[1] > b[3]:
            raise SemiSAMError(f"box must be x0 y0 x1 y1 with x0 <= x1 and y0 <= y1, got {list(np.asarray(box))}")
        _check_inside("box corner", b[:2], (X, Y))
        _check_inside("box corner", b[2:], (X, Y))
        box_xy = b
    volume_u8 = teacher_volume(arr, intensity, ct_window)
    if teacher is None:
        teacher = (teacher_factory or load_refine_teacher)()
    masks = segment_slices(teacher, volume_u8, z, box_xy, propagate)
    new = seg.copy()
    result = RefineResult(Path(output) if output is not None else pred_path, tuple(int(v) for v in box_xy))
    for s, m in sorted(masks.items()):
        new[s] = replace_label(seg[s], m, label, box_xy)
        result.slices[s] = (int((seg[s] == label).sum()), int((new[s] == label).sum()))
    result.changed_voxels = int((new != seg).sum())
    out_img = sitk.GetImageFromArray(new[0] if pred_img.GetDimension() == 2 else new)
    out_img.CopyInformation(pred_img)
    write_sitk(out_img, result.output)
    return result
