"""Unlabeled cases in nnU-Net datasets: raw-folder convention, integrity check and preprocessing (METHODS.md §1.2).

Raw format. A dataset may hold `imagesUnlabeled/` next to `imagesTr/`, with the same naming (`CASE_0000.ext`, one
file per channel, or one RGB file for nnU-Net's natural-image format) and the dataset's `file_ending`;
`dataset.json` may give `"numUnlabeled"`. nnU-Net's own fingerprint and planning only read `imagesTr/labelsTr`, so
they keep working on the labeled cases unchanged.

Preprocessed format. `preprocess_unlabeled` applies exactly the plans' preprocessing (nnU-Net's own preprocessor
class of the configuration, `run_case` with no segmentation: transpose, crop to nonzero, normalisation, resampling)
and stores each case with nnU-Net's `nnUNetDatasetBlosc2` layout in the sibling folder
`$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`:
`CASE.b2nd` (image), `CASE_seg.b2nd` (nnU-Net's nonzero mask: 0 inside, -1 outside; no label information),
`CASE.pkl` (properties; `class_locations` is empty). A `manifest.json` records which plans configuration produced
the folder, so stale cases are detected when the plans change.

Atomicity. Each case is written into a private `.partial_*` sub-folder and then moved into place with `os.replace`,
image file last. nnU-Net lists cases by their `CASE.b2nd`, so an interrupted run never leaves a listed case that is
incomplete; re-running skips finished cases and redoes the rest.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.nnunet_paths import dataset_name, preprocessed_dataset_folder, raw_dataset_folder
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_write_json

UNLABELED_IMAGES = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------------------------
# raw folder


def unlabeled_image_lists(raw_folder: str | os.PathLike, dataset_json: dict) -> dict[str, list[str]]:
    """Map case id -> sorted channel files of `imagesUnlabeled/` (empty dict if the folder does not exist).

    Raises `SemiSAMError` naming the first file whose ending differs from `dataset_json['file_ending']` or whose
    name does not follow `CASE_XXXX<ending>`.
    """
    folder = Path(raw_folder) / UNLABELED_IMAGES
    if not folder.is_dir():
        return {}
    ending = dataset_json["file_ending"]
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending))
    cases: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = folder / name
        if not name.endswith(ending):
            raise SemiSAMError(f"{path}: file ending differs from dataset.json file_ending {ending!r}")
        m = pattern.fullmatch(name)
        if m is None:
            raise SemiSAMError(f"{path}: expected a name like CASE_0000{ending} (case id, 4-digit channel index)")
        cases.setdefault(m.group(1), []).append(str(path))
    return cases


def reader_writer_class(raw_folder: str | os.PathLike, dataset_json: dict):
    """nnU-Net's reader/writer class for the dataset, chosen from a labeled training image as nnU-Net's planner does
    (or `overwrite_image_reader_writer` in dataset.json), so broken unlabeled files cannot mislead the choice."""
    import contextlib
    import io

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ending = dataset_json["file_ending"]
    examples = sorted((Path(raw_folder) / "imagesTr").glob(f"*{ending}"))
    if not examples:
        raise SemiSAMError(f"{Path(raw_folder) / 'imagesTr'} holds no {ending} image to choose a reader from")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return determine_reader_writer_from_dataset_json(dataset_json, str(examples[0]),
                                                         allow_nonmatching_filename=True, verbose=False)


def _check_case(args: tuple) -> str | None:
    """Return None if the case is fine, else a one-line error naming its file.

    `args` = (case, files, dataset_json, reader_class[, geometry]) where the optional geometry `(transpose_forward, target_spacing,
    patch_size)` of a plans configuration enables the check that the resampled case is at least one patch large.
    """
    case, files, dataset_json, reader_class = args[:4]
    geometry = args[4] if len(args) > 4 else None
    expected = len(dataset_json["channel_names"])
    try:
        data, props = reader_class().read_images(files)
    except Exception as e:  # unreadable file: name it
        return f"{files[0]}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if data.shape[0] != expected:
        return (f"{files[0]}: case {case} has {data.shape[0]} channel(s) but dataset.json channel_names lists "
                f"{expected}")
    if not np.all(np.isfinite(data)):
        return f"{files[0]}: case {case} contains NaN or Inf values"
    for f in files:  # ITK's NIfTI reader silently turns NaN into 0, so look at the stored values too
        if f.endswith((".nii", ".nii.gz")):
            import nibabel

            if not np.all(np.isfinite(np.asanyarray(nibabel.load(f).dataobj))):
                return f"{f}: case {case} contains NaN or Inf values"
    spacing = props.get("spacing")
    if spacing is None or any((not np.isfinite(s)) or s <= 0 for s in spacing):
        return f"{files[0]}: case {case} has an invalid spacing {spacing}"
    if geometry is not None:
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        transpose, target_spacing, patch_size = geometry
        shape = [data.shape[1:][i] for i in transpose]
        spacing_t = [spacing[i] for i in transpose]
        target = list(target_spacing) if len(target_spacing) == len(shape) else [spacing_t[0], *target_spacing]
        new_shape = compute_new_shape(shape, spacing_t, target)[-len(patch_size):]
        if any(s < p for s, p in zip(new_shape, patch_size)):
            return (f"{files[0]}: case {case} is {tuple(int(s) for s in new_shape)} voxels after resampling, smaller "
                    f"than the patch size {tuple(patch_size)}: remove it or re-plan with a smaller patch")
    return None


def verify_unlabeled(raw_folder: str | os.PathLike, dataset_json: dict | None = None, num_processes: int = 1,
                     require_nonempty: bool = False, progress: bool = True,
                     geometry: tuple | None = None) -> int:
    """Integrity check of `imagesUnlabeled/` (like nnU-Net's --verify_dataset_integrity): naming, file ending,
    readable geometry, channel count equal to `channel_names`, no NaN/Inf, positive spacing.

    With `geometry` = (transpose_forward, target spacing, patch size) of a plans configuration, a case smaller than
    one patch after resampling is an error too. Returns the number of unlabeled cases; raises `SemiSAMError` at the
    first problem.
    """
    from tqdm import tqdm

    raw_folder = Path(raw_folder)
    if dataset_json is None:
        dataset_json = json.loads((raw_folder / "dataset.json").read_text())
    cases = unlabeled_image_lists(raw_folder, dataset_json)
    if not cases:
        if require_nonempty:
            raise SemiSAMError(f"{raw_folder / UNLABELED_IMAGES} is missing or empty: add unlabeled images "
                               f"(CASE_0000{dataset_json['file_ending']}) or use `nnunet-semisam split-labels`")
        return 0
    declared = dataset_json.get("numUnlabeled")
    if declared is not None and int(declared) != len(cases):
        raise SemiSAMError(f"{raw_folder / 'dataset.json'}: numUnlabeled is {declared} but {UNLABELED_IMAGES}/ "
                           f"holds {len(cases)} cases")
    reader = reader_writer_class(raw_folder, dataset_json)
    jobs = [(c, f, dataset_json, reader) + ((geometry,) if geometry is not None else ()) for c, f in cases.items()]
    with _pool(num_processes) as pool:
        it = pool.imap(_check_case, jobs) if pool else map(_check_case, jobs)
        for err in tqdm(it, total=len(jobs), desc="verify unlabeled", disable=not progress):
            if err is not None:
                raise SemiSAMError(err)
    return len(cases)


# ----------------------------------------------------------------------------------------------------------------
# preprocessed folder


def unlabeled_preprocessed_folder(dataset_name_or_id: int | str, plans_identifier: str = "nnUNetPlans",
                                  configuration: str = "2d") -> Path:
    """`$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled` for the given plans and configuration."""
    plans_file = preprocessed_dataset_folder(dataset_name_or_id) / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SemiSAMError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess (or nnunet-semisam plan) "
                           f"for these plans first")
    plans = json.loads(plans_file.read_text())
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    if configuration not in pm.available_configurations:
        raise SemiSAMError(f"configuration {configuration!r} is not in {plans_file.name} "
                           f"(available: {', '.join(pm.available_configurations)})")
    cm = pm.get_configuration(configuration)
    return plans_file.parent / (cm.data_identifier + UNLABELED_SUFFIX)


def list_preprocessed_unlabeled(folder: str | os.PathLike) -> list[str]:
    """Identifiers of the complete cases in a preprocessed unlabeled folder (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")
                  and not n.startswith("."))


def _configuration_signature(plans: dict, configuration: str) -> str:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    relevant = {k: cm.configuration.get(k) for k in (
        "data_identifier", "preprocessor_name", "spacing", "normalization_schemes", "use_mask_for_norm",
        "resampling_fn_data", "resampling_fn_data_kwargs", "patch_size")}
    relevant["transpose_forward"] = pm.transpose_forward
    relevant["foreground_intensity_properties_per_channel"] = pm.foreground_intensity_properties_per_channel
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


class _CaseWriter:
    """Preprocess one unlabeled case with the configuration's nnU-Net preprocessor and store it atomically."""

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, out_folder: str):
        self.plans, self.configuration, self.dataset_json, self.out_folder = plans, configuration, dataset_json, out_folder

    def __call__(self, job: tuple[str, list[str]]) -> str:
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        case, files = job
        pm = PlansManager(self.plans)
        cm = pm.get_configuration(self.configuration)
        preprocessor = cm.preprocessor_class(verbose=False)
        data, seg, properties = preprocessor.run_case(files, None, pm, cm, self.dataset_json)
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int8, copy=False)  # nonzero mask: 0 inside, -1 outside
        properties["class_locations"] = {}
        properties["unlabeled"] = True
        blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
        partial = Path(self.out_folder) / f".partial_{case}_{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            nnUNetDatasetBlosc2.save_case(data, seg, properties, str(partial / case), chunks=chunks, blocks=blocks,
                                          chunks_seg=chunks_seg, blocks_seg=blocks_seg)
            # the image file is what makes a case visible to nnU-Net's dataset classes: move it last
            for suffix in ("_seg.b2nd", ".pkl", ".b2nd"):
                os.replace(partial / (case + suffix), Path(self.out_folder) / (case + suffix))
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return case


