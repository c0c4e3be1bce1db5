"""`nnunet-semisam benchmark`: methods x label protocols x seeds in one resumable command (METHODS.md §11).

`run_benchmark(BenchmarkOptions(...))` resolves the dataset (or preset), builds the plan of runs (`plan`), prepares
the derived datasets with one shared set of plans and executes the runs (`runner`), then aggregates whatever runs
are complete into results.csv, summary.csv, summary.md, plots and provenance.json (`report`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnunet_semisam.benchmark.plan import BASELINE, PLANS, SCHEDULES, Run, format_plan, make_plan, trainer_name
from nnunet_semisam.benchmark.presets import PRESETS, Preset, get_preset
from nnunet_semisam.errors import SemiSAMError

__all__ = ["BenchmarkOptions", "run_benchmark", "slurm_script", "PRESETS", "make_plan"]


@dataclass
class BenchmarkOptions:
    out: str
    dataset: str | None = None
    preset: str | None = None
    configuration: str | None = None
    trainers: Sequence[str] | None = None
    fractions: Sequence[float] | None = None
    labeled: Sequence[int] | None = None
    seeds: Sequence[int] | None = None
    fold: str = "all"
    schedule: str | None = None
    device: str = "cuda"
    jobs: int = 1
    dry_run: bool = False
    emit_slurm: str | None = None
    run_index: int | None = None
    aggregate_only: bool = False
    id_base: int = 900
    reference: bool = True
    num_processes: int = 1
    predict_workers: int | None = None
    quiet: bool = False
    argv: Sequence[str] = field(default_factory=lambda: list(sys.argv))


# ------------------------------------------------------------------------------------------------ resolution

def _merge(o: BenchmarkOptions) -> tuple[BenchmarkOptions, Preset | None]:
    """Fill unset options from the preset (explicit values win)."""
    preset = get_preset(o.preset) if o.preset else None
    if preset is None and o.dataset is None:
        raise SemiSAMError("give a dataset (-d ID, name or folder) or a preset (--preset "
                           f"{'|'.join(PRESETS)})")
    if preset is not None and o.dataset is None and preset.dataset is not None:
        o.dataset = preset.dataset
    if o.configuration is None:
        o.configuration = preset.configuration if preset else "2d"
    if o.trainers is None:
        o.trainers = list(preset.trainers) if preset else []
    if o.fractions is None and o.labeled is None and preset is not None:
        o.fractions, o.labeled = list(preset.fractions), list(preset.labeled)
    if o.seeds is None:
        o.seeds = list(preset.seeds) if preset else [0]
    if o.schedule is None:
        o.schedule = preset.schedule if preset else "full"
    if o.jobs < 1:
        raise SemiSAMError(f"--jobs must be >= 1, got {o.jobs}")
    if o.device not in ("cuda", "cpu", "mps"):
        raise SemiSAMError(f"-device must be cuda, cpu or mps, got {o.device!r}")
    if o.predict_workers is None:
        o.predict_workers = 0 if o.device == "cpu" else 3
    return o, preset


_DATASET_DIR = re.compile(r"Dataset(\d{3})_(.+)")


def _find_by_name(name: str) -> Path | None:
    raw = os.environ.get("nnUNet_raw")
    if not raw or not Path(raw).is_dir():
        return None
    hits = sorted(p for p in Path(raw).iterdir() if _DATASET_DIR.fullmatch(p.name) and
                  _DATASET_DIR.fullmatch(p.name).group(2) == name and (p / "dataset.json").is_file())
    if len(hits) > 1:
        raise SemiSAMError(f"several datasets named {name} in $nnUNet_raw ({', '.join(h.name for h in hits)}): "
                           "pass -d with the id")
    return hits[0] if hits else None


def resolve_source(o: BenchmarkOptions, preset: Preset | None, out: Path) -> tuple[Path | None, int, str]:
    """(source folder or None when missing in a dry run, dataset id, DatasetXXX_Name)."""
    if preset is not None and preset.synthetic and o.dataset is None:
        s = dict(preset.synthetic)
        did, name = s.pop("dataset_id"), s.pop("name")
        folder = out / "nnUNet_raw" / f"Dataset{did:03d}_{name}"
        if not (folder / "dataset.json").is_file() and not o.dry_run:
            from nnunet_semisam.data.synthetic import SynthParams, make_synthetic_dataset

            if "params" in s:
                s["params"] = SynthParams(**s["params"])
            make_synthetic_dataset(out / "nnUNet_raw", did, name=name, num_unlabeled=0, progress=not o.quiet,
                                   overwrite=folder.exists(), **s)
        return (folder if (folder / "dataset.json").is_file() else None), did, folder.name  # None: a dry run
    d = str(o.dataset)
    p = Path(d)
    if p.is_dir() and (p / "dataset.json").is_file():
        m = _DATASET_DIR.fullmatch(p.resolve().name)
        if not m:
            raise SemiSAMError(f"{p} is not named DatasetXXX_Name (nnU-Net's raw dataset naming)")
        return p.resolve(), int(m.group(1)), p.resolve().name
    if not d.isdigit() and not d.startswith("Dataset"):
        folder = _find_by_name(d)
        if folder is None:
            hint = f"; convert it first: {preset.convert_hint}" if preset and preset.convert_hint else ""
            if o.dry_run:
                return None, 0, f"DatasetXXX_{d}"
            raise SemiSAMError(f"no dataset named {d} in $nnUNet_raw ({os.environ.get('nnUNet_raw') or 'unset'})"
                               f"{hint}")
        return folder, int(_DATASET_DIR.fullmatch(folder.name).group(1)), folder.name
    from nnunet_semisam.data.nnunet_paths import raw_dataset_folder

    folder = raw_dataset_folder(d)
    return folder, int(_DATASET_DIR.fullmatch(folder.name).group(1)), folder.name


def _trainer_classes() -> set[str]:
    """Class names defined in nnU-Net's trainer package, this plugin's trainers and $nnUNet_extTrainer (text scan:
    no imports)."""
    import nnunetv2

    from nnunet_semisam.cli.trainers_path import trainers_path

    roots = [Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer", Path(trainers_path())]
    roots += [Path(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    names: set[str] = set()
    pat = re.compile(r"^class\s+(\w+)\s*[(:]", re.M)
    for root in roots:
        if root.is_dir():
            for f in root.rglob("*.py"):
                names.update(pat.findall(f.read_text(encoding="utf-8", errors="replace")))
    return names


def check_trainers(methods: Sequence[str], schedule: str) -> None:
    known = _trainer_classes()
    for m in dict.fromkeys([BASELINE, *methods]):
        t = trainer_name(m, schedule)
        if m not in known:
            raise SemiSAMError(f"unknown trainer {m!r}: no such class in nnU-Net's trainers, this plugin's trainers "
                               "or $nnUNet_extTrainer")
        if t not in known:
            raise SemiSAMError(f"trainer {m} has no {schedule!r} schedule variant {t}; choose another --schedule "
                               f"({', '.join(SCHEDULES)})")


# ------------------------------------------------------------------------------------------------ SLURM

def resumable_command(o: BenchmarkOptions, source: Path | None) -> list[str]:
    """The benchmark's own command with every choice explicit (source as an absolute folder), without --run-index."""
    cmd = ["nnunet-semisam", "benchmark"]
    if o.preset:
        cmd += ["--preset", o.preset]
    if source is not None and not (o.preset and get_preset(o.preset).synthetic and o.dataset is None):
        cmd += ["-d", str(source)]
    cmd += ["-c", o.configuration]
    if o.trainers:
        cmd += ["-tr", *o.trainers]
    if o.fractions:
        cmd += ["--fractions", *(repr(float(f)) for f in o.fractions)]
    if o.labeled:
        cmd += ["--labeled", *(str(int(n)) for n in o.labeled)]
    cmd += ["--seeds", *(str(s) for s in o.seeds), "-f", str(o.fold), "--schedule", o.schedule, "-device", o.device,
            "--id-base", str(o.id_base), "-np", str(o.num_processes), "-o", str(Path(o.out).resolve())]
    if not o.reference:
        cmd.append("--no-reference")
    return cmd


