"""`SlicingSAM3DPlanner`: nnU-Net plans for the Semi-SAM+ student (METHODS.md §5.1-5.2), identifier
nnUNetPlans_SlicingSAM3D.

Run with `nnunet-semisam plan -d ID -pl SlicingSAM3DPlanner`, then `nnUNetv2_preprocess -d ID -plans_name
nnUNetPlans_SlicingSAM3D -c 3d_fullres` and `nnUNetv2_train ID 3d_fullres 0 -tr SemiSAMPlusTrainer -p
nnUNetPlans_SlicingSAM3D`. Everything but the 3D patch and batch is nnU-Net's default plan (spacing, normalisation,
resampling; 2D configurations untouched). For 3D configurations it writes `sam_slice_size` (S, default 256) and
chooses patch and batch from `slicing_sam3d_memory`, the activation memory of the student:

- the frozen encoder runs under no_grad in chunks of `encoder_chunk` slices: its peak is one chunk's activations,
  `chunk * a_enc * S^2` floats (a_enc = 40 floats per input pixel for TinyViT, measured order of magnitude), and the
  stored embedding `B Z D (S/4)^2`;
- the decoder keeps its activations for backward: per voxel of each grid, ~4 tensors (conv, norm, activation, input)
  of its channel count: `B Z [4 * 3 * 128 g^2 + sum_i 4 * 2 * c_i (g 2^i)^2]`, plus the logits at the patch;
  all in fp32 (4 bytes).

In-plane the patch keeps nnU-Net's initial choice (median shape) capped at 2 S (the decoder's output grid is S/2, so
larger slices are only resampled); Z shrinks (by 8) while the estimate at batch 2 exceeds the memory target
(`gpu_memory_target_in_gb`, default 8); the batch is target / estimate at batch 1, at least 2, capped at 5 % of the
dataset's voxels like nnU-Net. For the manual's 128^3 patch, batch 2, S = 256 the estimate is ~16 GB (fp32; the
TinyViT grid S/4 is 4x finer than the ViT-B grid S/16 of [SSP], whose < 7 GB figure is fp16), so with an 8 GB target
this planner shortens Z. The model is an estimate, not a measurement.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


def slicing_sam3d_memory(patch: Sequence[int], batch: int, slice_size: int = 256, num_classes: int = 2,
                         width: int = 128, stride: int = 4, emb_channels: int = 256, encoder_chunk: int = 64,
                         encoder_floats_per_pixel: float = 40.0) -> float:
    """Estimated training memory in bytes of SlicingSAM3D for a (Z, Y, X) patch and batch (module docstring)."""
    z = int(patch[0])
    g = slice_size // stride
    n_up = max(1, int(round(np.log2(max(slice_size / 2 / g, 1)))))
    enc_peak = min(encoder_chunk, batch * z) * encoder_floats_per_pixel * slice_size ** 2
    emb = batch * z * emb_channels * g * g
    dec = 4 * 3 * width * g * g
    c, side = width, g
    for _ in range(n_up):
        c, side = c // 2, side * 2
        dec += 4 * 2 * (c + 1) * side * side
    logits = 3 * num_classes * float(np.prod(patch))
    return 4.0 * (enc_peak + emb + batch * (z * dec + logits))


def size_patch_and_batch(initial_patch: Sequence[int], slice_size: int, target_bytes: float, num_classes: int,
                         n_voxels_dataset: float, max_dataset_covered: float = 0.05,
                         min_batch: int = 2) -> Tuple[List[int], int]:
    """(patch (Z, Y, X), batch) for SlicingSAM3D under `target_bytes` (module docstring)."""
    patch = [int(initial_patch[0])] + [int(min(p, 2 * slice_size)) for p in initial_patch[1:]]
    while patch[0] > 8 and slicing_sam3d_memory(patch, min_batch, slice_size, num_classes) > target_bytes:
        patch[0] = max(8, patch[0] - 8)
    batch = int(target_bytes // slicing_sam3d_memory(patch, 1, slice_size, num_classes))
    cap = int(round(n_voxels_dataset * max_dataset_covered / float(np.prod(patch))))
    return patch, max(min(batch, cap), min_batch)


class SlicingSAM3DPlanner(ExperimentPlanner):
    """nnU-Net's default planner; 3D configurations get the SlicingSAM3D patch / batch and `sam_slice_size`."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans_SlicingSAM3D",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.sam_slice_size = 256

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if len(spacing) != 3:
            return plan
        tmp = 1 / np.array(spacing, dtype=np.float64)
        initial = [round(i) for i in tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)]
        initial = [max(1, int(min(i, j))) for i, j in zip(initial, median_shape)]
        patch, batch = size_patch_and_batch(initial, self.sam_slice_size, self.UNet_vram_target_GB * 1024 ** 3,
                                            len(self.dataset_json["labels"]), approximate_n_voxels_dataset)
        plan.update(patch_size=tuple(patch), batch_size=batch, sam_slice_size=self.sam_slice_size)
        return plan
