"""MedSAM2 teacher: key-slice prompts propagated through a volume with SAM2's video predictor (METHODS.md §5.4).

Optional: needs the `sam2` package (`pip install nnunet-semisam[medsam2]`; install it with `SAM2_BUILD_CUDA=0` and
`--no-build-isolation` to skip its optional CUDA extension). Imports of `sam2` happen only inside functions, so this
module imports without it and fails late with one actionable line.

Pipeline per volume (rule-U uint8 slices (Z, Y, X[, 3])):
- every slice is bilinearly resized (align_corners=False) to S × S (S = `image_size`, 512 for MedSAM2), replicated
  to RGB, scaled to [0, 1] and normalized with SAM2's ImageNet mean/std; the affine A of each slice is
  `x' = x · S / W`, `y' = y · S / H` (SAM2's own prompt scaling), recorded in `SliceAffine`;
- prompts (box, points, or a mask) go on one key slice, mapped with A (masks: nearest-resized to S × S);
- the video predictor propagates forward and backward from the key slice through memory attention;
- the per-slice logits (S × S) are turned into probabilities (sigmoid) and mapped back with A⁻¹: bilinear
  interpolation of the probabilities to (H, W) (align_corners=False).
As a `PromptableTeacher` (Algorithm 2): `decode(mask=M)` prompts the slice with the largest M area with M there;
`decode(points=P)` prompts the slice of the first point with all points of that slice.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_semisam.errors import SemiSAMError

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"  # MedSAM2 = SAM2.1 Hiera-T at 512²
DEFAULT_IMAGE_SIZE = 512
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


def _require_sam2():
    try:
        import sam2  # noqa: F401
        from sam2.build_sam import build_sam2_video_predictor
    except ImportError as e:
        raise SemiSAMError("the MedSAM2 teacher needs the optional package sam2: "
                           "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'nnunet-semisam[medsam2]' "
                           f"({type(e).__name__}: {e})") from None
    return build_sam2_video_predictor


@dataclass(frozen=True)
class SliceAffine:
    """Affine A from original slice pixels (H, W) to the S × S model grid: x' = x·S/W, y' = y·S/H."""

    hw: tuple[int, int]
    size: int

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) (x, y) original -> model grid."""
        return np.asarray(xy, np.float64) * np.array([self.size / self.hw[1], self.size / self.hw[0]])

    def box(self, box: Sequence[float]) -> np.ndarray:
        return self.points(np.asarray(box, np.float64).reshape(2, 2)).reshape(4)

    def mask(self, m: np.ndarray) -> torch.Tensor:
        """(H, W) binary -> (S, S) bool, nearest."""
        t = torch.as_tensor(np.asarray(m) > 0, dtype=torch.float32)[None, None]
        return F.interpolate(t, size=(self.size, self.size), mode="nearest")[0, 0] > 0

    def inverse_prob(self, prob: torch.Tensor) -> torch.Tensor:
        """(..., S, S) probabilities -> (..., H, W): A⁻¹ by bilinear interpolation (align_corners=False)."""
        shp = prob.shape[:-2]
        p = F.interpolate(prob.reshape(-1, 1, self.size, self.size).float(), size=self.hw, mode="bilinear",
                          align_corners=False)
        return p.reshape(*shp, *self.hw)