def slurm_script(command: Sequence[str], runs: Sequence[Run], out: Path, device: str) -> str:
    """A SLURM job-array script: task i executes run i with the same resumable command (`--run-index`)."""
    line = " ".join(shlex.quote(c) for c in command) + ' --run-index "$SLURM_ARRAY_TASK_ID"'
    lines = ["#!/bin/bash", "#SBATCH --job-name=nnunet-semisam-benchmark", f"#SBATCH --array=0-{len(runs) - 1}",
             f"#SBATCH --output={shlex.quote(str(out / 'slurm'))}/run_%a.log"]
    if device == "cuda":
        lines.append("#SBATCH --gres=gpu:1")
    lines += ["# one benchmark run per array task; re-submitting resumes (finished runs are skipped)", "# runs:"]
    lines += [f"#   {r.index:3d}  {r.run_id}" for r in runs]
    lines += ["set -euo pipefail", f"mkdir -p {shlex.quote(str(out / 'slurm'))}", line,
              "# when every task has ended, the tables over all complete runs:",
              "# " + " ".join(shlex.quote(c) for c in command) + " --aggregate-only", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main

def _num_training(folder: Path) -> int:
    dj = json.loads((folder / "dataset.json").read_text())
    return sum(1 for f in (folder / "labelsTr").iterdir() if f.name.endswith(dj["file_ending"]))


def aggregate(ctx, runs: Sequence[Run], o: BenchmarkOptions, plans_sha: str | None) -> tuple[list[dict], dict]:
    from nnunet_semisam.benchmark import report, runner

    out = ctx.out
    records = {r.run_id: runner.read_record(ctx, r) for r in runs}
    metrics = {r.run_id: report.load_json(runner.run_dir(ctx, r) / "metrics" / "metrics.json")
               if (records[r.run_id] or {}).get("status") == "done" else None for r in runs}
    rows = report.collect(runs, records, metrics, _num_training(ctx.source_copy))
    title = (f"nnunet-semisam benchmark: {ctx.source_name}, {o.configuration}, schedule {o.schedule}, seeds "
             f"{' '.join(map(str, o.seeds))}, fold {o.fold}")
    digest = runner.plans_digest(ctx.source_plans) if ctx.source_plans.is_file() else None
    summary = report.write_outputs(out, rows, title)
    prov = report.write_provenance(out, argv=o.argv, device=o.device, source=str(ctx.source_dir),
                                   plans_file=ctx.source_plans, plans_sha256=plans_sha, plans_digest=digest,
                                   runs=runs, records=records)
    bad = [k for k, v in prov["runs"].items() if v["plans_digest"] not in (None, digest)]
    if bad:
        raise SemiSAMError(f"run(s) {', '.join(bad)} trained with other plans than {ctx.source_plans}")
    return summary, prov


def run_benchmark(o: BenchmarkOptions) -> int:
    from nnunet_semisam.benchmark import runner

    o, preset = _merge(o)
    out = Path(o.out).resolve()
    source, source_id, source_name = resolve_source(o, preset, out)
    derived, runs = make_plan(source_id, source_name, list(o.trainers), o.fractions, o.labeled, list(o.seeds),
                              o.configuration, o.fold, o.schedule, o.id_base, o.reference)
    check_trainers(list(o.trainers), o.schedule)
    if source is not None:
        runner.check_source(source)
        n_train = _num_training(source)
        for n in o.labeled or []:
            if n >= n_train:
                raise SemiSAMError(f"--labeled {n} leaves no unlabeled case: {source_name} has {n_train} labeled "
                                   "training cases")
    if o.run_index is not None and not 0 <= o.run_index < len(runs):
        raise SemiSAMError(f"--run-index {o.run_index} is not in 0..{len(runs) - 1} (the plan has {len(runs)} runs)")
    if o.dry_run:
        print(format_plan(runs))
        print(f"{len(runs)} run(s) on {len(derived)} derived dataset(s) of {source_name}; plans {PLANS} of "
              f"{source_name}, moved to each; output {out}")
        return 0
    if o.emit_slurm:
        from nnunet_semisam.io import atomic_write_text

        atomic_write_text(o.emit_slurm, slurm_script(resumable_command(o, source), runs, out, o.device))
        print(f"wrote {o.emit_slurm}: SLURM array of {len(runs)} run(s); submit with sbatch {o.emit_slurm}")
        return 0
    ctx = runner.Context(out, source, source_id, source_name, o.configuration, o.device, o.num_processes,
                         o.predict_workers)
    selected = runs if o.run_index is None else [runs[o.run_index]]
    plans_sha = None
    if not o.aggregate_only:
        with runner.locked(out / ".prepare.lock"):
            plans_sha = runner.prepare_source(ctx, out / "prepare.log")
            needed = {r.dataset_name for r in selected}
            for d in derived:
                if d.dataset_name in needed:
                    runner.prepare_derived(ctx, d, out / "prepare.log")
        runner.execute_all(ctx, selected, jobs=o.jobs, progress=not o.quiet)
    elif not ctx.source_plans.is_file():
        raise SemiSAMError(f"nothing to aggregate: {ctx.source_plans} does not exist (no run was prepared)")
    if plans_sha is None and ctx.source_plans.is_file():
        from nnunet_semisam.io import file_digest

        plans_sha = file_digest(ctx.source_plans)
    summary, prov = aggregate(ctx, runs, o, plans_sha)
    print((out / "summary.md").read_text(encoding="utf-8"))
    states = [v["status"] for k, v in prov["runs"].items() if k in {r.run_id for r in selected}]
    failed = states.count("failed")
    print(f"{states.count('done')} of {len(selected)} run(s) done, {failed} failed; results in {out}")
    return 1 if failed else 0
