"""Preparing the datasets of a benchmark and executing its runs, resumably, through the real nnU-Net commands.

Layout under the output folder OUT (its own nnU-Net tree, so nothing is written to the user's nnU-Net folders):

    OUT/nnUNet_raw/<source>/             hard-linked copy of the source dataset (files linked, dataset.json copied)
    OUT/nnUNet_raw/<derived>/            hard-linked copy, then `nnunet-semisam split-labels` (seeded)
    OUT/nnUNet_preprocessed/<source>/    `nnUNetv2_plan_and_preprocess` (the one set of plans, nnUNetPlans)
    OUT/nnUNet_preprocessed/<derived>/   plans moved by `nnUNetv2_move_plans_between_datasets`, then
                                         `nnUNetv2_preprocess` and `nnunet-semisam preprocess-unlabeled`
    OUT/runs/<run id>/nnUNet_results/    the run's own nnUNet_results (`nnUNetv2_train`)
    OUT/runs/<run id>/predictions/       `nnUNetv2_predict` of the test set (imagesTs), renamed in place when complete
    OUT/runs/<run id>/metrics/           `evaluate_folders` against labelsTs (metrics.json / .csv / .md)
    OUT/runs/<run id>/run.json           the run's record: status (done / failed / running), cost, plans digest
    OUT/runs/<run id>/run.log            every command of the run and its output

Resuming: a run with checkpoint_final.pth, complete predictions and metrics.json is skipped; a run with
checkpoint_latest.pth is continued with `--c`; a run that fails is recorded as failed with its log's last line and
retried by the next invocation. Each prepared dataset carries a `.benchmark_ready.json` marker written last; a
dataset without it is rebuilt from scratch (hard links: cheap).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nnunet_semisam.benchmark.plan import PLANS, Derived, Run
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_write_json, file_digest

READY = ".benchmark_ready.json"
RUN_RECORD = "run.json"


class RunFailed(Exception):
    """A command of a run failed; the message is the last line of its log."""


# ------------------------------------------------------------------------------------------------ plans identity

def plans_digest(plans_file: str | os.PathLike) -> str:
    """sha256 of a plans file's content without `dataset_name` (the one key the plan-transfer tool changes), as
    canonical JSON: equal digests mean identical patch size, spacing, normalisation and network."""
    plans = json.loads(Path(plans_file).read_text(encoding="utf-8"))
    plans.pop("dataset_name", None)
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ context

@dataclass
class Context:
    out: Path
    source_dir: Path  # the source raw dataset folder (may already be OUT/nnUNet_raw/<name>)
    source_id: int
    source_name: str
    configuration: str
    device: str = "cuda"
    num_processes: int = 1  # preprocessing workers
    predict_workers: int = 0  # nnUNetv2_predict -npp/-nps (0: sequential, no worker processes)
    extra_env: dict = field(default_factory=dict)

    @property
    def raw(self) -> Path:
        return self.out / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.out / "nnUNet_preprocessed"

    @property
    def source_copy(self) -> Path:
        return self.raw / self.source_name

    @property
    def source_plans(self) -> Path:
        return self.preprocessed / self.source_name / f"{PLANS}.json"

    def env(self, results: Path | None = None, gpu: str | None = None) -> dict[str, str]:
        from nnunet_semisam.cli.trainers_path import trainers_path

        env = dict(os.environ)
        ext = [trainers_path()] + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(results or self.out / "nnUNet_results"),
                   nnUNet_extTrainer=os.pathsep.join(dict.fromkeys(ext)), PYTHONUNBUFFERED="1")
        env.setdefault("nnUNet_compile", "false")
        env.update(self.extra_env)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (several SLURM tasks preparing the same datasets wait for each other)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def last_line(log: Path) -> str:
    """Last non-empty line of a log (the exception message of a traceback), '' if none."""
    if not log.is_file():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - 65536))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()
                 if ln.strip() and not ln.startswith(("# exit ", "$ "))]  # skip the runner's own lines
    return lines[-1][:500] if lines else ""


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run `cmd` with its output appended to `log`; (exit code, wall seconds, peak RSS MB of the process).

    The command runs in its own process group, which is killed once the command has ended: a trainer killed hard
    (e.g. by the out-of-memory killer) leaves nnU-Net's data-loader workers running, and they hold memory (GBs for
    workers forked from a large trainer) until something kills them.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError as e:
            f.write(f"{e}\n")
            return 127, 0.0, 0.0
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            _kill_group(p.pid)
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        f.write(f"# exit {rc} after {time.time() - t0:.1f} s\n")
    return rc, time.time() - t0, usage.ru_maxrss / 1024.0  # Linux: ru_maxrss in KiB


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of process group `pgid` (nothing when the command cleaned up after itself)."""
    if not hasattr(os, "killpg"):  # not POSIX: no process groups to clean
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _check(cmd: list[str], env: dict[str, str], log: Path) -> None:
    rc, _, _ = run_logged(cmd, env, log)
    if rc:
        raise SemiSAMError(f"{' '.join(cmd[:2])} failed (exit {rc}): {last_line(log)} (log: {log})")


