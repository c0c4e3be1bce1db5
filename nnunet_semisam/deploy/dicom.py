"""DICOM in and out (METHODS.md §5.8): series discovery, series -> image with its geometry, DICOM-SEG writing.

This module is the only one that reads or writes DICOM. Reading uses SimpleITK's GDCM series reader (a core
dependency); DICOM-SEG writing uses the optional `highdicom` and `pydicom` (`pip install 'nnunet-semisam[dicom]'`),
imported inside the functions, with a one-line error naming the extra when they are missing.

Cases. A *case folder* holds exactly one DICOM series, in any depth of sub-folders (TCIA's `patient/study/series/`
layout included). `dicom_cases(root)` maps case identifiers to series:
- `root` itself holds one series and no sub-folder does: one case, named after `root` (`--case-id` overrides);
- otherwise each immediate sub-folder of `root` that holds a series is a case named after the sub-folder (characters
  outside `[A-Za-z0-9_-]` become `_`). A sub-folder with two or more series is an error naming it: split it into one
  folder per series (a study folder's localizer next to its CT, for example).
`nnunet-semisam dicom-to-nifti ROOT OUT` writes `OUT/<case>_0000.nii.gz` with this naming, so the predictions of
`nnUNetv2_predict -i OUT` carry the case identifiers that `nnunet-semisam export -s ROOT` looks up again.

Geometry. Slices are ordered as GDCM sorts them (by position along the slice normal). Before a series is read, every
slice is checked: one orientation (ImageOrientationPatient), single-frame files, positions on one line along the
normal (no gantry tilt) and regularly spaced (no gaps, no two slices at one position): otherwise a one-line error,
because nnU-Net needs a regular grid and SimpleITK would silently average an irregular spacing. The image keeps the
DICOM geometry: origin = ImagePositionPatient of the first slice, direction columns = row direction, column
direction, slice normal (LPS, as SimpleITK reports it), spacing = (column spacing, row spacing, slice distance).
Voxel values are the modality values (RescaleSlope / RescaleIntercept applied, e.g. HU for CT).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path

DICOM_EXTRA = "pip install 'nnunet-semisam[dicom]'"
ORIENTATION_TOL = 1e-4  # max difference of direction cosines between slices of one series
SPACING_RTOL = 1e-2  # slice distances may differ by 1 % of their mean
SEG_SERIES_NUMBER = 300  # default SeriesNumber of an exported DICOM-SEG series
# generic coding of a segment whose anatomy the exporter does not know (SNOMED CT "Tissue"); the segment's name is
# its SegmentLabel
_TISSUE = ("85756007", "SCT", "Tissue")

_TAG_POSITION, _TAG_ORIENTATION, _TAG_FRAMES = "0020|0032", "0020|0037", "0028|0008"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its case identifier, the folder it was found in, its SeriesInstanceUID and its files in
    SimpleITK's slice order (slice k of the image read from them is `files[k]`)."""

    case_id: str
    directory: str
    series_uid: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Segment:
    """A DICOM-SEG segment: its number (1, 2, ...), the label value it encodes and its name (SegmentLabel)."""

    number: int
    value: int
    name: str


