"""`nnunet-semisam export`: nnU-Net predictions -> NIfTI or DICOM-SEG on their source's geometry (METHODS.md §5.8).

Inputs: PRED, one segmentation file or a folder of them (`nnUNetv2_predict -o` output: `CASE<ending>` with the ending
of the `dataset.json` that nnU-Net writes next to them, default `.nii.gz`), and SOURCE, the images they were
predicted from. For each prediction case the source is, in this order:
- SOURCE itself when it is a file (one prediction only);
- `SOURCE/CASE_0000<ending>` or `SOURCE/CASE<ending>` (an nnU-Net image folder, e.g. imagesTs);
- the DICOM series of case CASE under SOURCE (`nnunet_semisam.deploy.dicom.dicom_cases`: one series per case folder,
  named as `dicom-to-nifti` names them); with one prediction and one DICOM series, the two are paired whatever
  their names.
Every case is resolved (and every DICOM series' geometry checked) before anything is written; a case without a
source is a one-line error naming it.

Each prediction must lie on its source's voxel grid (`check_same_grid`: same size, spacing within a relative 1e-4,
direction cosines within 1e-4, origin within 1 % of the smallest voxel side), which holds for nnUNetv2_predict
output: it writes every case with the geometry of its input image.

Formats:
- `nifti`: `OUT/CASE.nii.gz` through nnU-Net's own writer (`SimpleITKIO.write_seg`), with the geometry of the SOURCE
  (the DICOM geometry for a DICOM series, the image's for an image file), uint8 labels.
- `dicom-seg`: `OUT/CASE.dcm`, a BINARY DICOM-SEG (`write_dicom_seg`): one segment per foreground class of the
  dataset.json, algorithm `nnunet_semisam/<trainer>` (or `algorithm_name`), AUTOMATIC, empty frames omitted. Only for
  DICOM sources: a prediction whose source is an image file is refused with one line, before anything is written.
Outputs are written atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnunet_semisam.deploy.dicom import (DicomSeries, Segment, check_series_geometry, dicom_cases, read_series,
                                         write_dicom_seg)
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path

FORMATS = ("nifti", "dicom-seg")
DEFAULT_ENDING = ".nii.gz"
SPACING_RTOL = 1e-4
DIRECTION_ATOL = 1e-4
ORIGIN_VOXEL_FRACTION = 0.01  # origin tolerance as a share of the smallest voxel side


@dataclass(frozen=True)
class ExportCase:
    """One prediction file and its source: an image file (Path) or a DICOM series."""

    case_id: str
    prediction: Path
    source: Path | DicomSeries

    @property
    def is_dicom(self) -> bool:
        return isinstance(self.source, DicomSeries)


def algorithm_name_for(trainer: str | None, algorithm_name: str | None = None) -> str:
    """The DICOM-SEG algorithm name: `algorithm_name` if given, else `nnunet_semisam/<trainer>`."""
    if algorithm_name:
        return str(algorithm_name)
    if not trainer:
        raise SemiSAMError("DICOM-SEG export names the model that produced the segmentation: give -tr TRAINER (as "
                           "passed to nnUNetv2_predict) or --algorithm-name NAME")
    return f"nnunet_semisam/{trainer}"


# ------------------------------------------------------------------------------------------------------ inputs

def _ending_of(name: str, endings: Sequence[str]) -> str | None:
    return next((e for e in endings if name.lower().endswith(e.lower())), None)


def list_predictions(pred: str | os.PathLike, file_ending: str | None = None) -> tuple[dict[str, Path], str]:
    """(case -> prediction file, file ending) of a prediction file or folder (module docstring)."""
    p = Path(pred)
    if p.is_file():
        ending = file_ending or _ending_of(p.name, (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".tif",
                                                    ".tiff")) or p.suffix
        return {p.name[:-len(ending)]: p}, ending
    if not p.is_dir():
        raise SemiSAMError(f"prediction not found: {p}")
    dj = _read_json(p / "dataset.json") if (p / "dataset.json").is_file() else {}
    ending = file_ending or dj.get("file_ending") or DEFAULT_ENDING
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.name.lower().endswith(ending.lower()))
    if not files:
        raise SemiSAMError(f"no prediction files *{ending} in {p}")
    return {f.name[:-len(ending)]: f for f in files}, ending


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SemiSAMError(f"cannot read {path}: {e}") from None


def segments_from_dataset_json(path: str | os.PathLike) -> list[Segment]:
    """One `Segment` per foreground label of an nnU-Net dataset.json (`ignore` left out), numbered 1.. by value.

    Region-based label definitions (lists of values) are refused: their exported label map has no one-class-per-
    value meaning for a DICOM-SEG segment."""
    dj = _read_json(Path(path))
    labels = dj.get("labels")
    if not isinstance(labels, dict):
        raise SemiSAMError(f"{path} has no 'labels' dictionary")
    found = []
    for name, v in labels.items():
        if name == "ignore":
            continue
        if isinstance(v, (list, tuple)):
            raise SemiSAMError(f"{path}: label {name!r} is region-based ({v}); DICOM-SEG export needs one value per "
                               "class")
        if int(v) > 0:
            found.append((int(v), str(name)))
    if not found:
        raise SemiSAMError(f"{path} defines no foreground label")
    return [Segment(i + 1, v, n) for i, (v, n) in enumerate(sorted(found))]


def _dataset_json_for(pred: Path, labels: str | os.PathLike | None) -> Path:
    if labels is not None:
        if not Path(labels).is_file():
            raise SemiSAMError(f"--labels file not found: {labels}")
        return Path(labels)
    folder = pred if pred.is_dir() else pred.parent
    if not (folder / "dataset.json").is_file():
        raise SemiSAMError(f"no dataset.json in {folder} (nnUNetv2_predict writes one next to its predictions); "
                           "give --labels path/to/dataset.json for the class names")
    return folder / "dataset.json"


def pair_sources(predictions: dict[str, Path], source: str | os.PathLike, ending: str) -> list[ExportCase]:
    """The source of every prediction case (module docstring), or a one-line error for the first case without one."""
    src = Path(source)
    if src.is_file():
        if len(predictions) != 1:
            raise SemiSAMError(f"source {src} is one image but there are {len(predictions)} predictions; give the "
                               "folder of source images or DICOM series")
        (cid, pred), = predictions.items()
        return [ExportCase(cid, pred, src)]
    if not src.is_dir():
        raise SemiSAMError(f"source not found: {src}")
    series: dict[str, DicomSeries] | None = None
    cases = []
    for cid, pred in sorted(predictions.items()):
        image = next((f for f in (src / f"{cid}_0000{ending}", src / f"{cid}{ending}") if f.is_file()), None)
        if image is not None:
            cases.append(ExportCase(cid, pred, image))
            continue
        if series is None:
            series = dicom_cases(src)
            if len(predictions) == 1 and len(series) == 1:
                series = {cid: next(iter(series.values()))}
        if cid not in series:
            raise SemiSAMError(f"no source for case {cid} in {src} (expected {cid}_0000{ending}, {cid}{ending} or a "
                               f"DICOM series folder {cid}/)")
        cases.append(ExportCase(cid, pred, series[cid]))
    return cases


# ---------------------------------------------------------------------------------------------------- geometry

def check_same_grid(image: Any, reference: Any, what: str, reference_name: str) -> None:
    """One-line SemiSAMError unless SimpleITK image `image` lies on `reference`'s voxel grid (module docstring)."""
    if image.GetSize() != reference.GetSize():
        raise SemiSAMError(f"{what} has size {image.GetSize()}, its source {reference_name} {reference.GetSize()} "
                           "(x, y, z); it is not a prediction of that image")
    sp, rsp = np.array(image.GetSpacing()), np.array(reference.GetSpacing())
    if not np.allclose(sp, rsp, rtol=SPACING_RTOL, atol=0):
        raise SemiSAMError(f"{what} has spacing {tuple(np.round(sp, 6))}, its source {reference_name} "
                           f"{tuple(np.round(rsp, 6))}")
    d, rd = np.array(image.GetDirection()), np.array(reference.GetDirection())
    if np.abs(d - rd).max() > DIRECTION_ATOL:
        raise SemiSAMError(f"{what} has direction {tuple(np.round(d, 5))}, its source {reference_name} "
                           f"{tuple(np.round(rd, 5))}")
    off = float(np.abs(np.array(image.GetOrigin()) - np.array(reference.GetOrigin())).max())
    if off > ORIGIN_VOXEL_FRACTION * float(rsp.min()):
        raise SemiSAMError(f"{what}'s origin is {off:.4g} mm away from that of its source {reference_name}")


