"""`TinyMUNetPlanner`: nnU-Net plans whose network is Tiny-MUNet (METHODS.md §3.3), identifier nnUNetPlans_TinyMUNet.

nnU-Net looks planners up only inside `nnunetv2`; run this one with `nnunet-semisam plan -d ID -pl TinyMUNetPlanner`.
The plans then work with stock nnU-Net: `nnUNetv2_preprocess -d ID -plans_name nnUNetPlans_TinyMUNet`,
`nnUNetv2_train ID 2d 0 -p nnUNetPlans_TinyMUNet` (plain nnUNetTrainer, deep supervision included) and
`nnUNetv2_predict ... -p nnUNetPlans_TinyMUNet`.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_semisam.networks.tiny_munet import TinyMUNet


class TinyMUNetPlanner(ExperimentPlanner):
    """nnU-Net's default planner with Tiny-MUNet as the network; patch and batch size from Tiny-MUNet's memory model.

    Everything but the network comes from `ExperimentPlanner` (spacing, transpose, normalisation, resampling, the
    2d / 3d_fullres / 3d_lowres decisions). Per configuration this planner then replaces `architecture`,
    `patch_size` and `batch_size`:
    - Topology: 2 conv stages + 4 Mamba stages, 5 downsamplings. 2D: stride 2 on both axes at every step, so the
      patch is a multiple of 32. 3D: the first 5 pooling steps of nnU-Net's spacing-aware `get_pool_and_conv_props`
      (anisotropic axes are pooled later; stride 1 where an axis is already too small), conv kernels likewise.
    - Sizing, as nnU-Net does for its own networks: start from nnU-Net's initial patch (aspect ratio from the spacing,
      clipped to the median shape, rounded up to the network's divisibility), shrink the axis largest relative to the
      median shape while `TinyMUNet.compute_conv_feature_map_size` (same unit as nnU-Net's estimate) exceeds the
      reference for the VRAM target, then batch size = reference / estimate * reference batch, capped at 5 % of the
      dataset's voxels and at least `UNet_min_batch_size`.
    - Ops: 2D uses BatchNorm + GELU (METHODS.md §3.3, large 2D batches); 3D uses InstanceNorm + GELU (nnU-Net's 3D
      batches of 2 are too small for batch statistics) and the narrower `features_3d` stem.
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetPlans_TinyMUNet",
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.network_class = TinyMUNet
        self.features_2d = (32, 64, 64, 96, 128, 192)  # METHODS.md §3.3
        self.features_3d = (16, 32, 64, 96, 128, 192)
        self.n_conv_stages = 2
        self.n_mamba_layers_per_stage = (1, 2, 2, 2)
        self.mamba_kwargs = {"d_state": 16, "d_conv": 4, "expand": 2}

    # ------------------------------------------------------------------------------------------------------------
    def get_plans_for_configuration(self, spacing: Union[np.ndarray, Tuple[float, ...], List[float]],
                                    median_shape: Union[np.ndarray, Tuple[int, ...]], data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        architecture, patch, batch_size = self.size_network(spacing, median_shape, approximate_n_voxels_dataset,
                                                            _cache)
        plan.update(batch_size=batch_size, patch_size=tuple(patch), architecture=architecture)
        return plan

    def size_network(self, spacing, median_shape, approximate_n_voxels_dataset: float,
                     _cache: dict) -> Tuple[dict, List[int], int]:
        """(architecture entry, patch size, batch size) for one configuration, as described in the class doc."""
        dim = len(spacing)
        median = [float(i) for i in median_shape[:dim]]
        num_input_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        num_classes = len(self.dataset_json["labels"])

        patch = self.initial_patch_size(spacing, median)
        architecture, patch, divisor = self.architecture_for(spacing, patch)
        estimate = self._estimate(patch, architecture, num_input_channels, num_classes, _cache)
        reference = (self.UNet_reference_val_2d if dim == 2 else self.UNet_reference_val_3d) * \
            (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB)
        ref_bs = self.UNet_reference_val_corresp_bs_2d if dim == 2 else self.UNet_reference_val_corresp_bs_3d
        while estimate / ref_bs * self.UNet_min_batch_size > reference:
            shrinkable = [i for i in range(dim) if patch[i] > divisor[i]]
            if not shrinkable:
                break
            axis = max(shrinkable, key=lambda i: patch[i] / median[i])
            patch[axis] -= divisor[axis]
            architecture, patch, divisor = self.architecture_for(spacing, patch)
            estimate = self._estimate(patch, architecture, num_input_channels, num_classes, _cache)

        batch_size = round(reference / estimate * ref_bs)
        bs_5_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered /
                             np.prod(patch, dtype=np.float64))
        batch_size = max(min(batch_size, bs_5_percent), self.UNet_min_batch_size)
        return architecture, [int(i) for i in patch], int(batch_size)

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def initial_patch_size(spacing, median_shape) -> List[int]:
        """nnU-Net's starting patch: 2048^2 (2D) or 256^3 (3D) voxels shaped by 1/spacing, clipped to the median."""
        tmp = 1 / np.array(spacing, dtype=np.float64)
        volume = 2048 ** 2 if len(spacing) == 2 else 256 ** 3
        initial = [round(i) for i in tmp * (volume / np.prod(tmp)) ** (1 / len(spacing))]
        return [max(1, int(min(i, j))) for i, j in zip(initial, median_shape)]

    def topology(self, spacing, patch_size) -> Tuple[List[List[int]], List[List[int]]]:
        """Per-stage strides and conv kernel sizes (6 stages) for this spacing and patch."""
        dim = len(spacing)
        n_stages = len(self.features_2d if dim == 2 else self.features_3d)
        if dim == 2:
            return [[1, 1]] + [[2, 2]] * (n_stages - 1), [[3, 3]] * n_stages
        _, pool, conv, _, _ = get_pool_and_conv_props(spacing, patch_size, self.UNet_featuremap_min_edge_length,
                                                      999999)
        strides = [list(p) for p in pool[:n_stages]] + [[1] * dim] * max(0, n_stages - len(pool))
        kernels = [list(k) for k in conv[:n_stages]] + [[3] * dim] * max(0, n_stages - len(conv))
        return strides, kernels

    def architecture_for(self, spacing, patch_size) -> Tuple[dict, List[int], List[int]]:
        """(plans `architecture` entry, patch rounded up to the network's divisibility, divisibility per axis)."""
        dim = len(spacing)
        strides, kernels = self.topology(spacing, patch_size)
        divisor = [int(np.prod([s[i] for s in strides])) for i in range(dim)]
        patch = [int(np.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
        norm = "torch.nn.modules.batchnorm.BatchNorm2d" if dim == 2 else \
            "torch.nn.modules.instancenorm.InstanceNorm3d"
        architecture = {
            "network_class_name": self.network_class.__module__ + "." + self.network_class.__name__,
            "arch_kwargs": {
                "features_per_stage": list(self.features_2d if dim == 2 else self.features_3d),
                "conv_op": "torch.nn.modules.conv.Conv2d" if dim == 2 else "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernels,
                "strides": strides,
                "n_conv_stages": self.n_conv_stages,
                "n_mamba_layers_per_stage": list(self.n_mamba_layers_per_stage),
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                "nonlin": "torch.nn.GELU",
                "nonlin_kwargs": {},
                **self.mamba_kwargs,
            },
            "_kw_requires_import": ["conv_op", "norm_op", "nonlin"],
        }
        return architecture, patch, divisor

    @staticmethod
    def static_estimate_VRAM_usage(patch_size: Tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: Tuple[str, ...]) -> int:
        """nnU-Net's estimate (`compute_conv_feature_map_size` of the network built from the plans entry).

        Overridden only because nnU-Net 2.8.1's version calls `torch.set_num_threads(get_allowed_n_proc_DA())`,
        which raises when nnUNet_n_proc_DA=0 (single-process data augmentation); used for nnU-Net's own U-Net
        search in `super().get_plans_for_configuration` too.
        """
        net = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                     output_channels, allow_init=False)
        return net.compute_conv_feature_map_size(patch_size)

    def _estimate(self, patch, architecture, num_input_channels: int, num_classes: int, cache: dict) -> float:
        key = "TinyMUNet_" + str(patch) + "_" + str(architecture["arch_kwargs"]["strides"])
        if key not in cache:
            cache[key] = self.static_estimate_VRAM_usage(
                tuple(patch), num_input_channels, num_classes, architecture["network_class_name"],
                architecture["arch_kwargs"], tuple(architecture["_kw_requires_import"]))
        return float(cache[key])

