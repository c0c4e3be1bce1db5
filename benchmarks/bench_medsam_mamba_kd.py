"""MedSAMMambaKDTrainer benchmark: accuracy at 10 % labels against supervised nnU-Net, and cost per iteration, on CPU.

Accuracy (`accuracy`): a thin caller of the benchmark machinery (`nnunet_semisam.benchmark.run_benchmark`, the code
behind `nnunet-semisam benchmark`). It generates one synthetic 2D RGB lesion dataset, fully labeled, with a test set
(`OUT/nnUNet_raw/Dataset781_KDBench`), made hard enough that labels matter (low lesion contrast, lesion-like
distractors, texture: `--contrast`, `--distractors`, `--texture`), so that the fully labeled run is well above the
10 % run and a semi-supervised gain can show. The accuracy defaults (contrast 0.18, 10 % tiny lesions, 5 % empty
images, 40 test images) were chosen with `--gap-only` (the two supervised runs, no KD run) on seed 0: supervised
nnU-Net's 10 -> 100 % gap was 9.23 Dice points at contrast 0.25 and 12.38 at 0.18, against the >= 10 the benchmark
needs; 20 test images left single runs too noisy to tell (7.75 and 11.66 in two runs of the same split). The
machinery plans it once with nnU-Net's default planner (`nnUNetPlans`), derives the 10 % dataset (`split-labels
--fraction`, seeded by `--seed`: 10 % labeled, the rest in imagesUnlabeled/, their labels kept aside) with the same
plans, and runs, through the real `nnUNetv2_train` / `nnUNetv2_predict` commands, with one schedule (`--schedule`,
default `bench`: 40 epochs x 25 iterations), on CPU, fold `all` (the machinery's default: every labeled case
trains):

1. `nnUNetTrainer_<s>` at 10 %                                 -> supervised 10 % (stock nnU-Net, PlainConvUNet)
2. LiteMedSAM alone on the test images, prompted by GT boxes   -> what the teacher knows (no training; this script)
3. `TinyMUNetTrainer_<s>` at 10 %                              -> the KD student on the labels alone (§4.8):
                                                                 architecture vs. distillation
   `MedSAMMambaKDTrainer_<s>` at 10 % (LiteMedSAM teacher)     -> the method (Tiny-MUNet student, same plans)
4. `MedSAMMambaKDTrainer_{boxOnly,noFPKDM,noFBVM}_<s>` at 10 % -> box-only setting and Table 5 ablations
   (`--no-ablations` skips them; the `smoke` schedule has no noFPKDM / noFBVM variants)
5. `MedSAMMambaKDTrainer_teacherNative_<s>` at 10 % (`--native`: FPKDM features at 256 instead of the CPU patch side;
   a `demo` variant only)
6. `MedSAMMambaKDTrainer_<v>_<s>` for every `--variants v` (e.g. `boxRefine`, §4.5)
7. `nnUNetTrainer_<s>` on the source (every training case labeled) -> supervised 100 % (the machinery's reference)

The machinery writes `OUT/summary.md` (and results.csv, summary.csv, plots, provenance.json; runs under `OUT/runs/`,
resumable: finished runs are skipped, failed runs are reported and retried by the next invocation). This script adds
row 2, the pseudo-label diagnosis of the KD runs (their last teacher targets against the labels `split-labels` kept
aside) and the gap / share-of-gap line, and writes them with the test Dice / HD95 / ASD of every run as
`OUT/kd_accuracy.md` and `.json`. It exits 1 if a run failed.

Cost (`cost`): `MedSAMMambaKDTrainer` (CPU feature side) and `_teacherNative` vs `nnUNetTrainer` on the same default
plans and data, in one process, interleaved blocks of training steps, median ms per iteration and the ratios; peak
memory of each trainer in a fresh process: peak RSS during its first 3 steps minus the RSS of the ready trainer.

    python benchmarks/bench_medsam_mamba_kd.py accuracy [--out DIR] [--num-train 60] [--num-test 40] [--size 64]
        [--contrast 0.18] [--fraction 0.1] [--schedule bench] [--no-ablations] [--native] [--variants boxRefine]
    python benchmarks/bench_medsam_mamba_kd.py accuracy --gap-only [--contrast 0.25]   # the supervised gap alone
    python benchmarks/bench_medsam_mamba_kd.py accuracy --out /tmp/kd --num-train 20 --num-test 4 --size 32 \
        --schedule smoke --no-ablations                        # a few minutes: every row once
    python benchmarks/bench_medsam_mamba_kd.py cost [--size 64] [--iters 20] [--threads 2] [--clock cpu] [--no-native]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FULL_ID, SPLIT_ID = 781, 782  # cost: its own datasets in a temporary nnU-Net tree
PLANS = "nnUNetPlans"
SOURCE_ID, SOURCE_NAME = 781, "KDBench"  # accuracy: the source dataset in OUT/nnUNet_raw
ABLATIONS = ("boxOnly", "noFPKDM", "noFBVM")
CONTROL = "TinyMUNetTrainer"  # the KD student on the labels alone (METHODS.md §4.8)


def _env(root: Path) -> dict[str, str]:
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = dict(os.environ)
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=trainers_path(), nnUNet_n_proc_DA="1",
               nnUNet_compile="false", nnUNet_def_n_proc="1", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    t0 = time.time()
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"error: {' '.join(cmd)} failed ({rc}); see {log}")
    print(f"  {time.time() - t0:.0f} s", flush=True)


def _synth_params(a: argparse.Namespace):
    from nnunet_semisam.data.synthetic import SynthParams

    return SynthParams(contrast=a.contrast, texture=a.texture, distractors=(a.distractors[0], a.distractors[1]),
                       tiny_fraction=a.tiny, empty_fraction=a.empty)


def _make_datasets(root: Path, env: dict[str, str], a: argparse.Namespace, log: Path) -> tuple[Path, Path]:
    """The cost measurement's datasets (fully labeled and split, planned and preprocessed)."""
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    raw = Path(env["nnUNet_raw"])
    full = raw / f"Dataset{FULL_ID:03d}_KDBenchFull"
    split = raw / f"Dataset{SPLIT_ID:03d}_KDBench10pct"
    if not (full / "dataset.json").is_file():
        make_synthetic_dataset(raw, FULL_ID, kind="2d-rgb", num_labeled=a.num_train, num_unlabeled=0,
                               num_test=a.num_test, shape=(a.size, a.size), seed=a.seed, name="KDBenchFull",
                               params=_synth_params(a), progress=False)
    if not (split / "split_labels.json").is_file():
        shutil.rmtree(split, ignore_errors=True)
        shutil.copytree(full, split)
        ds = json.loads((split / "dataset.json").read_text())
        ds["name"] = "KDBench10pct"
        (split / "dataset.json").write_text(json.dumps(ds, indent=2))
        _run(["nnunet-semisam", "split-labels", "-d", str(SPLIT_ID), "--fraction", str(a.fraction), "--seed",
              str(a.seed), "--quiet"], env, log)
    for did in (FULL_ID, SPLIT_ID):
        pre = Path(env["nnUNet_preprocessed"]) / (full.name if did == FULL_ID else split.name)
        if not (pre / f"{PLANS}_2d").is_dir():
            _run(["nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "2d", "-np", "1"], env, log)
    _run(["nnunet-semisam", "preprocess-unlabeled", "-d", str(SPLIT_ID), "-c", "2d", "-p", PLANS, "--quiet"], env,
         log)
    return full, split


def make_source(out: Path, a: argparse.Namespace) -> Path:
    """The fully labeled source dataset `OUT/nnUNet_raw/Dataset781_KDBench` (imagesTs / labelsTs included), made
    once; an existing one made with other options is an error (its runs would not be these options' runs)."""
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    params = _synth_params(a)
    folder = out / "nnUNet_raw" / f"Dataset{SOURCE_ID:03d}_{SOURCE_NAME}"
    if (folder / "dataset.json").is_file():
        dj = json.loads((folder / "dataset.json").read_text())
        syn = dj.get("synthetic", {})
        have = [dj.get("numTraining"), dj.get("numTest"), syn.get("seed"), syn.get("shape")]
        have += [syn.get("params", {}).get(k) for k in ("contrast", "texture", "distractors", "tiny_fraction",
                                                         "empty_fraction")]
        want = [a.num_train, a.num_test, a.seed, [a.size, a.size], params.contrast, params.texture,
                list(params.distractors), params.tiny_fraction, params.empty_fraction]
        if have != want:
            sys.exit(f"error: {folder} was made with other options ({have} != {want}); use another --out")
        return folder
    return make_synthetic_dataset(out / "nnUNet_raw", SOURCE_ID, kind="2d-rgb", num_labeled=a.num_train,
                                  num_unlabeled=0, num_test=a.num_test, shape=(a.size, a.size), seed=a.seed,
                                  name=SOURCE_NAME, params=params, progress=False, overwrite=folder.exists())


def teacher_alone(raw: Path, out: Path) -> dict:
    """LiteMedSAM's reference inference on each test image of the dataset `raw`, prompted by the §2.3 boxes of its
    ground truth, masks written to `out`; the test metrics of those masks (what the teacher gives without any
    training)."""
    import numpy as np
    from PIL import Image

    from nnunet_semisam.evaluation.metrics import evaluate_folders
    from nnunet_semisam.io import atomic_path
    from nnunet_semisam.teachers.factory import load_teacher
    from nnunet_semisam.teachers.prompts import boxes_from_mask

    if not (out / "metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        teacher = load_teacher(None)
        for gt in sorted((raw / "labelsTs").glob("*.png")):
            img = np.asarray(Image.open(raw / "imagesTs" / gt.name.replace(".png", "_0000.png")).convert("RGB"))
            lab = np.asarray(Image.open(gt)) > 0
            boxes = boxes_from_mask(lab)
            mask = np.zeros(lab.shape, np.uint8)
            if len(boxes):
                mask = (teacher.predict(img, boxes).amax(0).numpy() > 0.5).astype(np.uint8)
            with atomic_path(out / gt.name) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG")
        evaluate_folders(out, raw / "labelsTs", output_dir=out, progress=False)
    m = json.loads((out / "metrics.json").read_text())["mean"]["mean"]
    return {"Dice %": 100 * m["dice"], "HD95 px": m["hd95_vox"], "ASD px": m["asd_vox"]}


def pseudolabel_dice(fold: Path, split: Path) -> dict:
    """Diagnosis, not a result: mean Dice (%) of the trainer's last teacher targets (threshold 0.5) against the labels
    `split-labels` kept aside (`labelsUnlabeled_heldout/`, never read by training), and of the labeled GT-box targets
    against the labels. Tells whether a weak KD row comes from the pseudo-labels (closed loop) or from the student.
    `fold`: the run's fold folder; `split`: the raw folder of the derived (split) dataset it trained on."""
    import numpy as np
    from PIL import Image

    from nnunet_semisam.data.pseudolabel_store import load_pseudolabel, read_record
    from nnunet_semisam.data.split_labels import HELDOUT_LABELS
    from nnunet_semisam.evaluation.metrics import binary_metrics

    def dice(a, b):  # percent; two empty masks score 100 (the project's strict convention)
        return 100.0 * binary_metrics(a, b)["dice"]

    out = {}
    for store, labels in (("unlabeled", split / HELDOUT_LABELS), ("labeled", split / "labelsTr")):
        ds, n_avail = [], 0
        for lab in sorted(labels.glob("*.png")):
            case = lab.name[:-4]
            gt = np.asarray(Image.open(lab)) > 0
            rec = read_record(fold / "pseudolabels" / store, case)
            if rec is not None and rec.get("available"):
                n_avail += 1
                prob = load_pseudolabel(fold / "pseudolabels" / store, case)[0].reshape(gt.shape)
                ds.append(dice(prob > 0.5, gt))
            else:
                ds.append(dice(np.zeros_like(gt), gt))
        out[store] = (float(np.mean(ds)) if ds else float("nan"), n_avail, len(ds))
    return {"targets Dice % (unlab / lab)": f"{out['unlabeled'][0]:.1f} / {out['labeled'][0]:.1f}",
            "unlab. with target": f"{out['unlabeled'][1]}/{out['unlabeled'][2]}"}


def _run_row(ctx, run, label: str, labeled: str, split_raw: Path) -> dict:
    """One table row of a benchmark run from its record and metrics (the machinery's files)."""
    from nnunet_semisam.benchmark import report, runner

    rec = runner.read_record(ctx, run) or {}
    row: dict = {"run": label, "labeled": labeled}
    status = rec.get("status", "pending")
    m = report.load_json(runner.run_dir(ctx, run) / "metrics" / "metrics.json") if status == "done" else None
    if m is None:
        row["status"] = status if status != "done" else "incomplete"
        row["error"] = rec.get("error")
    else:
        m = m["mean"]["mean"]
        row.update({"Dice %": 100 * m["dice"], "HD95 px": m["hd95_vox"], "ASD px": m["asd_vox"]})
    row["train s"] = round(rec["train_s"]) if rec.get("train_s") is not None else None
    fold = runner.fold_dir(ctx, run)
    if (fold / "pseudolabels").is_dir():
        row.update(pseudolabel_dice(fold, split_raw))
    return row


def accuracy(a: argparse.Namespace) -> int:
    from nnunet_semisam.benchmark import BenchmarkOptions, make_plan, run_benchmark, runner
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.evaluation.metrics import format_markdown_table

    t_start = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for k in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc"):  # the subprocesses' data-loading workers, on a CPU box
        os.environ.setdefault(k, "1")
    source = make_source(out, a)
    kd = ["MedSAMMambaKDTrainer"] + ([] if a.no_ablations else [f"MedSAMMambaKDTrainer_{x}" for x in ABLATIONS])
    kd += ["MedSAMMambaKDTrainer_teacherNative"] if a.native else []
    kd += [f"MedSAMMambaKDTrainer_{x}" for x in a.variants]
    kd = [] if a.gap_only else [CONTROL] + kd  # the machinery always adds the supervised nnUNetTrainer runs
    o = BenchmarkOptions(out=str(out), dataset=str(source), configuration="2d", trainers=kd, fractions=[a.fraction],
                         seeds=[a.seed], schedule=a.schedule, device="cpu")
    try:
        rc = run_benchmark(o)
    except SemiSAMError as e:
        sys.exit(f"error: {e}")
    # the same plan and context run_benchmark used (o now holds the merged options), to find the runs' folders
    derived, runs = make_plan(SOURCE_ID, source.name, list(o.trainers), o.fractions, o.labeled, list(o.seeds),
                              o.configuration, o.fold, o.schedule, o.id_base, o.reference)
    ctx = runner.Context(out, source, SOURCE_ID, source.name, o.configuration, o.device)
    split_raw = ctx.raw / derived[0].dataset_name
    n_lab = sum(1 for _ in (split_raw / "labelsTr").glob("*.png"))
    at = {(r.method, r.protocol.kind): r for r in runs}
    rows = [_run_row(ctx, at[("nnUNetTrainer", "fraction")], "nnUNetTrainer, 10 % labeled",
                     f"{n_lab}/{a.num_train}", split_raw),
            {"run": "LiteMedSAM alone, GT boxes", "labeled": "-", **teacher_alone(source, out / "litemedsam_gt_boxes"),
             "train s": 0}]
    rows += [_run_row(ctx, at[(m, "fraction")], m, f"{n_lab}/{a.num_train}", split_raw) for m in kd]
    rows.append(_run_row(ctx, at[("nnUNetTrainer", "full")], "nnUNetTrainer, 100 % labeled",
                         f"{a.num_train}/{a.num_train}", split_raw))
    by = {r["run"]: r.get("Dice %") for r in rows}
    base, kd_dice = by["nnUNetTrainer, 10 % labeled"], by.get("MedSAMMambaKDTrainer")
    fullsup = by["nnUNetTrainer, 100 % labeled"]
    summary = ""
    if None not in (base, fullsup):
        gap = fullsup - base
        summary = f"gap fully labeled - 10 %: {gap:+.2f} Dice points (needs >= 10)"
        if kd_dice is not None:
            summary += (f"; KD - supervised 10 %: {kd_dice - base:+.2f} (target >= +5); share of the gap closed by "
                        f"KD: {(kd_dice - base) / gap if gap else float('nan'):.2f} (target >= 0.5)")
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c != "error"]
    table = format_markdown_table(rows, columns)
    errors = "".join(f"\n{r['run']}: {r['status']}{': ' + r['error'] if r.get('error') else ''}"
                     for r in rows if "status" in r)
    header = (f"synthetic 2d-rgb, {a.num_train} train / {a.num_test} test images of {a.size}x{a.size}, lesion "
              f"contrast {a.contrast}, texture {a.texture}, distractors {list(a.distractors)}, tiny {a.tiny}, "
              f"empty {a.empty}, seed {a.seed}, {100 * a.fraction:g} % labeled, schedule `{o.schedule}`, fold "
              f"{o.fold}, plans {PLANS}, teacher: {os.environ.get('SEMISAM_TEACHER') or 'LiteMedSAM (bundled)'}; "
              f"benchmark tables: {out / 'summary.md'}")
    text = f"{header}\n\n{table}\n{summary}\n{errors}"
    from nnunet_semisam.io import atomic_write_json, atomic_write_text

    atomic_write_text(out / "kd_accuracy.md", text)
    atomic_write_json(out / "kd_accuracy.json", {"header": header, "rows": rows, "summary": summary})
    print(f"\n{text}\ntotal {time.time() - t_start:.0f} s; {out / 'kd_accuracy.md'}")
    return rc


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """Peak RSS (MB) above the value at entry, sampled every ~1 ms by a thread."""

    def __enter__(self):
        self.before, self.peak, self._done = _rss_mb(), 0.0, threading.Event()

        def sample():
            while not self._done.is_set():
                self.peak = max(self.peak, _rss_mb())
                time.sleep(0.001)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._t.join()
        self.delta = max(self.peak, _rss_mb()) - self.before


def _step_memory_child(dataset: str, trainer: str, env: dict, queue) -> None:
    """Fresh process: build the trainer and its loaders, then the peak RSS above that during 3 training steps."""
    os.environ.update(env)
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.set_num_threads(1)
    t = get_trainer_from_args(dataset, "2d", 0, trainer, PLANS, device=torch.device("cpu"))
    t.on_train_start()
    t.network.train()
    with PeakRSS() as m:
        for _ in range(3):
            t.train_step(next(t.dataloader_train))
    queue.put(m.delta)
    queue.close()
    queue.join_thread()  # the value is sent before the hard exit below
    from step_timing import exit_now

    exit_now()  # kills the loader workers, which would outlive a plain os._exit


def step_memory_mb(trainer: str, env: dict) -> float:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_step_memory_child, args=(str(SPLIT_ID), trainer, env, queue))
    p.start()
    value = queue.get(timeout=1800)
    p.join()
    return value


def cost(a: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_kd_"))
    env = _env(root)
    nn_env = {k: v for k, v in env.items() if k.startswith("nnUNet_")}
    os.environ.update(nn_env)
    a.num_train, a.num_test, a.fraction = 30, 0, 1 / 3
    _make_datasets(root, env, a, root / "bench.log")
    names = ("nnUNetTrainer", "MedSAMMambaKDTrainer")
    names += () if a.no_native else ("MedSAMMambaKDTrainer_teacherNative",)
    peak = {}
    for name in names:
        peak[name] = step_memory_mb(name, nn_env)
        print(f"peak step memory {name}: {peak[name]:.1f} MB", flush=True)

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from step_timing import exit_now, interleaved_step_times, ready_for_steps

    torch.set_num_threads(a.threads)
    trainers = {}
    for name in names:
        trainers[name] = ready_for_steps(
            get_trainer_from_args(str(SPLIT_ID), "2d", 0, name, PLANS, device=torch.device("cpu")))
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    times = interleaved_step_times(trainers, a.iters, clock=clock)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    base = ms["nnUNetTrainer"]
    bs = trainers["nnUNetTrainer"].batch_size
    n_proj = sum(p.numel() for p in trainers["MedSAMMambaKDTrainer"].projector.parameters())
    print(f"{a.size}x{a.size} RGB, default nnU-Net plans, batch {bs} labeled (+{bs} unlabeled for KD), LiteMedSAM, "
          f"{a.threads} threads, {a.clock} clock, median of {len(times['nnUNetTrainer'])} iterations; peak memory = "
          f"peak RSS above the ready trainer during 3 steps, in a fresh process each; FPKDM projectors {n_proj:,} "
          f"parameters")
    for name in names:
        side = "" if name == "nnUNetTrainer" else f", FPKDM teacher side {trainers[name].features.side}"
        print(f"{name:32s} {ms[name]:8.1f} ms/iteration, peak step memory {peak[name]:7.1f} MB{side}")
    for name in names[1:]:
        print(f"ratio {name} / nnUNetTrainer = {ms[name] / base:.2f} (target <= 3); peak memory ratio "
              f"{peak[name] / max(peak['nnUNetTrainer'], 1e-9):.2f}")
    exit_now()  # kills the background augmenter workers, which would outlive a plain os._exit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("accuracy", "cost"):
        p = sub.add_parser(name)
        # the accuracy dataset (module docstring); `cost` keeps the generator settings its figures were measured on
        acc = name == "accuracy"
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--contrast", type=float, default=0.18 if acc else 0.25,
                       help="lesion contrast of the synthetic data (default %(default)s)")
        p.add_argument("--texture", type=float, default=0.06, help="background texture of the synthetic data")
        p.add_argument("--distractors", type=int, nargs=2, default=(1, 4), help="lesion-like distractors per image")
        p.add_argument("--tiny", type=float, default=0.1 if acc else 0.2,
                       help="share of tiny (1-2.5 px radius) lesions (default %(default)s)")
        p.add_argument("--empty", type=float, default=0.05 if acc else 0.1,
                       help="share of images without a lesion (default %(default)s)")
        p.add_argument("--seed", type=int, default=0)
        if name == "accuracy":
            p.add_argument("--out", default="kd_bench")
            p.add_argument("--num-train", type=int, default=60)
            p.add_argument("--num-test", type=int, default=40)
            p.add_argument("--fraction", type=float, default=0.1)
            p.add_argument("--schedule", default="bench", choices=("smoke", "demo", "bench"),
                           help="bench (40x25 iterations), demo (12x25) or smoke (2x10: add --no-ablations)")
            p.add_argument("--no-ablations", action="store_true",
                           help="skip the _boxOnly / _noFPKDM / _noFBVM runs")
            p.add_argument("--variants", nargs="*", default=[], metavar="SUFFIX",
                           help="more MedSAMMambaKDTrainer variants by suffix, e.g. boxRefine")
            p.add_argument("--gap-only", action="store_true",
                           help="only the supervised 10 %% and 100 %% runs and LiteMedSAM from GT boxes: checks that "
                                "a dataset leaves the >= 10-point gap a semi-supervised gain needs")
            p.add_argument("--native", action="store_true",
                           help="also FPKDM teacher features at LiteMedSAM's native 256 (slow on CPU; --schedule "
                                "demo)")
        else:
            p.add_argument("--iters", type=int, default=20)
            p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                           help="cpu: the training thread's CPU time (use with --threads 1 on a shared machine)")
            p.add_argument("--no-native", action="store_true",
                           help="leave out _teacherNative (the 256-pixel encoder: ~40 s per CPU iteration)")
            p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sys.exit(accuracy(a)) if a.what == "accuracy" else cost(a)


if __name__ == "__main__":
    main()
