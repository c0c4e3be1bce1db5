"""LiteMedSAM as a 3D promptable teacher for Algorithm 2, slice by slice (METHODS.md §5.4, §2.8).

`LiteMedSAMSliceTeacher` has the §5.4 interface (`encode(volume)`, `decode(E, points=..., mask=...)`, numpy, spatial
(Z, Y, X)). LiteMedSAM was distilled on **box prompts only**, so every prompt is turned into boxes (this package's
choice, documented in docs/METHODS.md §5.4):
- mask prompt: per Z-slice, the boxes of the mask's connected components (`boxes_from_mask`, §2.3), union of the
  box probabilities (the `MedSAMSliceTeacher` "box" mode);
- point prompt (z, y, x): a square box centred on the point with half side `point_box_half` pixels (default: 1/8 of
  the slice's longest side, at least 2 px), clipped to the slice.
The volume is turned into uint8 slices by the caller (rule U, METHODS.md §2.4); each slice is embedded lazily (slices
without a prompt never run the encoder) at LiteMedSAM's reference 256 x 256 input (the exact path of §2.8).
"""
from __future__ import annotations

import numpy as np

from nnunet_semisam.teachers.algorithm2 import MedSAMSliceTeacher


class LiteMedSAMSliceTeacher(MedSAMSliceTeacher):
    """`PromptableTeacher` over a `LiteMedSAMTeacher` with box prompts derived from mask and point prompts."""

    def __init__(self, teacher, point_box_half: int | None = None, box_min_area: int = 4, max_boxes: int = 5):
        super().__init__(teacher, mask_prompt="box", box_min_area=box_min_area, max_boxes=max_boxes)
        self.point_box_half = point_box_half

    def point_boxes(self, points_yx: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """(k, 2) (row, col) points -> (k, 4) boxes [x0, y0, x1, y1] in pixels, clipped to the slice."""
        half = self.point_box_half if self.point_box_half is not None else max(2, max(hw) // 8)
        y, x = points_yx[:, 0].astype(np.float64), points_yx[:, 1].astype(np.float64)
        return np.stack([np.clip(x - half, 0, hw[1] - 1), np.clip(y - half, 0, hw[0] - 1),
                         np.clip(x + half, 0, hw[1] - 1), np.clip(y + half, 0, hw[0] - 1)], 1)

    def decode(self, embedding: dict, points: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        if mask is not None or points is None:
            return super().decode(embedding, points=None, mask=mask)
        zyx = embedding["image"].shape[:3]
        out = np.zeros(zyx, np.float32)
        pts = np.asarray(points).reshape(-1, 3)
        for z in np.unique(pts[:, 0]):
            boxes = self.point_boxes(pts[pts[:, 0] == z][:, 1:], zyx[1:])
            prob = self.teacher.segment(self._emb(embedding, int(z)), boxes, zyx[1:])
            out[int(z)] = prob.amax(0).cpu().numpy()
        return out