class MedSAM2Teacher:
    """SAM2 video predictor wrapped for volumes. Build with `from_checkpoint` (MedSAM2 `.pt`: {"model": ...})."""

    def __init__(self, predictor: Any, device: str | torch.device = "cpu", image_size: int | None = None,
                 checkpoint_sha1: str | None = None, config_name: str = DEFAULT_CONFIG,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.predictor = predictor.eval()
        self.device = torch.device(device)
        self.image_size = int(image_size or predictor.image_size)
        self.checkpoint_sha1 = checkpoint_sha1
        self.config_name = config_name
        self.amp_dtype = amp_dtype

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None, config: str | None = None,
                        device: str | torch.device = "cpu", image_size: int = DEFAULT_IMAGE_SIZE,
                        hydra_overrides: Sequence[str] = (), amp_dtype: torch.dtype | None = None
                        ) -> "MedSAM2Teacher":
        """Build SAM2's video predictor from `config` (a sam2 config name, default SAM2.1 Hiera-T, or a path to a
        hydra yaml file such as MedSAM2's `sam2.1_hiera_t512.yaml`) at `image_size`
        and load `path` strictly. `path=None` keeps random weights (tests). Raises SemiSAMError for a missing file,
        a missing `sam2` package, or weights that do not fit the config."""
        from nnunet_semisam.io import file_digest

        build = _require_sam2()
        if path is not None and not os.path.isfile(path):
            raise SemiSAMError(f"MedSAM2 checkpoint not found: {path} (give a local file, e.g. MedSAM2_latest.pt; "
                               "nothing is downloaded)")
        config = str(config or DEFAULT_CONFIG)
        # fill_hole_area=0: the hole filling needs sam2's optional CUDA extension; off everywhere so that results do
        # not depend on whether it was built
        overrides = [f"++model.image_size={int(image_size)}", "++model.fill_hole_area=0", *hydra_overrides]
        try:
            if os.path.isfile(config):  # a yaml file of one's own (MedSAM2 ships sam2.1_hiera_t512.yaml)
                from pathlib import Path

                from hydra import initialize_config_dir, initialize_config_module
                from hydra.core.global_hydra import GlobalHydra

                GlobalHydra.instance().clear()  # sam2 initializes hydra on its own package at import
                try:
                    with initialize_config_dir(config_dir=str(Path(config).resolve().parent), version_base="1.2"):
                        predictor = build(Path(config).name, ckpt_path=None, device="cpu", mode="eval",
                                          hydra_overrides_extra=overrides)
                finally:
                    GlobalHydra.instance().clear()
                    initialize_config_module("sam2", version_base="1.2")
            else:
                predictor = build(config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
        except Exception as e:  # noqa: BLE001 - hydra raises many types for a bad config name
            raise SemiSAMError(f"cannot build SAM2 from config {config!r}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}") from None
        sha1 = None
        if path is not None:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise SemiSAMError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
            sd = obj.get("model", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict):
                raise SemiSAMError(f"checkpoint {path} is not a SAM2 state dict")
            try:
                predictor.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
                raise SemiSAMError(f"checkpoint {path} does not fit SAM2 config {config!r} (wrong architecture): "
                                   f"{' '.join(first)[:300]}") from None
            sha1 = file_digest(path, "sha1")
        return cls(predictor.to(device), device, image_size, sha1, config, amp_dtype)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------------------

    def frames(self, volume_u8: np.ndarray) -> tuple[torch.Tensor, SliceAffine]:
        """(Z, Y, X) or (Z, Y, X, 3) uint8 -> normalized frames (Z, 3, S, S) float32 and the slice affine."""
        v = np.asarray(volume_u8)
        if v.dtype != np.uint8:
            raise SemiSAMError(f"MedSAM2 expects uint8 slices (rule U), got {v.dtype}")
        t = torch.as_tensor(v, dtype=torch.float32)
        t = t[:, None].expand(-1, 3, -1, -1) if t.ndim == 3 else t[..., :3].permute(0, 3, 1, 2)
        s = self.image_size
        t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False) / 255.0
        mean = torch.tensor(IMG_MEAN)[:, None, None]
        std = torch.tensor(IMG_STD)[:, None, None]
        return ((t - mean) / std).to(self.device), SliceAffine((int(v.shape[1]), int(v.shape[2])), s)

    def init_state(self, volume_u8: np.ndarray) -> dict:
        """SAM2 inference state for an in-memory volume (what `init_state(video_path)` builds from files)."""
        from collections import OrderedDict

        images, affine = self.frames(volume_u8)
        s = self.image_size
        st: dict[str, Any] = {
            "images": images, "num_frames": len(images), "offload_video_to_cpu": False,
            "offload_state_to_cpu": False, "video_height": s, "video_width": s, "device": self.device,
            "storage_device": self.device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
            "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(),
            "obj_ids": [], "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
        }
        st["affine"] = affine
        return st

    @torch.no_grad()
    def propagate(self, volume_u8: np.ndarray | dict, key_slice: int, box: Sequence[float] | None = None,
                  points: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                  mask: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (Z, H, W) float32 from prompts on `key_slice`, propagated forward and backward.

        box: `[x0, y0, x1, y1]`, points: (n, 2) `(x, y)` with labels (1/0), both in original slice pixels;
        mask: (H, W) binary. Give a box and/or points, or a mask.
        """
        st = self.init_state(volume_u8) if not isinstance(volume_u8, dict) else volume_u8
        self.predictor.reset_state(st)
        aff: SliceAffine = st["affine"]
        z_n = st["num_frames"]
        if not 0 <= key_slice < z_n:
            raise SemiSAMError(f"key slice {key_slice} outside the volume (0..{z_n - 1})")
        with self._autocast():
            if mask is not None:
                self.predictor.add_new_mask(st, frame_idx=int(key_slice), obj_id=1, mask=aff.mask(mask))
            else:
                pts = None if points is None else aff.points(np.asarray(points).reshape(-1, 2)).astype(np.float32)
                labs = None if points is None else np.asarray(
                    point_labels if point_labels is not None else np.ones(len(pts)), np.int32)
                self.predictor.add_new_points_or_box(st, frame_idx=int(key_slice), obj_id=1, points=pts,
                                                     labels=labs, normalize_coords=False,
                                                     box=None if box is None else aff.box(box).astype(np.float32))
            logits = torch.zeros((z_n, self.image_size, self.image_size), device=self.device)
            for reverse in (False, True):
                for fi, _, m in self.predictor.propagate_in_video(st, start_frame_idx=int(key_slice),
                                                                  reverse=reverse):
                    logits[fi] = m[0, 0].float()
        return aff.inverse_prob(torch.sigmoid(logits)).cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------------------------------------------------
    # PromptableTeacher interface (Algorithm 2)

    def encode(self, image: np.ndarray) -> dict:
        """image (C, Z, Y, X) float (uint8 range) -> inference state (frames are embedded lazily by SAM2)."""
        img = image[None] if image.ndim == 3 else image
        u8 = np.clip(np.round(img), 0, 255).astype(np.uint8)
        u8 = u8[0] if u8.shape[0] == 1 else np.moveaxis(u8[:3], 0, -1)
        return self.init_state(u8)

    def decode(self, embedding: dict, points: np.ndarray | None = None, mask: np.ndarray | None = None
               ) -> np.ndarray:
        if mask is not None:
            m = np.asarray(mask) > 0
            if not m.any():
                return np.zeros(m.shape, np.float32)
            key = int(np.argmax(m.reshape(m.shape[0], -1).sum(1)))
            return self.propagate(embedding, key, mask=m[key])
        pts = np.asarray(points).reshape(-1, 3)
        key = int(pts[0, 0])
        sel = pts[pts[:, 0] == key][:, 1:][:, ::-1]  # (row, col) -> (x, y)
        return self.propagate(embedding, key, points=sel, point_labels=np.ones(len(sel)))


def key_slice_and_box(mask: np.ndarray) -> tuple[int, np.ndarray] | None:
    """Key slice (largest mask area) and its whole-mask box, or None for an empty mask."""
    from nnunet_semisam.teachers.prompts import box_from_mask

    m = np.asarray(mask) > 0
    if not m.any():
        return None
    key = int(np.argmax(m.reshape(m.shape[0], -1).sum(1)))
    return key, box_from_mask(m[key])


def medsam2_pseudolabel_case(teacher: MedSAM2Teacher, image_u8: np.ndarray, coarse_mask: np.ndarray | None,
                             params, case_id: str, boxes: dict[int, np.ndarray] | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-label of one case with MedSAM2 (same contract as `pseudolabels.pseudolabel_case`).

    aug == 0: box of the key slice (largest prompt area; a box file's first slice/box if given), propagated through
    the volume; conf = everywhere when there was a prompt. aug > 0: Algorithm 2 with MedSAM2 as the teacher
    (mask prompt on the key slice / RITM point), variance filter `var_threshold`.
    """
    from nnunet_semisam.teachers.algorithm2 import algorithm2
    from nnunet_semisam.teachers.pseudolabels import case_seed

    zyx = image_u8.shape[:3]
    empty = np.zeros(zyx, np.float32), np.zeros(zyx, bool)
    if params.aug <= 0:
        if boxes:
            key = min(boxes)
            box = np.asarray(boxes[key]).reshape(-1, 4)[0]
        else:
            kb = None if coarse_mask is None else key_slice_and_box(coarse_mask)
            if kb is None:
                return empty
            key, box = kb
        prob = teacher.propagate(image_u8, key, box=box)
        return prob, np.ones(zyx, bool)
    if coarse_mask is None or not np.asarray(coarse_mask).any():
        return empty
    img = image_u8.astype(np.float32)
    img = img[None] if img.ndim == 3 else np.moveaxis(img, -1, 0)
    rng = np.random.default_rng(case_seed(params.seed, case_id))
    return algorithm2(img, coarse_mask, teacher, rng, n_aug=params.aug, u_th=params.var_threshold,
                      point_mode="volume")