def _read_image(path: Path) -> Any:
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise SemiSAMError(f"cannot read {path}: {str(e).strip().splitlines()[-1][:160]}") from None


def read_label_map(path: Path) -> tuple[Any, np.ndarray]:
    """(SimpleITK image, integer array (Z, Y, X); a 2D image as (1, Y, X)) of a segmentation file."""
    import SimpleITK as sitk

    img = _read_image(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise SemiSAMError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per pixel; a segmentation "
                           "has one")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise SemiSAMError(f"{path} holds non-integer values; it is not a label map")
    arr = arr.astype(np.int64)
    return img, (arr[None] if arr.ndim == 2 else arr)


def write_nifti(label_map: np.ndarray, reference: Any, output: str | os.PathLike) -> None:
    """Write `label_map` (Z, Y, X) with the geometry of SimpleITK image `reference` through nnU-Net's writer
    (`SimpleITKIO.write_seg`), atomically."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    props = {"sitk_stuff": {"spacing": reference.GetSpacing(), "origin": reference.GetOrigin(),
                            "direction": reference.GetDirection()}}
    with atomic_path(output) as tmp:
        SimpleITKIO().write_seg(np.asarray(label_map), tmp, props)


# ------------------------------------------------------------------------------------------------------ export

def export_predictions(pred: str | os.PathLike, source: str | os.PathLike, output_dir: str | os.PathLike,
                       fmt: str = "nifti", trainer: str | None = None, algorithm_name: str | None = None,
                       labels: str | os.PathLike | None = None, file_ending: str | None = None,
                       series_number: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Export every prediction case (module docstring); returns one record per case (case, output, frames/None).

    trainer / algorithm_name: the DICOM-SEG algorithm identification (`algorithm_name_for`). labels: a dataset.json
    for the class names (default: the one nnUNetv2_predict wrote next to the predictions). All inputs are checked
    and every case resolved (DICOM geometry checked) before the first output is written.
    """
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise SemiSAMError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    predictions, ending = list_predictions(pred, file_ending)
    cases = pair_sources(predictions, source, ending)
    segments: list[Segment] = []
    name = ""
    if fmt == "dicom-seg":
        not_dicom = [c for c in cases if not c.is_dicom]
        if not_dicom:
            raise SemiSAMError(f"DICOM-SEG needs a DICOM series as source; case {not_dicom[0].case_id}'s source "
                               f"{not_dicom[0].source} is not DICOM (use --format nifti, or -s the DICOM folder)")
        name = algorithm_name_for(trainer, algorithm_name)
        segments = segments_from_dataset_json(_dataset_json_for(Path(pred), labels))
    for case in cases:
        if case.is_dicom:
            check_series_geometry(case.source)
    from nnunet_semisam import __version__

    out = Path(output_dir)
    records = []
    for case in tqdm(cases, desc=f"export {fmt}", disable=not progress):
        pred_img, label_map = read_label_map(case.prediction)
        if case.is_dicom:
            ref, ref_name = read_series(case.source, check=False), f"DICOM series {case.source.directory}"
        else:
            ref, ref_name = _read_image(case.source), str(case.source)
        check_same_grid(pred_img, ref, f"prediction {case.prediction}", ref_name)
        if fmt == "nifti":
            path = out / f"{case.case_id}.nii.gz"
            write_nifti(label_map, ref, path)
            records.append({"case": case.case_id, "output": str(path), "frames": None})
            continue
        allowed = {0} | {s.value for s in segments}
        extra = sorted(set(np.unique(label_map).tolist()) - allowed)
        if extra:
            raise SemiSAMError(f"prediction {case.prediction} holds label(s) {extra[:5]} that the dataset.json does "
                               f"not define (defined: {sorted(allowed)})")
        path = out / f"{case.case_id}.dcm"
        frames = write_dicom_seg(label_map, case.source, segments, name, __version__, path,
                                 **({} if series_number is None else {"series_number": series_number}))
        records.append({"case": case.case_id, "output": str(path), "frames": frames})
    return records
