"""Merge several nnU-Net raw datasets into one multi-task dataset for VerSemi (METHODS.md §6.1).

`merge_datasets(sources, out_id, name)` reads K source datasets (`$nnUNet_raw/DatasetXXX_*`, each with its own
`imagesTr/labelsTr`, optional `imagesUnlabeled/` and `imagesTs/labelsTs`) and writes `DatasetYYY_<name>/`:

- **Task k** (1..K) is the k-th source, in the order given. Each labeled case keeps a binary mask of its own task,
  stored with the value k (0 elsewhere): the mask is binary per case, and the value tells nnU-Net's label manager
  how many tasks there are. `dataset.json` labels are `background: 0`, one label per task, and `union: K+1` (the
  synthetic task of METHODS.md §6.3, never present in a label file but the value `nnUNetv2_predict` writes for it).
- **Per-source intensity normalisation.** A merged dataset has one normalisation scheme per channel, while the
  sources may need different ones (a CT and an MR source). Each source's images are therefore normalised at merge
  time with the scheme nnU-Net would pick for that source alone (from its own `channel_names`): `CT` = clip to the
  0.5/99.5 percentiles of the source's labeled foreground voxels and z-score with their mean/std; `noNorm` = as is;
  `rescale_to_0_1` = per-case min/max; `rgb_to_0_1` = /255; anything else = per-case z-score (nnU-Net's default).
  The merged channels are declared `noNorm`, so nnU-Net's preprocessing leaves them alone. (nnU-Net's z-score may
  restrict itself to the nonzero mask when cropping shrinks the images; the merge always uses the whole image.)
- **Task channel.** One extra, last input channel holding the constant task id of the case (also `noNorm`, so it
  survives preprocessing unchanged). `nnUNetv2_predict` hands the network nothing but the image, so this channel is
  how each case's task reaches the dynamic head at inference (METHODS.md §6.6); the backbone never sees it.
- **Sidecar** `versemi_tasks.json`: K, the union task id, the task channel index, per task its source dataset,
  normalisation schemes (with the CT statistics), and the task id of every case (labeled, unlabeled, test).

Images are written as NIfTI (`.nii.gz`, float32), labels as uint8 NIfTI, whatever the sources' formats. The dataset
is built in a temporary folder next to the target and renamed into place (atomic). One-line `SemiSAMError`s: a source
without dataset.json, sources with different channel counts or dimensionality, a case name used twice (pass
`prefix_cases=True` to prefix every case with `t<k>_`), an existing target.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.unlabeled import (UNLABELED_IMAGES, channel_files_per_case, load_dataset_json,
                                           raw_case_ids, read_case, reader_writer_class, unlabeled_image_lists)
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_write_json

SIDECAR = "versemi_tasks.json"
FILE_ENDING = ".nii.gz"
GROUPS = (("imagesTr", "labelsTr", "labeled"), (UNLABELED_IMAGES, None, "unlabeled"), ("imagesTs", "labelsTs", "test"))


def load_sidecar(raw_folder: str | os.PathLike) -> dict:
    """`versemi_tasks.json` of a merged dataset, one-line error if missing or unreadable."""
    path = Path(raw_folder) / SIDECAR
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SemiSAMError(f"{path} does not exist: build the dataset with `nnunet-semisam merge-datasets`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SemiSAMError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None


def normalisation_scheme(channel_name: str) -> str:
    """The scheme nnU-Net's `get_normalization_scheme` picks for a channel name, as a short key."""
    key = channel_name.casefold()
    return key if key in ("ct", "nonorm", "rescale_to_0_1", "rgb_to_0_1") else "zscore"


def ct_statistics(values: np.ndarray) -> dict:
    """nnU-Net's CT fingerprint of foreground intensities: 0.5/99.5 percentiles, mean, std."""
    values = values.astype(np.float64)
    return {"percentile_00_5": float(np.percentile(values, 0.5)), "percentile_99_5": float(np.percentile(values, 99.5)),
            "mean": float(values.mean()), "std": float(values.std())}


