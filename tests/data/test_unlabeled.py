"""Unlabeled cases: plans-exact preprocessing, resumable atomic writes, integrity check with one-line errors."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from conftest import kill_group, make_preprocessed_dataset, run_cmd, start_in_own_group


def _dataset_dir(env, prefix="Dataset"):
    raw = Path(env["nnUNet_raw"])
    return next(raw.glob(prefix + "*"))


def test_preprocessing_equals_nnunet_for_the_same_image(tiny2d, tmp_path):
    """A labeled training image copied into imagesUnlabeled must preprocess to exactly nnU-Net's array."""
    env = dict(tiny2d)
    raw = _dataset_dir(env, "Dataset990")
    pre = Path(env["nnUNet_preprocessed"]) / raw.name
    # copy the whole preprocessed+raw dataset so the session fixture stays untouched
    root = tmp_path / "copy"
    shutil.copytree(Path(env["nnUNet_raw"]).parent, root)
    env = {**env, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    raw_c = root / "raw" / raw.name
    shutil.copy(raw_c / "imagesTr" / "synth_0000_0000.png", raw_c / "imagesUnlabeled" / "copyof0_0000.png")
    dj = json.loads((raw_c / "dataset.json").read_text())
    dj["numUnlabeled"] = dj.get("numUnlabeled", 0) + 1
    (raw_c / "dataset.json").write_text(json.dumps(dj))
    out = run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", "990", "-c", "2d", "--quiet"], env).stdout
    assert "preprocessed 1 unlabeled case(s) now" in out  # the six earlier cases were skipped
    folder = root / "preprocessed" / raw.name
    lab = nnUNetDatasetBlosc2(str(folder / "nnUNetPlans_2d")).load_case("synth_0000")
    unl = nnUNetDatasetBlosc2(str(folder / "nnUNetPlans_2d_unlabeled")).load_case("copyof0")
    np.testing.assert_array_equal(np.asarray(lab[0]), np.asarray(unl[0]))
    assert unl[3]["class_locations"] == {} and unl[3]["bbox_used_for_cropping"] == lab[3]["bbox_used_for_cropping"]
    assert set(np.unique(np.asarray(unl[1]))) <= {0, -1}
    assert pre.is_dir()


def test_interrupted_run_leaves_only_complete_cases_and_resumes(tmp_path):
    env = make_preprocessed_dataset(tmp_path / "n", 991, num_labeled=5, num_unlabeled=40, num_test=1,
                                    shape=(64, 64), unlabeled=False)
    folder = Path(env["nnUNet_preprocessed"]) / "Dataset991_SynthRGB" / "nnUNetPlans_2d_unlabeled"
    proc = start_in_own_group(["nnunet-semisam", "preprocess-unlabeled", "-d", "991", "-c", "2d", "--quiet"], env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("*.pkl"))) < 3:
        time.sleep(0.05)
    kill_group(proc)
    listed = nnUNetDatasetBlosc2.get_identifiers(str(folder))
    assert 0 < len(listed) < 40, "the kill should land mid-run"
    for case in listed:  # every listed case loads completely
        data, seg, _, props = nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)
        assert np.asarray(data).shape == np.asarray(seg).shape[:0] + (3, 1, 64, 64)
    manifest = json.loads((folder / "manifest.json").read_text())  # a killed run reads as incomplete
    assert manifest["complete"] is False and manifest["num_expected"] == 40
    run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", "991", "-c", "2d", "--quiet"], env)
    assert len(nnUNetDatasetBlosc2.get_identifiers(str(folder))) == 40
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["num_done"] == 40
    assert not list(folder.glob(".partial_*")) and not list(folder.glob(".tmp_*"))
    resumed = {c: np.asarray(nnUNetDatasetBlosc2(str(folder), [c]).load_case(c)[0]) for c in listed}
    run_cmd(["nnunet-semisam", "preprocess-unlabeled", "-d", "991", "-c", "2d", "--quiet", "--overwrite"], env)
    for c, arr in resumed.items():
        np.testing.assert_array_equal(arr, np.asarray(nnUNetDatasetBlosc2(str(folder), [c]).load_case(c)[0]))


def _err(env, *args):
    proc = run_cmd(["nnunet-semisam", *args], env, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip() and "it/s]" not in l]  # drop progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_input_errors(tiny2d, tmp_path):
    base = dict(tiny2d)
    no_env = {k: v for k, v in base.items() if not k.startswith("nnUNet_")}
    assert "nnUNet_raw is not set" in _err({**no_env, "nnUNet_preprocessed": "/x"}, "verify-unlabeled", "-d", "990")
    assert "unknown dataset 4242" in _err(base, "preprocess-unlabeled", "-d", "4242", "-c", "2d")

    root = tmp_path / "copy"
    shutil.copytree(Path(base["nnUNet_raw"]).parent, root)
    env = {**base, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed")}
    unl = root / "raw" / "Dataset990_SynthRGB" / "imagesUnlabeled"
    out_folder = root / "preprocessed" / "Dataset990_SynthRGB" / "nnUNetPlans_2d_unlabeled"
    shutil.rmtree(out_folder)

    # wrong file ending
    (unl / "odd_0000.jpg").write_bytes(b"x")
    assert "odd_0000.jpg: file ending differs" in _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d")
    (unl / "odd_0000.jpg").unlink()
    victim = sorted(unl.iterdir())[0]
    backup = victim.read_bytes()
    name = victim.name
    from PIL import Image
    # wrong channel count: a grayscale PNG in an RGB dataset
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(victim)
    assert f"{name}: case {name[:-9]} has 1 channel(s)" in _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d")
    # unreadable image
    victim.write_bytes(b"not a png")
    assert f"{name}: cannot be read" in _err(env, "verify-unlabeled", "-d", "990")
    # patch larger than the image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(victim)
    assert "smaller than the patch size (64, 64)" in _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d")
    victim.write_bytes(backup)
    # numUnlabeled in dataset.json disagrees with the folder
    shutil.copy(victim, unl / "extra_0000.png")
    assert "numUnlabeled is 6 but imagesUnlabeled/ holds 7" in _err(env, "verify-unlabeled", "-d", "990")
    (unl / "extra_0000.png").unlink()
    assert not out_folder.exists() or not list(out_folder.glob("*.b2nd")), "no output on bad input"
    # empty folder
    for f in unl.iterdir():
        f.unlink()
    assert "imagesUnlabeled is missing or empty" in _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d")


def test_nan_image_rejected(tmp_path):
    from nnunet_semisam.data.synthetic import make_synthetic_dataset
    from conftest import nnunet_env

    env = nnunet_env(tmp_path)
    ds = make_synthetic_dataset(env["nnUNet_raw"], 992, kind="2d-mri", num_labeled=1, num_unlabeled=1, num_test=0,
                                shape=(32, 32), progress=False)
    f = next((Path(ds) / "imagesUnlabeled").glob("*_0001.nii.gz"))
    img = sitk.ReadImage(str(f))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[0, 0] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(f))
    assert "contains NaN or Inf" in _err(env, "verify-unlabeled", "-d", "992")
