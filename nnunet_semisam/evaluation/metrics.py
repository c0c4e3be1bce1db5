"""Segmentation metrics, medpy-compatible (METHODS.md §9): Dice, Jaccard, HD, HD95, ASD, ASSD per case and label.

`binary_metrics` returns exactly what `medpy.metric.binary.dc/jc/hd/hd95/asd/assd` (medpy 0.5.2) return on non-empty
masks, but computes the two surface-distance sets once (medpy recomputes them in each of its five functions) and on
the joint bounding box of the two masks instead of the whole image. Empty masks follow one of two conventions
(`empty_mode`, §9): `strict` (worst-case penalty, our default) or `paper` (the SSL4MIS/VerSemi evaluation code).

`evaluate_case` reads one prediction/reference pair with nnU-Net's reader classes and reports every distance twice:
in mm (the case's spacing, key suffix `_mm`) and in voxels (spacing 1, suffix `_vox`; the papers' unit).
`evaluate_folders` does this for a folder of predictions and writes `metrics.json`, `metrics.csv` and `metrics.md`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from nnunet_semisam.errors import SemiSAMError

EMPTY_MODES = ("strict", "paper")
DISTANCE_KEYS = ("hd", "hd95", "asd", "assd")
OVERLAP_KEYS = ("dice", "jaccard")
FLAG_KEYS = ("pred_empty", "gt_empty", "penalized", "excluded")


# ---------------------------------------------------------------------------------------------------------------------
# binary masks
# ---------------------------------------------------------------------------------------------------------------------
def _joint_bbox(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of `a | b`, widened by `margin` voxels and clipped to the image; None when both are empty."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hit = np.flatnonzero(np.any(union, axis=other)) if other else np.flatnonzero(union)
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)


def _normalize_spacing(spacing: Sequence[float] | float | None, ndim: int) -> np.ndarray | None:
    """Spacing as a contiguous float64 vector of length `ndim` (a scalar is repeated, like medpy); None stays None."""
    if spacing is None:
        return None
    s = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if s.size == 1:
        s = np.repeat(s, ndim)
    if s.size != ndim:
        raise SemiSAMError(f"spacing {tuple(s.tolist())} has {s.size} values but the masks are {ndim}-D")
    return np.ascontiguousarray(s)


def _borders(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-voxel borders `X XOR erode(X)` (face connectivity, `border_value=0`) of the non-empty masks `a`, `b`.

    Both masks are cropped to their joint bounding box plus one voxel (clipped at the image edge) first. This leaves
    every border voxel unchanged: beyond the box both masks are 0, which is also what `binary_erosion` assumes
    outside the image. The returned borders are crops of the same shape, in the original C order.
    """
    box = _joint_bbox(a, b)
    a, b = a[box], b[box]
    footprint = generate_binary_structure(a.ndim, 1)
    return a ^ binary_erosion(a, structure=footprint, iterations=1), b ^ binary_erosion(b, structure=footprint,
                                                                                          iterations=1)


def _directed(border_a: np.ndarray, border_b: np.ndarray, spacing: np.ndarray | None) -> np.ndarray:
    """Distance from each voxel of `border_a` (C order) to the nearest voxel of `border_b` (EDT of `~border_b`).

    Exact on the crop: every voxel of `border_b` lies inside it, so the nearest one is the same as in the full image.
    """
    return distance_transform_edt(~border_b, sampling=spacing)[border_a]


def _as_bool(x: np.ndarray) -> np.ndarray:
    return np.atleast_1d(np.asarray(x).astype(bool))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Directed surface distances d_{A->B}: for each border voxel of `a`, the distance to the nearest
    border voxel of `b`.

    Same values in the same order as medpy's `__surface_distances(a, b, spacing, connectivity=1)` (METHODS.md §9):
    border = `X XOR binary_erosion(X, generate_binary_structure(ndim, 1))`, distances from
    `distance_transform_edt(~border_b, sampling=spacing)`; computed on the joint bounding box only.

    Args:
        a, b: masks of the same shape `(*spatial)`, any dtype (non-zero = foreground); both must be non-empty.
        spacing: voxel size per axis (physical units), or None for voxel units.
    Returns:
        float64 array `(n_border_voxels_of_a,)`. No gradient (numpy).
    """
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise SemiSAMError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks (binary_metrics handles empty ones)")
    border_a, border_b = _borders(a, b)
    return _directed(border_a, border_b, _normalize_spacing(spacing, a.ndim))


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the image diagonal, sqrt(sum_i (n_i * s_i)^2): the `strict` penalty distance (METHODS.md §9)."""
    s = np.ones(len(shape)) if spacing is None else _normalize_spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * s) ** 2)))


