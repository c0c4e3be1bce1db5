"""The teacher side of FPKDM on augmented training batches (METHODS.md §2.6, §2.8, §4.1).

Training-time teacher features are never used for pseudo-labels: they come from the teacher's fast path on the
student's augmented batch (select the teacher channels, min-max per image, bilinear resize to a square side). The side:
- `"native"`: the side the teacher segments at (MedSAM 1024, LiteMedSAM 256), so the features see the image at the
  scale of the pseudo-label pipeline;
- `"patch"`: the student's patch side, rounded up to a side the encoder accepts (LiteMedSAM's TinyViT built for that
  input with the same weights, METHODS.md §2.8 "Cost on CPU"); MedSAM's ViT keeps its native side;
- `"f1"`: the smallest side whose first-tap grid is as fine as the student's F1 grid (tap stride x max(F1)),
  capped at the native side;
- `"windows"`: the largest side up to the patch side that is a multiple of the teacher's `window_multiple`
  (LiteMedSAM: 56), so that no attention stage pads its grid to whole windows; `"patch"` for patches smaller than
  that. A 64-pixel patch gets 56: the teacher's FPKDM work per step costs half that at 64 and its taps, pooled onto
  the student grids, are closer to the native 256 path's (METHODS.md §2.8 "Cost on CPU",
  `benchmarks/bench_feature_side.py`);
- `"auto"` (default): native on CUDA; on CPU `"windows"` for LiteMedSAM (its 256² encoder costs ~1.5 s per image on
  two cores, several nnU-Net iterations), native for MedSAM;
- an int: used as given.
"""
from __future__ import annotations

from typing import Sequence

import torch

from nnunet_semisam.errors import SemiSAMError


def teacher_channels(normalization_schemes: Sequence[str], teacher_channel: int = 0) -> tuple[int, ...]:
    """Channels the teacher sees: the first three of an RGB dataset (`RGBTo01Normalization`), else `teacher_channel`
    (replicated to 3 by the teacher; METHODS.md §2.4)."""
    schemes = list(normalization_schemes)
    if len(schemes) >= 3 and all(s == "RGBTo01Normalization" for s in schemes[:3]):
        return (0, 1, 2)
    return (int(teacher_channel),)


