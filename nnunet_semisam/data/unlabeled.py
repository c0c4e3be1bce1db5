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
`CASE.pkl` (properties; `class_locations` is empty; `source_files` = name, size, mtime and sha256 of the raw files
the case was made from). A `manifest.json` records which plans configuration produced the folder (stale cases are
detected when the plans change), how many cases `imagesUnlabeled/` holds and whether all of them are done.

Content keys. A case is reused only while its raw files are unchanged (size + mtime, sha256 when the mtime moved);
a replaced image is preprocessed again and a case removed from `imagesUnlabeled/` is removed here too, so training
never sees a stale or orphaned copy.

Atomicity. Each case is written into a private `.partial_*` sub-folder and then moved into place with `os.replace`,
image file last. nnU-Net lists cases by their `CASE.b2nd`, so an interrupted run never leaves a listed case that is
incomplete; re-running skips finished cases and redoes the rest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
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


def load_dataset_json(raw_folder: str | os.PathLike) -> dict:
    """`dataset.json` of a raw dataset, with a one-line error when it is missing, unparsable or lacks a key that
    the unlabeled tools need (`channel_names`, `file_ending`, `labels`)."""
    path = Path(raw_folder) / "dataset.json"
    try:
        dj = json.loads(path.read_text())
    except FileNotFoundError:
        raise SemiSAMError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SemiSAMError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
    for key in ("channel_names", "file_ending", "labels"):
        if key not in dj:
            raise SemiSAMError(f"{path} has no {key!r} entry (nnU-Net's dataset.json format requires it)")
    return dj


_CHANNEL_NAME = r"(.+)_(\d{4})"


def raw_case_ids(images_folder: str | os.PathLike, ending: str) -> set[str]:
    """Case identifiers of an nnU-Net images folder (`imagesTr`, `imagesTs`; empty if missing)."""
    folder = Path(images_folder)
    if not folder.is_dir():
        return set()
    pattern = re.compile(_CHANNEL_NAME + re.escape(ending))
    return {m.group(1) for n in os.listdir(folder) if (m := pattern.fullmatch(n))}


