"""Shared machinery of the dataset converters: layout checks, splits, atomic case writers and the resumable runner.

A converter (one per dataset family, see `nnunet_semisam.data.converters`) only says how to find the *units* of a
source tree (an image, a patient), how to split them into train/test, and how to turn one unit into one or more
nnU-Net cases. `run_conversion` does the rest, the same way for every dataset:

1. scan and validate the whole source layout (a `SemiSAMError` names the first missing file) before writing anything;
2. write the plan, `conversion.json`, into `DatasetNNN_Name/` (the train/test split of the units and the options);
   a rerun with other options or another split is refused, a rerun with the same ones resumes;
3. convert the units (`-np` worker processes, tqdm bar); every file is written through `atomic_path`, and a case
   whose files all exist is skipped, so an interrupted run is finished by running the same command again;
4. write `dataset.json` (nnU-Net's `generate_dataset_json`) last, and mark the plan complete with the case lists.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path, atomic_write_json

CONVERSION_RECORD = "conversion.json"  # the train/test split and options, written next to dataset.json
SUBSETS = ("Tr", "Ts")  # imagesTr/labelsTr (training pool) and imagesTs/labelsTs (held-out test set)
_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Unit:
    """One element of a source dataset that the split assigns to train or test as a whole.

    `uid` is the case identifier (2D images, volumes) or the patient identifier (MSD BrainTumour 2D, whose cases are
    that patient's slices). `files` maps a role ("image", "label", "dicom_dir", ...) to an absolute path.
    """

    uid: str
    files: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class CaseRecord:
    """One written nnU-Net case: its identifier, subset ("Tr"/"Ts") and the unit (patient) it came from."""

    case_id: str
    subset: str
    group: str


@dataclass
class ConvertOptions:
    """User options shared by all converters (`None` means: the converter's paper default)."""

    seed: int = 0
    resize: int | None = None  # 2D only: output size S for S x S images (bilinear) and masks (nearest)
    test_fraction: float | None = None
    num_test: int | None = None
    max_cases: int | None = None  # seeded subset of the source before the split ([KD]: 6 000 of HAM10000)
    empty_fraction: float = 0.1  # MSD BrainTumour 2D: share of tumour-free brain slices kept per patient
    num_processes: int = 1
    progress: bool = True


def safe_case_id(name: str) -> str:
    """A case identifier nnU-Net can use in file names: characters outside [A-Za-z0-9_-] become '_'."""
    out = _SAFE_ID.sub("_", name).strip("_")
    if not out:
        raise SemiSAMError(f"cannot build a case identifier from source name {name!r}")
    return out


# ----------------------------------------------------------------------------------------------- layout checks

def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a folder, else raise naming it as the first missing part of the expected layout."""
    if not path.is_dir():
        raise SemiSAMError(f"source layout mismatch: missing folder {path} ({what})")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else raise naming it as the first missing file of the expected layout."""
    if not path.is_file():
        raise SemiSAMError(f"source layout mismatch: missing file {path} ({what})")
    return path


def visible_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files of `folder` ending in one of `suffixes` (case-insensitive), sorted, skipping hidden and '._' files."""
    sfx = tuple(s.lower() for s in suffixes)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith((".", "_")) and p.name.lower().endswith(sfx))


# ------------------------------------------------------------------------------------------------------ splits

def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (484 * 0.2 = 96.8 -> 97 test patients, as [KD]'s 387/97)."""
    return int(math.floor(x + 0.5))


def number_of_test_units(n: int, opts: ConvertOptions, default_fraction: float = 0.2,
                         default_num: int | None = None) -> int:
    """Test-set size from `--num-test`, else `--test-fraction`, else the converter's paper default."""
    if opts.num_test is not None:
        k = opts.num_test
    elif opts.test_fraction is not None:
        if not 0.0 <= opts.test_fraction < 1.0:
            raise SemiSAMError(f"--test-fraction must be in [0, 1), got {opts.test_fraction}")
        k = round_half_up(opts.test_fraction * n)
    elif default_num is not None:
        k = default_num
    else:
        k = round_half_up(default_fraction * n)
    if not 0 <= k < n:
        raise SemiSAMError(f"cannot hold out {k} test cases from {n} source cases; lower --num-test/--test-fraction")
    return k


def seeded_split(uids: Sequence[str], num_test: int, seed: int) -> dict[str, str]:
    """Random train/test split: the sorted ids are permuted with `default_rng(seed)`; the first `num_test` are test."""
    order = sorted(uids)
    perm = np.random.default_rng(seed).permutation(len(order))
    test = {order[i] for i in perm[:num_test]}
    return {u: ("Ts" if u in test else "Tr") for u in order}


def tail_split(uids: Sequence[str], num_test: int) -> dict[str, str]:
    """Ordered split: the last `num_test` of the sorted ids are test (Pancreas-CT: 62 train / 20 test of 82)."""
    order = sorted(uids)
    test = set(order[len(order) - num_test:]) if num_test else set()
    return {u: ("Ts" if u in test else "Tr") for u in order}


def seeded_subset(units: Sequence[Unit], max_cases: int | None, seed: int) -> list[Unit]:
    """At most `max_cases` units, drawn without replacement with `default_rng(seed + 1)`; all units if None."""
    units = sorted(units, key=lambda u: u.uid)
    if max_cases is None or max_cases >= len(units):
        return units
    if max_cases < 2:
        raise SemiSAMError(f"--max-cases must be at least 2, got {max_cases}")
    keep = np.sort(np.random.default_rng(seed + 1).choice(len(units), size=max_cases, replace=False))
    return [units[i] for i in keep]


# ------------------------------------------------------------------------------------------------------ writers

def case_paths(dataset_dir: Path, subset: str, case_id: str, num_image_files: int, file_ending: str
               ) -> tuple[list[Path], Path]:
    """Image files `images<subset>/<case>_<cccc><ending>` and label file `labels<subset>/<case><ending>`."""
    images = [dataset_dir / f"images{subset}" / f"{case_id}_{c:04d}{file_ending}" for c in range(num_image_files)]
    return images, dataset_dir / f"labels{subset}" / f"{case_id}{file_ending}"


def case_complete(images: Sequence[Path], label: Path) -> bool:
    """True when every file of the case exists (each was renamed into place only once fully written)."""
    return label.is_file() and all(p.is_file() for p in images)


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    from PIL import Image

    if array.dtype != np.uint8:
        raise ValueError(f"PNG writer expects uint8, got {array.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_sitk(image: Any, path: Path) -> None:
    """Write a SimpleITK image (geometry included), atomically, compressed when the ending is .gz."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, useCompression=str(path).endswith(".gz"))


def resize_2d(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Resize a 2D (H, W) or RGB (H, W, 3) array to (size, size) with PIL: bilinear, or nearest for masks.

    This is what torchvision's `Resize` does on PIL images (the [KD] 256 x 256 inputs). uint8 arrays stay uint8;
    other arrays are resized per channel in float32 (PIL mode 'F').
    """
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))
    if array.ndim == 3:
        return np.stack([resize_2d(array[..., c], size, nearest) for c in range(array.shape[-1])], axis=-1)
    out = np.asarray(Image.fromarray(array.astype(np.float32)).resize((size, size), resample=resample))
    return out.astype(array.dtype) if nearest else out


def slice_geometry(volume: Any, z: int, out_shape_yx: tuple[int, int] | None = None
                   ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) of slice `z` of a 3D SimpleITK `volume`, as a one-slice 3D image.

    With `out_shape_yx` the in-plane grid is resampled to that shape over the same physical extent: the spacing
    scales by old/new size and the origin (a voxel centre) moves by half the spacing change along each axis.
    """
    spacing = np.array(volume.GetSpacing(), dtype=float)
    direction = np.array(volume.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.array(volume.TransformIndexToPhysicalPoint((0, 0, int(z))), dtype=float)
    if out_shape_yx is not None:
        size_x, size_y = volume.GetSize()[:2]
        new = spacing.copy()
        new[0] = spacing[0] * size_x / out_shape_yx[1]
        new[1] = spacing[1] * size_y / out_shape_yx[0]
        origin = origin + direction @ ((new - spacing) / 2.0)
        spacing = new
    return tuple(spacing), tuple(origin), tuple(direction.ravel())


def sitk_from_array(array: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                    direction: Sequence[float]) -> Any:
    """SimpleITK image from a (Z, Y, X) array with the given geometry (x-first, as SimpleITK reports it)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    return img


# ----------------------------------------------------------------------------------------------------- converter

class Converter:
    """Base of a dataset converter; subclasses set the class attributes and implement `scan` and `worker`.

    `worker` returns a module-level function `(unit, subset, dataset_dir, params) -> list[CaseRecord]` (picklable
    for worker processes). It must skip cases whose files all exist and write every file with `atomic_path`.
    """

    key: str = ""
    default_name: str = ""
    is_2d: bool = False  # 2D converters accept --resize
    file_ending: str = ".nii.gz"
    uses_empty_fraction: bool = False

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        raise NotImplementedError

    def split(self, units: Sequence[Unit], opts: ConvertOptions) -> dict[str, str]:
        """Default: seeded 80/20 split of the units (`--num-test` / `--test-fraction` override it)."""
        k = number_of_test_units(len(units), opts)
        return seeded_split([u.uid for u in units], k, opts.seed)

    def worker(self) -> Callable[[Unit, str, str, dict], list[CaseRecord]]:
        raise NotImplementedError

    def worker_params(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        """Picklable parameters every worker call receives (resize, seeds, channel choices...)."""
        return {"resize": opts.resize, "seed": opts.seed, "file_ending": self.file_ending}

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        """Keyword arguments for nnU-Net's `generate_dataset_json` except the folder and the case count."""
        raise NotImplementedError

    def check_options(self, opts: ConvertOptions) -> None:
        """Reject options this converter does not use, before anything is written."""
        if opts.resize is not None:
            if not self.is_2d:
                raise SemiSAMError(f"--resize applies to 2D datasets only, not to '{self.key}' (3D sets keep spacing)")
            if opts.resize < 8:
                raise SemiSAMError(f"--resize must be at least 8 pixels, got {opts.resize}")
        if not 0.0 <= opts.empty_fraction <= 1.0:
            raise SemiSAMError(f"--empty-fraction must be in [0, 1], got {opts.empty_fraction}")
        if opts.num_test is not None and opts.test_fraction is not None:
            raise SemiSAMError("give --num-test or --test-fraction, not both")
        if opts.num_processes < 1:
            raise SemiSAMError(f"-np must be at least 1, got {opts.num_processes}")


# ------------------------------------------------------------------------------------------------------- runner

def resolve_output_dir(dataset_id: int, name: str, out_root: str | os.PathLike | None) -> Path:
    """`<out_root or $nnUNet_raw>/DatasetNNN_Name`; refuses an id already used by a dataset of another name."""
    if not 1 <= dataset_id <= 999:
        raise SemiSAMError(f"--dataset-id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise SemiSAMError(f"--name must use letters, digits, '_' or '-', got {name!r}")
    if out_root is None:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise SemiSAMError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass -o OUT")
        out_root = raw
    root = Path(out_root)
    folder = f"Dataset{dataset_id:03d}_{name}"
    if root.is_dir():
        clash = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p.name != folder)
        if clash:
            raise SemiSAMError(f"dataset id {dataset_id} is already used by {root / clash[0]}; "
                               "choose another --dataset-id")
    return root / folder


def _clean_temporaries(dataset_dir: Path) -> None:
    """Remove '.tmp_*' leftovers of a run that was killed while writing (atomic_path cleans up on exceptions)."""
    for sub in [dataset_dir] + [dataset_dir / f"{k}{s}" for k in ("images", "labels") for s in SUBSETS]:
        if sub.is_dir():
            for p in sub.glob(".tmp_*"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink() if p.is_file() else shutil.rmtree(p)


def _run_job(job: tuple[Callable, Unit, str, str, dict]) -> list[CaseRecord]:
    fn, unit, subset, dataset_dir, params = job
    return fn(unit, subset, dataset_dir, params)


def _run_jobs(jobs: list[tuple], num_processes: int, desc: str, progress: bool) -> list[CaseRecord]:
    from tqdm import tqdm

    records: list[CaseRecord] = []
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                records.extend(_run_job(job))
                bar.update()
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                for recs in pool.imap_unordered(_run_job, jobs):
                    records.extend(recs)
                    bar.update()
    finally:
        bar.close()
    return records


def _write_dataset_json(dataset_dir: Path, num_training: int, fields: dict) -> None:
    """nnU-Net's `generate_dataset_json` into a temporary folder, then renamed onto dataset.json (atomic)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    tmpdir = tempfile.mkdtemp(prefix=".tmp_dsjson_", dir=dataset_dir)
    try:
        generate_dataset_json(tmpdir, num_training_cases=num_training, **fields)
        os.replace(os.path.join(tmpdir, "dataset.json"), dataset_dir / "dataset.json")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_json(path: Path) -> Any:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_conversion(converter: Converter, source: str | os.PathLike, dataset_id: int, name: str | None = None,
                   out_root: str | os.PathLike | None = None, opts: ConvertOptions | None = None) -> Path:
    """Convert `source` with `converter` into `<out_root or $nnUNet_raw>/DatasetNNN_Name`; return that folder.

    Resumable: reruns with the same options skip finished cases; a finished dataset is left untouched (also after
    `split-labels` moved cases out of imagesTr). Everything is validated before the first file is written.
    """
    opts = opts or ConvertOptions()
    converter.check_options(opts)
    src = Path(source).expanduser().resolve()
    if not src.is_dir():
        raise SemiSAMError(f"source folder {source} does not exist")
    units = converter.scan(src, opts)  # may set the default name (MSD: from TaskXX_Name)
    name = name or converter.default_name
    dataset_dir = resolve_output_dir(dataset_id, name, out_root)
    if len(units) < 2:
        raise SemiSAMError(f"found {len(units)} usable case(s) in {src}; a dataset needs at least 2")
    uids = [u.uid for u in units]
    if len(set(uids)) != len(uids):
        dup = sorted({u for u in uids if uids.count(u) > 1})[0]
        raise SemiSAMError(f"two source cases map to the same case identifier {dup!r} in {src}")
    units = seeded_subset(units, opts.max_cases, opts.seed)
    split = converter.split(units, opts)

    plan = {
        "format": converter.key,
        "dataset": dataset_dir.name,
        "options": {"seed": opts.seed, "resize": opts.resize, "test_fraction": opts.test_fraction,
                    "num_test": opts.num_test, "max_cases": opts.max_cases,
                    **({"empty_fraction": opts.empty_fraction} if converter.uses_empty_fraction else {})},
        "split": {"train": sorted(u for u, s in split.items() if s == "Tr"),
                  "test": sorted(u for u, s in split.items() if s == "Ts")},
    }
    record_path = dataset_dir / CONVERSION_RECORD
    if record_path.is_file():
        old = load_json(record_path)
        same = all(old.get(k) == plan[k] for k in ("format", "options", "split"))
        if not same:
            raise SemiSAMError(f"{dataset_dir} holds a conversion with other options or another split "
                               f"({record_path}); delete that folder or choose another --dataset-id")
        if old.get("status") == "complete" and (dataset_dir / "dataset.json").is_file():
            print(f"{dataset_dir} is already converted; nothing to do")
            return dataset_dir
    elif dataset_dir.is_dir() and any(dataset_dir.iterdir()):
        raise SemiSAMError(f"{dataset_dir} exists and was not made by this converter (no {CONVERSION_RECORD}); "
                           f"delete it or choose another --dataset-id")

    # ---- output starts here
    dataset_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {**plan, "status": "converting", "source": str(src)})
    _clean_temporaries(dataset_dir)
    for kind in ("images", "labels"):
        for s in SUBSETS:
            (dataset_dir / f"{kind}{s}").mkdir(exist_ok=True)

    fn = converter.worker()
    params = converter.worker_params(units, opts)
    jobs = [(fn, u, split[u.uid], str(dataset_dir), params) for u in units]
    records = _run_jobs(jobs, opts.num_processes, f"convert {converter.key}", opts.progress)

    train = sorted(r.case_id for r in records if r.subset == "Tr")
    test = sorted(r.case_id for r in records if r.subset == "Ts")
    if not train:
        raise SemiSAMError(f"no training case was written for {src}; check the source data")
    _write_dataset_json(dataset_dir, len(train), {**converter.dataset_json(units, opts), "numTest": len(test)})
    groups = {r.case_id: r.group for r in records if r.group != r.case_id}
    atomic_write_json(record_path, {**plan, "status": "complete", "source": str(src),
                                    "cases": {"train": train, "test": test},
                                    **({"groups": dict(sorted(groups.items()))} if groups else {})})
    print(f"wrote {dataset_dir}: {len(train)} training and {len(test)} test cases")
    return dataset_dir