# ------------------------------------------------------------------------------------------------ datasets

_COPY_NOT_LINK = (".json",)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the dataset folder `src` to `dst`: files hard-linked (copied across file systems), JSON files copied.
    Built under a temporary name and renamed, so `dst` exists only complete."""
    tmp = dst.parent / f".tmp_{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        dirs[:] = [d for d in dirs if not (rel == Path(".") and d in skip) and not d.startswith(".")]
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith("."):
                continue
            s, d = Path(root) / name, tmp / rel / name
            if name.endswith(_COPY_NOT_LINK):
                shutil.copy2(s, d)
                continue
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _count_cases(folder: Path, ending: str) -> int:
    return sum(1 for f in folder.iterdir() if f.name.endswith(ending) and not f.name.startswith(".")) \
        if folder.is_dir() else 0


def check_source(folder: Path) -> dict:
    """The source dataset.json, after checking that the folder is a usable fully labeled dataset with a test set."""
    dj_file = folder / "dataset.json"
    if not dj_file.is_file():
        raise SemiSAMError(f"{dj_file} does not exist: not an nnU-Net raw dataset")
    dj = json.loads(dj_file.read_text(encoding="utf-8"))
    ending = dj.get("file_ending", "")
    for sub in ("imagesTs", "labelsTs"):
        if _count_cases(folder / sub, ending) == 0:
            raise SemiSAMError(f"{folder.name} has no {sub}/ cases: the benchmark evaluates on the dataset's test "
                               f"set (imagesTs + labelsTs); convert it with a test split")
    if (folder / "split_labels.json").is_file():
        raise SemiSAMError(f"{folder.name} is already split (split_labels.json): give the fully labeled dataset")
    if _count_cases(folder / "labelsTr", ending) < 2:
        raise SemiSAMError(f"{folder.name} needs at least 2 labeled training cases in labelsTr/")
    return dj


def prepare_source(ctx: Context, log: Path) -> str:
    """Copy, plan and preprocess the source once; returns the sha256 of its plans file (the one set of plans)."""
    pre = ctx.preprocessed / ctx.source_name
    marker = pre / READY
    if marker.is_file() and ctx.source_plans.is_file():
        return json.loads(marker.read_text())["plans_sha256"]
    if ctx.source_dir.resolve() != ctx.source_copy.resolve() and not (ctx.source_copy / "dataset.json").is_file():
        link_tree(ctx.source_dir, ctx.source_copy)
    env = ctx.env()
    n = str(ctx.num_processes)  # -npfp too: nnU-Net's default spawns 8 fingerprint workers
    _check(["nnUNetv2_plan_and_preprocess", "-d", str(ctx.source_id), "-c", ctx.configuration, "-np", n, "-npfp", n],
           env, log)
    if not ctx.source_plans.is_file():
        raise SemiSAMError(f"nnUNetv2_plan_and_preprocess wrote no {ctx.source_plans}")
    plans = json.loads(ctx.source_plans.read_text())
    if ctx.configuration not in plans.get("configurations", {}):
        raise SemiSAMError(f"the plans of {ctx.source_name} have no {ctx.configuration} configuration (e.g. a 2D "
                           f"dataset has no 3d_fullres): choose -c from {', '.join(plans['configurations'])}")
    sha = file_digest(ctx.source_plans)
    atomic_write_json(marker, {"plans_sha256": sha, "plans_digest": plans_digest(ctx.source_plans)})
    return sha


def prepare_derived(ctx: Context, d: Derived, log: Path) -> str:
    """Split, move the source's plans onto, and preprocess one derived dataset; returns its plans digest."""
    raw, pre = ctx.raw / d.dataset_name, ctx.preprocessed / d.dataset_name
    marker = raw / READY
    expected = plans_digest(ctx.source_plans)
    if marker.is_file():
        digest = json.loads(marker.read_text())["plans_digest"]
        if digest != expected:
            raise SemiSAMError(f"{d.dataset_name} was prepared with other plans than {ctx.source_name}'s (digest "
                               f"{digest[:12]} != {expected[:12]}): delete {raw} and {pre} and re-run")
        return digest
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(pre, ignore_errors=True)
    link_tree(ctx.source_copy, raw, skip=())
    dj = json.loads((raw / "dataset.json").read_text())
    dj["name"] = d.dataset_name.split("_", 1)[1]
    atomic_write_json(raw / "dataset.json", dj)
    env = ctx.env()
    _check(["nnunet-semisam", "split-labels", "-d", str(d.dataset_id), *d.protocol.split_args(), "--seed",
            str(d.seed), "--quiet"], env, log)
    pre.mkdir(parents=True, exist_ok=True)
    _check(["nnUNetv2_move_plans_between_datasets", "-s", str(ctx.source_id), "-t", str(d.dataset_id), "-sp", PLANS,
            "-tp", PLANS], env, log)
    digest = plans_digest(pre / f"{PLANS}.json")
    if digest != expected:
        raise SemiSAMError(f"the plans moved to {d.dataset_name} differ from {ctx.source_name}'s")
    shutil.copy2(raw / "dataset.json", pre / "dataset.json")  # as nnU-Net's planner does; preprocessing reads it
    # the fingerprint the shared plans were made from (nnUNetv2_train copies it next to the model)
    shutil.copy2(ctx.preprocessed / ctx.source_name / "dataset_fingerprint.json", pre / "dataset_fingerprint.json")
    _check(["nnUNetv2_preprocess", "-d", str(d.dataset_id), "-plans_name", PLANS, "-c", ctx.configuration, "-np",
            str(ctx.num_processes)], env, log)
    _check(["nnunet-semisam", "preprocess-unlabeled", "-d", str(d.dataset_id), "-c", ctx.configuration, "-p", PLANS,
            "-np", str(ctx.num_processes), "--quiet"], env, log)
    split = json.loads((raw / "split_labels.json").read_text())
    atomic_write_json(marker, {"plans_digest": digest, "split_labels": {k: split.get(k) for k in ("request",)}})
    return digest


