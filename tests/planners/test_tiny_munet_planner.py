"""TinyMUNetPlanner through the real commands: plan -> preprocess -> nnUNetv2_train (plain trainer) -> predict."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_binary_png_predictions, run_cmd
from nnunet_semisam.cli import main
from nnunet_semisam.data.synthetic import make_synthetic_dataset
from nnunet_semisam.networks.tiny_munet import paper_tiny_munet

PLANS = "nnUNetPlans_TinyMUNet"


def _plans(env: dict, dataset: str) -> dict:
    return json.loads((Path(env["nnUNet_preprocessed"]) / dataset / f"{PLANS}.json").read_text())


def _fingerprint_and_plan(env: dict, dataset_id: int) -> None:
    run_cmd(["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "1"], env)
    out = run_cmd(["nnunet-semisam", "plan", "-d", str(dataset_id), "-pl", "TinyMUNetPlanner"], env).stdout
    assert f"plans identifier: {PLANS}" in out


def test_plan_train_predict_2d(env, tmp_path):
    raw = make_synthetic_dataset(env["nnUNet_raw"], 931, kind="2d-rgb", num_labeled=5, num_unlabeled=0, num_test=2,
                                 shape=(64, 64), seed=1, progress=False)
    _fingerprint_and_plan(env, 931)
    cfg = _plans(env, raw.name)["configurations"]["2d"]
    arch = cfg["architecture"]
    assert arch["network_class_name"] == "nnunet_semisam.networks.tiny_munet.TinyMUNet"
    assert all(p % 32 == 0 for p in cfg["patch_size"]) and cfg["batch_size"] >= 2
    assert arch["arch_kwargs"]["strides"] == [[1, 1]] + [[2, 2]] * 5  # = pool_op_kernel_sizes for DS targets

    out = run_cmd(["nnunet-semisam", "complexity", "-d", "931", "-c", "2d", "-p", PLANS], env)
    record = json.loads(out.stdout)
    assert record["parameters"] == sum(p.numel() for p in paper_tiny_munet(3, 2).parameters())
    assert record["input_shape"] == [1, 3, *cfg["patch_size"]] and 0 < record["gmacs_scan"] < record["gmacs"]
    assert "M parameters" in out.stderr and "GMACs" in out.stderr

    run_cmd(["nnUNetv2_preprocess", "-d", "931", "-plans_name", PLANS, "-c", "2d", "-np", "1"], env)
    run_cmd(["nnUNetv2_train", "931", "2d", "0", "-p", PLANS, "-tr", "nnUNetTrainer_smoke", "-device", "cpu"], env)
    fold = Path(env["nnUNet_results"]) / raw.name / f"nnUNetTrainer_smoke__{PLANS}__2d" / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert weights.keys() == paper_tiny_munet(3, 2).state_dict().keys()

    pred = tmp_path / "pred"
    run_cmd(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", "931", "-c", "2d", "-f", "0",
             "-p", PLANS, "-tr", "nnUNetTrainer_smoke", "-device", "cpu", "-npp", "0", "-nps", "0"], env)
    assert_binary_png_predictions(pred, raw / "labelsTs", 2)


SIZING = """
import json, sys
from nnunet_semisam.planners.tiny_munet import TinyMUNetPlanner
out = {}
for gb in (8, 24):
    p = TinyMUNetPlanner(int(sys.argv[1]), gpu_memory_target_in_gb=gb)
    for key, spacing, median in (("iso", (1.0, 1.0, 1.0), (256, 256, 256)), ("aniso", (3.0, 0.8, 0.8), (60, 400, 400)),
                                 ("2d", (1.0, 1.0), (1024, 1024))):
        arch, patch, bs = p.size_network(spacing, median, 1e9, {})
        est = p._estimate(patch, arch, 1, 2, {})
        ref = (p.UNet_reference_val_2d if len(spacing) == 2 else p.UNet_reference_val_3d) * gb / 8
        ref_bs = p.UNet_reference_val_corresp_bs_2d if len(spacing) == 2 else p.UNet_reference_val_corresp_bs_3d
        out[f"{key}_{gb}"] = dict(patch=patch, bs=bs, strides=arch["arch_kwargs"]["strides"],
                                  fits=est / ref_bs * 2 <= ref)
print(json.dumps(out))
"""


def test_plan_3d_and_memory_driven_sizing(env):
    raw = make_synthetic_dataset(env["nnUNet_raw"], 932, kind="3d", num_labeled=3, num_unlabeled=0, num_test=0,
                                 shape=(24, 64, 64), seed=2, progress=False)
    _fingerprint_and_plan(env, 932)
    cfg = _plans(env, raw.name)["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    assert kw["conv_op"].endswith("Conv3d") and kw["norm_op"].endswith("InstanceNorm3d") and len(kw["strides"]) == 6
    divisor = np.prod(np.array(kw["strides"]), axis=0)
    assert all(p % d == 0 for p, d in zip(cfg["patch_size"], divisor))

    # the network nnU-Net builds from these plans gives one output per deep-supervision scale nnU-Net computes
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    net = get_network_from_plans(cfg["architecture"]["network_class_name"], kw,
                                 cfg["architecture"]["_kw_requires_import"], 1, 2, deep_supervision=True)
    outputs = net(torch.zeros(1, 1, *cfg["patch_size"]))
    scales = 1 / np.cumprod(np.vstack(kw["strides"]), axis=0)[:-1]  # nnUNetTrainer._get_deep_supervision_scales
    assert [list(o.shape[2:]) for o in outputs] == [[round(p * s) for p, s in zip(cfg["patch_size"], sc)]
                                                    for sc in scales]

    sizes = json.loads(run_cmd([sys.executable, "-c", SIZING, "932"], env).stdout.strip().splitlines()[-1])
    for key, s in sizes.items():
        assert s["fits"] and s["bs"] >= 2, (key, s)
        divisor = np.prod(np.array(s["strides"]), axis=0)
        assert all(p % d == 0 for p, d in zip(s["patch"], divisor)), (key, s)
    assert sizes["iso_8"]["patch"] != [256, 256, 256], "an 8 GB target must shrink a 256^3 patch"
    for key in ("iso", "aniso", "2d"):  # more memory never gives a smaller patch
        assert np.prod(sizes[f"{key}_24"]["patch"]) >= np.prod(sizes[f"{key}_8"]["patch"])
    assert sizes["aniso_8"]["strides"][1][0] == 1, "the coarse z axis is not pooled first"


def test_cli_errors_are_one_line(capsys, tmp_path, monkeypatch):
    assert main(["plan", "-d", "1", "-pl", "NoSuchPlanner"]) == 2
    assert "planner class 'NoSuchPlanner' not found" in capsys.readouterr().err
    assert main(["complexity"]) == 2
    assert "give either -d ID" in capsys.readouterr().err
    assert main(["complexity", "--preset", "paper", "--patch", "64", "64", "64"]) == 2
    assert "--patch needs 2 sizes" in capsys.readouterr().err


def test_complexity_preset_paper(capsys):
    assert main(["complexity", "--preset", "paper", "--patch", "64", "64"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["parameters"] == 1297578 and record["input_shape"] == [1, 3, 64, 64]
    assert record["macs"] == record["macs_conv_linear"] + record["macs_scan"]
    assert "paper Tiny-MUNet: 1.298 M parameters" in captured.err


@pytest.mark.parametrize("name", ["TinyMUNetPlanner", "ExperimentPlanner", "nnUNetPlannerResEncM"])
def test_planner_lookup(name):
    from nnunet_semisam.cli.plan import find_planner
    assert find_planner(name).__name__ == name
