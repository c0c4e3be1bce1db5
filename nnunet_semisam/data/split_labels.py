"""Label-ratio protocols of the seed papers: keep some training cases labeled, make the rest unlabeled
(METHODS.md §1.2).

`split_labels` turns a fully labeled raw dataset into the semi-supervised layout of this plugin: the chosen labeled
cases stay in `imagesTr/labelsTr`; the others move to `imagesUnlabeled/` (same `CASE_XXXX.ext` names) and their
labels to `labelsUnlabeled_heldout/`, kept for analysis and never read by training. `dataset.json` gets
`numTraining` = labeled cases and `numUnlabeled`; `split_labels.json` records the plan.

Selection (seeded, stratified): units are cases, or patients when the converter recorded `groups` (MSD BrainTumour
2D: all slices of a patient are labeled or unlabeled together, and the ratio counts patients). Each unit's lesion
size is its foreground fraction (label > 0 voxels / voxels, summed over a patient's slices). Units fall in strata:
lesion-free, then the lesion-bearing units cut into `NUM_SIZE_BINS` equal-count bins by size (the first bin holds
the tiny lesions). Each stratum gets labeled units in proportion to its size (largest-remainder rounding, ties
broken at random), drawn at random within the stratum: no stratum ends up all on one side unless it is too small.

Safety: the plan is written before any file moves; moves are idempotent renames, so an interrupted run is finished
by running the same command again. A finished split is refused a second time unless `force=True`, which first
restores the held-out cases to `imagesTr/labelsTr` and then splits anew. Case identifiers of `imagesTr` and an
existing `imagesUnlabeled` must be disjoint (`nnunet_semisam.data.disjoint.check_disjoint`).

Preprocessed data (label leak guard): when `$nnUNet_preprocessed/DatasetXXX_Name` already holds preprocessed
training cases or a `splits_final.json` (the dataset was preprocessed before the split), the moved cases would stay
there with their labels and nnU-Net would train and validate on them. The split is refused before anything moves,
unless `clean_preprocessed=True` (`--clean-preprocessed`), which deletes every file of the moved cases from that
folder's sub-folders and the stale `splits_final.json` after the split (`stale_preprocessed`).
"""
from __future__ import annotations

import multiprocessing
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.disjoint import check_disjoint, check_splits_disjoint  # noqa: F401 - importable here
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_write_json

SPLIT_RECORD = "split_labels.json"
UNLABELED_IMAGES = "imagesUnlabeled"
HELDOUT_LABELS = "labelsUnlabeled_heldout"
NUM_SIZE_BINS = 4  # lesion-size quartiles among lesion-bearing units
CONVERSION_RECORD = "conversion.json"  # written by `nnunet-semisam convert`; its `groups` map case -> patient


def resolve_raw_dataset(dataset: str | int) -> Path:
    """`$nnUNet_raw/DatasetXXX_Name` for a dataset id or name (nnU-Net's lookup, one-line errors)."""
    from nnunet_semisam.data.nnunet_paths import raw_dataset_folder

    return raw_dataset_folder(dataset)


def list_cases(folder: Path, file_ending: str) -> dict[str, list[str]]:
    """Case id -> sorted image file names (`CASE_XXXX<ending>`) in `folder`; hidden and temporary files skipped."""
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(file_ending))
    cases: dict[str, list[str]] = defaultdict(list)
    if folder.is_dir():
        for name in sorted(os.listdir(folder)):
            m = pattern.fullmatch(name)
            if m and not name.startswith("."):
                cases[m.group(1)].append(name)
    return dict(sorted(cases.items()))


def _foreground(job: tuple[type, str]) -> tuple[int, int]:
    reader_cls, path = job
    seg, _ = reader_cls().read_seg(path)
    return int(np.count_nonzero(seg > 0)), int(seg.size)