def channel_files_per_case(raw_folder: str | os.PathLike, dataset_json: dict) -> int:
    """How many `CASE_XXXX` files one case has: counted on `imagesTr/` (one RGB file for nnU-Net's natural-image
    format even with three channel names), else `len(channel_names)`."""
    folder = Path(raw_folder) / "imagesTr"
    pattern = re.compile(_CHANNEL_NAME + re.escape(dataset_json["file_ending"]))
    per_case: dict[str, int] = {}
    if folder.is_dir():
        for n in os.listdir(folder):
            if m := pattern.fullmatch(n):
                per_case[m.group(1)] = per_case.get(m.group(1), 0) + 1
    if not per_case:
        return len(dataset_json["channel_names"])
    counts = sorted(per_case.values())
    return counts[len(counts) // 2]


def unlabeled_image_lists(raw_folder: str | os.PathLike, dataset_json: dict) -> dict[str, list[str]]:
    """Map case id -> its channel files `CASE_0000<ending>`, `CASE_0001<ending>`, ... of `imagesUnlabeled/`
    (empty dict if the folder does not exist).

    Raises a one-line `SemiSAMError` naming the first file whose ending differs from `file_ending`, whose name does
    not follow `CASE_XXXX<ending>`, or whose channel index XXXX is not one of the dataset's (`synth_0019.png` in a
    one-channel dataset is not channel 19 of case `synth` but a missing `_0000`), and any case missing a channel.
    """
    folder = Path(raw_folder) / UNLABELED_IMAGES
    if not folder.is_dir():
        return {}
    ending = dataset_json["file_ending"]
    pattern = re.compile(_CHANNEL_NAME + re.escape(ending))
    n_files = channel_files_per_case(raw_folder, dataset_json)
    expected = f"CASE_0000{ending}" + (f" .. CASE_{n_files - 1:04d}{ending}" if n_files > 1 else "")
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = folder / name
        if not name.endswith(ending):
            raise SemiSAMError(f"{path}: file ending differs from dataset.json file_ending {ending!r}")
        m = pattern.fullmatch(name)
        if m is None:
            raise SemiSAMError(f"{path}: expected a name like {expected} (case id, 4-digit channel index)")
        channel = int(m.group(2))
        if channel >= n_files:
            raise SemiSAMError(f"{path}: channel index {m.group(2)} but this dataset's cases have {n_files} "
                               f"channel file(s) ({expected}); did you mean {name[:-len(ending)]}_0000{ending}?")
        cases.setdefault(m.group(1), {})[channel] = str(path)
    for case, channels in cases.items():
        missing = [c for c in range(n_files) if c not in channels]
        if missing:
            raise SemiSAMError(f"{folder / f'{case}_{missing[0]:04d}{ending}'} is missing: case {case!r} needs "
                               f"{n_files} channel file(s) ({expected})")
    return {case: [channels[c] for c in range(n_files)] for case, channels in cases.items()}


def check_unlabeled_disjoint(raw_folder: str | os.PathLike, dataset_json: dict, unlabeled_ids,
                             transductive: bool = False) -> None:
    """Unlabeled case ids must be neither labeled (`imagesTr`) nor test (`imagesTs`) ids: otherwise a case would
    get another case's label, pseudo-label or preprocessed copy. `transductive` lets unlabeled = test images
    (as in M&N's official code); labeled vs. unlabeled is always refused."""
    from nnunet_semisam.data.disjoint import check_disjoint

    raw = Path(raw_folder)
    ending = dataset_json["file_ending"]
    check_disjoint(raw_case_ids(raw / "imagesTr", ending), unlabeled_ids,
                   labeled_source=f"labeled cases ({raw / 'imagesTr'})",
                   unlabeled_source=f"unlabeled cases ({raw / UNLABELED_IMAGES})",
                   test_ids=raw_case_ids(raw / "imagesTs", ending), test_source=f"test cases ({raw / 'imagesTs'})",
                   allow_unlabeled_test_overlap=transductive,
                   fix="rename or remove them so that every case has one role (--transductive allows unlabeled = "
                       "test images on purpose)")


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


def _quiet_read(reader_class, files: list[str]):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return reader_class().read_images(files)


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


def read_case(case: str, files: list[str], reader_class):
    """(data, properties) of one case read with nnU-Net's reader, or a one-line `SemiSAMError` naming the file:
    a truncated NIfTI (which SimpleITK would zero-fill silently), any reader exception, and channel files of
    different sizes (for which nnU-Net's reader raises with an empty message)."""
    from nnunet_semisam.io import image_truncation

    for f in files:
        why = image_truncation(f)
        if why is not None:
            raise SemiSAMError(f"{f}: cannot be read ({why})")
    try:
        return _quiet_read(reader_class, files)
    except Exception as e:
        error = e
    shapes = {}
    for f in files if len(files) > 1 else ():
        try:
            shapes[f] = tuple(_quiet_read(reader_class, [f])[0].shape[1:])
        except Exception as e:
            raise SemiSAMError(f"{f}: cannot be read ({_reason(e)})") from None
    first = next(iter(shapes.items()), None)
    for f, shape in shapes.items():
        if shape != first[1]:
            raise SemiSAMError(f"{f}: case {case} has channel files of different sizes ({Path(first[0]).name} "
                               f"{first[1]} vs {Path(f).name} {shape})")
    raise SemiSAMError(f"{files[0]}: cannot be read ({_reason(error)})")


def _check_case(args: tuple) -> str | None:
    """Return None if the case is fine, else a one-line error naming its file.

    `args` = (case, files, dataset_json, reader_class[, geometry]) where the optional geometry
    `(transpose_forward, target_spacing, patch_size)` of a plans configuration enables the check that the resampled
    case is at least one patch large.
    """
    case, files, dataset_json, reader_class = args[:4]
    geometry = args[4] if len(args) > 4 else None
    expected = len(dataset_json["channel_names"])
    try:
        data, props = read_case(case, files, reader_class)
    except SemiSAMError as e:
        return str(e)
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
                     geometry: tuple | None = None, transductive: bool = False) -> int:
    """Integrity check of `imagesUnlabeled/` (like nnU-Net's --verify_dataset_integrity): naming (channel indices
    of the dataset), file ending, case ids disjoint from `imagesTr` / `imagesTs` (`transductive`: unlabeled = test
    images allowed), complete readable files, channel count equal to `channel_names`, no NaN/Inf, positive spacing.

    With `geometry` = (transpose_forward, target spacing, patch size) of a plans configuration, a case smaller than
    one patch after resampling is an error too. Returns the number of unlabeled cases; raises `SemiSAMError` at the
    first problem.
    """
    from tqdm import tqdm

    raw_folder = Path(raw_folder)
    if dataset_json is None:
        dataset_json = load_dataset_json(raw_folder)
    cases = unlabeled_image_lists(raw_folder, dataset_json)
    check_unlabeled_disjoint(raw_folder, dataset_json, cases, transductive)
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


