"""Shared test fixtures: isolated nnU-Net folders and a runner for the real CLI commands in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest


def cpus_per_worker() -> int:
    """This pytest process's share of the cores: all of them, or cores // workers under pytest-xdist."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


#: folder whose `sitecustomize.py` caps `multiprocessing.cpu_count()` in child processes (see that file)
CHILD_SITE = Path(__file__).with_name("child_site")


def nnunet_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for nnU-Net child processes with raw/preprocessed/results under `root`.

    One data-augmentation worker (`nnUNet_n_proc_DA=1`; 0 would break nnU-Net's planner) and no torch.compile
    keep CPU runs short; `nnUNet_extTrainer` points at this plugin's trainers. The children see only this worker's
    share of the cores (`tests/child_site/sitecustomize.py`): nnU-Net's CPU commands set torch's thread count to the
    core count, and two xdist workers' commands would otherwise oversubscribe the machine 2x.
    """
    from nnunet_semisam.cli.trainers_path import trainers_path

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHILD_SITE), env.get("PYTHONPATH", "")) if p)
    env["nnUNet_semisam_test_cpus"] = str(cpus_per_worker())
    for k in ("raw", "preprocessed", "results"):
        (root / k).mkdir(parents=True, exist_ok=True)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "preprocessed"),
        nnUNet_results=str(root / "results"),
        nnUNet_extTrainer=trainers_path(),
        nnUNet_n_proc_DA="1",  # 0 breaks nnU-Net 2.8.1 planning (torch.set_num_threads(0))
        nnUNet_compile="false",
        nnUNet_def_n_proc="1",  # nnU-Net's final validation spawns this many export workers
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cmd(cmd: Sequence[str], env: dict[str, str], timeout: float = 900, check: bool = True,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run a console command (e.g. `nnUNetv2_train`, `nnunet-semisam`), capture output, fail with its tail."""
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          encoding="utf-8", errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def start_in_own_group(cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` (output discarded) as the leader of a new process group, for `kill_group`."""
    return subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process of its group, then reap it: worker processes (nnU-Net's data augmentation,
    preprocessing pools) outlive a killed parent otherwise and keep polling as orphans."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def kill_after_first_checkpoint(cmd: Sequence[str], env: dict[str, str], fold: Path, timeout: float = 600) -> Path:
    """Start `nnUNetv2_train` (cmd), SIGKILL it once `fold/checkpoint_latest.pth` appears; return that path.

    Asserts the run was killed before it finished (no `checkpoint_final.pth`). The whole process group is killed,
    the data-loading workers included.
    """
    import time

    proc = start_in_own_group(cmd, env)
    latest = fold / "checkpoint_latest.pth"
    deadline = time.time() + timeout
    while time.time() < deadline and not latest.exists() and proc.poll() is None:
        time.sleep(0.1)
    kill_group(proc)
    assert latest.exists() and not (fold / "checkpoint_final.pth").exists(), "killed after the epoch-0 checkpoint"
    return latest


def assert_binary_png_predictions(pred: Path, labels: Path, n: int) -> None:
    """`pred` holds one PNG per ground-truth PNG in `labels` (there are `n`), same shape, values in {0, 1}."""
    import numpy as np
    from PIL import Image

    gts = sorted(labels.glob("*.png"))
    assert len(gts) == n
    for gt in gts:
        p = np.asarray(Image.open(pred / gt.name))
        assert p.shape == np.asarray(Image.open(gt)).shape and set(np.unique(p)) <= {0, 1}


def training_log(fold: Path) -> str:
    """All of nnU-Net's training logs of a fold folder, oldest first (a resumed run writes a second one)."""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(fold.glob("training_log_*.txt")))


def trainer_from_checkpoint(env: dict[str, str], monkeypatch, dataset: str, trainer: str, checkpoint: Path):
    """The trainer class `nnUNetv2_train` would build (nnU-Net folders from `env`), CPU, with `checkpoint` loaded."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for k, v in env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    t = get_trainer_from_args(dataset, "2d", 0, trainer, device=torch.device("cpu"))
    t.load_checkpoint(str(checkpoint))
    return t


@pytest.fixture
def nnunet_root(tmp_path: Path) -> Path:
    """A fresh folder holding raw/, preprocessed/ and results/ for one test."""
    return tmp_path / "nnunet"


@pytest.fixture
def env(nnunet_root: Path) -> dict[str, str]:
    """Child-process environment pointing nnU-Net at `nnunet_root` (see `nnunet_env`)."""
    return nnunet_env(nnunet_root)


PYTHON = sys.executable


def make_preprocessed_dataset(root: Path, dataset_id: int, kind: str = "2d-rgb", num_labeled: int = 6,
                              num_unlabeled: int = 6, num_test: int = 2, shape=(64, 64), seed: int = 0,
                              unlabeled: bool = True, configuration: str = "2d") -> dict[str, str]:
    """Synthetic dataset -> nnUNetv2_plan_and_preprocess -> preprocess-unlabeled (one configuration, `2d` or
    `3d_fullres`), under `root`; returns env."""
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    env = nnunet_env(root)
    make_synthetic_dataset(env["nnUNet_raw"], dataset_id, kind=kind, num_labeled=num_labeled,
                           num_unlabeled=num_unlabeled, num_test=num_test, shape=shape, seed=seed, progress=False)
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1", "-npfp", "1"],
            env)
    if unlabeled and num_unlabeled:
        run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", str(dataset_id), "-c", configuration, "--quiet"], env)
    return env


#: volume shape of the session 3D datasets: the smallest for which nnU-Net still plans 3 stages (12x24x24 trains a
#: 3D smoke schedule in about half the time of 16x32x32)
TINY3D_SHAPE = (12, 24, 24)

#: test modules (or module::Class scopes) that run nnU-Net trainings in subprocesses, slowest first, from the
#: `--durations` report on a quiet 2-core machine. pytest-xdist (`--dist loadscope`) hands scopes to its workers in
#: collection order, so starting the longest ones first keeps both workers busy until the end (longest processing
#: time first) instead of leaving one worker alone with a 10-minute module.
SLOWEST_FIRST = (
    "trainers/test_baselines_e2e.py::TestBaselines3D",
    "trainers/test_medsam_mamba_kd_e2e.py",
    "trainers/test_baselines_e2e.py::TestBaselines2D",
    "distributed/test_ddp.py",
    "trainers/test_semisam_plus_e2e.py",
    "trainers/test_mn_cotrain_e2e.py",
    "benchmark/test_benchmark_e2e.py",
    "cli/test_demo.py",
    "teachers/test_pseudolabel_cli.py",
    "trainers/test_versemi_e2e.py",
    "planners/test_tiny_munet_planner.py",
    "trainers/test_uamt_cps.py",
    "trainers/test_mean_teacher_e2e.py",
    "trainers/test_trainer_errors.py",
    "trainers/test_bcp.py",
    "trainers/test_tiny_munet_trainer.py",
)


def pytest_configure(config):
    """In-process torch work gets this worker's share of the cores too (two workers x all cores oversubscribe)."""
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        import torch

        torch.set_num_threads(cpus_per_worker())


def pytest_collection_modifyitems(config, items):
    """Run the scopes of `SLOWEST_FIRST` first, in that order; every other test keeps its place after them."""
    def rank(item) -> int:
        node = item.nodeid.removeprefix("tests/")
        for i, prefix in enumerate(SLOWEST_FIRST):
            if node.startswith(prefix + "::") or node == prefix:
                return i
        return len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a scope is unchanged


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory) -> dict[str, str]:
    """Session-wide preprocessed 2D RGB dataset 990 (6 labeled, 6 unlabeled, 2 test, 64x64), unlabeled preprocessed.

    Tests that train must point nnUNet_results at their own folder (`with_results`).
    """
    return make_preprocessed_dataset(tmp_path_factory.mktemp("tiny2d"), 990)


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory) -> dict[str, str]:
    """Session-wide preprocessed 3D dataset 991 (`3d` synthetic kind, 3 MRI-like channels; 6 labeled, 4 unlabeled,
    2 test volumes of 12x24x24, planned as a 3-stage PlainConvUNet), `3d_fullres` only, unlabeled preprocessed. Train
    with `with_results`."""
    return make_preprocessed_dataset(tmp_path_factory.mktemp("tiny3d"), 991, kind="3d", num_labeled=6,
                                     num_unlabeled=4, num_test=2, shape=TINY3D_SHAPE, configuration="3d_fullres")


def with_results(env: dict[str, str], folder: Path) -> dict[str, str]:
    """Copy of `env` with nnUNet_results set to `folder` (so trainings of different tests do not collide)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {**env, "nnUNet_results": str(folder)}


def tiny_configuration(dim: int):
    """nnU-Net `ConfigurationManager` of a 3-stage PlainConvUNet (4, 8, 8 features; 3D pools only Y and X at the
    first stride), for in-process network and trainer tests without a dataset."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    strides = [[1, 1], [2, 2], [2, 2]] if dim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    conv = "torch.nn.modules.conv.Conv2d" if dim == 2 else "torch.nn.modules.conv.Conv3d"
    norm = "torch.nn.modules.instancenorm.InstanceNorm2d" if dim == 2 else \
        "torch.nn.modules.instancenorm.InstanceNorm3d"
    return ConfigurationManager({
        "patch_size": [16, 16] if dim == 2 else [8, 16, 16],
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": conv,
                            "kernel_sizes": [[3] * dim] * 3, "strides": strides, "n_conv_per_stage": [1, 1, 1],
                            "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "norm_op": norm,
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}})
def make_merged_sources(raw: str | Path, ids: Sequence[int], kinds: Sequence[str], shape, num_labeled: int = 4,
                        num_unlabeled: int = 2, num_test: int = 1) -> None:
    """Synthetic source datasets for `merge-datasets` (different seeds, so the tasks differ)."""
    from nnunet_semisam.data.synthetic import make_synthetic_dataset

    for i, (dataset_id, kind) in enumerate(zip(ids, kinds)):
        make_synthetic_dataset(raw, dataset_id, kind=kind, num_labeled=num_labeled, num_unlabeled=num_unlabeled,
                               num_test=num_test, shape=shape, seed=100 + i, name=f"Src{dataset_id}", progress=False)


@pytest.fixture(scope="session")
def versemi3d(tmp_path_factory) -> dict[str, str]:
    """Session-wide merged 3-task 3D dataset 920 (`nnunet-semisam merge-datasets -d 921 922 923 -o 920 --name
    VerSemi3D --prefix-cases`; each source 4 labeled, 2 unlabeled, 1 test volume of 16x32x32), planned and
    preprocessed `3d_fullres`, unlabeled preprocessed. Train with `with_results`."""
    env = nnunet_env(tmp_path_factory.mktemp("versemi3d"))
    make_merged_sources(env["nnUNet_raw"], (921, 922, 923), ("3d",) * 3, TINY3D_SHAPE)
    run_cmd(["nnunet-semisam", "merge-datasets", "-d", "921", "922", "923", "-o", "920", "--name", "VerSemi3D",
             "--prefix-cases", "--no-progress"], env)
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", "920", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", "920", "-c", "3d_fullres", "--quiet"], env)
    return env