def label_foreground(label_files: Sequence[str], reader_cls: type, num_processes: int = 1, progress: bool = True
                     ) -> list[tuple[int, int]]:
    """(foreground voxels, voxels) of each label file, read with the dataset's nnU-Net reader."""
    from tqdm import tqdm

    jobs = [(reader_cls, f) for f in label_files]
    bar = dict(total=len(jobs), desc="split-labels: read labels", unit="case", disable=not progress)
    if num_processes <= 1 or len(jobs) < 2:
        return [_foreground(j) for j in tqdm(jobs, **bar)]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return list(tqdm(pool.imap(_foreground, jobs, chunksize=8), **bar))


def size_strata(fg_fraction: dict[str, float], num_bins: int = NUM_SIZE_BINS) -> dict[str, list[str]]:
    """Stratum name -> unit ids: "lesion-free", then "size-1" (smallest lesions) .. "size-<num_bins>"."""
    empty = sorted(u for u, f in fg_fraction.items() if f == 0)
    lesion = sorted((u for u, f in fg_fraction.items() if f > 0), key=lambda u: (fg_fraction[u], u))
    strata = {"lesion-free": empty} if empty else {}
    for i, chunk in enumerate(np.array_split(np.array(lesion, dtype=object), min(num_bins, len(lesion)))):
        strata[f"size-{i + 1}"] = [str(u) for u in chunk]
    return strata


def stratified_select(fg_fraction: dict[str, float], num_labeled: int, seed: int,
                      num_bins: int = NUM_SIZE_BINS) -> tuple[list[str], list[str], dict[str, dict]]:
    """Pick `num_labeled` of the units in `fg_fraction` (unit -> foreground fraction), stratified by lesion size.

    Returns (labeled, unlabeled, per-stratum summary). Quotas: `num_labeled * n_s / N` per stratum, floored, the
    remaining units going to the largest remainders (random tie-break); units are drawn with `default_rng(seed)`.
    """
    total = len(fg_fraction)
    if not 1 <= num_labeled < total:
        raise SemiSAMError(f"cannot label {num_labeled} of {total} units: need at least 1 labeled and 1 unlabeled")
    rng = np.random.default_rng(seed)
    strata = size_strata(fg_fraction, num_bins)
    exact = {s: num_labeled * len(m) / total for s, m in strata.items()}
    quota = {s: int(np.floor(v)) for s, v in exact.items()}
    tie = {s: rng.random() for s in strata}
    left = num_labeled - sum(quota.values())
    for s in sorted(strata, key=lambda s: (-(exact[s] - quota[s]), tie[s])):
        if left == 0:
            break
        if quota[s] < len(strata[s]):
            quota[s] += 1
            left -= 1
    labeled, summary = [], {}
    for s, members in strata.items():
        picked = [members[i] for i in rng.permutation(len(members))[:quota[s]]]
        labeled += picked
        fgs = [fg_fraction[u] for u in members]
        summary[s] = {"labeled": len(picked), "unlabeled": len(members) - len(picked),
                      "foreground_fraction": [min(fgs), max(fgs)]}
    labeled = sorted(labeled)
    chosen = set(labeled)
    return labeled, sorted(u for u in fg_fraction if u not in chosen), summary


# ------------------------------------------------------------------------------------------------ file moves

def _move(src: Path, dst: Path) -> None:
    """Idempotent rename: move `src` onto `dst` if `src` exists; nothing to do if only `dst` exists."""
    if src.exists():
        dst.parent.mkdir(exist_ok=True)
        os.replace(src, dst)
    elif not dst.exists():
        raise SemiSAMError(f"{src} is missing and not in {dst.parent}: the dataset was changed outside split-labels")


def _case_moves(dataset_dir: Path, plan: dict, case: str) -> list[tuple[Path, Path]]:
    """(training-pool path, unlabeled-pool path) for every file of one unlabeled case."""
    files = plan["files"][case]
    moves = [(dataset_dir / "imagesTr" / f, dataset_dir / UNLABELED_IMAGES / f) for f in files["images"]]
    return moves + [(dataset_dir / "labelsTr" / files["label"], dataset_dir / HELDOUT_LABELS / files["label"])]