ALLOW_SUBSET_ENV = "nnUNet_semisam_allow_unlabeled_subset"  # "1": train on an incomplete unlabeled folder


def check_preprocessed_unlabeled(folder: str | os.PathLike, plans: dict, configuration: str,
                                 labeled_ids: Sequence[str], splits_file: str | os.PathLike | None = None,
                                 allow_subset: bool = False, command: str = "nnunet-semisam preprocess-unlabeled",
                                 needed_by: str = "training") -> tuple[list[str], dict]:
    """Everything a trainer must know about `<data_identifier>_unlabeled/` before it starts: (cases, manifest).

    One-line `SemiSAMError` when the folder is empty, has no manifest, was made with other plans, is incomplete
    (`complete` false in the manifest: a killed or subset run; `allow_subset` accepts it), or when an unlabeled case
    is also a labeled preprocessed case (`labeled_ids`) or a train/val case of nnU-Net's `splits_file` (label leak,
    e.g. a dataset split after preprocessing). `command` is the preprocess command quoted in the messages,
    `needed_by` who asks (a trainer's class name).
    """
    from nnunet_semisam.data.disjoint import check_disjoint, check_splits_disjoint

    folder = Path(folder)
    cases = list_preprocessed_unlabeled(folder)
    if not cases:
        raise SemiSAMError(f"{needed_by} needs unlabeled cases but {folder} has none: run `{command}` "
                           f"(imagesUnlabeled/ must not be empty)")
    manifest_file = folder / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise SemiSAMError(f"{manifest_file} is missing or unreadable: run `{command} --overwrite`") from None
    if manifest.get("configuration_signature") != _configuration_signature(plans, configuration):
        raise SemiSAMError(f"{folder} was preprocessed with other plans ({manifest.get('plans_identifier')}, "
                           f"{manifest.get('configuration')}): run `{command} --overwrite`")
    if not manifest.get("complete") and not allow_subset:
        expected = manifest.get("num_expected", "?")
        raise SemiSAMError(f"{folder} is incomplete ({len(cases)} of {expected} unlabeled cases preprocessed): run "
                           f"`{command}` to finish it, or set {ALLOW_SUBSET_ENV}=1 to train on the cases present")
    check_disjoint(labeled_ids, cases, labeled_source=f"labeled preprocessed cases ({folder.parent.name})",
                   unlabeled_source=f"unlabeled cases ({folder.name})",
                   fix="a case was moved to imagesUnlabeled after preprocessing (e.g. by split-labels): delete "
                       f"{folder.parent} and rerun nnUNetv2_plan_and_preprocess and `{command}`")
    if splits_file is not None and Path(splits_file).is_file():
        check_splits_disjoint(splits_file, cases, unlabeled_source=f"unlabeled cases of {folder.name}")
    return cases, manifest


