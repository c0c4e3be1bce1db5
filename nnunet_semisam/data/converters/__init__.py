"""Converters from the seed papers' public datasets to nnU-Net raw datasets (`nnunet-semisam convert`).

| format        | source layout (SOURCE_DIR holds...)                                     | module        |
|---------------|-------------------------------------------------------------------------|---------------|
| `kvasir`      | `Kvasir-SEG/images/*.jpg`, `Kvasir-SEG/masks/*.jpg`                      | natural2d     |
| `ham10000`    | ISIC 2018 Task 1 input + ground truth, or HAM10000 images + masks        | natural2d     |
| `msd-brats2d` | MSD `Task01_BrainTumour` (4D NIfTI), as 2D slices                        | msd           |
| `msd`         | any MSD `TaskXX_Name` (Task09 Spleen, Task06 Lung of [VS])               | msd           |
| `la-h5`       | UA-MT `2018LA_Seg_Training Set/<case>/mri_norm2.h5`, `train/test.list`   | la_h5         |
| `pancreas-ct` | TCIA `Pancreas-CT/PANCREAS_NNNN/.../*.dcm`, `TCIA_pancreas_labels-*/`    | pancreas_ct   |

Each writes `DatasetNNN_Name/{imagesTr,labelsTr,imagesTs,labelsTs}`, `dataset.json` and `conversion.json` (the
train/test split and options); see `common.run_conversion` for the resumable protocol.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_semisam.data.converters.common import ConvertOptions, Converter, run_conversion
from nnunet_semisam.data.converters.la_h5 import LAH5Converter
from nnunet_semisam.data.converters.msd import BraTS2DConverter, MSDConverter
from nnunet_semisam.data.converters.natural2d import HAM10000Converter, KvasirConverter
from nnunet_semisam.data.converters.pancreas_ct import PancreasCTConverter
from nnunet_semisam.errors import SemiSAMError

CONVERTERS: dict[str, type[Converter]] = {
    c.key: c for c in (KvasirConverter, HAM10000Converter, BraTS2DConverter, LAH5Converter, PancreasCTConverter,
                       MSDConverter)
}


def convert_dataset(fmt: str, source: str | os.PathLike, dataset_id: int, name: str | None = None,
                    out_root: str | os.PathLike | None = None, **options) -> Path:
    """Convert a public dataset at `source` (format `fmt`, a key of `CONVERTERS`) into an nnU-Net raw dataset.

    `options` are the fields of `ConvertOptions` (seed, resize, test_fraction, num_test, max_cases, empty_fraction,
    num_processes, progress). Returns the dataset folder `<out_root or $nnUNet_raw>/DatasetNNN_Name`.
    """
    if fmt not in CONVERTERS:
        raise SemiSAMError(f"unknown dataset format {fmt!r}; choose one of {', '.join(CONVERTERS)}")
    return run_conversion(CONVERTERS[fmt](), source, dataset_id, name, out_root, ConvertOptions(**options))


__all__ = ["CONVERTERS", "ConvertOptions", "convert_dataset"]