def _update_dataset_json(dataset_dir: Path, dataset_json: dict) -> dict:
    """Set numTraining (labeled cases in imagesTr) and numUnlabeled (cases in imagesUnlabeled); atomic write."""
    ending = dataset_json["file_ending"]
    dj = dict(dataset_json)
    dj["numTraining"] = len(list_cases(dataset_dir / "imagesTr", ending))
    n_unl = len(list_cases(dataset_dir / UNLABELED_IMAGES, ending))
    if n_unl:
        dj["numUnlabeled"] = n_unl
    else:
        dj.pop("numUnlabeled", None)
    atomic_write_json(dataset_dir / "dataset.json", dj)
    return dj


def apply_plan(dataset_dir: Path, plan: dict, progress: bool = True) -> dict:
    """Carry out (or finish) a written plan: move the unlabeled cases, update dataset.json, mark the plan done."""
    from tqdm import tqdm

    for case in tqdm(plan["unlabeled"], desc="split-labels: move unlabeled", unit="case", disable=not progress):
        for src, dst in _case_moves(dataset_dir, plan, case):
            _move(src, dst)
    dj = _update_dataset_json(dataset_dir, _load_json(dataset_dir / "dataset.json"))
    plan = {**plan, "status": "done", "numTraining": dj["numTraining"], "numUnlabeled": dj.get("numUnlabeled", 0)}
    atomic_write_json(dataset_dir / SPLIT_RECORD, plan)
    return plan


def restore_heldout(dataset_dir: Path, progress: bool = True) -> int:
    """Undo a (possibly unfinished) split: move its held-out cases back to imagesTr/labelsTr, drop the plan.

    Only the cases listed in `split_labels.json` move; unlabeled cases that came from elsewhere stay. Returns the
    number of restored cases (0 if the dataset was never split).
    """
    from tqdm import tqdm

    record = dataset_dir / SPLIT_RECORD
    if not record.is_file():
        return 0
    plan = _load_json(record)
    for case in tqdm(plan["unlabeled"], desc="split-labels: restore", unit="case", disable=not progress):
        for tr, unl in _case_moves(dataset_dir, plan, case):
            _move(unl, tr)
    _update_dataset_json(dataset_dir, _load_json(dataset_dir / "dataset.json"))
    record.unlink()
    for sub in (UNLABELED_IMAGES, HELDOUT_LABELS):
        folder = dataset_dir / sub
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return len(plan["unlabeled"])


# ------------------------------------------------------------------------------------ preprocessed leftovers

SPLITS_FILE = "splits_final.json"
# files nnU-Net and this plugin write per case into the sub-folders of a preprocessed dataset
_CASE_SUFFIXES = ("_seg.b2nd", ".b2nd", ".pkl", "_seg.npy", ".npy", ".npz", ".json")


def preprocessed_dataset_dir(dataset_dir: Path) -> Path | None:
    """`$nnUNet_preprocessed/<dataset folder name>` when nnUNet_preprocessed is set, else None."""
    pre = os.environ.get("nnUNet_preprocessed")
    return Path(pre) / Path(dataset_dir).name if pre else None


def _preprocessed_case_id(name: str, ids: set[str], file_ending: str) -> str | None:
    for suffix in (file_ending, *_CASE_SUFFIXES):
        if name.endswith(suffix) and name[: -len(suffix)] in ids:
            return name[: -len(suffix)]
    return None


def stale_preprocessed(pp_dir: Path | None, case_ids, file_ending: str) -> list[Path]:
    """Files of `case_ids` in the sub-folders of the preprocessed dataset folder `pp_dir` (nnU-Net's
    `<data_identifier>/CASE.b2nd|_seg.b2nd|.pkl|.npz|.npy`, `gt_segmentations/CASE<ending>`, the plugin's
    `*_pseudolabels/CASE.npz|.json`, ...), plus its `splits_final.json`; sorted."""
    if pp_dir is None or not pp_dir.is_dir():
        return []
    ids = set(case_ids)
    out = [pp_dir / SPLITS_FILE] if (pp_dir / SPLITS_FILE).is_file() else []
    for sub in sorted(p for p in pp_dir.iterdir() if p.is_dir()):
        out += [f for f in sub.iterdir() if f.is_file() and not f.name.startswith(".")
                and _preprocessed_case_id(f.name, ids, file_ending) is not None]
    return sorted(out)