# ------------------------------------------------------------------------------------------------ runs

def run_dir(ctx: Context, run: Run) -> Path:
    return ctx.out / "runs" / run.run_id


def fold_dir(ctx: Context, run: Run) -> Path:
    return (run_dir(ctx, run) / "nnUNet_results" / run.dataset_name /
            f"{run.trainer}__{PLANS}__{run.configuration}" / f"fold_{run.fold}")


def test_cases(ctx: Context) -> list[str]:
    """File names of the reference test segmentations (labelsTs) of the source."""
    dj = json.loads((ctx.source_copy / "dataset.json").read_text())
    ending = dj["file_ending"]
    return sorted(f.name for f in (ctx.source_copy / "labelsTs").iterdir()
                  if f.name.endswith(ending) and not f.name.startswith("."))


def read_record(ctx: Context, run: Run) -> dict | None:
    f = run_dir(ctx, run) / RUN_RECORD
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return None


def is_complete(ctx: Context, run: Run) -> bool:
    """Final checkpoint, every test prediction and metrics.json present."""
    rd = run_dir(ctx, run)
    pred = rd / "predictions"
    return ((fold_dir(ctx, run) / "checkpoint_final.pth").is_file() and (rd / "metrics" / "metrics.json").is_file()
            and pred.is_dir() and all((pred / c).is_file() for c in test_cases(ctx)))


def training_cost(fold: Path) -> dict:
    """Training time from nnU-Net's own logs (sum of 'Epoch time', right for resumed runs too) and its schedule."""
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(fold.glob("training_log_*.txt")))
    epochs = [float(t) for t in re.findall(r"Epoch time: ([\d.]+) s", text)]
    iters = None
    dbg = fold / "debug.json"
    if dbg.is_file():
        with contextlib.suppress(ValueError, KeyError):
            iters = int(json.loads(dbg.read_text())["num_iterations_per_epoch"])
    train_s = sum(epochs)
    return {"train_s": train_s, "epochs_logged": len(epochs), "iterations_per_epoch": iters,
            "s_per_iteration": train_s / (len(epochs) * iters) if epochs and iters else None}


