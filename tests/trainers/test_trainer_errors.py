"""Training tells its errors in one line (issue 14): every check a trainer can make runs before nnU-Net starts a
data-augmentation worker, and a `SemiSAMError` escaping `nnUNetv2_train` is the last stderr line, `error: ...`.

The failure cases run the real `nnUNetv2_train` on broken copies of the session dataset `tiny2d`, two at a time
(module fixture `failed_runs`); none of them trains. The rest are in-process checks of the hooks behind them.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_cmd

DATASET = "Dataset990_SynthRGB"
MT = "MeanTeacherTrainer_smoke"
KD = "MedSAMMambaKDTrainer_smoke"
COMMAND = "nnunet-semisam preprocess-unlabeled -d 990 -c 2d -p nnUNetPlans"


def _manifest(base: Path, **changes) -> None:
    f = base / "nnUNetPlans_2d_unlabeled" / "manifest.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _copy_labeled_case_into_unlabeled(base: Path) -> None:
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
        shutil.copy(base / "nnUNetPlans_2d" / f"synth_0000{suffix}", base / "nnUNetPlans_2d_unlabeled")


def _stale_splits(base: Path) -> None:
    (base / "splits_final.json").write_text(json.dumps([{"train": ["synth_0000", "synth_0006"],
                                                         "val": ["synth_0001"]}] * 5))


# name: (trainer, extra environment, how to break the dataset copy, substrings of the error line)
CASES = {
    "missing-unlabeled-folder": (MT, {}, lambda b: shutil.rmtree(b / "nnUNetPlans_2d_unlabeled"),
                                 ["needs unlabeled cases but", "nnUNetPlans_2d_unlabeled", COMMAND]),
    "incomplete-manifest": (MT, {}, lambda b: _manifest(b, complete=False, num_expected=150, num_done=6),
                            ["is incomplete (6 of 150 unlabeled cases preprocessed)", COMMAND,
                             "nnUNet_semisam_allow_unlabeled_subset=1"]),
    "other-plans": (MT, {}, lambda b: _manifest(b, configuration_signature="0" * 40),
                    ["was preprocessed with other plans", f"{COMMAND} --overwrite"]),
    "unlabeled-id-is-labeled": (MT, {}, _copy_labeled_case_into_unlabeled,
                                ["both labeled preprocessed cases", "synth_0000"]),
    "stale-splits-label-leak": (MT, {}, _stale_splits, ["splits_final.json lists 1 of the unlabeled cases",
                                                        "synth_0006"]),
    "missing-labeled-folder": (MT, {}, lambda b: shutil.rmtree(b / "nnUNetPlans_2d"),
                               ["does not exist", "nnUNetv2_plan_and_preprocess -d 990 -c 2d"]),
    "abstract-base": ("SemiSupervisedTrainer", {}, None,
                      ["SemiSupervisedTrainer is the abstract base", "-tr MeanTeacherTrainer",
                       "-tr MedSAMMambaKDTrainer"]),
    "teacher-not-found": (KD, {"SEMISAM_TEACHER": "{tmp}/no_such_medsam.pth"}, None,
                          ["teacher checkpoint not found", "no_such_medsam.pth"]),
    "teacher-random-bytes": (KD, {"SEMISAM_TEACHER": "{tmp}/random.pth"}, None,
                             ["random.pth: not a SAM / MedSAM / LiteMedSAM checkpoint"]),
    "sam-ablation-without-checkpoint": ("MedSAMMambaKDTrainer_SAM", {"SEMISAM_SAM_CHECKPOINT": ""}, None,
                                        ["SEMISAM_SAM_CHECKPOINT"]),
    "kd-missing-unlabeled-before-teacher": (KD, {"SEMISAM_TEACHER": "{tmp}/random.pth"},
                                            lambda b: shutil.rmtree(b / "nnUNetPlans_2d_unlabeled"),
                                            ["needs unlabeled cases but"]),
}


def _run_case(name: str, tiny2d: dict, root: Path):
    trainer, extra, breaker, _ = CASES[name]
    tmp = root / name
    pre = tmp / "preprocessed"
    shutil.copytree(tiny2d["nnUNet_preprocessed"], pre)
    if breaker is not None:
        breaker(pre / DATASET)
    (tmp / "random.pth").write_bytes(os.urandom(4096))
    env = {**tiny2d, "nnUNet_preprocessed": str(pre), "nnUNet_results": str(tmp / "results")}
    env.update({k: v.format(tmp=tmp) for k, v in extra.items()})
    return run_cmd(["nnUNetv2_train", "990", "2d", "0", "-tr", trainer, "-device", "cpu"], env, timeout=600,
                   check=False)


@pytest.fixture(scope="module")
def failed_runs(tiny2d, tmp_path_factory):
    """{case: CompletedProcess} of every case of CASES, two subprocesses at a time."""
    root = tmp_path_factory.mktemp("trainer_errors")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run_case, name, tiny2d, root) for name in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_training_fails_at_start_with_one_error_line(failed_runs, case):
    proc = failed_runs[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    report = f"rc {proc.returncode}\n--- stderr ---\n{proc.stderr[-3000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
    assert proc.returncode != 0, report
    assert lines and lines[-1].startswith("error: "), report
    for part in CASES[case][3]:
        assert part in lines[-1], report
    assert "Traceback" not in proc.stderr, report
    assert "Epoch 0" not in proc.stdout, "refused before training (and before the data workers) started"
    assert "labeled teacher targets" not in proc.stdout, "refused before the teacher ran"


# ---------------------------------------------------------------------------------------------------- in process

@pytest.fixture
def dataset_copy(tiny2d, tmp_path, monkeypatch) -> Path:
    """A copy of tiny2d's preprocessed dataset folder, with the nnU-Net variables of this process pointing at it."""
    pre = tmp_path / "preprocessed"
    shutil.copytree(tiny2d["nnUNet_preprocessed"], pre)
    for k, v in {**tiny2d, "nnUNet_preprocessed": str(pre), "nnUNet_results": str(tmp_path / "results")}.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the trainers install theirs; restored afterwards
    return pre / DATASET


