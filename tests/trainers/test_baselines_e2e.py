"""Every baseline trainer (METHODS.md §8.2-8.7) through the real nnU-Net commands, 2d and 3d_fullres: `nnUNetv2_train
-tr <Trainer>_smoke -device cpu`, every loss term in the log, `nnUNetv2_predict` of the test images with the trained
fold, then `nnunet-semisam evaluate` against the test labels.

One parametrized test per configuration on the session datasets `tiny2d` / `tiny3d`, each in its own class so that
pytest-xdist (`--dist loadscope`) runs the two configurations on different workers; the 2D CPS and BCP runs are their
kill/resume tests (`RESUMED_2D`), which finish with the same checks. The method-specific checks
(hand-computed losses, `--c` restores, phases) live in each method's own test file.
"""
import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cmd, training_log, with_results

#: trainer class -> module of nnunet_semisam.trainers
BASELINES = {
    "UAMTTrainer": "uamt",
    "CPSTrainer": "cps",
    "BCPTrainer": "bcp",
    "URPCTrainer": "urpc",
    "MCNetPlusTrainer": "mcnet_plus",
    "CCTTrainer": "cct",
}
DATASETS = {"2d": ("990", "Dataset990_SynthRGB", "tiny2d", ".png"),
            "3d_fullres": ("991", "Dataset991_Synth3D", "tiny3d", ".nii.gz")}
TERM = re.compile(r"(\w+) (\S+) \(w (\S+)\)")


def trainer_class(name: str):
    return getattr(importlib.import_module(f"nnunet_semisam.trainers.{BASELINES[name]}"), name)


def logged_terms(log: str) -> list[dict[str, tuple[float, float]]]:
    """Per epoch: {term: (mean loss, mean weight)} from the base trainer's `loss terms: ...` lines."""
    epochs = []
    for line in re.findall(r"loss terms: (.*)", log):
        epochs.append({name: (float(loss), float(w)) for name, loss, w in TERM.findall(line)})
    return epochs


def train_predict_evaluate(name, configuration, request, tmp_path):
    dataset_id, dataset_name, fixture, _ = DATASETS[configuration]
    env = with_results(request.getfixturevalue(fixture), tmp_path / "results")
    trainer = f"{name}_smoke"
    run_cmd(["nnUNetv2_train", dataset_id, configuration, "0", "-tr", trainer, "-device", "cpu"], env)
    check_predict_evaluate(name, configuration, env, tmp_path)


def check_predict_evaluate(name, configuration, env, tmp_path):
    """The checks of a finished `<name>_smoke` training in `tmp_path/results`, then predict and evaluate."""
    dataset_id, dataset_name, _, ending = DATASETS[configuration]
    trainer = f"{name}_smoke"
    fold = tmp_path / "results" / dataset_name / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"

    # every term of the method in nnU-Net's log, finite; every non-diagnostic term weighted in some epoch
    cls = trainer_class(name)
    epochs = logged_terms(training_log(fold))
    assert len(epochs) == 2, training_log(fold)
    diagnostic = set(getattr(cls, "diagnostic_terms", ()))
    for term in cls.loss_terms:
        seen = [e[term] for e in epochs if term in e]
        assert len(seen) == 2, f"{term} missing from the log of {trainer}"
        assert any(math.isfinite(loss) for loss, _ in seen), f"{term} never finite: {seen}"
        if term not in diagnostic:
            assert any(w > 0 for _, w in seen), f"{term} never weighted: {seen}"
    assert len(set(cls.loss_terms) - {"supervised"} - diagnostic) >= 1
    assert (fold / "progress_terms.png").is_file()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["semisam"]["global_step"] == 20

    raw = Path(env["nnUNet_raw"]) / dataset_name
    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", dataset_id, "-c", configuration,
             "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"], env)
    assert sorted(p.name for p in pred.glob(f"*{ending}")) == sorted(p.name for p in (raw / "labelsTs").iterdir())
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(raw / "labelsTs")], env)
    metrics = json.loads((pred / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_cases"] == 2 and len(metrics["cases"]) == 2


#: their 2D runs are the kill/resume tests of test_uamt_cps.py and test_bcp.py, which end with
#: `check_predict_evaluate` (one training each instead of two)
RESUMED_2D = ("CPSTrainer", "BCPTrainer")


class TestBaselines2D:
    @pytest.mark.parametrize("name", [n for n in BASELINES if n not in RESUMED_2D])
    def test_train_predict_evaluate(self, name, request, tmp_path):
        train_predict_evaluate(name, "2d", request, tmp_path)


class TestBaselines3D:
    @pytest.mark.parametrize("name", list(BASELINES))
    def test_train_predict_evaluate(self, name, request, tmp_path):
        train_predict_evaluate(name, "3d_fullres", request, tmp_path)
