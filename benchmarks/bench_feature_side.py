"""LiteMedSAM's FPKDM feature side on CPU: cost and fidelity of the training-time taps at several input sides.

For each side S (the native 256 and the CPU candidates, default 64 / 56 / 48) on `--images` synthetic 64x64 RGB lesion
images (the KD benchmark's generator, seed 0): the teacher work of one KD step on a batch of `--batch` images
(T_1 = patch embedding + stage 0, then the clean and the perturbed re-injection through the stages of T_2..T_L,
METHODS.md §4.1), in CPU time of this thread with 1 torch thread, median of `--repeats`; and how close the taps are to
the native 256 path once pooled onto the student grids of a `--patch` Tiny-MUNet (F_l at patch / 4, / 8, / 16):
cosine similarity over channels, averaged over positions and images, per level. Sides that are multiples of
`LiteMedSAMTeacher.window_multiple` (56) give every attention stage whole windows; others pad the stage grids.

    python benchmarks/bench_feature_side.py [--sides 64 56 48] [--images 16] [--batch 4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_semisam.data.synthetic import SynthParams, synth_case
from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=(64, 56, 48))
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--levels", type=int, default=3, help="student levels L (taps T_1..T_L)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = LiteMedSAMTeacher.from_package("cpu")
    rng = np.random.default_rng(0)
    params = SynthParams(contrast=0.25, texture=0.06, distractors=(1, 4), tiny_fraction=0.2, empty_fraction=0.1)
    x = torch.stack([torch.from_numpy(synth_case(rng, "2d-rgb", (a.patch, a.patch), params)[0].astype(np.float32))
                     for _ in range(a.images)])
    grids = [(a.patch // 4 // 2 ** i,) * 2 for i in range(a.levels)]

    def pooled_taps(side: int) -> list[torch.Tensor]:
        t1 = teacher.first_tap(teacher.feature_input(x, (0, 1, 2), side))
        taps = [t1] + teacher.later_taps(t1, a.levels - 1)
        return [F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), g) for t, g in zip(taps, grids)]

    def step_cost(side: int) -> float:
        xb = teacher.feature_input(x[:a.batch], (0, 1, 2), side)

        def once():
            t1 = teacher.first_tap(xb)
            teacher.later_taps(t1, a.levels - 1)
            teacher.later_taps(t1 + 0.1 * t1.std() * torch.randn_like(t1), a.levels - 1)
        once()
        times = []
        for _ in range(a.repeats):
            t0 = time.thread_time()
            once()
            times.append(time.thread_time() - t0)
        return 1000 * statistics.median(times)

    print(f"LiteMedSAM FPKDM teacher work per KD step ({a.batch} images; T_1, clean and perturbed re-injection to "
          f"T_{a.levels}), CPU time, 1 thread, median of {a.repeats}; fidelity: cosine similarity to the native 256 "
          f"path after pooling onto the student grids {grids} ({a.images} images); window multiple "
          f"{teacher.window_multiple}")
    native = pooled_taps(int(teacher.native_size))
    for side in (int(teacher.native_size), *a.sides):
        taps = native if side == teacher.native_size else pooled_taps(side)
        cos = [F.cosine_similarity(t, n, dim=1).mean().item() for t, n in zip(taps, native)]
        windows = "whole windows" if side % teacher.window_multiple == 0 else "padded windows"
        print(f"  side {side:4d} ({windows:14s}): {step_cost(side):8.1f} ms per step | cosine to native per level "
              + " ".join(f"{c:.3f}" for c in cos))


if __name__ == "__main__":
    main()
