"""Per-task scores of a merged multi-task dataset (VerSemi, METHODS.md §6.6).

`nnunet-semisam evaluate PRED GT --labels 1 .. K` scores every label in every case; on a merged dataset a case only
has its own task's label, and (strict empty mode) an absent label predicted absent counts as Dice 1. The score of
task k is therefore the mean of label k over the cases of task k only (`versemi_tasks.json`).
"""
from __future__ import annotations

from nnunet_semisam.errors import SemiSAMError


def _case_name(entry: dict, ending: str) -> str:
    name = entry["case"]
    return name[:-len(ending)] if ending and name.endswith(ending) else name


def per_task_scores(metrics: dict, sidecar: dict, metric: str = "dice") -> dict[int, dict]:
    """{task: {"n": cases, metric: mean over that task's cases of label task}} from evaluate's metrics.json."""
    ending = metrics.get("file_ending", ".nii.gz")
    by_task: dict[int, list[float]] = {}
    for entry in metrics["cases"]:
        case = _case_name(entry, ending)
        if case not in sidecar["cases"]:
            raise SemiSAMError(f"case {case!r} of the evaluation has no task id in versemi_tasks.json")
        task = int(sidecar["cases"][case])
        scores = entry["metrics"].get(str(task))
        if scores is None:
            raise SemiSAMError(f"case {case!r} was not scored for label {task}: evaluate with --labels 1 .. "
                               f"{sidecar['num_tasks']}")
        by_task.setdefault(task, []).append(float(scores[metric]))
    return {t: {"n": len(v), metric: sum(v) / len(v)} for t, v in sorted(by_task.items())}
