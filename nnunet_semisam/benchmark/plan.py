"""The run list of a benchmark: dataset x label protocols x seeds x methods, deterministic (METHODS.md §11).

A *protocol* is how many training cases stay labeled: a fraction (`--fractions 0.1`), a count (`--labeled 4`) or
every case (`full`, the fully labeled supervised reference). Every (protocol, seed) but `full` gets its own derived
nnU-Net dataset (`split-labels` of a copy of the source, seeded by the seed); `full` trains on the source copy.

Derived dataset ids count up from `id_base` in plan order (fractions ascending, then counts ascending, each over the
seeds in the order given), skipping the source's id, so the same arguments always give the same ids and names
(`DatasetNNN_<Source>_<protocol>_s<seed>`). Runs are numbered in order: per derived dataset the supervised baseline
first, then the requested trainers; the fully labeled reference last. The run id (`10pct_s0_MeanTeacherTrainer`,
`full_nnUNetTrainer`) names the run's folder and is what resuming keys on; the index is what `--run-index` (one
SLURM array task) selects.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from nnunet_semisam.errors import SemiSAMError

BASELINE = "nnUNetTrainer"
PLANS = "nnUNetPlans"
# schedule -> trainer-name suffix (full: the trainer as named)
SCHEDULES = {"smoke": "_smoke", "demo": "_demo", "bench": "_bench", "5epochs": "_5epochs", "full": ""}
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


@dataclass(frozen=True)
class Protocol:
    kind: str  # "fraction", "labeled" or "full"
    value: float | int | None = None

    @property
    def slug(self) -> str:
        """File-name form: 10pct, 12p5pct, 4lab, full."""
        if self.kind == "fraction":
            return f"{100 * self.value:g}".replace(".", "p") + "pct"
        if self.kind == "labeled":
            return f"{self.value}lab"
        return "full"

    @property
    def label(self) -> str:
        """Table form: '10 %', '4 labeled', '100 %'."""
        if self.kind == "fraction":
            return f"{100 * self.value:g} %"
        if self.kind == "labeled":
            return f"{self.value} labeled"
        return "100 %"

    def split_args(self) -> list[str]:
        if self.kind == "fraction":
            return ["--fraction", repr(float(self.value))]
        if self.kind == "labeled":
            return ["--num-labeled", str(int(self.value))]
        raise ValueError("the full protocol has no split")

    def labeled_fraction(self, num_training: int) -> float:
        """Share of the training pool that is labeled (x axis of the Dice plot)."""
        if self.kind == "fraction":
            return float(self.value)
        if self.kind == "labeled":
            return int(self.value) / max(num_training, 1)
        return 1.0


@dataclass(frozen=True)
class Derived:
    """One derived dataset: a (protocol, seed) split of the source."""
    protocol: Protocol
    seed: int
    dataset_id: int
    dataset_name: str  # DatasetNNN_Name


@dataclass(frozen=True)
class Run:
    index: int
    method: str  # trainer as the user named it (table row), e.g. MeanTeacherTrainer
    trainer: str  # class nnUNetv2_train gets, with the schedule suffix
    protocol: Protocol
    seed: int | None  # None for the fully labeled reference (no split)
    dataset_id: int
    dataset_name: str
    configuration: str
    fold: str

    @property
    def run_id(self) -> str:
        seed = "" if self.seed is None else f"_s{self.seed}"
        return f"{self.protocol.slug}{seed}_{self.method}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_id"] = self.run_id
        d["protocol"] = {"kind": self.protocol.kind, "value": self.protocol.value, "label": self.protocol.label}
        return d


def trainer_name(method: str, schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise SemiSAMError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return method + SCHEDULES[schedule]


def protocols(fractions: Sequence[float] | None, labeled: Sequence[int] | None) -> list[Protocol]:
    """Validated label protocols, fractions ascending then counts ascending (duplicates dropped)."""
    out = []
    for f in sorted(set(fractions or [])):
        if not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 < f < 1.0):
            raise SemiSAMError(f"--fractions must lie in (0, 1), got {f}")
        out.append(Protocol("fraction", float(f)))
    for n in sorted(set(labeled or [])):
        if int(n) != n or n < 1:
            raise SemiSAMError(f"--labeled must be whole numbers >= 1, got {n}")
        out.append(Protocol("labeled", int(n)))
    if not out:
        raise SemiSAMError("give at least one label protocol: --fractions 0.1 0.2 and/or --labeled 4 8 16")
    return out


def derived_datasets(source_id: int, source_short_name: str, protos: Sequence[Protocol], seeds: Sequence[int],
                     id_base: int) -> list[Derived]:
    """The derived datasets in plan order, with their deterministic ids and names."""
    if not seeds:
        raise SemiSAMError("give at least one seed (--seeds 0 1 2)")
    if len(set(seeds)) != len(seeds):
        raise SemiSAMError(f"--seeds has duplicates: {list(seeds)}")
    if any(int(s) != s or s < 0 for s in seeds):
        raise SemiSAMError(f"--seeds must be whole numbers >= 0, got {list(seeds)}")
    out, next_id = [], id_base
    for p in protos:
        for s in seeds:
            if next_id == source_id:
                next_id += 1
            if next_id > 999:
                raise SemiSAMError(f"derived dataset ids run past 999 (from --id-base {id_base}, "
                                   f"{len(protos) * len(seeds)} datasets): choose a lower --id-base")
            out.append(Derived(p, int(s), next_id, f"Dataset{next_id:03d}_{source_short_name}_{p.slug}_s{s}"))
            next_id += 1
    return out


def make_plan(source_id: int, source_name: str, trainers: Sequence[str], fractions: Sequence[float] | None,
              labeled: Sequence[int] | None, seeds: Sequence[int], configuration: str = "2d", fold: str = "all",
              schedule: str = "smoke", id_base: int = 900, reference: bool = True) -> tuple[list[Derived], list[Run]]:
    """(derived datasets, runs) of a benchmark. `source_name` is the source's `DatasetXXX_Name`.

    The supervised baseline `nnUNetTrainer` is added first (a repeat in `trainers` is dropped); `reference` adds the
    fully labeled baseline run on the source. Raises SemiSAMError on bad input (before anything runs).
    """
    if configuration not in CONFIGURATIONS:
        raise SemiSAMError(f"unknown configuration {configuration!r}; choose one of {', '.join(CONFIGURATIONS)}")
    if fold != "all" and not str(fold).isdigit():
        raise SemiSAMError(f"-f must be a fold number or 'all', got {fold!r}")
    if not 1 <= id_base <= 999:
        raise SemiSAMError(f"--id-base must be in 1..999, got {id_base}")
    for t in trainers:
        if any(t.endswith(sfx) for sfx in SCHEDULES.values() if sfx):
            raise SemiSAMError(f"give the trainer without its schedule suffix ({t!r}); --schedule picks the variant")
    methods = list(dict.fromkeys([BASELINE, *trainers]))
    short = source_name.split("_", 1)[1] if "_" in source_name else source_name
    derived = derived_datasets(source_id, short, protocols(fractions, labeled), seeds, id_base)
    runs: list[Run] = []
    for d in derived:
        for m in methods:
            runs.append(Run(len(runs), m, trainer_name(m, schedule), d.protocol, d.seed, d.dataset_id,
                            d.dataset_name, configuration, str(fold)))
    if reference:
        runs.append(Run(len(runs), BASELINE, trainer_name(BASELINE, schedule), Protocol("full"), None, source_id,
                        source_name, configuration, str(fold)))
    return derived, runs


def format_plan(runs: Sequence[Run]) -> str:
    """The `--dry-run` listing: one line per run."""
    lines = [f"{'#':>3}  {'run id':40s} {'dataset':40s} trainer"]
    for r in runs:
        lines.append(f"{r.index:>3}  {r.run_id:40s} {r.dataset_name:40s} {r.trainer} ({r.configuration}, fold "
                     f"{r.fold})")
    return "\n".join(lines)