class _pool:
    """`multiprocessing.Pool` for n > 1, else None (run in-process): `with _pool(n) as pool:`."""

    def __init__(self, n: int):
        self.n = n
        self.pool = None

    def __enter__(self):
        if self.n > 1:
            self.pool = multiprocessing.get_context("fork").Pool(self.n)
        return self.pool

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] is not None else self.pool.close()
            self.pool.join()
        return False


def preprocess_unlabeled(dataset_name_or_id: int | str, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, verify: bool = True, overwrite: bool = False,
                         progress: bool = True, cases: Sequence[str] | None = None) -> list[str]:
    """Preprocess `imagesUnlabeled/` with the plans' preprocessing into `<data_identifier>_unlabeled/`.

    Resumable: finished cases are skipped. With `overwrite=True` the folder is rebuilt. Raises `SemiSAMError`
    (before writing anything) for missing environment variables, unknown datasets, missing plans, an empty or
    inconsistent unlabeled folder, or a folder preprocessed with different plans. Returns the cases processed now.
    """
    from tqdm import tqdm

    raw = raw_dataset_folder(dataset_name_or_id)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    out = unlabeled_preprocessed_folder(dataset_name_or_id, plans_identifier, configuration)
    plans = json.loads((out.parent / f"{plans_identifier}.json").read_text())
    all_cases = unlabeled_image_lists(raw, dataset_json)
    if not all_cases:
        raise SemiSAMError(f"{raw / UNLABELED_IMAGES} is missing or empty: nothing to preprocess")
    if cases is not None:
        missing = [c for c in cases if c not in all_cases]
        if missing:
            raise SemiSAMError(f"unlabeled case {missing[0]!r} is not in {raw / UNLABELED_IMAGES}")
        all_cases = {c: all_cases[c] for c in cases}
    if verify:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        verify_unlabeled(raw, dataset_json, num_processes=num_processes, progress=progress,
                         geometry=(pm.transpose_forward, cm.spacing, cm.patch_size))

    signature = _configuration_signature(plans, configuration)
    manifest_file = out / MANIFEST
    if manifest_file.is_file() and not overwrite:
        old = json.loads(manifest_file.read_text())
        if old.get("configuration_signature") != signature:
            raise SemiSAMError(f"{out} was preprocessed with different plans ({old.get('plans_identifier')}, "
                               f"{old.get('configuration')}): re-run with --overwrite")
    if overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".partial_*"):
        shutil.rmtree(stale, ignore_errors=True)
    atomic_write_json(manifest_file, {
        "dataset": dataset_name(dataset_name_or_id), "plans_identifier": plans_identifier,
        "configuration": configuration, "configuration_signature": signature,
        "source": str(raw / UNLABELED_IMAGES),
    })

    done = set(list_preprocessed_unlabeled(out))
    todo = [(c, f) for c, f in all_cases.items() if c not in done]
    writer = _CaseWriter(plans, configuration, dataset_json, str(out))
    finished = []
    with _pool(num_processes) as pool:
        it = pool.imap_unordered(writer, todo) if pool else map(writer, todo)
        for case in tqdm(it, total=len(todo), desc=f"preprocess unlabeled ({configuration})", disable=not progress,
                         initial=0):
            finished.append(case)
    return sorted(finished)
