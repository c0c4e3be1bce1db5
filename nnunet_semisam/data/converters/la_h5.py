"""2018 Left Atrium challenge data in the h5 form of UA-MT / SSL4MIS (used by [MN] and [VS]; METHODS.md §6, §7, §10.4).

Layout (UA-MT `data/`): `2018LA_Seg_Training Set/<case>/mri_norm2.h5` with datasets `image` (float32, z-scored
LGE-MRI, cropped around the atrium) and `label` (uint8, 1 = left atrium), both indexed (x, y, z) as read from the
challenge's NRRD files, plus `train.list` (80 cases) and `test.list` (20 cases) beside the folder. SOURCE_DIR is the
folder holding both (or the `2018LA_Seg_Training Set` folder itself, with the lists in its parent, as UA-MT reads
`base_dir/../train.list`). The split is the lists' 80/20.

The h5 files carry no header: the volumes are written with the challenge's 0.625 mm isotropic voxel size, origin 0
and identity direction, the array axes (x, y, z) mapping to the image axes in that order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.converters.common import (CaseRecord, ConvertOptions, Converter, Unit, case_complete,
                                                   case_paths, require_dir, require_file, safe_case_id,
                                                   sitk_from_array, write_sitk)
from nnunet_semisam.errors import SemiSAMError

LA_FOLDER = "2018LA_Seg_Training Set"
LA_H5 = "mri_norm2.h5"
LA_SPACING_MM = (0.625, 0.625, 0.625)  # 2018 Atrial Segmentation Challenge LGE-MRI voxel size


def read_list(path: Path) -> list[str]:
    """Case names of a UA-MT list file, one per line, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def convert_la_case(unit: Unit, subset: str, dataset_dir: str, params: dict) -> list[CaseRecord]:
    """Write one h5 case as `<case>_0000.nii.gz` + label: (x, y, z) arrays become (z, y, x) for SimpleITK."""
    import h5py

    images, label = case_paths(Path(dataset_dir), subset, unit.uid, 1, ".nii.gz")
    if not case_complete(images, label):
        with h5py.File(unit.files["image"], "r") as f:
            if "image" not in f or "label" not in f:
                raise SemiSAMError(f"{unit.files['image']} lacks the 'image' and 'label' datasets of UA-MT's h5 files")
            image = np.asarray(f["image"][:], dtype=np.float32)
            lab = np.asarray(f["label"][:])
        if image.ndim != 3 or image.shape != lab.shape:
            raise SemiSAMError(f"{unit.files['image']}: image {image.shape} and label {lab.shape} "
                               "must be equal 3D shapes")
        geometry = (LA_SPACING_MM, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        write_sitk(sitk_from_array(np.ascontiguousarray(image.transpose(2, 1, 0)), *geometry), images[0])
        write_sitk(sitk_from_array(np.ascontiguousarray((lab > 0).astype(np.uint8).transpose(2, 1, 0)), *geometry),
                   label)
    return [CaseRecord(unit.uid, subset, unit.uid)]


class LAH5Converter(Converter):
    """Left Atrium (UA-MT h5): 80 training and 20 test volumes from `train.list` / `test.list`."""

    key = "la-h5"
    default_name = "LeftAtrium"
    file_ending = ".nii.gz"

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        if source.name == LA_FOLDER and not (source / LA_FOLDER).is_dir():
            data_dir, list_dir = source, source.parent
        else:
            data_dir, list_dir = require_dir(source / LA_FOLDER, "UA-MT LA h5 cases"), source
        self.lists = {s: read_list(require_file(list_dir / f"{name}.list", f"UA-MT {name} list"))
                      for s, name in (("Tr", "train"), ("Ts", "test"))}
        both = set(self.lists["Tr"]) & set(self.lists["Ts"])
        if both:
            raise SemiSAMError(f"case {sorted(both)[0]} is in both train.list and test.list of {list_dir}")
        units = []
        for name in self.lists["Tr"] + self.lists["Ts"]:
            h5 = require_file(data_dir / name / LA_H5, f"h5 volume of case {name}")
            units.append(Unit(safe_case_id(name), {"image": str(h5)}))
        return units

    def split(self, units: Sequence[Unit], opts: ConvertOptions) -> dict[str, str]:
        if opts.num_test is not None or opts.test_fraction is not None:
            raise SemiSAMError("la-h5 uses the train.list/test.list split of UA-MT; "
                               "--num-test/--test-fraction do not apply")
        test = {safe_case_id(n) for n in self.lists["Ts"]}
        return {u.uid: ("Ts" if u.uid in test else "Tr") for u in units}

    def worker(self):
        return convert_la_case

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {
            "channel_names": {"0": "LGE-MRI"},
            "labels": {"background": 0, "left atrium": 1},
            "file_ending": ".nii.gz",
            "dataset_name": self.default_name,
            "description": "2018 Atrial Segmentation Challenge LGE-MRI (UA-MT h5: z-scored, cropped), 0.625 mm voxels",
            "reference": "Xiong et al., Med Image Anal 67:101832 (2021); Yu et al., UA-MT, MICCAI 2019",
            "license": "see the 2018 Atrial Segmentation Challenge data terms",
            "converted_by": "nnunet-semisam convert la-h5",
        }
