"""Medical Segmentation Decathlon sources: any MSD task as 3D volumes, and Task01 BrainTumour as 2D slices ([KD]).

Both read the documented MSD layout: `TaskXX_Name/dataset.json` (with "modality", "labels" and the "training" list of
`{"image": "./imagesTr/<case>.nii.gz", "label": "./labelsTr/<case>.nii.gz"}`), `imagesTr/` (4D NIfTI for
multi-modal tasks, modality order as in dataset.json), `labelsTr/`. `imagesTs/` has no labels and is not used: the
test set is split off the labeled training cases. Hidden `._*` files of the macOS archives are ignored.
"""
from __future__ import annotations

import re
import shutil
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.converters.common import (CaseRecord, ConvertOptions, Converter, Unit, case_complete,
                                                   case_paths, load_json, number_of_test_units, require_file,
                                                   resize_2d, round_half_up, safe_case_id, seeded_split,
                                                   sitk_from_array, slice_geometry, write_sitk)
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path

# Test-set sizes of [VS] (METHODS.md §10.6) for the MSD tasks it uses; other tasks default to 20 %.
MSD_DEFAULT_NUM_TEST = {"spleen": 11, "lung": 13}
# [KD] trains on FLAIR, T1 and T2 (no T1gd); MSD names them FLAIR, T1w, T2w (METHODS.md §4, seed 000 §3.1).
BRATS2D_MODALITIES = (("FLAIR", ("flair",)), ("T1w", ("t1w", "t1")), ("T2w", ("t2w", "t2")))


def read_msd_dataset_json(source: Path) -> dict:
    """Load `<source>/dataset.json` of an MSD task, checking the keys the converters use."""
    meta = load_json(require_file(source / "dataset.json", "MSD task description"))
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise SemiSAMError(f"{source / 'dataset.json'} has no '{key}' entry; is this an MSD TaskXX_Name folder?")
    return meta


def msd_units(source: Path, meta: dict) -> list[Unit]:
    """One unit per entry of the "training" list; the first missing image or label file is reported."""
    units = []
    for entry in meta["training"]:
        image = require_file(source / entry["image"], "MSD training image listed in dataset.json")
        label = require_file(source / entry["label"], "MSD training label listed in dataset.json")
        stem = image.name[:-len(".nii.gz")] if image.name.endswith(".nii.gz") else image.stem
        units.append(Unit(safe_case_id(stem), {"image": str(image), "label": str(label)}))
    return units