def _empty_result(pred_empty: bool, gt_empty: bool, diagonals: dict[str, float], empty_mode: str) -> dict[str, Any]:
    """Metrics of a pair with at least one empty mask, by the convention `empty_mode` (METHODS.md §9)."""
    out: dict[str, Any] = {}
    penalized = excluded = False
    if empty_mode == "strict":
        both = pred_empty and gt_empty
        out["dice"] = out["jaccard"] = 1.0 if both else 0.0
        for suffix, diag in diagonals.items():
            for k in DISTANCE_KEYS:
                out[k + suffix] = 0.0 if both else diag
        penalized = not both
    else:  # paper: A empty -> everything 0; G empty and A not -> Dice 0, distances excluded (NaN)
        out["dice"] = out["jaccard"] = 0.0
        for suffix in diagonals:
            for k in DISTANCE_KEYS:
                out[k + suffix] = 0.0 if pred_empty else math.nan
        excluded = not pred_empty
    out.update(pred_empty=pred_empty, gt_empty=gt_empty, penalized=penalized, excluded=excluded)
    return out


def _metrics_multi(pred: np.ndarray, gt: np.ndarray, spacings: dict[str, np.ndarray | None],
                   empty_mode: str) -> dict[str, Any]:
    """`binary_metrics` for several spacings at once (borders computed once); distance keys get the dict's suffixes."""
    if empty_mode not in EMPTY_MODES:
        raise SemiSAMError(f"empty_mode must be one of {EMPTY_MODES}, got {empty_mode!r}")
    if pred.shape != gt.shape:
        raise SemiSAMError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 or n_gt == 0:
        diagonals = {suffix: image_diagonal(pred.shape, s) for suffix, s in spacings.items()}
        return _empty_result(n_pred == 0, n_gt == 0, diagonals, empty_mode)
    intersection = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    out: dict[str, Any] = {"dice": 2.0 * intersection / float(n_pred + n_gt), "jaccard": intersection / float(union)}
    border_p, border_g = _borders(pred, gt)
    cache: dict[bytes | None, tuple[np.ndarray, np.ndarray]] = {}
    for suffix, s in spacings.items():
        key = None if s is None else s.tobytes()
        if key not in cache:  # voxel units and an isotropic 1 mm spacing share one pair of EDTs
            cache[key] = (_directed(border_p, border_g, s), _directed(border_g, border_p, s))
        d_pg, d_gp = cache[key]
        both = np.hstack((d_pg, d_gp))
        out["hd" + suffix] = float(max(d_pg.max(), d_gp.max()))       # medpy hd
        out["hd95" + suffix] = float(np.percentile(both, 95))         # medpy hd95: pooled, linear percentile
        out["asd" + suffix] = float(d_pg.mean())                      # medpy asd: prediction -> reference
        out["assd" + suffix] = float(np.concatenate([d_pg, d_gp]).mean())  # medpy 0.5 assd: mean of pooled set
    out.update(pred_empty=False, gt_empty=False, penalized=False, excluded=False)
    return out


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                   empty_mode: str = "strict") -> dict[str, float | bool]:
    """Dice, Jaccard, HD, HD95, ASD, ASSD of one binary prediction against its reference (METHODS.md §9).

    On non-empty masks the values equal medpy 0.5.2's `dc`, `jc`, `hd`, `hd95`, `asd` (directed prediction ->
    reference) and `assd` (mean of the pooled two-way distances). Empty masks:
    - `strict`: both empty -> Dice = Jaccard = 1, distances 0; one empty -> Dice = Jaccard = 0 and every distance =
      the image diagonal in the same units (`image_diagonal`), flag `penalized`.
    - `paper`: prediction empty -> every metric 0; reference empty, prediction not -> Dice = Jaccard = 0, distances
      NaN (to be excluded from means), flag `excluded`.

    Args:
        pred, gt: masks `(*spatial)` of the same shape (2D or 3D), any dtype, non-zero = foreground.
        spacing: voxel size per axis; None measures distances in voxels.
        empty_mode: "strict" or "paper".
    Returns:
        {"dice", "jaccard", "hd", "hd95", "asd", "assd": float, "pred_empty", "gt_empty", "penalized",
        "excluded": bool}. No gradient (numpy).
    """
    p, g = _as_bool(pred), _as_bool(gt)
    return _metrics_multi(p, g, {"": _normalize_spacing(spacing, p.ndim)}, empty_mode)