def _refuse_stale_preprocessed(dataset_dir: Path, pp_dir: Path | None, candidates, file_ending: str) -> None:
    stale = stale_preprocessed(pp_dir, candidates, file_ending)
    if not stale:
        return
    n = len({_preprocessed_case_id(f.name, set(candidates), file_ending) for f in stale if f.parent != pp_dir})
    what = ", ".join(x for x in ([f"files of {n} training cases"] if n else [])
                     + ([SPLITS_FILE] if pp_dir / SPLITS_FILE in stale else []))
    raise SemiSAMError(f"{pp_dir} holds preprocessed data from before this split ({what}): the cases moved to "
                       f"{UNLABELED_IMAGES}/ would stay there with their labels and nnU-Net would train and validate "
                       f"on them; delete that folder and run nnUNetv2_plan_and_preprocess after split-labels, or "
                       f"pass --clean-preprocessed to delete the moved cases and {SPLITS_FILE} from it")


def _clean_stale_preprocessed(pp_dir: Path | None, moved, file_ending: str) -> int:
    stale = stale_preprocessed(pp_dir, moved, file_ending)
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def _load_json(path: Path):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _report_clean(pp_dir: Path | None, n: int, dataset_dir: Path) -> None:
    if n:
        print(f"removed {n} stale files (the moved cases, {SPLITS_FILE}) from {pp_dir}; its fingerprint and plans "
              f"still count the moved cases: rerun nnUNetv2_plan_and_preprocess -d {dataset_dir.name} for plans of "
              f"the labeled cases alone")


# ------------------------------------------------------------------------------------------------------ entry

