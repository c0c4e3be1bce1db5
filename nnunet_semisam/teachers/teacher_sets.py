"""Algorithm 2 teacher sets for Semi-SAM+ (METHODS.md §5.4): names -> teachers with the 3D interface.

Every teacher of a set answers `encode(volume)` / `decode(E, points=..., mask=...)` on the same rule-U uint8 volume;
Algorithm 2 appends 2 masks per teacher and augmentation, so a set of k teachers gives 2kN masks (the manual's 2N for
SAM-Med3D alone, 4N with MedSAM2), and the variance filter and the mean run over all of them.

Names and where their weights come from (local files only; nothing is downloaded):

    litemedsam   LiteMedSAM slice-wise (`slice3d.LiteMedSAMSliceTeacher`), the bundled checkpoint (§2.8)
    medsam       MedSAM ViT-B slice-wise (`algorithm2.MedSAMSliceTeacher`), $SEMISAM_TEACHER
    medsam2      MedSAM2 with slice propagation (`medsam2.MedSAM2Teacher`), $SEMISAM_MEDSAM2 (+ sam2 config
                 $SEMISAM_MEDSAM2_CONFIG, default SAM2.1 Hiera-T; MedSAM2's own file is `sam2.1_hiera_t512.yaml`)
    sam-med3d    SAM-Med3D / Tiny SAM-Med3D (`sam_med3d.SAMMed3DTeacher`, medim's architecture), $SEMISAM_SAM_MED3D

`options` passes per-teacher keyword arguments (the model configuration of a non-default checkpoint, e.g. medim's
`encoder_depth` for a Tiny SAM-Med3D, or sam2 `hydra_overrides`); a missing variable or file is a one-line error
naming it, raised by `check_teacher_set` before training starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from nnunet_semisam.errors import SemiSAMError

#: teacher name -> environment variable with its local checkpoint (None: bundled, nothing to set)
CHECKPOINT_ENV = {"litemedsam": None, "medsam": "SEMISAM_TEACHER", "medsam2": "SEMISAM_MEDSAM2",
                  "sam-med3d": "SEMISAM_SAM_MED3D"}
MEDSAM2_CONFIG_ENV = "SEMISAM_MEDSAM2_CONFIG"
#: teachers that segment slice by slice (a point prompt reaches only its own slice)
SLICE_TEACHERS = ("litemedsam", "medsam")


def point_mode(names: Sequence[str]) -> str:
    """Algorithm 2's `point_mode` for a set: "slicewise" (one RITM point per non-empty slice) when a slice-by-slice
    2D teacher is in it, since it answers only on slices that carry a prompt; "volume" (one point in 3D, the manual's
    prompt for SAM-Med3D and MedSAM2) for sets of 3D teachers. SAM-Med3D takes every point of a slice-wise prompt
    together; MedSAM2 propagates from the first prompted slice."""
    return "slicewise" if any(n in SLICE_TEACHERS for n in names) else "volume"


def checkpoint_path(name: str) -> Path | None:
    """The local checkpoint of teacher `name` from its environment variable (None for the bundled LiteMedSAM)."""
    if name not in CHECKPOINT_ENV:
        raise SemiSAMError(f"unknown Algorithm 2 teacher {name!r}: expected one of {', '.join(CHECKPOINT_ENV)}")
    env = CHECKPOINT_ENV[name]
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise SemiSAMError(f"the {name} teacher needs ${env} = a local checkpoint file (nothing is downloaded)")
    path = Path(value)
    if not path.is_file():
        raise SemiSAMError(f"${env} = {path}: the {name} checkpoint does not exist")
    return path


def check_teacher_set(names: Sequence[str]) -> None:
    """Start-up check: at least one teacher, no repeats, every name known with its checkpoint present."""
    if not names:
        raise SemiSAMError("the Algorithm 2 teacher set is empty: name at least one teacher")
    if len(set(names)) != len(names):
        raise SemiSAMError(f"the Algorithm 2 teacher set {list(names)} names a teacher twice")
    for name in names:
        checkpoint_path(name)


def build_teacher(name: str, device: str | torch.device = "cpu", **options):
    """One frozen teacher with the §5.4 interface (module docstring)."""
    path = checkpoint_path(name)
    if name == "litemedsam":
        from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher
        from nnunet_semisam.teachers.slice3d import LiteMedSAMSliceTeacher
        return LiteMedSAMSliceTeacher(LiteMedSAMTeacher.from_package(device=device), **options)
    if name == "medsam":
        from nnunet_semisam.teachers.algorithm2 import MedSAMSliceTeacher
        from nnunet_semisam.teachers.factory import load_teacher
        return MedSAMSliceTeacher(load_teacher(path, device=device), **options)
    if name == "medsam2":
        from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher
        options.setdefault("config", os.environ.get(MEDSAM2_CONFIG_ENV) or None)
        return MedSAM2Teacher.from_checkpoint(path, device=device, **options)
    from nnunet_semisam.teachers.sam_med3d import SAMMed3DTeacher
    return SAMMed3DTeacher.from_checkpoint(path, device=device, **options)


def build_teacher_set(names: Sequence[str], device: str | torch.device = "cpu",
                      options: dict[str, dict] | None = None) -> list:
    """The teachers of `names`, in order, each with `options[name]` as keyword arguments."""
    check_teacher_set(names)
    options = options or {}
    return [build_teacher(name, device, **options.get(name, {})) for name in names]