def normalise_channel(x: np.ndarray, scheme: str, ct_stats: dict | None = None) -> np.ndarray:
    """One channel normalised with `scheme` (see the module docstring); float32."""
    x = x.astype(np.float32)
    if scheme == "ct":
        x = np.clip(x, ct_stats["percentile_00_5"], ct_stats["percentile_99_5"])
        return ((x - ct_stats["mean"]) / max(ct_stats["std"], 1e-8)).astype(np.float32)
    if scheme == "nonorm":
        return x
    if scheme == "rescale_to_0_1":
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    if scheme == "rgb_to_0_1":
        return (x / 255.0).astype(np.float32)
    return ((x - x.mean()) / max(float(x.std()), 1e-8)).astype(np.float32)


class _Source:
    """One source dataset: its folder, dataset.json, reader and cases per group."""

    def __init__(self, dataset: int | str, task: int):
        from nnunet_semisam.data.nnunet_paths import dataset_name, require_env

        self.task = task
        self.folder = require_env("nnUNet_raw") / dataset_name(dataset)
        if not (self.folder / "dataset.json").is_file():
            raise SemiSAMError(f"{self.folder / 'dataset.json'} does not exist: source dataset {dataset} is not an "
                               f"nnU-Net raw dataset")
        self.dj = load_dataset_json(self.folder)
        self.ending = self.dj["file_ending"]
        self.reader = reader_writer_class(self.folder, self.dj)
        self.n_files = channel_files_per_case(self.folder, self.dj)
        self.channel_names = [self.dj["channel_names"][k] for k in sorted(self.dj["channel_names"], key=int)]
        self.schemes = [normalisation_scheme(c) for c in self.channel_names]
        self.cases: dict[str, dict[str, list[str]]] = {}
        for images, _, group in GROUPS:
            if images == UNLABELED_IMAGES:
                self.cases[group] = unlabeled_image_lists(self.folder, self.dj)
                continue
            ids = sorted(raw_case_ids(self.folder / images, self.ending))
            self.cases[group] = {c: [str(self.folder / images / f"{c}_{i:04d}{self.ending}")
                                     for i in range(self.n_files)] for c in ids}
        if not self.cases["labeled"]:
            raise SemiSAMError(f"{self.folder / 'imagesTr'} holds no labeled case")
        self.ct_stats: dict | None = None

    def label_file(self, labels_folder: str, case: str) -> Path:
        return self.folder / labels_folder / f"{case}{self.ending}"

    def read_label(self, labels_folder: str, case: str) -> tuple[np.ndarray, dict]:
        path = self.label_file(labels_folder, case)
        if not path.is_file():
            raise SemiSAMError(f"{path} is missing: every image of {path.parent.parent.name}/"
                               f"{'imagesTr' if labels_folder == 'labelsTr' else 'imagesTs'} needs its label")
        seg, props = self.reader().read_seg(str(path))
        return seg[0], props

    def fit_ct_statistics(self) -> None:
        """CT channels: the source's foreground statistics over its labeled cases (as nnU-Net's fingerprint)."""
        ct = [i for i, s in enumerate(self.schemes) if s == "ct"]
        if not ct:
            return
        values: dict[int, list[np.ndarray]] = {i: [] for i in ct}
        for case, files in self.cases["labeled"].items():
            data, _ = read_case(case, files, self.reader)
            seg, _ = self.read_label("labelsTr", case)
            fg = seg > 0
            for i in ct:
                values[i].append(data[i][fg] if fg.any() else data[i].ravel())
        self.ct_stats = {str(i): ct_statistics(np.concatenate(v)) for i, v in values.items()}


def _write_nifti(path: Path, arr: np.ndarray, props: dict, is2d: bool) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr[0] if is2d else arr)
    stuff = props.get("sitk_stuff")
    if stuff is not None and len(stuff["spacing"]) == img.GetDimension():
        img.SetSpacing(stuff["spacing"])
        img.SetOrigin(stuff["origin"])
        img.SetDirection(stuff["direction"])
    else:
        spacing = [float(s) for s in props["spacing"]][1:] if is2d else [float(s) for s in props["spacing"]]
        img.SetSpacing(spacing[::-1])
    sitk.WriteImage(img, str(path), True)