def execute_run(ctx: Context, run: Run, gpu: str | None = None) -> dict:
    """Train, predict and evaluate one run, resuming what exists; returns (and writes) its record."""
    from nnunet_semisam.evaluation.metrics import evaluate_folders

    rd, fold = run_dir(ctx, run), fold_dir(ctx, run)
    old = read_record(ctx, run) or {}
    if is_complete(ctx, run) and old.get("status") == "done":
        return {**old, "skipped": True}
    rd.mkdir(parents=True, exist_ok=True)
    log = rd / "run.log"
    attempts = list(old.get("attempts", []))
    attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "gpu": gpu}
    attempts.append(attempt)
    record = {**run.to_dict(), "status": "running", "attempts": attempts, "error": None}
    atomic_write_json(rd / RUN_RECORD, record)
    results = rd / "nnUNet_results"
    env = ctx.env(results, gpu)
    try:
        if not (fold / "checkpoint_final.pth").is_file():
            resume = (fold / "checkpoint_latest.pth").is_file()
            cmd = ["nnUNetv2_train", str(run.dataset_id), run.configuration, run.fold, "-tr", run.trainer, "-p",
                   PLANS, "-device", ctx.device] + (["--c"] if resume else [])
            rc, wall, rss = run_logged(cmd, env, log)
            attempt.update(resumed=resume, train_rc=rc, train_wall_s=wall, train_peak_rss_mb=rss)
            if rc or not (fold / "checkpoint_final.pth").is_file():
                raise RunFailed(last_line(log) or f"nnUNetv2_train exited {rc} without checkpoint_final.pth")
        pred, cases = rd / "predictions", test_cases(ctx)
        if not (pred.is_dir() and all((pred / c).is_file() for c in cases)):
            tmp = rd / ".predictions_tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            w = str(ctx.predict_workers)
            cmd = ["nnUNetv2_predict", "-i", str(ctx.source_copy / "imagesTs"), "-o", str(tmp), "-d",
                   str(run.dataset_id), "-c", run.configuration, "-f", run.fold, "-tr", run.trainer, "-p", PLANS,
                   "-device", ctx.device, "-npp", w, "-nps", w, "--disable_progress_bar"]
            rc, wall, _ = run_logged(cmd, env, log)
            attempt.update(predict_rc=rc, predict_wall_s=wall)
            missing = [c for c in cases if not (tmp / c).is_file()]
            if rc or missing:
                raise RunFailed(last_line(log) or f"nnUNetv2_predict left {len(missing)} test case(s) unpredicted")
            shutil.rmtree(pred, ignore_errors=True)
            os.replace(tmp, pred)
        try:
            evaluate_folders(pred, ctx.source_copy / "labelsTs", output_dir=rd / "metrics", progress=False)
        except SemiSAMError as e:
            raise RunFailed(f"evaluate: {e}") from None
    except RunFailed as e:
        record.update(status="failed", error=str(e))
        atomic_write_json(rd / RUN_RECORD, record)
        return record
    plans_used = fold.parent / "plans.json"
    walls = [a.get("train_wall_s") for a in attempts if a.get("train_wall_s") is not None]
    rss = [a.get("train_peak_rss_mb") for a in attempts if a.get("train_peak_rss_mb")]
    record.update(status="done", **training_cost(fold),
                  train_wall_s=sum(walls) if walls else None, peak_rss_mb=max(rss) if rss else None,
                  plans_digest=plans_digest(plans_used) if plans_used.is_file() else None,
                  checkpoint_sha256=file_digest(fold / "checkpoint_final.pth"),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(rd / RUN_RECORD, record)
    return record


def visible_gpus(device: str) -> list[str]:
    """GPU ids to spread jobs over: CUDA_VISIBLE_DEVICES if set, else every device torch sees (cuda only)."""
    if device != "cuda":
        return []
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return [g.strip() for g in vis.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover - no torch CUDA
        return []


def execute_all(ctx: Context, runs: list[Run], jobs: int = 1, progress: bool = True) -> list[dict]:
    """Execute `runs`, `jobs` at a time (one GPU each when several are visible), with a progress bar over runs."""
    import queue
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    gpus = visible_gpus(ctx.device)
    jobs = max(1, jobs)
    free: queue.Queue = queue.Queue()
    slots = gpus if len(gpus) > 1 else [None]
    for i in range(jobs):
        free.put(slots[i % len(slots)])

    def one(run: Run) -> dict:
        gpu = free.get()
        try:
            return execute_run(ctx, run, gpu)
        finally:
            free.put(gpu)

    records = []
    with tqdm(total=len(runs), desc="benchmark runs", unit="run", disable=not progress, file=sys.stderr) as bar:
        if jobs == 1:
            for r in runs:
                bar.set_postfix_str(r.run_id)
                records.append(one(r))
                bar.update()
        else:
            with ThreadPoolExecutor(jobs) as pool:
                futures = {pool.submit(one, r): r for r in runs}
                for f in as_completed(futures):
                    records.append(f.result())
                    bar.set_postfix_str(futures[f].run_id)
                    bar.update()
    return records