def _image_info(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _copy_atomic(src: str, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def split_channels(image):
    """3D SimpleITK volumes of a 3D or 4D image (4th axis = modality), each with the 3D geometry of the source."""
    import SimpleITK as sitk

    if image.GetDimension() == 3:
        return [image]
    if image.GetDimension() != 4:
        raise SemiSAMError(f"expected a 3D or 4D image, got {image.GetDimension()}D")
    size = list(image.GetSize())
    return [sitk.Extract(image, size[:3] + [0], [0, 0, 0, c], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
            for c in range(size[3])]


def convert_msd_case(unit: Unit, subset: str, dataset_dir: str, params: dict) -> list[CaseRecord]:
    """Write one MSD case: one `_000c.nii.gz` per modality, the label as is; spacing, origin, direction kept.

    3D images and labels are copied byte for byte; 4D images are split along the modality axis.
    """
    images, label = case_paths(Path(dataset_dir), subset, unit.uid, params["num_channels"], ".nii.gz")
    if case_complete(images, label):
        return [CaseRecord(unit.uid, subset, unit.uid)]
    img_info, lab_info = _image_info(unit.files["image"]), _image_info(unit.files["label"])
    spatial = img_info.GetSize()[:3]
    if lab_info.GetSize() != spatial or not np.allclose(lab_info.GetSpacing(), img_info.GetSpacing()[:3], rtol=1e-4):
        raise SemiSAMError(f"label {unit.files['label']} (size {lab_info.GetSize()}) does not match image "
                           f"{unit.files['image']} (size {spatial})")
    if img_info.GetDimension() == 3:
        if params["num_channels"] != 1:
            raise SemiSAMError(f"{unit.files['image']} is 3D but dataset.json lists "
                               f"{params['num_channels']} modalities")
        _copy_atomic(unit.files["image"], images[0])
    else:
        import SimpleITK as sitk

        vols = split_channels(sitk.ReadImage(unit.files["image"]))
        if len(vols) != params["num_channels"]:
            raise SemiSAMError(f"{unit.files['image']} has {len(vols)} modalities, dataset.json lists "
                               f"{params['num_channels']}")
        for vol, path in zip(vols, images):
            write_sitk(vol, path)
    _copy_atomic(unit.files["label"], label)
    return [CaseRecord(unit.uid, subset, unit.uid)]


class MSDConverter(Converter):
    """Any MSD task (used for Task09 Spleen and Task06 Lung of [VS]) as a 3D nnU-Net dataset.

    Channel names and labels come from the task's dataset.json ("CT" selects nnU-Net's CT normalisation). Split:
    seeded, with [VS]'s test sizes for Spleen (11 of 41) and Lung (13 of 63), 20 % for other tasks.
    """

    key = "msd"
    file_ending = ".nii.gz"

    def _task(self, source: Path, meta: dict) -> tuple[str, str]:
        m = re.fullmatch(r"Task(\d+)_(\w+)", source.name)
        name = m.group(2) if m else str(meta.get("name", source.name))
        return safe_case_id(name), name.lower()

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        self.meta = read_msd_dataset_json(source)
        self.default_name, self.task = self._task(source, self.meta)
        return msd_units(source, self.meta)

    def split(self, units: Sequence[Unit], opts: ConvertOptions) -> dict[str, str]:
        k = number_of_test_units(len(units), opts, default_num=MSD_DEFAULT_NUM_TEST.get(self.task))
        return seeded_split([u.uid for u in units], k, opts.seed)

    def worker(self):
        return convert_msd_case

    def worker_params(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {**super().worker_params(units, opts), "num_channels": len(self.meta["modality"])}

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        modality = self.meta["modality"]
        return {
            "channel_names": {str(i): modality[k] for i, k in enumerate(sorted(modality, key=int))},
            "labels": {name: int(v) for v, name in sorted(self.meta["labels"].items(), key=lambda kv: int(kv[0]))},
            "file_ending": ".nii.gz",
            "dataset_name": self.default_name,
            "description": f"MSD {self.meta.get('name', self.default_name)}: {self.meta.get('description', '')}",
            "reference": self.meta.get("reference", "Antonelli et al., Nat Commun 13:4128 (2022)"),
            "license": self.meta.get("licence", self.meta.get("license", "CC-BY-SA 4.0")),
            "converted_by": "nnunet-semisam convert msd",
        }


def select_brats_slices(whole_tumour: np.ndarray, brain: np.ndarray, empty_fraction: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Axial slice indices kept for one patient: every tumour slice plus a share of tumour-free brain slices.

    `whole_tumour`, `brain`: per-slice booleans `(Z,)`. Of the `n` brain slices without tumour,
    `round(empty_fraction * n)` are drawn without replacement; slices without brain (all channels 0) are dropped.
    """
    tumour = np.flatnonzero(whole_tumour)
    empty = np.flatnonzero(brain & ~whole_tumour)
    k = round_half_up(empty_fraction * len(empty))
    chosen = rng.choice(empty, size=k, replace=False) if k else np.empty(0, dtype=int)
    return np.sort(np.concatenate([tumour, chosen]).astype(int))


def convert_brats2d_patient(unit: Unit, subset: str, dataset_dir: str, params: dict) -> list[CaseRecord]:
    """Write the kept axial slices of one BrainTumour patient as cases `<patient>_zNNN` (FLAIR, T1w, T2w, label).

    Each slice is a one-slice NIfTI with the slice's physical position; labels are whole tumour (label > 0 -> 1).
    The choice of tumour-free slices uses `default_rng([seed, crc32(patient)])`, so a rerun picks the same slices.
    """
    import SimpleITK as sitk

    lab_img = sitk.ReadImage(unit.files["label"])
    vols = split_channels(sitk.ReadImage(unit.files["image"]))
    if len(vols) <= max(params["channels"]):
        raise SemiSAMError(f"{unit.files['image']} has {len(vols)} modalities; expected 4D FLAIR, T1w, t1gd, T2w")
    vols = [vols[c] for c in params["channels"]]
    if lab_img.GetSize() != vols[0].GetSize():
        raise SemiSAMError(f"label {unit.files['label']} (size {lab_img.GetSize()}) does not match image "
                           f"{unit.files['image']} (size {vols[0].GetSize()})")
    whole_tumour = sitk.GetArrayFromImage(lab_img) > 0  # (Z, Y, X)
    arrays = [sitk.GetArrayFromImage(v) for v in vols]
    brain = np.any([a.reshape(a.shape[0], -1).any(axis=1) for a in arrays], axis=0)
    rng = np.random.default_rng([params["seed"], zlib.crc32(unit.uid.encode())])
    keep = select_brats_slices(whole_tumour.reshape(len(brain), -1).any(axis=1), brain, params["empty_fraction"], rng)

    size = params["resize"]
    records = []
    for z in keep:
        case_id = f"{unit.uid}_z{z:03d}"
        images, label = case_paths(Path(dataset_dir), subset, case_id, len(vols), ".nii.gz")
        records.append(CaseRecord(case_id, subset, unit.uid))
        if case_complete(images, label):
            continue
        geometry = slice_geometry(vols[0], z, (size, size) if size else None)
        for a, path in zip(arrays, images):
            sl = resize_2d(a[z].astype(np.float32), size, nearest=False) if size else a[z]
            write_sitk(sitk_from_array(sl[None], *geometry), path)
        wt = whole_tumour[z].astype(np.uint8)
        write_sitk(sitk_from_array((resize_2d(wt, size, nearest=True) if size else wt)[None], *geometry), label)
    return records


class BraTS2DConverter(Converter):
    """MSD Task01 BrainTumour as 2D axial slices for [KD]: FLAIR, T1w, T2w channels, whole-tumour labels.

    [KD] (seed 000 §3.1) uses the 484 patients' FLAIR, T1 and T2, split 80/20 into 387/97 *patients*; it does not
    say which slices it uses. We keep every slice with tumour plus `--empty-fraction` (default 0.1) of the
    tumour-free slices that contain brain, per patient and seeded; slices without brain are dropped. The split is
    by patient, so no patient has slices on both sides (no leakage); `conversion.json` maps each slice case to its
    patient (`groups`), which `split-labels` uses to label whole patients. `--resize 256` gives 256 x 256 slices.
    """

    key = "msd-brats2d"
    default_name = "BrainTumour2D"
    is_2d = True
    uses_empty_fraction = True
    file_ending = ".nii.gz"

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        meta = read_msd_dataset_json(source)
        names = {str(v).lower(): int(k) for k, v in meta["modality"].items()}
        self.channels = []
        for wanted, aliases in BRATS2D_MODALITIES:
            idx = next((names[a] for a in aliases if a in names), None)
            if idx is None:
                raise SemiSAMError(f"{source / 'dataset.json'} lists modalities {sorted(meta['modality'].values())}; "
                                   f"msd-brats2d needs {wanted} (Task01_BrainTumour: FLAIR, T1w, t1gd, T2w)")
            self.channels.append(idx)
        return msd_units(source, meta)

    def worker(self):
        return convert_brats2d_patient

    def worker_params(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {**super().worker_params(units, opts), "channels": list(self.channels),
                "empty_fraction": opts.empty_fraction}

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {
            "channel_names": {str(i): name for i, (name, _) in enumerate(BRATS2D_MODALITIES)},
            "labels": {"background": 0, "whole tumour": 1},
            "file_ending": ".nii.gz",
            "dataset_name": self.default_name,
            "description": (f"MSD Task01 BrainTumour, axial slices (tumour slices + {opts.empty_fraction:g} of "
                            f"tumour-free brain slices), FLAIR/T1w/T2w, whole tumour"
                            + (f", resized to {opts.resize}x{opts.resize}" if opts.resize else "")),
            "reference": "Antonelli et al., Nat Commun 13:4128 (2022); BraTS 2016/2017",
            "license": "CC-BY-SA 4.0",
            "converted_by": "nnunet-semisam convert msd-brats2d",
        }
