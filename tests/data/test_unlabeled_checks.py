"""Unlabeled data that is misnamed, colliding, changed, partial, truncated or inconsistent is an error or a redo,
never a silent wrong result (issue 14, items 1-4 and the raw-folder errors)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from conftest import make_preprocessed_dataset, run_cmd

DS = "Dataset990_SynthRGB"


def _err(env, *args) -> str:
    """Run `nnunet-semisam args`, assert exit 2 and a one-line `error: ...` as the last stderr line; return it."""
    proc = run_cmd(["nnunet-semisam", *args], env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip() and "it/s]" not in l]
    assert lines and lines[-1].startswith("error: ") and len(lines) == 1, proc.stderr
    return lines[-1]


def _ok(env, *args) -> str:
    return run_cmd(["nnunet-semisam", *args, "--quiet"], env).stdout


@pytest.fixture
def copy2d(tiny2d, tmp_path):
    """A private copy of the session's tiny 2D dataset (raw + preprocessed, unlabeled preprocessed)."""
    root = tmp_path / "copy"
    shutil.copytree(Path(tiny2d["nnUNet_raw"]).parent, root)
    env = {**tiny2d, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    return env, root / "raw" / DS, root / "preprocessed" / DS / "nnUNetPlans_2d_unlabeled"


def _set_num_unlabeled(raw: Path, delta: int) -> None:
    dj = json.loads((raw / "dataset.json").read_text())
    dj["numUnlabeled"] = dj["numUnlabeled"] + delta
    (raw / "dataset.json").write_text(json.dumps(dj))


def test_file_without_channel_suffix_is_named(copy2d):
    """Item 1: `synth_0019.png` is not channel 19 of case `synth`."""
    env, raw, _ = copy2d
    src = sorted((raw / "imagesUnlabeled").iterdir())[0]
    shutil.copy(src, raw / "imagesUnlabeled" / "synth_0019.png")
    _set_num_unlabeled(raw, 1)
    for cmd in (("verify-unlabeled", "-d", "990"), ("preprocess-unlabeled", "-d", "990", "-c", "2d")):
        line = _err(env, *cmd)
        assert "synth_0019.png: channel index 0019" in line and "did you mean synth_0019_0000.png" in line


def test_ids_shared_with_imagesTr_or_imagesTs_are_refused(copy2d):
    """Item 2: an unlabeled case may not reuse a labeled (or test) case's identifier; --transductive allows test."""
    env, raw, _ = copy2d
    unl = raw / "imagesUnlabeled"
    labeled = sorted((raw / "imagesTr").iterdir())[0]
    shutil.copy(labeled, unl / labeled.name)
    _set_num_unlabeled(raw, 1)
    line = _err(env, "verify-unlabeled", "-d", "990")
    assert "both labeled cases" in line and labeled.name[:-9] in line
    assert "both labeled cases" in _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d")
    (unl / labeled.name).unlink()
    test = sorted((raw / "imagesTs").iterdir())[0]
    shutil.copy(test, unl / test.name)
    line = _err(env, "verify-unlabeled", "-d", "990")
    assert "test cases" in line and test.name[:-9] in line and "--transductive" in line
    assert "OK: 7 case(s)" in _ok(env, "verify-unlabeled", "-d", "990", "--transductive")


def test_changed_and_removed_raw_cases_are_redone_and_dropped(copy2d):
    """Item 3: a replaced raw image is preprocessed again; a case gone from imagesUnlabeled leaves the folder."""
    env, raw, folder = copy2d
    unl = sorted((raw / "imagesUnlabeled").iterdir())
    a, b, gone = unl[0], unl[1], unl[2]
    case = lambda f: f.name[:-9]  # noqa: E731 - CASE_0000.png -> CASE
    load = lambda c: np.asarray(nnUNetDatasetBlosc2(str(folder), [c]).load_case(c)[0])  # noqa: E731
    assert not np.array_equal(load(case(a)), load(case(b)))
    b.touch()  # same bytes, new mtime: reused
    assert "preprocessed 0 unlabeled case(s) now; 6 of 6 done" in _ok(env, "preprocess-unlabeled", "-d", "990")
    shutil.copy(a, b)  # the user replaces an image
    gone.unlink()
    _set_num_unlabeled(raw, -1)
    out = _ok(env, "preprocess-unlabeled", "-d", "990")
    assert "preprocessed 1 unlabeled case(s) now (1 redone because their raw files changed; 1 removed" in out
    np.testing.assert_array_equal(load(case(b)), load(case(a)))
    assert case(gone) not in nnUNetDatasetBlosc2.get_identifiers(str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_expected"] == manifest["num_done"] == 5 and manifest["complete"] is True


def test_manifest_tells_partial_from_complete_and_the_library_check_refuses(copy2d, monkeypatch):
    """Item 4: a subset run leaves `complete: false`; `check_preprocessed_unlabeled` (what trainers call) refuses
    it, names the command, and accepts it only when a subset is allowed explicitly."""
    from nnunet_semisam.data.unlabeled import check_preprocessed_unlabeled, preprocess_unlabeled
    from nnunet_semisam.errors import SemiSAMError

    env, raw, folder = copy2d
    plans = json.loads((folder.parent / "nnUNetPlans.json").read_text())
    labeled = nnUNetDatasetBlosc2.get_identifiers(str(folder.parent / "nnUNetPlans_2d"))
    cases, manifest = check_preprocessed_unlabeled(folder, plans, "2d", labeled)
    assert len(cases) == 6 and manifest["complete"]
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    shutil.rmtree(folder)
    first = sorted(p.name[:-9] for p in (raw / "imagesUnlabeled").iterdir())[:2]
    report = preprocess_unlabeled(990, "2d", cases=first, progress=False, verify=False)
    assert report.num_done == 2 and report.num_expected == 6 and not report.complete
    with pytest.raises(SemiSAMError, match=r"incomplete \(2 of 6 unlabeled cases preprocessed\): run `CMD`"):
        check_preprocessed_unlabeled(folder, plans, "2d", labeled, command="CMD")
    assert len(check_preprocessed_unlabeled(folder, plans, "2d", labeled, allow_subset=True)[0]) == 2
    with pytest.raises(SemiSAMError, match="both labeled preprocessed cases"):
        check_preprocessed_unlabeled(folder, plans, "2d", labeled + first[:1], allow_subset=True)
    splits = folder.parent / "splits_final.json"
    splits.write_text(json.dumps([{"train": labeled[:3] + first[:1], "val": labeled[3:]}]))
    with pytest.raises(SemiSAMError, match="splits_final.json lists 1 of the unlabeled cases .* as train cases"):
        check_preprocessed_unlabeled(folder, plans, "2d", labeled, splits_file=splits, allow_subset=True)


def test_rgb_case_with_one_channel_is_named_even_without_verify(copy2d):
    """--no-verify skips the integrity pass, not the checks that would otherwise fail inside a training worker."""
    from PIL import Image

    env, raw, folder = copy2d
    victim = sorted((raw / "imagesUnlabeled").iterdir())[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(victim)
    line = _err(env, "preprocess-unlabeled", "-d", "990", "-c", "2d", "--no-verify", "--quiet")
    assert f"{victim.name}: case {victim.name[:-9]} has 1 channel(s)" in line


def test_dataset_json_without_channel_names(copy2d):
    env, raw, _ = copy2d
    dj = json.loads((raw / "dataset.json").read_text())
    dj.pop("channel_names")
    (raw / "dataset.json").write_text(json.dumps(dj))
    assert "dataset.json has no 'channel_names' entry" in _err(env, "verify-unlabeled", "-d", "990")


@pytest.fixture(scope="module")
def mri2d(tmp_path_factory):
    """A planned two-channel NIfTI dataset (993), unlabeled cases not yet preprocessed."""
    return make_preprocessed_dataset(tmp_path_factory.mktemp("mri2d"), 993, kind="2d-mri", num_labeled=3,
                                     num_unlabeled=2, num_test=0, shape=(32, 32), unlabeled=False)


def test_truncated_nifti_and_mismatched_channels_are_named(mri2d):
    env = mri2d
    unl = next(Path(env["nnUNet_raw"]).glob("Dataset993_*")) / "imagesUnlabeled"
    out = next(Path(env["nnUNet_preprocessed"]).glob("Dataset993_*")) / "nnUNetPlans_2d_unlabeled"
    first = sorted(unl.glob("*_0001.nii.gz"))[0]
    backup = first.read_bytes()
    first.write_bytes(backup[: len(backup) // 2])  # truncated, e.g. an interrupted copy
    assert f"{first.name}: cannot be read (truncated" in _err(env, "verify-unlabeled", "-d", "993")
    line = _err(env, "preprocess-unlabeled", "-d", "993", "-c", "2d", "--no-verify")
    assert f"{first.name}: cannot be read (truncated" in line  # never zero-filled by the reader
    assert not list(out.glob("*.b2nd"))
    img = sitk.ReadImage(str(unl / first.name.replace("_0001", "_0000")))
    small = sitk.GetImageFromArray(np.zeros((16, 16), np.float32))
    small.SetSpacing(img.GetSpacing())
    sitk.WriteImage(small, str(first))
    for cmd in (("verify-unlabeled", "-d", "993"), ("preprocess-unlabeled", "-d", "993", "-c", "2d", "--no-verify")):
        line = _err(env, *cmd)
        assert "has channel files of different sizes" in line and first.name in line
    first.write_bytes(backup)
    assert "2 of 2 done" in _ok(env, "preprocess-unlabeled", "-d", "993")


def test_pseudolabel_all_refuses_an_id_in_both_pools(copy2d):
    """Item 2 downstream: a preprocessed unlabeled case sharing a labeled case's id (made before these checks
    existed) would get the labeled case's pseudo-label file; `pseudolabel --cases all` refuses it."""
    env, raw, folder = copy2d
    labeled = folder.parent / "nnUNetPlans_2d"
    for f in labeled.glob("synth_0000*"):
        shutil.copy(f, folder / f.name)
    line = _err(env, "pseudolabel", "-d", "990", "-c", "2d", "--prompts", "student", "--student-model",
                str(raw), "--cases", "all")
    assert "1 case identifier is both labeled cases" in line and "synth_0000" in line