def _trainer(name: str = MT, plans: dict | None = None, folder: Path | None = None):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    if plans is None:
        return get_trainer_from_args("990", "2d", 0, name, device=torch.device("cpu"))
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(name)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return cls(plans={**plans, "continue_training": False}, configuration="2d", fold=0, dataset_json=dataset_json,
               device=torch.device("cpu"))


def _log(trainer) -> str:
    return Path(trainer.log_file).read_text(encoding="utf-8")


def test_allowed_subset_and_transductive_pool_are_stated_in_the_log(dataset_copy, monkeypatch):
    from nnunet_semisam.data.unlabeled import ALLOW_SUBSET_ENV

    _manifest(dataset_copy, complete=False, num_expected=150, num_done=6, transductive=True)
    monkeypatch.setenv(ALLOW_SUBSET_ENV, "1")
    trainer = _trainer()
    trainer.preflight()
    assert len(trainer.unlabeled_cases) == 6
    log = _log(trainer)
    assert f"{ALLOW_SUBSET_ENV}=1: training on the 6 of 150 unlabeled cases present" in log
    assert "overlaps the test images (imagesTs)" in log


def test_unlabeled_views_are_masked_when_the_configuration_masks(dataset_copy):
    """The unlabeled pipeline carries nnU-Net's MaskImageTransform exactly when the plans' configuration has
    `use_mask_for_norm` (tiny2d is RGB: no masking; the same plans with the flag set: masking)."""
    plans = json.loads((dataset_copy / "nnUNetPlans.json").read_text())
    assert _trainer(plans=plans, folder=dataset_copy).unlabeled_transforms().transforms[-1].masking == []
    plans["configurations"]["2d"]["use_mask_for_norm"] = [True, True, True]
    steps = _trainer(plans=plans, folder=dataset_copy).unlabeled_transforms().transforms[-1].masking
    assert len(steps) == 1 and steps[0].apply_to_channels == [0, 1, 2]


