"""The `baselines-2d` / `baselines-3d` presets of `nnunet-semisam benchmark` (issue 16): every baseline of METHODS.md
§8 against supervised nnU-Net at the same 10 % labels, 3 seeds, in 2D and 3D. Plans only (`--dry-run`); the full
comparison is CPU-hours."""
import dataclasses
import importlib
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semisam.benchmark import BenchmarkOptions, resolve_source, run_benchmark
from nnunet_semisam.benchmark.presets import BASELINES, get_preset

MODULES = {"MeanTeacherTrainer": "mean_teacher", "UAMTTrainer": "uamt", "CPSTrainer": "cps", "BCPTrainer": "bcp",
           "URPCTrainer": "urpc", "MCNetPlusTrainer": "mcnet_plus", "CCTTrainer": "cct"}


def test_baselines_are_every_method_of_section_8_with_a_demo_variant():
    assert set(BASELINES) == set(MODULES)
    for name, module in MODULES.items():
        assert hasattr(importlib.import_module(f"nnunet_semisam.trainers.{module}"), f"{name}_demo")


@pytest.mark.parametrize("preset, configuration", [("baselines-2d", "2d"), ("baselines-3d", "3d_fullres")])
def test_baseline_preset_plan(preset, configuration, tmp_path, capsys):
    p = get_preset(preset)
    assert p.configuration == configuration and p.fractions == (0.1,) and p.seeds == (0, 1, 2)
    assert run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset=preset, dry_run=True)) == 0
    text = capsys.readouterr().out
    runs = re.findall(r"^\s*\d+\s+(\S+)\s+(\S+)\s+(\S+) \((\S+), fold all\)", text, flags=re.M)
    # per seed: supervised nnU-Net then every baseline, at 10 %; then the fully labeled reference
    expected = [(f"10pct_s{s}_{m}", f"{m}_demo") for s in (0, 1, 2) for m in ("nnUNetTrainer",) + BASELINES]
    expected.append(("full_nnUNetTrainer", "nnUNetTrainer_demo"))
    assert [(r[0], r[2]) for r in runs] == expected
    assert {r[3] for r in runs} == {configuration}
    assert not (tmp_path / "o").exists()  # a dry run generates nothing


def test_baselines_3d_has_large_lesions(tmp_path):
    """The 3D preset's generator settings reach make_synthetic_dataset as SynthParams (resolve_source): its lesions
    are large enough (no tiny ones) for fully labeled nnU-Net to beat 10 % labels at the `_demo` schedule."""
    p = get_preset("baselines-3d")
    syn = {**p.synthetic, "num_labeled": 3, "num_test": 0}  # a small copy of the preset's dataset
    small = dataclasses.replace(p, synthetic=syn)
    folder, did, name = resolve_source(BenchmarkOptions(out=str(tmp_path), preset="baselines-3d"), small, tmp_path)
    assert (did, name) == (887, "Dataset887_BenchBaselines3DLarge") and folder.is_dir()
    recorded = json.loads((folder / "dataset.json").read_text())["synthetic"]["params"]
    assert recorded["tiny_fraction"] == 0.0 and tuple(recorded["size"]) == (0.15, 0.35)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in sorted((folder / "labelsTr").iterdir())]
    assert labels[0].shape == (16, 40, 40)
    assert np.mean([lab.mean() for lab in labels if lab.any()]) > 0.01  # the default generator: 0.4 %
