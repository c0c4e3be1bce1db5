"""`nnunet-semisam merge-datasets` (METHODS.md §6.1): layout, labels, sidecar, per-source normalisation, the task
channel, bad inputs, and that the stock nnU-Net commands plan and preprocess the result."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_merged_sources, nnunet_env, run_cmd
from nnunet_semisam.data.merge_datasets import ct_statistics, merge_datasets, normalise_channel
from nnunet_semisam.errors import SemiSAMError


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def raw_env(tmp_path, monkeypatch):
    env = nnunet_env(tmp_path / "nnunet")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    return env


def test_normalise_channel_hand_made():
    x = np.array([0.0, 1.0, 2.0, 3.0, 100.0])
    z = normalise_channel(x, "zscore")
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(normalise_channel(x, "rgb_to_0_1"), x / 255, rtol=1e-6)
    np.testing.assert_allclose(normalise_channel(x, "rescale_to_0_1"), x / 100, rtol=1e-6)
    stats = {"percentile_00_5": 1.0, "percentile_99_5": 3.0, "mean": 2.0, "std": 0.5}
    np.testing.assert_allclose(normalise_channel(x, "ct", stats), [-2, -2, 0, 2, 2], rtol=1e-6)
    s = ct_statistics(np.arange(201.0))
    assert s["percentile_00_5"] == pytest.approx(1.0) and s["percentile_99_5"] == pytest.approx(199.0)
    assert s["mean"] == pytest.approx(100.0)


def test_merge_3d_three_sources_and_stock_preprocessing(raw_env, tmp_path):
    raw = Path(raw_env["nnUNet_raw"])
    make_merged_sources(raw, (11, 12, 13), ("3d",) * 3, (8, 16, 16), num_labeled=3, num_unlabeled=2, num_test=1)
    # source 2 declared as CT: clipped to its own foreground percentiles and z-scored with its foreground stats
    dj_path = raw / "Dataset012_Src12" / "dataset.json"
    dj = json.loads(dj_path.read_text())
    dj["channel_names"] = {"0": "CT"}
    dj_path.write_text(json.dumps(dj))

    out = merge_datasets([11, 12, 13], 20, "Multi", prefix_cases=True)
    assert out == raw / "Dataset020_Multi"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "noNorm", "1": "noNorm"}
    assert dj["labels"]["background"] == 0 and dj["labels"]["union"] == 4
    assert sorted(v for k, v in dj["labels"].items() if k.startswith("task")) == [1, 2, 3]
    assert dj["numTraining"] == 9 and dj["numUnlabeled"] == 6 and dj["numTest"] == 3
    side = json.loads((out / "versemi_tasks.json").read_text())
    assert side["num_tasks"] == 3 and side["union_task"] == 4 and side["task_channel"] == 1
    assert side["tasks"]["2"]["normalisation"] == ["ct"] and side["tasks"]["1"]["normalisation"] == ["zscore"]
    assert len(side["cases"]) == 18 and side["cases"]["t2_synth_0000"] == 2
    assert not list(raw.glob(".Dataset020*"))  # no temp folder left

    for case, task in side["groups"]["labeled"].items():
        src = raw / f"Dataset01{task}_Src1{task}"
        orig = read(src / "imagesTr" / f"{case[3:]}_0000.nii.gz").astype(np.float64)
        img = read(out / "imagesTr" / f"{case}_0000.nii.gz")
        chan = read(out / "imagesTr" / f"{case}_0001.nii.gz")
        lab = read(out / "labelsTr" / f"{case}.nii.gz")
        src_lab = read(src / "labelsTr" / f"{case[3:]}.nii.gz")
        assert np.all(chan == task)
        np.testing.assert_array_equal(lab, (src_lab > 0) * task)
        if task == 2:
            st = side["tasks"]["2"]["ct_statistics"]["0"]
            expect = (np.clip(orig, st["percentile_00_5"], st["percentile_99_5"]) - st["mean"]) / st["std"]
            np.testing.assert_allclose(img, expect, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_allclose(img, (orig - orig.mean()) / orig.std(), rtol=1e-4, atol=1e-4)
        assert sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz")).GetSpacing() == pytest.approx(
            sitk.ReadImage(str(src / "imagesTr" / f"{case[3:]}_0000.nii.gz")).GetSpacing())

    env = nnunet_env(Path(raw_env["nnUNet_raw"]).parent)
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", "20", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
             "--verify_dataset_integrity"], env)
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset020_Multi" / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["NoNormalization"] * 2


def test_merge_2d_png_and_nifti_sources(raw_env):
    raw = Path(raw_env["nnUNet_raw"])
    make_merged_sources(raw, (31, 32, 33), ("2d-rgb", "2d-mri", "2d-mri"), (32, 32), num_labeled=3,
                        num_unlabeled=1, num_test=0)
    out = merge_datasets(["31", "Dataset032_Src32", 33], 30, "Multi2D", prefix_cases=True)
    side = json.loads((out / "versemi_tasks.json").read_text())
    assert side["tasks"]["1"]["normalisation"] == ["rgb_to_0_1"] * 3
    assert side["task_channel"] == 3 and not (out / "imagesTs").exists()
    img = read(out / "imagesTr" / "t1_synth_0000_0001.nii.gz")
    assert img.shape == (32, 32) and 0 <= img.min() and img.max() <= 1
    assert np.all(read(out / "imagesTr" / "t3_synth_0000_0003.nii.gz") == 3)
    env = nnunet_env(raw.parent)
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", "30", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    assert (Path(env["nnUNet_preprocessed"]) / "Dataset030_Multi2D" / "nnUNetPlans_2d").is_dir()


def test_bad_inputs_one_line_errors(raw_env):
    raw = Path(raw_env["nnUNet_raw"])
    make_merged_sources(raw, (41, 42), ("3d", "3d"), (8, 16, 16), num_labeled=1, num_unlabeled=1, num_test=0)
    make_merged_sources(raw, (43,), ("2d-mri",), (16, 16), num_labeled=1, num_unlabeled=0, num_test=0)
    with pytest.raises(SemiSAMError, match=r"case name 'synth_0000' occurs in Dataset041_Src41/labeled.*"
                                           r"--prefix-cases"):
        merge_datasets([41, 42], 50, "Dup")
    with pytest.raises(SemiSAMError, match=r"Dataset043_Src43 has 3 channel\(s\) but Dataset041_Src41 has 1"):
        merge_datasets([41, 43], 50, "Chan", prefix_cases=True)
    (raw / "Dataset044_NoJson" / "imagesTr").mkdir(parents=True)
    with pytest.raises(SemiSAMError, match=r"Dataset044_NoJson/dataset.json does not exist"):
        merge_datasets([41, 44], 50, "NoJson", prefix_cases=True)
    assert not list(raw.glob("Dataset050_*")) and not list(raw.glob(".Dataset050*"))
    merge_datasets([41, 42], 50, "Ok", prefix_cases=True)
    with pytest.raises(SemiSAMError, match=r"exists; pass --overwrite"):
        merge_datasets([41, 42], 50, "Ok", prefix_cases=True)
    # the CLI prints the same message on one line, exit status 2
    proc = run_cmd(["nnunet-semisam", "merge-datasets", "-d", "41", "42", "-o", "51", "--name", "Dup"],
                   nnunet_env(raw.parent), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: case name")


def test_versemi_inputs_match_the_merged_test_images(raw_env, tmp_path):
    raw = Path(raw_env["nnUNet_raw"])
    make_merged_sources(raw, (61, 62), ("3d", "3d"), (8, 16, 16), num_labeled=2, num_unlabeled=0, num_test=1)
    dj_path = raw / "Dataset062_Src62" / "dataset.json"
    dj = json.loads(dj_path.read_text())
    dj["channel_names"] = {"0": "CT"}
    dj_path.write_text(json.dumps(dj))
    out = merge_datasets([61, 62], 60, "Two", prefix_cases=True)
    proc = run_cmd(["nnunet-semisam", "versemi-inputs", "-d", "60", "--task", "2", "-i",
                    str(raw / "Dataset062_Src62" / "imagesTs"), "-o", str(tmp_path / "inputs")],
                   nnunet_env(raw.parent))
    assert "1 case(s)" in proc.stdout
    for c in (0, 1):
        np.testing.assert_array_equal(read(tmp_path / "inputs" / f"synth_0002_{c:04d}.nii.gz"),
                                      read(out / "imagesTs" / f"t2_synth_0002_{c:04d}.nii.gz"))
    proc = run_cmd(["nnunet-semisam", "versemi-inputs", "-d", "60", "--task", "3", "-i", str(tmp_path), "-o",
                    str(tmp_path / "x")], nnunet_env(raw.parent), check=False)
    assert proc.returncode == 2 and "task 3 is not a task of Dataset060_Two" in proc.stderr