def source_key(files: Sequence[str]) -> list[list]:
    """[[file name, size, mtime_ns, sha256], ...] of a case's raw channel files: what its preprocessed copy was
    made from (stored in the case's properties as `source_files`)."""
    from nnunet_semisam.io import file_digest

    key = []
    for f in files:
        st = os.stat(f)
        key.append([os.path.basename(f), st.st_size, st.st_mtime_ns, file_digest(f)])
    return key


def source_unchanged(stored: Sequence[Sequence] | None, files: Sequence[str]) -> bool:
    """True if `files` are the bytes `stored` (a `source_key`) was made from: same names, and same size and mtime,
    or (when only the mtime moved, e.g. after a copy) the same sha256. A case without a key is never unchanged."""
    from nnunet_semisam.io import file_digest

    if not stored or len(stored) != len(files):
        return False
    for (name, size, mtime_ns, digest), f in zip(stored, files):
        if name != os.path.basename(f):
            return False
        st = os.stat(f)
        if st.st_size != size:
            return False
        if st.st_mtime_ns != mtime_ns and file_digest(f) != digest:
            return False
    return True


def _stored_source_key(folder: Path, case: str):
    try:
        from batchgenerators.utilities.file_and_folder_operations import load_pickle

        return load_pickle(str(folder / f"{case}.pkl")).get("source_files")
    except Exception:  # unreadable properties: treat as changed, the case is redone
        return None


def _remove_case(folder: Path, case: str) -> None:
    """Delete a preprocessed case, image file first so that it stops being listed at once."""
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(folder / (case + suffix))


class _CaseWriter:
    """Preprocess one unlabeled case with the configuration's nnU-Net preprocessor and store it atomically.

    Runs even with `--no-verify`, so it checks what would otherwise fail far away or silently: truncated NIfTI
    files (zero-filled by SimpleITK), reader errors and the channel count, each as a one-line error naming the file.
    """

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, out_folder: str, reader_class=None):
        self.plans, self.configuration, self.dataset_json, self.out_folder = (plans, configuration, dataset_json,
                                                                              out_folder)
        self.reader_class = reader_class  # to name the cause when nnU-Net's preprocessor fails without a reason

    def __call__(self, job: tuple[str, list[str]]) -> str:
        from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunet_semisam.io import image_truncation

        case, files = job
        key = source_key(files)  # before reading: a file changed meanwhile is redone next time
        for f in files:
            why = image_truncation(f)
            if why is not None:
                raise SemiSAMError(f"{f}: cannot be read ({why})")
        pm = PlansManager(self.plans)
        cm = pm.get_configuration(self.configuration)
        preprocessor = cm.preprocessor_class(verbose=False)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                data, seg, properties = preprocessor.run_case(files, None, pm, cm, self.dataset_json)
        except Exception as e:
            if self.reader_class is not None:
                read_case(case, files, self.reader_class)  # raises the specific reason (e.g. channel sizes differ)
            raise SemiSAMError(f"{files[0]}: case {case} cannot be preprocessed ({_reason(e)})") from None
        expected = len(self.dataset_json["channel_names"])
        if data.shape[0] != expected:
            raise SemiSAMError(f"{files[0]}: case {case} has {data.shape[0]} channel(s) but dataset.json "
                               f"channel_names lists {expected}")
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int8, copy=False)  # nonzero mask: 0 inside, -1 outside
        properties["class_locations"] = {}
        properties["unlabeled"] = True
        properties["source_files"] = key
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


@dataclasses.dataclass
class PreprocessReport:
    """What one `preprocess_unlabeled` call did: cases written now (`processed`, of which `changed` were redone
    because their raw files changed), `removed` orphans, and the folder's state afterwards."""
    processed: list[str]
    changed: list[str]
    removed: list[str]
    num_done: int
    num_expected: int

    @property
    def complete(self) -> bool:
        return self.num_done == self.num_expected


