"""nnU-Net folder lookups with one-line errors (`SemiSAMError`) instead of nnU-Net's multi-line RuntimeErrors.

Reads the nnU-Net environment variables at call time (never at import), through `nnunetv2.paths`.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_semisam.errors import SemiSAMError

_ENV_HELP = "export it (see nnU-Net's documentation/setting_up_paths.md)"


def require_env(name: str) -> Path:
    """Value of the nnU-Net environment variable `name` (nnUNet_raw, nnUNet_preprocessed, nnUNet_results)."""
    value = os.environ.get(name)
    if not value:
        raise SemiSAMError(f"{name} is not set: {_ENV_HELP}")
    return Path(value)


def dataset_name(dataset_name_or_id: int | str) -> str:
    """`DatasetXXX_Name` for an id or name, looked up in the nnU-Net folders like nnU-Net does."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not any(os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")):
        raise SemiSAMError(f"none of nnUNet_raw, nnUNet_preprocessed, nnUNet_results is set: {_ENV_HELP}")
    try:
        return maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError) as e:
        if "More than one" in str(e):
            raise SemiSAMError(f"dataset id {dataset_name_or_id} is ambiguous: several DatasetXXX_* folders carry "
                               f"it in nnUNet_raw/nnUNet_preprocessed/nnUNet_results") from None
        raise SemiSAMError(f"unknown dataset {dataset_name_or_id}: no Dataset{str(dataset_name_or_id).zfill(3)}_* "
                           f"folder in nnUNet_raw, nnUNet_preprocessed or nnUNet_results") from None


def raw_dataset_folder(dataset_name_or_id: int | str) -> Path:
    """`$nnUNet_raw/DatasetXXX_Name`, which must exist and hold a dataset.json."""
    folder = require_env("nnUNet_raw") / dataset_name(dataset_name_or_id)
    if not (folder / "dataset.json").is_file():
        raise SemiSAMError(f"{folder / 'dataset.json'} does not exist: is dataset {dataset_name_or_id} in nnUNet_raw?")
    return folder


def preprocessed_dataset_folder(dataset_name_or_id: int | str) -> Path:
    """`$nnUNet_preprocessed/DatasetXXX_Name`, which must exist (run nnUNetv2_plan_and_preprocess first)."""
    folder = require_env("nnUNet_preprocessed") / dataset_name(dataset_name_or_id)
    if not folder.is_dir():
        raise SemiSAMError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} first")
    return folder
