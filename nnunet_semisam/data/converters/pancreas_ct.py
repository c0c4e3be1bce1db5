"""NIH Pancreas-CT (TCIA) as a 3D nnU-Net dataset ([MN], [VS]; METHODS.md §6, §7, §10.4).

Layout of the TCIA download: one DICOM series per patient under `Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm`
(older downloads: `DOI/PANCREAS_NNNN/...`) and the manual labels as `TCIA_pancreas_labels-02-05-2017/labelNNNN.nii.gz`.
SOURCE_DIR holds both folders. Patients without a label file are reported (the first one) as a layout error.

Geometry: the CT is read with SimpleITK's GDCM series reader, so spacing, origin and direction are the DICOM ones.
The label NIfTI headers do not describe the DICOM geometry; their voxel grid does: label array `[i, j, k]` is
DICOM column i, row j of the slice with InstanceNumber k + 1 (the correspondence used by OrganSegRSTN's
`DATA2NPY`: `label.transpose(1, 0, 2)` against pixel arrays stacked by InstanceNumber). The label is rebuilt on the
CT grid slice by slice from that rule and gets the CT's geometry. Label 1 = pancreas.
Split: ordered, the last 20 patients are the test set (62/20 of 82, as [MN]; `--num-test` changes it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.converters.common import (CaseRecord, ConvertOptions, Converter, Unit, case_complete,
                                                   case_paths, number_of_test_units, require_dir, require_file,
                                                   tail_split, write_sitk)
from nnunet_semisam.errors import SemiSAMError

PANCREAS_NUM_TEST = 20
LABEL_FOLDER = "TCIA_pancreas_labels-02-05-2017"
_PATIENT = re.compile(r"PANCREAS_(\d{4})")


def _dicom_dir(patient_dir: Path) -> Path:
    """The folder below `patient_dir` with the most .dcm files (TCIA ships one CT series per patient)."""
    counts: dict[Path, int] = {}
    for f in patient_dir.rglob("*.dcm"):
        if not f.name.startswith("."):
            counts[f.parent] = counts.get(f.parent, 0) + 1
    if not counts:
        raise SemiSAMError(f"source layout mismatch: missing file {patient_dir}/<study>/<series>/*.dcm (DICOM series)")
    return max(sorted(counts), key=lambda d: counts[d])


def read_ct_series(dicom_dir: str):
    """(CT image, rank of each slice's InstanceNumber in the image's slice order, 0-based) of a DICOM folder."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(dicom_dir)
    if not series:
        raise SemiSAMError(f"no readable DICOM series in {dicom_dir}")
    files = max((reader.GetGDCMSeriesFileNames(dicom_dir, s) for s in series), key=len)
    reader.SetFileNames(files)
    image = reader.Execute()
    instance = []
    for f in files:
        info = sitk.ImageFileReader()
        info.SetFileName(f)
        info.ReadImageInformation()
        if not info.HasMetaDataKey("0020|0013"):
            raise SemiSAMError(f"DICOM file {f} has no InstanceNumber (0020,0013)")
        instance.append(int(str(info.GetMetaData("0020|0013")).strip()))
    if len(set(instance)) != len(instance):
        raise SemiSAMError(f"DICOM series {dicom_dir} repeats InstanceNumbers; cannot match label slices")
    rank = np.argsort(np.argsort(instance))  # series position s holds the slice of label index rank[s]
    return image, rank


def convert_pancreas_case(unit: Unit, subset: str, dataset_dir: str, params: dict) -> list[CaseRecord]:
    """Write one patient: CT as `<case>_0000.nii.gz` (DICOM geometry), label resampled onto it by the index rule."""
    import nibabel as nib
    import SimpleITK as sitk

    images, label = case_paths(Path(dataset_dir), subset, unit.uid, 1, ".nii.gz")
    if not case_complete(images, label):
        image, rank = read_ct_series(unit.files["dicom_dir"])
        cols, rows, nz = image.GetSize()
        lab = np.asanyarray(nib.load(unit.files["label"]).dataobj)
        if lab.shape != (cols, rows, nz):
            raise SemiSAMError(f"label {unit.files['label']} has shape {lab.shape}, the DICOM series "
                               f"{unit.files['dicom_dir']} has {nz} slices of {cols}x{rows}; "
                               f"expected ({cols}, {rows}, {nz})")
        lab_rc = lab.transpose(1, 0, 2)  # (rows, cols, instance slice)
        lab_zyx = np.stack([lab_rc[:, :, rank[s]] for s in range(nz)]) > 0
        lab_img = sitk.GetImageFromArray(lab_zyx.astype(np.uint8))
        lab_img.CopyInformation(image)
        write_sitk(image, images[0])
        write_sitk(lab_img, label)
    return [CaseRecord(unit.uid, subset, unit.uid)]


class PancreasCTConverter(Converter):
    """NIH Pancreas-CT: DICOM series + TCIA NIfTI labels -> 3D CT dataset, ordered 62/20 split."""

    key = "pancreas-ct"
    default_name = "PancreasCT"
    file_ending = ".nii.gz"

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        image_root = next((source / d for d in ("Pancreas-CT", "DOI") if (source / d).is_dir()), None)
        if image_root is None:
            if any(_PATIENT.fullmatch(p.name) for p in source.iterdir() if p.is_dir()):
                image_root = source
            else:
                require_dir(source / "Pancreas-CT", "TCIA DICOM folders PANCREAS_NNNN")
        label_dirs = sorted(p for p in source.iterdir() if p.is_dir() and p.name.startswith("TCIA_pancreas_labels"))
        label_dir = label_dirs[0] if label_dirs else require_dir(source / LABEL_FOLDER, "TCIA label NIfTI files")
        patients = sorted(p for p in image_root.iterdir() if p.is_dir() and _PATIENT.fullmatch(p.name))
        if not patients:
            raise SemiSAMError(f"source layout mismatch: no PANCREAS_NNNN folder in {image_root}")
        units = []
        for p in patients:
            num = _PATIENT.fullmatch(p.name).group(1)
            lab = require_file(label_dir / f"label{num}.nii.gz", f"label of {p.name}")
            units.append(Unit(p.name, {"dicom_dir": str(_dicom_dir(p)), "label": str(lab)}))
        return units

    def split(self, units: Sequence[Unit], opts: ConvertOptions) -> dict[str, str]:
        k = number_of_test_units(len(units), opts, default_num=min(PANCREAS_NUM_TEST, len(units) - 1))
        return tail_split([u.uid for u in units], k)

    def worker(self):
        return convert_pancreas_case

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "pancreas": 1},
            "file_ending": ".nii.gz",
            "dataset_name": self.default_name,
            "description": "NIH Pancreas-CT (TCIA): 82 contrast-enhanced abdominal CT, pancreas labels",
            "reference": "Roth et al., DeepOrgan, MICCAI 2015; TCIA doi:10.7937/K9/TCIA.2016.tNB1kqBU",
            "license": "CC BY 3.0",
            "converted_by": "nnunet-semisam convert pancreas-ct",
        }