# ---------------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------------
def _read_seg(reader: Any, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a segmentation with an nnU-Net reader; return the label map `(*spatial)` and its spacing (array order).

    nnU-Net stores a 2D image as one slice with a fake first spacing (999, or 999 x the largest in-plane spacing);
    such an image is returned as 2D with the in-plane spacing, so that 2D erosion and distances are used.
    """
    seg, props = reader.read_seg(path)
    seg = np.asarray(seg)[0]
    spacing = np.asarray(props["spacing"], dtype=np.float64)
    if seg.ndim == 3 and seg.shape[0] == 1 and spacing[0] >= 999 * spacing[1:].max() * (1 - 1e-6):
        seg, spacing = seg[0], spacing[1:]
    return np.rint(seg).astype(np.int32), spacing


def evaluate_case(pred_file: str | os.PathLike, gt_file: str | os.PathLike, labels: Sequence[int] | None,
                  reader: Any, empty_mode: str = "strict") -> dict[str, Any]:
    """Metrics of one predicted segmentation file against its reference, per foreground label (METHODS.md §9).

    Every distance is given in mm (spacing of the reference file, key suffix `_mm`) and in voxels (suffix `_vox`);
    Dice and Jaccard carry no suffix. The case name is the reference file name without its ending.

    Args:
        pred_file, gt_file: label maps readable by `reader` (.nii.gz, .png, ...), same grid.
        labels: foreground labels to evaluate; None = every label > 0 in the reference or the prediction.
        reader: an nnU-Net `BaseReaderWriter` class or instance (e.g. `SimpleITKIO`, `NaturalImage2DIO`).
        empty_mode: "strict" or "paper" (see `binary_metrics`).
    Returns:
        {"case", "pred_file", "gt_file", "shape", "spacing", "gt_labels": labels > 0 present in the reference,
        "metrics": {label (int): {"dice", "jaccard", "hd_mm", ..., "assd_vox", flags}}}.
    """
    if isinstance(reader, type):
        reader = reader()
    pred, _ = _read_seg(reader, str(pred_file))
    gt, spacing = _read_seg(reader, str(gt_file))
    case = Path(gt_file).name
    if pred.shape != gt.shape:
        raise SemiSAMError(f"case {case}: prediction shape {pred.shape} differs from reference shape {gt.shape} "
                           f"({pred_file})")
    gt_labels = sorted(int(v) for v in np.unique(gt) if v > 0)
    if labels is None:
        labels = sorted(set(gt_labels) | {int(v) for v in np.unique(pred) if v > 0})
    spacings = {"_mm": spacing, "_vox": None}
    metrics = {int(lab): _metrics_multi(pred == lab, gt == lab, spacings, empty_mode) for lab in labels}
    return {"case": case, "pred_file": str(pred_file), "gt_file": str(gt_file), "shape": list(gt.shape),
            "spacing": [float(s) for s in spacing], "gt_labels": gt_labels, "metrics": metrics}


def metric_columns() -> list[str]:
    """Metric keys of `evaluate_case` in table order: dice, jaccard, then each distance in mm and in voxels."""
    return [*OVERLAP_KEYS, *(k + "_mm" for k in DISTANCE_KEYS), *(k + "_vox" for k in DISTANCE_KEYS)]


def _supported_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)  # '.nii.gz' before '.gz'


def _load_dataset_json(*folders: Path) -> dict | None:
    for f in folders:
        p = f / "dataset.json"
        if p.is_file():
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise SemiSAMError(f"cannot read {p}: {e}") from e
    return None


def _labels_from_dataset_json(dj: dict) -> list[int] | None:
    """Foreground label values of a dataset.json (`ignore` left out; region lists flattened), None if absent."""
    if not isinstance(dj.get("labels"), dict):
        return None
    values: set[int] = set()
    for name, v in dj["labels"].items():
        if name == "ignore":
            continue
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if int(x) > 0:
                values.add(int(x))
    return sorted(values)


def _list_cases(folder: Path, file_ending: str) -> list[str]:
    return sorted(f.name for f in folder.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(file_ending.lower()))


def _nanmean(values: Iterable[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def summarize(cases: list[dict[str, Any]], labels: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Mean of each metric over cases per label (NaN excluded), with case counts; key "mean" = mean over labels.

    Returns {str(label): {metric: mean, "n_cases", "n_penalized", "n_excluded"}, "mean": {metric: mean of the label
    means, "n_cases", and the (case, label) pairs penalized / excluded summed over labels}}.
    """
    out: dict[str, dict[str, Any]] = {}
    for lab in labels:
        rows = [c["metrics"][lab] for c in cases]
        entry: dict[str, Any] = {k: _nanmean(r[k] for r in rows) for k in metric_columns()}
        entry.update(n_cases=len(rows), n_penalized=sum(bool(r["penalized"]) for r in rows),
                     n_excluded=sum(bool(r["excluded"]) for r in rows))
        out[str(lab)] = entry
    if labels:
        per_label = list(out.values())
        mean: dict[str, Any] = {k: _nanmean(e[k] for e in per_label) for k in metric_columns()}
        mean.update(n_cases=len(cases), n_penalized=sum(e["n_penalized"] for e in per_label),
                    n_excluded=sum(e["n_excluded"] for e in per_label))
        out["mean"] = mean
    return out


def _format_cell(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def format_markdown_table(rows: list[dict[str, Any]], columns: list[str], digits: int = 2) -> str:
    """A GitHub Markdown table: one header row of `columns`, one line per dict in `rows` (missing keys left blank).

    Floats get `digits` decimals, NaN reads "n/a", bools "yes"/"no". Used by `evaluate`, the demo and the benchmarks.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_format_cell(r.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def mean_table(summary: dict[str, dict[str, Any]], label_names: dict[int, str] | None = None) -> str:
    """Markdown table of `summarize` output: Dice %, Jaccard %, HD/HD95/ASD in mm and vox, counts, one row per label."""
    columns = ["label", "n", "Dice %", "Jaccard %", "HD mm", "HD95 mm", "ASD mm", "HD vox", "HD95 vox", "ASD vox",
               "penalized", "excluded"]
    rows = []
    for key, e in summary.items():
        name = key
        if label_names and key != "mean" and int(key) in label_names:
            name = f"{key} ({label_names[int(key)]})"
        rows.append({"label": name, "n": e["n_cases"], "Dice %": 100 * e["dice"], "Jaccard %": 100 * e["jaccard"],
                     "HD mm": e["hd_mm"], "HD95 mm": e["hd95_mm"], "ASD mm": e["asd_mm"], "HD vox": e["hd_vox"],
                     "HD95 vox": e["hd95_vox"], "ASD vox": e["asd_vox"], "penalized": e["n_penalized"],
                     "excluded": e["n_excluded"]})
    return format_markdown_table(rows, columns)


def _json_safe(x: Any) -> Any:
    """NaN -> None (JSON has no NaN), numpy scalars -> Python, int dict keys -> str."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _csv_text(cases: list[dict[str, Any]], labels: Sequence[int]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "label", *metric_columns(), *FLAG_KEYS])
    for c in cases:
        for lab in labels:
            m = c["metrics"][lab]
            w.writerow([c["case"], lab, *(repr(float(m[k])) for k in metric_columns()),
                        *(int(bool(m[k])) for k in FLAG_KEYS)])
    return buf.getvalue()


def _evaluate_job(job: tuple) -> dict[str, Any]:
    return evaluate_case(*job)


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, labels: Sequence[int] | None = None,
                     output_dir: str | os.PathLike | None = None, empty_mode: str = "strict",
                     num_processes: int = 1, file_ending: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate every reference segmentation in `gt_dir` against the same-named file in `pred_dir` (METHODS.md §9).

    Labels default to those of a `dataset.json` in `pred_dir` or `gt_dir` (nnU-Net copies it next to predictions),
    else to every label > 0 found in any reference. The file ending comes from that dataset.json or from the files
    in `gt_dir`. Writes `metrics.json` (per case and mean), `metrics.csv` (one row per case x label) and
    `metrics.md` (table of the means) to `output_dir` (default `pred_dir`), atomically, after all cases succeeded.

    Reference files without a prediction are an error (raised before anything is written); predictions without a
    reference are ignored. Cases run in `num_processes` spawned workers when > 1.

    Returns the content of metrics.json (NaN as None): {"pred_dir", "gt_dir", "file_ending", "empty_mode",
    "labels", "n_cases", "units", "mean": `summarize` output, "cases": [`evaluate_case` output, label keys as str],
    "files": {"json", "csv", "md"}}, plus "markdown": the table of the means (also in metrics.md).
    """
    from tqdm import tqdm

    from nnunet_semisam.io import atomic_write_json, atomic_write_text

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, d in (("prediction", pred_dir), ("reference", gt_dir)):
        if not d.is_dir():
            raise SemiSAMError(f"{what} folder not found: {d}")
    if empty_mode not in EMPTY_MODES:
        raise SemiSAMError(f"empty_mode must be one of {EMPTY_MODES}, got {empty_mode!r}")
    if num_processes < 1:
        raise SemiSAMError(f"-np must be >= 1, got {num_processes}")
    dj = _load_dataset_json(pred_dir, gt_dir)

    if file_ending is None and dj is not None and isinstance(dj.get("file_ending"), str):
        file_ending = dj["file_ending"]
    if file_ending is None:
        endings = _supported_endings()
        found = Counter(next((e for e in endings if f.name.lower().endswith(e)), None) for f in gt_dir.iterdir()
                        if f.is_file() and not f.name.startswith("."))
        found.pop(None, None)
        if not found:
            raise SemiSAMError(f"no segmentation files in {gt_dir} (readable endings: {', '.join(sorted(endings))})")
        file_ending = found.most_common(1)[0][0]
    gt_files = _list_cases(gt_dir, file_ending)
    if not gt_files:
        raise SemiSAMError(f"no reference files ending in {file_ending} in {gt_dir}")
    pred_names = set(_list_cases(pred_dir, file_ending))
    missing = [f for f in gt_files if f not in pred_names]
    if len(missing) == len(gt_files):
        raise SemiSAMError(f"no prediction in {pred_dir} matches a reference file in {gt_dir} "
                           f"(expected names like {gt_files[0]})")
    if missing:
        raise SemiSAMError(f"{len(missing)} of {len(gt_files)} predictions missing in {pred_dir}, first: {missing[0]}")

    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)
    example = str(gt_dir / gt_files[0])
    try:
        if dj is not None and "file_ending" in dj:
            reader = determine_reader_writer_from_dataset_json({**dj, "file_ending": file_ending}, example,
                                                               verbose=False)
        else:
            reader = determine_reader_writer_from_file_ending(file_ending, example, verbose=False)
    except RuntimeError as e:
        raise SemiSAMError(f"no nnU-Net reader can open {example}: {e}") from e

    if labels is None and dj is not None:
        labels = _labels_from_dataset_json(dj)
    fixed_labels = None if labels is None else sorted({int(x) for x in labels})
    if fixed_labels is not None and any(x <= 0 for x in fixed_labels):
        raise SemiSAMError(f"labels must be foreground labels > 0, got {fixed_labels}")

    jobs = [(str(pred_dir / f), str(gt_dir / f), fixed_labels, reader, empty_mode) for f in gt_files]
    bar = dict(desc="evaluate", total=len(jobs), disable=not progress, unit="case")
    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            cases = list(tqdm(pool.imap(_evaluate_job, jobs), **bar))
    else:
        cases = [_evaluate_job(j) for j in tqdm(jobs, **bar)]

    if fixed_labels is None:  # every label in any reference; a case lacking it in both masks is a both-empty pair
        fixed_labels = sorted({lab for c in cases for lab in c["gt_labels"]})
        for c in cases:
            for lab in fixed_labels:
                if lab not in c["metrics"]:
                    c["metrics"][lab] = _empty_result(True, True, {"_mm": 0.0, "_vox": 0.0}, empty_mode)
            c["metrics"] = {lab: c["metrics"][lab] for lab in fixed_labels}
    if not fixed_labels:
        raise SemiSAMError(f"no foreground label (> 0) in the reference files of {gt_dir}; pass --labels")

    out_dir = Path(output_dir) if output_dir is not None else pred_dir
    label_names = None
    if dj is not None and isinstance(dj.get("labels"), dict):
        label_names = {int(v): k for k, v in dj["labels"].items() if isinstance(v, int) and v > 0}
    summary = summarize(cases, fixed_labels)
    files = {"json": str(out_dir / "metrics.json"), "csv": str(out_dir / "metrics.csv"),
             "md": str(out_dir / "metrics.md")}
    result = _json_safe({
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "file_ending": file_ending, "empty_mode": empty_mode,
        "labels": fixed_labels, "n_cases": len(cases),
        "units": {"_mm": "physical units of the reference spacing", "_vox": "voxels (spacing 1)"},
        "mean": summary, "cases": cases, "files": files,
    })
    md = (f"# Segmentation metrics\n\n{len(cases)} case(s), empty_mode={empty_mode}; predictions {pred_dir}, "
          f"references {gt_dir}. Mean over cases (NaN excluded); `penalized`/`excluded` count cases with an empty "
          f"mask (METHODS.md section 9).\n\n" + mean_table(summary, label_names))
    atomic_write_json(files["json"], result)
    atomic_write_text(files["csv"], _csv_text(cases, fixed_labels))
    atomic_write_text(files["md"], md)
    result["markdown"] = mean_table(summary, label_names)
    return result