def split_labels(dataset_dir: str | os.PathLike, fraction: float | None = None, num_labeled: int | None = None,
                 seed: int = 0, force: bool = False, by_case: bool = False, num_processes: int = 1,
                 progress: bool = True, clean_preprocessed: bool = False) -> dict:
    """Keep `fraction` (rounded half up, at least 1) or `num_labeled` units labeled; move the rest to the
    unlabeled pool.

    Units are patients when `conversion.json` has `groups` (unless `by_case`), else cases. Returns the plan as
    written to `split_labels.json`. Raises `SemiSAMError` for bad arguments, a dataset already split (without
    `force`), an interrupted split with other settings, identifiers both in imagesTr and imagesUnlabeled, or a
    preprocessed folder of the dataset holding training cases or splits_final.json (without `clean_preprocessed`,
    which deletes the moved cases and splits_final.json from it; module docstring).
    """
    dataset_dir = Path(dataset_dir)
    if (fraction is None) == (num_labeled is None):
        raise SemiSAMError("give exactly one of --fraction and --num-labeled")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise SemiSAMError(f"--fraction must be in (0, 1), got {fraction}")
    if num_labeled is not None and num_labeled < 1:
        raise SemiSAMError(f"--num-labeled must be at least 1, got {num_labeled}")
    dataset_json = _load_json(dataset_dir / "dataset.json")
    if "dataset" in dataset_json:
        raise SemiSAMError(f"{dataset_dir / 'dataset.json'} lists its files in 'dataset'; split-labels needs the "
                           f"imagesTr/labelsTr folder layout")
    request = {"fraction": fraction, "num_labeled": num_labeled, "seed": seed, "by_case": by_case}

    record = dataset_dir / SPLIT_RECORD
    ending = dataset_json["file_ending"]
    pp_dir = preprocessed_dataset_dir(dataset_dir)
    old = _load_json(record) if record.is_file() else None
    if old is not None and old.get("status") == "done" and not force:
        raise SemiSAMError(f"{dataset_dir.name} is already split ({len(old['labeled'])} labeled, "
                           f"{len(old['unlabeled'])} unlabeled cases, see {record}); pass --force to restore "
                           f"and re-split")
    if not clean_preprocessed:  # before anything moves: any training case may end up unlabeled
        candidates = set(list_cases(dataset_dir / "imagesTr", ending)) | set((old or {}).get("unlabeled", []))
        _refuse_stale_preprocessed(dataset_dir, pp_dir, candidates, ending)
    if old is not None:
        if force:
            n = restore_heldout(dataset_dir, progress)
            print(f"restored {n} held-out cases of the previous split to imagesTr/labelsTr")
        elif old.get("request") == request:
            print(f"finishing the interrupted split recorded in {record}")
            plan = apply_plan(dataset_dir, old, progress)
            if clean_preprocessed:
                _report_clean(pp_dir, _clean_stale_preprocessed(pp_dir, plan["unlabeled"], ending), dataset_dir)
            return plan
        else:
            raise SemiSAMError(f"an interrupted split with other settings is recorded in {record}; rerun it with "
                               f"{old.get('request')} to finish it, or pass --force")
        dataset_json = _load_json(dataset_dir / "dataset.json")

    cases = list_cases(dataset_dir / "imagesTr", ending)
    if not cases:
        raise SemiSAMError(f"no training images '*_0000{ending}' in {dataset_dir / 'imagesTr'}")
    check_disjoint(cases, list_cases(dataset_dir / UNLABELED_IMAGES, ending),
                   labeled_source=f"training cases ({dataset_dir.name}/imagesTr)",
                   unlabeled_source=f"unlabeled cases ({dataset_dir.name}/{UNLABELED_IMAGES})",
                   fix=f"rename or remove the {UNLABELED_IMAGES}/ ones before split-labels moves cases there")
    labels = {c: dataset_dir / "labelsTr" / f"{c}{ending}" for c in cases}
    missing = next((p for p in labels.values() if not p.is_file()), None)
    if missing is not None:
        raise SemiSAMError(f"missing label {missing} for training case {missing.name[:-len(ending)]}")

    groups: dict[str, str] = {}
    conv = dataset_dir / CONVERSION_RECORD
    if not by_case and conv.is_file():
        groups = _load_json(conv).get("groups", {})
    unit_of = {c: groups.get(c, c) for c in cases}

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(dataset_json, str(next(iter(labels.values()))), verbose=False)
    stats = label_foreground([str(labels[c]) for c in cases], reader, num_processes, progress)
    fg, vox = defaultdict(int), defaultdict(int)
    for c, (f, v) in zip(cases, stats):
        fg[unit_of[c]] += f
        vox[unit_of[c]] += v
    fg_fraction = {u: fg[u] / vox[u] for u in sorted(fg)}

    total = len(fg_fraction)
    n = num_labeled if num_labeled is not None else max(1, int(np.floor(fraction * total + 0.5)))
    if not 1 <= n < total:
        raise SemiSAMError(f"cannot keep {n} of {total} {'patients' if groups else 'cases'} labeled in "
                           f"{dataset_dir.name}: at least one must stay unlabeled")
    labeled_units, unlabeled_units, summary = stratified_select(fg_fraction, n, seed)
    unl = set(unlabeled_units)
    plan = {
        "status": "planned",
        "request": request,
        "unit": "patient" if groups else "case",
        "num_units": total,
        "labeled_units": labeled_units,
        "unlabeled_units": unlabeled_units,
        "strata": summary,
        "labeled": sorted(c for c in cases if unit_of[c] not in unl),
        "unlabeled": sorted(c for c in cases if unit_of[c] in unl),
        "files": {c: {"images": cases[c], "label": labels[c].name} for c in cases if unit_of[c] in unl},
    }
    atomic_write_json(record, plan)
    plan = apply_plan(dataset_dir, plan, progress)
    if clean_preprocessed:
        _report_clean(pp_dir, _clean_stale_preprocessed(pp_dir, plan["unlabeled"], ending), dataset_dir)
    elif pp_dir is not None and pp_dir.is_dir():
        print(f"note: {pp_dir} predates this split; rerun nnUNetv2_plan_and_preprocess")
    print(f"{dataset_dir.name}: {len(labeled_units)} of {total} {plan['unit']}s labeled "
          f"({len(plan['labeled'])} cases), {len(plan['unlabeled'])} cases moved to {UNLABELED_IMAGES}/")
    return plan