def preprocess_unlabeled(dataset_name_or_id: int | str, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, verify: bool = True, overwrite: bool = False,
                         progress: bool = True, cases: Sequence[str] | None = None,
                         transductive: bool = False) -> PreprocessReport:
    """Preprocess `imagesUnlabeled/` with the plans' preprocessing into `<data_identifier>_unlabeled/`.

    Resumable and content-keyed: a finished case is skipped only while its raw files are the ones it was made from
    (`source_unchanged`); a changed case is redone, and a preprocessed case whose raw files left `imagesUnlabeled/`
    (an orphan) is deleted. `manifest.json` records the plans, `transductive`, `num_expected` (cases in
    `imagesUnlabeled/`), `num_done` and `complete`; it says `complete: false` while a run is under way or after a
    subset (`cases`), which trainers refuse. `overwrite=True` rebuilds the folder. Raises `SemiSAMError` (before
    writing anything) for missing environment variables, unknown datasets, missing plans, an empty or inconsistent
    unlabeled folder, identifiers shared with imagesTr/imagesTs, or a folder preprocessed with different plans.
    """
    from tqdm import tqdm

    raw = raw_dataset_folder(dataset_name_or_id)
    dataset_json = load_dataset_json(raw)
    out = unlabeled_preprocessed_folder(dataset_name_or_id, plans_identifier, configuration)
    plans = json.loads((out.parent / f"{plans_identifier}.json").read_text())
    all_cases = unlabeled_image_lists(raw, dataset_json)
    if not all_cases:
        raise SemiSAMError(f"{raw / UNLABELED_IMAGES} is missing or empty: nothing to preprocess")
    check_unlabeled_disjoint(raw, dataset_json, all_cases, transductive)
    selected = all_cases
    if cases is not None:
        missing = [c for c in cases if c not in all_cases]
        if missing:
            raise SemiSAMError(f"unlabeled case {missing[0]!r} is not in {raw / UNLABELED_IMAGES}")
        selected = {c: all_cases[c] for c in cases}
    if verify:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        verify_unlabeled(raw, dataset_json, num_processes=num_processes, progress=progress,
                         geometry=(pm.transpose_forward, cm.spacing, cm.patch_size), transductive=transductive)

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
    manifest = {
        "dataset": dataset_name(dataset_name_or_id), "plans_identifier": plans_identifier,
        "configuration": configuration, "configuration_signature": signature,
        "source": str(raw / UNLABELED_IMAGES), "transductive": bool(transductive),
        "num_expected": len(all_cases),
    }

    def write_manifest(complete: bool) -> int:
        n = len(list_preprocessed_unlabeled(out))
        atomic_write_json(manifest_file, {**manifest, "num_done": n, "complete": complete and n == len(all_cases)})
        return n

    write_manifest(False)  # a run under way (or killed) is never mistaken for a complete folder
    listed = list_preprocessed_unlabeled(out)
    removed = [c for c in listed if c not in all_cases]
    for c in removed:
        _remove_case(out, c)
    changed = [c for c in listed if c in all_cases and not source_unchanged(_stored_source_key(out, c), all_cases[c])]
    for c in changed:
        _remove_case(out, c)
    done = set(listed) - set(changed) - set(removed)
    todo = [(c, f) for c, f in selected.items() if c not in done]
    writer = _CaseWriter(plans, configuration, dataset_json, str(out), reader_writer_class(raw, dataset_json))
    finished = []
    with _pool(num_processes) as pool:
        it = pool.imap_unordered(writer, todo) if pool else map(writer, todo)
        for case in tqdm(it, total=len(todo), desc=f"preprocess unlabeled ({configuration})", disable=not progress):
            finished.append(case)
    n_done = write_manifest(True)
    return PreprocessReport(sorted(finished), sorted(changed), sorted(removed), n_done, len(all_cases))