def merge_datasets(sources: Sequence[int | str], out_id: int, name: str, prefix_cases: bool = False,
                   overwrite: bool = False, progress: bool = False) -> Path:
    """Build `$nnUNet_raw/DatasetYYY_<name>/` from `sources` (module docstring); returns its folder."""
    import re

    from tqdm import tqdm

    from nnunet_semisam.data.nnunet_paths import require_env

    if len(sources) < 2:
        raise SemiSAMError(f"merge-datasets needs at least 2 source datasets, got {len(sources)}")
    if not 1 <= int(out_id) <= 999:
        raise SemiSAMError(f"output dataset id must be in 1..999, got {out_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SemiSAMError(f"dataset name {name!r} must contain only letters, digits, '_' and '-'")
    raw = require_env("nnUNet_raw")
    target = raw / f"Dataset{int(out_id):03d}_{name}"
    clash = sorted(p.name for p in raw.glob(f"Dataset{int(out_id):03d}_*") if p.name != target.name)
    if clash:
        raise SemiSAMError(f"{raw / clash[0]} already uses dataset id {out_id}; pick another -o")
    if target.exists() and not overwrite:
        raise SemiSAMError(f"{target} exists; pass --overwrite to replace it")

    srcs = [_Source(d, k + 1) for k, d in enumerate(sources)]
    if len({s.folder for s in srcs}) < len(srcs):
        raise SemiSAMError("a source dataset is given twice")
    first = srcs[0]
    for s in srcs[1:]:
        if len(s.channel_names) != len(first.channel_names):
            raise SemiSAMError(f"{s.folder.name} has {len(s.channel_names)} channel(s) but {first.folder.name} has "
                               f"{len(first.channel_names)}: sources must have the same number of channels")
    num_channels = len(first.channel_names)
    K = len(srcs)

    # case names: unique over all sources and groups
    owner: dict[str, str] = {}
    renamed: dict[tuple[int, str], str] = {}
    for s in srcs:
        for group, cases in s.cases.items():
            for case in cases:
                new = f"t{s.task}_{case}" if prefix_cases else case
                if new in owner:
                    raise SemiSAMError(f"case name {new!r} occurs in {owner[new]} and in {s.folder.name}/{group}: "
                                       f"rename it or pass --prefix-cases")
                owner[new] = f"{s.folder.name}/{group}"
                renamed[(s.task, case)] = new

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=raw))
    try:
        for images, labels, _ in GROUPS:
            (tmp / images).mkdir()
            if labels:
                (tmp / labels).mkdir()
        sidecar_cases: dict[str, dict[str, int]] = {g: {} for _, _, g in GROUPS}
        dims: dict[bool, str] = {}
        jobs = [(s, images, labels, group, case, files) for s in srcs for images, labels, group in GROUPS
                for case, files in sorted(s.cases[group].items())]
        for s in srcs:
            s.fit_ct_statistics()
        for s, images, labels, group, case, files in tqdm(jobs, desc=f"merge-datasets {target.name}",
                                                          disable=not progress):
            data, props = read_case(case, files, s.reader)
            is2d = float(props["spacing"][0]) == 999
            dims.setdefault(is2d, s.folder.name)
            if len(dims) > 1:
                raise SemiSAMError(f"{dims[True]} is 2D but {dims[False]} is 3D: sources must have the same "
                                   f"dimensionality")
            if data.shape[0] != num_channels:
                raise SemiSAMError(f"{files[0]}: {data.shape[0]} channel(s), but {s.folder.name}'s dataset.json "
                                   f"declares {num_channels}")
            new = renamed[(s.task, case)]
            for i in range(num_channels):
                ct = s.ct_stats[str(i)] if s.ct_stats and str(i) in s.ct_stats else None
                _write_nifti(tmp / images / f"{new}_{i:04d}{FILE_ENDING}",
                             normalise_channel(data[i], s.schemes[i], ct), props, is2d)
            _write_nifti(tmp / images / f"{new}_{num_channels:04d}{FILE_ENDING}",
                         np.full(data.shape[1:], float(s.task), np.float32), props, is2d)
            if labels:
                seg, seg_props = s.read_label(labels, case)
                if seg.shape != data.shape[1:]:
                    raise SemiSAMError(f"{s.label_file(labels, case)}: label shape {seg.shape} differs from its "
                                       f"image {data.shape[1:]}")
                _write_nifti(tmp / labels / f"{new}{FILE_ENDING}", ((seg > 0) * s.task).astype(np.uint8),
                             seg_props, is2d)
            sidecar_cases[group][new] = s.task

        task_names = {}
        for s in srcs:
            label_names = [k for k, v in s.dj["labels"].items() if k != "background" and v != 0]
            task_names[s.task] = re.sub(r"[^A-Za-z0-9_\-]", "_", "_".join(label_names) or s.folder.name)
        labels_json = {"background": 0}
        for k in range(1, K + 1):
            labels_json[f"task{k}_{task_names[k]}"] = k
        labels_json["union"] = K + 1
        dataset_json = {
            "channel_names": {str(i): "noNorm" for i in range(num_channels + 1)},
            "labels": labels_json,
            "numTraining": len(sidecar_cases["labeled"]),
            "file_ending": FILE_ENDING,
            "numUnlabeled": len(sidecar_cases["unlabeled"]),
            "numTest": len(sidecar_cases["test"]),
            "name": target.name,
            "description": f"merged by nnunet-semisam merge-datasets from {', '.join(s.folder.name for s in srcs)}; "
                           f"channel {num_channels} is the task id (METHODS.md §6.1)",
        }
        sidecar = {
            "num_tasks": K,
            "union_task": K + 1,
            "task_channel": num_channels,
            "tasks": {str(s.task): {"source": s.folder.name, "name": task_names[s.task],
                                    "source_channel_names": s.channel_names, "normalisation": s.schemes,
                                    "ct_statistics": s.ct_stats} for s in srcs},
            "cases": {case: task for group in sidecar_cases.values() for case, task in group.items()},
            "groups": sidecar_cases,
        }
        atomic_write_json(tmp / SIDECAR, sidecar)
        atomic_write_json(tmp / "dataset.json", dataset_json)
        for images, labels, group in GROUPS:  # nnU-Net expects no empty optional folders
            if not sidecar_cases[group] and images != "imagesTr":
                shutil.rmtree(tmp / images)
                if labels:
                    shutil.rmtree(tmp / labels)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_images(merged: int | str, task: int, images: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """New images of task `task` -> inputs of the merged dataset's model, in `out`: each case's channels normalised
    as `merge-datasets` normalised its source (scheme and CT statistics from `versemi_tasks.json`) plus the constant
    task channel, as NIfTI. `images` holds `CASE_XXXX<ending>` files in the source's format. Returns the case ids."""
    from nnunet_semisam.data.nnunet_paths import raw_dataset_folder

    folder = raw_dataset_folder(merged)
    side = load_sidecar(folder)
    if str(task) not in side["tasks"]:
        raise SemiSAMError(f"task {task} is not a task of {folder.name} (tasks 1..{side['num_tasks']})")
    info = side["tasks"][str(task)]
    src = _Source(info["source"], int(task))
    ids = sorted(raw_case_ids(images, src.ending))
    if not ids:
        raise SemiSAMError(f"{images} holds no CASE_XXXX{src.ending} image")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = info.get("ct_statistics") or {}
    for case in ids:
        files = [str(Path(images) / f"{case}_{i:04d}{src.ending}") for i in range(src.n_files)]
        data, props = read_case(case, files, src.reader)
        is2d = float(props["spacing"][0]) == 999
        for i in range(data.shape[0]):
            _write_nifti(out / f"{case}_{i:04d}{FILE_ENDING}",
                         normalise_channel(data[i], info["normalisation"][i], stats.get(str(i))), props, is2d)
        _write_nifti(out / f"{case}_{side['task_channel']:04d}{FILE_ENDING}",
                     np.full(data.shape[1:], float(task), np.float32), props, is2d)
    return ids