def _round_up(side: int, multiple: int) -> int:
    return -(-int(side) // multiple) * multiple


#: the named settings of the feature side (module docstring); any positive int is allowed too
SIDE_SETTINGS = ("auto", "native", "patch", "windows", "f1")


def check_side_setting(setting: int | str, name: str = "teacher_input_size") -> None:
    """One-line error unless `setting` is one of `SIDE_SETTINGS` or a positive side (an int or its digits)."""
    positive = (isinstance(setting, int) and not isinstance(setting, bool) and setting > 0) or (
        isinstance(setting, str) and setting.isdigit() and int(setting) > 0)
    if not (positive or setting in SIDE_SETTINGS):
        raise SemiSAMError(f"{name} = {setting!r}: expected {', '.join(map(repr, SIDE_SETTINGS))} or a positive side "
                           "in pixels")


def feature_side(teacher, setting: int | str, patch_size: Sequence[int], f1_grid: Sequence[int],
                 device: torch.device) -> int:
    """Square input side of the teacher's training-time features for `setting` (module docstring)."""
    check_side_setting(setting)
    native = int(teacher.native_size)
    resizable = hasattr(teacher, "encoder_for")  # LiteMedSAM: a TinyViT for any multiple of `feature_multiple`
    if setting == "auto":
        setting = "native" if device.type == "cuda" or not resizable else "windows"
    if isinstance(setting, int) or (isinstance(setting, str) and setting.isdigit()):
        return int(setting)
    if setting == "native":
        return native
    if setting == "windows" and resizable:
        multiple = int(teacher.window_multiple)
        side = max(int(s) for s in patch_size) // multiple * multiple
        if side:
            return min(native, side)
        setting = "patch"
    if setting in ("patch", "windows"):
        if not resizable:
            return native
        return min(native, _round_up(max(int(s) for s in patch_size), teacher.feature_multiple))
    side = int(teacher.tap_stride) * max(int(g) for g in f1_grid)  # "f1"
    if resizable:
        side = _round_up(side, teacher.feature_multiple)
    return min(native, side)


def fill_background(x: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """`x` (B, C, *sp) with the `background` pixels (B, 1, *sp) set to each image's minimum over its other pixels
    (jointly over channels); images that are all background are left as they are."""
    if background is None or not bool(background.any()):
        return x
    bg = background.to(torch.bool).expand_as(x)
    big = torch.finfo(x.dtype).max
    lo = torch.where(bg, torch.full_like(x, big), x).flatten(1).amin(1)  # (B,)
    lo = torch.where(lo == big, x.flatten(1).amin(1), lo).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(bg, lo.expand_as(x), x)


class TeacherFeatures:
    """T_1 of a batch and the re-injection T_1 -> [T_2..T_L] for `fpkdm_responses` (METHODS.md §4.1).

    Both the clean and the perturbed later taps go through `reinject` (one path, one precision). No gradient reaches
    the teacher.
    """

    def __init__(self, teacher, channels: Sequence[int], side: int, levels: int) -> None:
        self.teacher = teacher
        self.channels = tuple(channels)
        self.side = int(side)
        self.levels = int(levels)

    def first_tap(self, x: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) student batch -> T_1 (B, h, w, D_1) float32.

        background: optional (B, 1, H, W) bool, True outside nnU-Net's mask / in padding (the soft-target `valid`
        channel). Those pixels are set to the image's minimum over the valid pixels before the teacher's min-max,
        so they become 0 as in rule U (METHODS.md §2.4 correction) instead of the mid-grey of z-scored zeros.
        """
        return self.teacher.first_tap(self.teacher.feature_input(fill_background(x.detach(), background),
                                                                 self.channels, self.side))

    def reinject(self, t1: torch.Tensor) -> list[torch.Tensor]:
        """T_1 (clean or perturbed) -> [T_2..T_levels] (the teacher runs only the stages these taps need)."""
        return self.teacher.later_taps(t1, self.levels - 1)

    def responses(self, x: torch.Tensor, background: torch.Tensor | None, student: torch.nn.Module,
                  student_features: Sequence[torch.Tensor], projector, sigma: float):
        """FPKDM responses (`losses.fpkdm.fpkdm_responses`, METHODS.md §4.1) of a batch the student has just seen:
        (teacher deltas, student deltas) for layers 2..levels. The student's perturbed re-run (`encode_from(1, ·)`)
        leaves its BatchNorm running statistics alone (`networks.batchnorm.frozen_running_stats`)."""
        from nnunet_semisam.distributed import unwrap
        from nnunet_semisam.losses.fpkdm import fpkdm_responses
        from nnunet_semisam.networks.batchnorm import frozen_running_stats

        def reinject_student(f1: torch.Tensor) -> list[torch.Tensor]:
            with frozen_running_stats(student):
                return unwrap(student).encode_from(1, f1)[:self.levels - 1]

        return fpkdm_responses(self.first_tap(x, background), self.reinject, student_features[:self.levels],
                               reinject_student, projector, sigma)


def fpkdm_pair(teacher, network: torch.nn.Module, num_input_channels: int, configuration_manager,
               setting: int | str = "auto", teacher_channel: int = 0, dropout: float = 0.1,
               device: torch.device = torch.device("cpu")):
    """The two sides of FPKDM (METHODS.md §4.1) for a student built from nnU-Net plans: `TeacherFeatures` at the side
    `setting` gives and the projectors P_l (`losses.fpkdm.FeatureProjector`) from the teacher's taps to the student's
    F_1..F_L, L = min(student levels, teacher taps). Returns (features, projector, one line for the training log)."""
    from nnunet_semisam.losses.fpkdm import FeatureProjector
    from nnunet_semisam.networks.kd_student import feature_shapes

    patch = configuration_manager.patch_size
    shapes = feature_shapes(network, num_input_channels, patch, device)
    levels = min(len(shapes), len(teacher.tap_channels))
    grids = [g for _, g in shapes[:levels]]
    side = feature_side(teacher, setting, patch, grids[0], device)
    features = TeacherFeatures(teacher, teacher_channels(configuration_manager.normalization_schemes,
                                                         teacher_channel), side, levels)
    projector = FeatureProjector(teacher.tap_channels[:levels], [c for c, _ in shapes[:levels]], grids,
                                 dropout=dropout).to(device)
    line = (f"FPKDM: {levels} levels, student grids {grids}, projector parameters "
            f"{sum(p.numel() for p in projector.parameters()):,} (not part of the student); teacher features at "
            f"{side}x{side} (teacher_input_size {setting!r}, native {teacher.native_size})")
    return features, projector, line