def test_final_validation_logs_start_and_end(dataset_copy, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_semisam.trainers.short_schedules import SMOKE_VALIDATION_ENV

    calls = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", lambda self, save=False: calls.append(save))
    monkeypatch.setenv(SMOKE_VALIDATION_ENV, "1")
    trainer = _trainer()
    trainer.perform_actual_validation(True)
    assert calls == [True]
    log = _log(trainer)
    assert "final validation: predicting 2 validation cases of fold 0" in log  # 6 labeled cases, 5 folds
    assert "final validation done: 2 cases in" in log


def test_smoke_runs_skip_the_final_validation_unless_asked(dataset_copy, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_semisam.trainers.short_schedules import SMOKE_VALIDATION_ENV

    calls = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", lambda self, save=False: calls.append(save))
    monkeypatch.delenv(SMOKE_VALIDATION_ENV, raising=False)
    for name in (MT, "nnUNetTrainer_smoke"):
        trainer = _trainer(name)
        trainer.perform_actual_validation(False)
        assert "final validation skipped (smoke schedule" in _log(trainer)
    assert calls == []
    _trainer("MeanTeacherTrainer_demo").perform_actual_validation(False)  # other schedules validate
    assert calls == [False]


def test_kd_settings_fail_before_the_teacher_loads_and_f1_builds_the_fpkdm_pair(dataset_copy):
    """`SETTINGS` (checked by the base trainer), `teacher_input_size` (`teachers.feature_side.check_side_setting`)
    `teacher_channel` and `student_box_margin` (`ClosedLoopTrainerMixin`) are one-line errors before any teacher is
    loaded; every documented side setting, "f1" included, passes, and `setup_teacher` then builds the teacher features
    at the side `feature_side` gives."""
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.networks.kd_student import feature_shapes
    from nnunet_semisam.teachers.feature_side import feature_side

    trainer = _trainer(KD)
    for attr, value, message in [("fbvm_polarity", "-1", "fbvm_polarity = '-1': expected one of estimate, +1, abs"),
                                 ("teacher_input_size", "huge", "teacher_input_size = 'huge': expected 'auto'"),
                                 ("teacher_input_size", 0, "teacher_input_size = 0: expected"),
                                 ("teacher_threshold", 1.5, "teacher_threshold = 1.5: expected 'calibrate' or"),
                                 ("teacher_threshold", "auto", "teacher_threshold = 'auto': expected 'calibrate'"),
                                 ("teacher_channel", 3, "teacher_channel = 3: the dataset has 3 image channel(s)"),
                                 ("student_box_margin", -1, "student_box_margin = -1: must be >= 0 px")]:
        old = getattr(trainer, attr)
        setattr(trainer, attr, value)
        with pytest.raises(SemiSAMError) as e:
            trainer.preflight_checks()
        assert str(e.value).startswith(f"{KD}.{attr}") and message in str(e.value), str(e.value)
        setattr(trainer, attr, old)
    assert trainer.teacher is None, "a failed setting check must come before the teacher is loaded"
    trainer.teacher_input_size = "f1"
    trainer.initialize()  # preflight (teacher loaded) is not needed first: configure_optimizers loads it once
    patch = trainer.configuration_manager.patch_size
    shapes = feature_shapes(trainer.network, trainer.num_input_channels, patch, trainer.device)
    levels = min(len(shapes), len(trainer.teacher.tap_channels))
    assert trainer.features.levels == levels == len(trainer.projector.levels)
    assert trainer.features.side == feature_side(trainer.teacher, "f1", patch, shapes[0][1], trainer.device)
    assert "FPKDM: " in _log(trainer) and f"teacher features at {trainer.features.side}x" in _log(trainer)


def test_closed_loop_progress_counts_records_written_since_the_stage_began(tmp_path):
    """The refresh's progress lines count the cases whose store record was (re)written during the stage: a record
    of an earlier round counts only once it is replaced; a line per third of the cases and one at the end."""
    from nnunet_semisam.teachers.closed_loop import ProgressLog

    ids = [f"c{i}" for i in range(7)]
    old = tmp_path / "c0.json"
    old.write_text("{}")
    os.utime(old, ns=(10**18, 10**18))  # a record of an earlier round
    lines: list[str] = []
    with ProgressLog(tmp_path, ids, "closed-loop refresh round 2", lines.append, chunks=3, poll_s=60) as progress:
        assert progress.done() == 0
        for case in ids:
            (tmp_path / f"{case}.json").write_text("{}")
            progress.check()
        (tmp_path / "manifest.json").write_text("{}")  # not a case
    assert [line.split(" (")[0] for line in lines] == [f"closed-loop refresh round 2: {i}/7 cases done"
                                                       for i in (3, 6, 7)]
    assert all(line.endswith(" s)") for line in lines)
    with ProgressLog(tmp_path, ids, "quiet", None):  # no log: no thread, nothing logged
        pass


def test_excepthook_one_line_for_semisam_errors_only(monkeypatch, capsys):
    from nnunet_semisam.errors import TRACEBACK_ENV, SemiSAMError, install_one_line_errors

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[0]))
    cleaned = []

    class Owner:
        def cleanup(self):
            cleaned.append(True)

    owner = Owner()
    install_one_line_errors(owner.cleanup)
    install_one_line_errors(owner.cleanup)  # once is enough
    hook = sys.excepthook
    hook(SemiSAMError, SemiSAMError("a\nb"), None)
    assert capsys.readouterr().err == "error: a b\n" and cleaned == [True] and seen == []
    hook(ValueError, ValueError("x"), None)
    assert seen == [ValueError] and capsys.readouterr().err == ""
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    hook(SemiSAMError, SemiSAMError("c"), None)
    assert seen == [ValueError, SemiSAMError] and capsys.readouterr().err == ""  # the full traceback instead
