"""Growing a prompt box that cuts through its object (METHODS.md §4.5, box refinement of the closed loop).

SAM-family teachers segment inside the box they are given: a box from an immature student that covers only part of
a lesion yields a pseudo-label of that part, however clearly the lesion continues outside it. A box side that cuts
through the object shows in the teacher's own answer: its mask runs along that side for much of its length, whereas
around a box that encloses the object (even a tight one) the mask only touches the sides at a few extreme points.

`grow_cut_sides` moves every side whose edge is covered by the mask for at least `edge_fraction` of its length
outwards by `grow` times the box's extent on that axis (at least 1 pixel, clipped to the image) and asks the teacher
again, at most `rounds` times, stopping once no side moves. The teacher's embedding is cached, so each round costs
only the mask decoder.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from nnunet_semisam.teachers.prompts import grow_boxes

SegmentFn = Callable[[np.ndarray], np.ndarray]  # boxes (n, 4) xyxy -> probabilities (n, H, W)


def cut_sides(mask: np.ndarray, box: np.ndarray, edge_fraction: float) -> tuple[bool, bool, bool, bool]:
    """(left, top, right, bottom): whether `mask` (H, W) covers at least `edge_fraction` of that side of `box`
    `[x0, y0, x1, y1]` (inclusive pixel coordinates)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = np.asarray(mask, bool)[y0:y1 + 1, x0:x1 + 1]
    if inside.size == 0:
        return False, False, False, False
    return (inside[:, 0].mean() >= edge_fraction, inside[0, :].mean() >= edge_fraction,
            inside[:, -1].mean() >= edge_fraction, inside[-1, :].mean() >= edge_fraction)


def grow_cut_sides(segment: SegmentFn, boxes: np.ndarray, shape_hw: tuple[int, int], rounds: int = 3,
                   grow: float = 0.5, edge_fraction: float = 0.5, threshold: float = 0.5
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes after growing their cut sides (module docstring) and the teacher's probabilities for them.

    segment: the teacher on one image, boxes (n, 4) -> probabilities (n, H, W). rounds = 0 returns the teacher's
    answer to `boxes` unchanged. Returns (boxes int64 (n, 4), probabilities (n, H, W)).
    """
    h, w = int(shape_hw[0]), int(shape_hw[1])
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4).copy()
    prob = np.asarray(segment(boxes))
    for _ in range(max(0, int(rounds))):
        shift = np.zeros_like(boxes)  # per side: the growth of the sides that cut the mask, 0 elsewhere
        for i, box in enumerate(boxes):
            cut = cut_sides(prob[i] > threshold, box, edge_fraction)
            dx = max(1, int(round(grow * (box[2] - box[0] + 1))))
            dy = max(1, int(round(grow * (box[3] - box[1] + 1))))
            shift[i] = np.array([dx, dy, dx, dy]) * np.array(cut)
        new = grow_boxes(boxes, (h, w), shift)
        if np.array_equal(new, boxes):
            break
        boxes = new
        prob = np.asarray(segment(boxes))
    return boxes, prob