def require_dicom_packages() -> tuple[Any, Any]:
    """(highdicom, pydicom), or a one-line SemiSAMError naming the `[dicom]` extra."""
    try:
        import highdicom
        import pydicom
    except ImportError as e:
        raise SemiSAMError(f"DICOM-SEG export needs the optional packages highdicom and pydicom: {DICOM_EXTRA} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return highdicom, pydicom


# ---------------------------------------------------------------------------------------------------- discovery

def find_series(folder: str | os.PathLike) -> list[tuple[str, str, tuple[str, ...]]]:
    """Every DICOM series under `folder` (recursive) as (directory, SeriesInstanceUID, files in slice order).

    Files of one series in several directories count once per directory (GDCM reads one directory at a time)."""
    import SimpleITK as sitk

    found = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if not any(not f.startswith(".") for f in files):
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(d):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(d, uid)
            if names:
                found.append((d, str(uid), tuple(str(n) for n in names)))
    return found


def dicom_cases(root: str | os.PathLike, case_id: str | None = None) -> dict[str, DicomSeries]:
    """Case identifier -> series for a DICOM folder (module docstring: one series per case folder).

    `case_id` names the case when `root` itself is one series. Returns {} when there is no DICOM series under
    `root`. Raises a one-line SemiSAMError for a case folder with several series.
    """
    from nnunet_semisam.data.converters.common import safe_case_id

    root = Path(root)
    if not root.is_dir():
        raise SemiSAMError(f"DICOM folder not found: {root}")
    own, per_sub = [], {}
    for s in find_series(root):
        rel = Path(os.path.relpath(s[0], root))
        if rel == Path("."):
            own.append(s)
        else:
            per_sub.setdefault(root / rel.parts[0], []).append(s)
    if own and not per_sub:
        if len(own) > 1:
            raise SemiSAMError(f"DICOM folder {root} holds {len(own)} series; give one folder per series")
        d, uid, files = own[0]
        cid = safe_case_id(case_id or root.name)
        return {cid: DicomSeries(cid, d, uid, files)}
    if own:
        raise SemiSAMError(f"DICOM folder {root} holds a series and sub-folders with series; give one folder per "
                           "case (a series, or sub-folders that each hold one series)")
    if case_id is not None and per_sub:
        raise SemiSAMError(f"a case name ({case_id!r}) is for a folder that is one series; {root} holds case folders, "
                           "named after themselves")
    cases: dict[str, DicomSeries] = {}
    for p, series in sorted(per_sub.items()):
        if len(series) > 1:
            where = ", ".join(sorted({os.path.relpath(s[0], p) for s in series}))[:200]
            raise SemiSAMError(f"case folder {p} holds {len(series)} DICOM series ({where}); give one folder per "
                               "series (the case is the sub-folder that holds it)")
        cid = safe_case_id(p.name)
        if cid in cases:
            raise SemiSAMError(f"case folders {cases[cid].directory} and {p} both give case identifier {cid!r}")
        d, uid, files = series[0]
        cases[cid] = DicomSeries(cid, d, uid, files)
    return cases


# ----------------------------------------------------------------------------------------------------- reading

def _slice_info(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(ImagePositionPatient (3,), ImageOrientationPatient (6,), NumberOfFrames) of one file's header."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise SemiSAMError(f"cannot read DICOM file {path}: {str(e).strip().splitlines()[-1][:160]}") from None

    def floats(tag: str, n: int, what: str) -> np.ndarray:
        if not r.HasMetaDataKey(tag):
            raise SemiSAMError(f"DICOM file {path} has no {what} ({tag.replace('|', ',')}); cannot place the slice")
        try:
            v = np.array([float(x) for x in r.GetMetaData(tag).strip().split("\\")])
        except ValueError:
            v = np.zeros(0)
        if v.shape != (n,) or not np.isfinite(v).all():
            raise SemiSAMError(f"DICOM file {path}: {what} {r.GetMetaData(tag).strip()!r} is not {n} numbers")
        return v

    frames = int(float(r.GetMetaData(_TAG_FRAMES).strip() or 1)) if r.HasMetaDataKey(_TAG_FRAMES) else 1
    return floats(_TAG_POSITION, 3, "ImagePositionPatient"), floats(_TAG_ORIENTATION, 6, "ImageOrientationPatient"), \
        frames


def check_series_geometry(series: DicomSeries) -> None:
    """One-line SemiSAMError unless the series is a regular grid (module docstring, "Geometry")."""
    info = [_slice_info(f) for f in series.files]
    where = f"DICOM series {series.directory}"
    multi = [f for f, (_, _, n) in zip(series.files, info) if n > 1]
    if multi:
        raise SemiSAMError(f"{where}: {multi[0]} is a multi-frame image; give single-frame slices")
    orient = np.stack([o for _, o, _ in info])
    if np.abs(orient - orient[0]).max() > ORIENTATION_TOL:
        raise SemiSAMError(f"{where} mixes slice orientations (ImageOrientationPatient); give one series per "
                           "orientation")
    if len(info) < 2:
        return
    normal = np.cross(orient[0, :3], orient[0, 3:])
    pos = np.stack([p for p, _, _ in info])
    along = (pos - pos[0]) @ normal
    gaps = np.diff(along)
    mean = float(gaps.mean())
    if np.abs(gaps).min() < 1e-3:
        raise SemiSAMError(f"{where}: two slices lie at the same position (several acquisitions or series in one "
                           "folder?)")
    if np.abs(gaps - mean).max() > SPACING_RTOL * abs(mean):
        raise SemiSAMError(f"{where}: irregular slice spacing ({np.abs(gaps).min():.4g} to "
                           f"{np.abs(gaps).max():.4g} mm; missing slices?); nnU-Net needs a regular grid")
    off_line = pos - pos[0] - along[:, None] * normal[None]
    if np.linalg.norm(off_line, axis=1).max() > SPACING_RTOL * abs(mean):
        raise SemiSAMError(f"{where}: slice positions do not follow the slice normal (gantry tilt or sheared "
                           "volume); resample it to a regular grid first")


def read_series(series: DicomSeries, check: bool = True) -> Any:
    """The series as a SimpleITK image (geometry and modality values as in the module docstring), checked first
    (`check_series_geometry`) unless `check` is False (the caller checked it)."""
    import SimpleITK as sitk

    if check:
        check_series_geometry(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise SemiSAMError(f"cannot read DICOM series {series.directory}: "
                           f"{str(e).strip().splitlines()[-1][:160]}") from None


def dicom_to_nifti(root: str | os.PathLike, output_dir: str | os.PathLike, case_id: str | None = None,
                   channel: int = 0, progress: bool = True) -> list[Path]:
    """Write every case of a DICOM folder as `output_dir/<case>_<channel:04d>.nii.gz` (nnU-Net's image naming),
    geometry and modality values kept. Every case is resolved and its geometry checked before anything is written;
    each file is written atomically. Returns the written paths."""
    from tqdm import tqdm

    from nnunet_semisam.data.converters.common import write_sitk

    cases = dicom_cases(root, case_id)
    if not cases:
        raise SemiSAMError(f"no DICOM series under {root}")
    for series in cases.values():
        check_series_geometry(series)
    out = Path(output_dir)
    written = []
    for cid, series in tqdm(sorted(cases.items()), desc="dicom-to-nifti", disable=not progress):
        path = out / f"{cid}_{int(channel):04d}.nii.gz"
        write_sitk(read_series(series, check=False), path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------- DICOM-SEG

def write_dicom_seg(label_map: np.ndarray, series: DicomSeries, segments: Sequence[Segment], algorithm_name: str,
                    algorithm_version: str, output: str | os.PathLike, series_number: int = SEG_SERIES_NUMBER,
                    series_description: str | None = None) -> int:
    """Write a BINARY DICOM-SEG of `label_map` referencing the source `series`; return its number of frames.

    label_map: (Z, Y, X) integer array on the series' grid, slice k belonging to `series.files[k]` (the image
    `read_series` returns). One segment per entry of `segments` (pixels == `value`), each with
    SegmentAlgorithmType AUTOMATIC and the algorithm identification `algorithm_name` / `algorithm_version` (family
    "Artificial Intelligence"). Frames without a pixel of their segment are omitted (highdicom keeps every frame only
    when all are empty, since a SEG needs one). Written atomically to `output`.
    """
    hd, pydicom = require_dicom_packages()
    from pydicom.sr.coding import Code
    from pydicom.sr.codedict import codes

    from nnunet_semisam import __version__

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    lm = np.asarray(label_map)
    if lm.ndim != 3 or lm.shape[0] != len(sources) or lm.shape[1:] != (int(sources[0].Rows),
                                                                         int(sources[0].Columns)):
        raise SemiSAMError(f"label map of shape {lm.shape} does not fit DICOM series {series.directory} "
                           f"({len(sources)} slices of {sources[0].Rows} x {sources[0].Columns})")
    if not segments:
        raise SemiSAMError("no foreground label to export as a DICOM-SEG segment")
    stack = np.stack([lm == s.value for s in segments], axis=-1)  # (Z, Y, X, S): stacked segments
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=algorithm_version, source="nnunet-semisam")
    tissue = Code(*_TISSUE)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=s.number, segment_label=s.name[:64], segmented_property_category=tissue,
        segmented_property_type=tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for s in segments]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stack, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=int(series_number),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="nnunet-semisam",
        manufacturer_model_name=algorithm_name[:64], software_versions=__version__, device_serial_number="0",
        omit_empty_frames=True, content_label="SEGMENTATION",
        content_description=(series_description or algorithm_name)[:64],
        series_description=(series_description or f"{algorithm_name} segmentation")[:64])
    with atomic_path(output, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return int(seg.NumberOfFrames)
