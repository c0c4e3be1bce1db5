"""Synthetic lesion datasets: determinism, nnU-Net raw layout and readers, lesion statistics, difficulty, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import run_cmd
from nnunet_semisam.data.synthetic import SynthParams, make_synthetic_dataset, synth_case
from nnunet_semisam.errors import SemiSAMError

SMALL = {"2d-rgb": (48, 48), "2d-mri": (48, 48), "3d": (16, 32, 32)}


def _case(kind: str, i: int, shape=None, params: SynthParams | None = None):
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(i + 1)[i])
    return synth_case(rng, kind, shape or {"3d": (32, 64, 64)}.get(kind, (128, 128)), params)


def _gray(kind: str, img: np.ndarray) -> np.ndarray:
    """Intensity a threshold would use: mean of RGB for photos, FLAIR (channel 0) for the MRI kinds."""
    return img.astype(np.float64).mean(0) if kind == "2d-rgb" else img[0].astype(np.float64)


def _foreground_of_image(kind: str, g: np.ndarray) -> np.ndarray:
    """Where the object is: everything for photos, the head (above 5% of the max) for MRI."""
    return np.ones(g.shape, bool) if kind == "2d-rgb" else g > 0.05 * g.max()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# single cases


@pytest.mark.parametrize("kind,channels,dtype", [("2d-rgb", 3, np.uint8), ("2d-mri", 3, np.float32),
                                                 ("3d", 1, np.float32)])
def test_synth_case_shapes_and_determinism(kind, channels, dtype):
    shape = SMALL[kind]
    img, lab = synth_case(np.random.default_rng(5), kind, shape)
    img2, lab2 = synth_case(np.random.default_rng(5), kind, shape)
    assert img.shape == (channels, *shape) and img.dtype == dtype
    assert lab.shape == shape and lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
    assert np.isfinite(img).all() and img.min() >= 0


def test_synth_case_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(SemiSAMError, match="unknown synthetic kind"):
        synth_case(rng, "2d-ct", (32, 32))
    with pytest.raises(SemiSAMError, match="invalid for kind '3d'"):
        synth_case(rng, "3d", (32, 32))
    with pytest.raises(SemiSAMError, match="spacing"):
        synth_case(rng, "2d-mri", (32, 32), SynthParams(spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(SemiSAMError, match="empty_fraction"):
        SynthParams(empty_fraction=1.5)
    with pytest.raises(SemiSAMError, match="polarity"):
        SynthParams(polarity=0)


@pytest.mark.parametrize("kind", ["2d-rgb", "2d-mri", "3d"])
def test_lesion_statistics_and_low_contrast(kind):
    """Over 40 cases: some empty masks (p=0.1), tiny lesions present, several lesions per image, and a lesion
    intensity shift that is small against the background variability (|mean_fg - mean_bg| / std_bg)."""
    n = 24 if kind == "3d" else 40
    empty, tiny, multi, ratios = 0, 0, 0, []
    for i in range(n):
        img, lab = _case(kind, i)
        if not lab.any():
            empty += 1
            continue
        sizes = np.bincount(ndimage.label(lab)[0].ravel())[1:]
        tiny += int((sizes <= 20).any())
        multi += int(len(sizes) >= 2)
        g = _gray(kind, img)
        bg = g[_foreground_of_image(kind, g) & (lab == 0)]
        ratios.append(abs(g[lab > 0].mean() - bg.mean()) / bg.std())
    assert 1 <= empty <= 0.3 * n, empty          # expectation 0.1 * n; seeded, so the count is fixed
    assert tiny >= 0.2 * n, tiny                 # tiny lesions (<= 20 voxels) occur in many images
    assert multi >= 0.3 * n, multi
    assert np.median(ratios) < 1.5 and max(ratios) < 3.0, ratios   # low contrast: well inside the texture spread
    assert np.median(ratios) > 0.3, ratios                          # ... but not invisible


@pytest.mark.parametrize("kind", ["2d-rgb", "2d-mri", "3d"])
def test_otsu_threshold_does_not_solve_it(kind):
    """A global Otsu threshold, with the better of the two polarities, scores a mean Dice far below 0.9."""
    from skimage.filters import threshold_otsu

    dices = []
    for i in range(20):
        img, lab = _case(kind, i)
        if not lab.any():
            continue
        g = _gray(kind, img)
        obj = _foreground_of_image(kind, g)
        th = threshold_otsu(g[obj])
        best = 0.0
        for pred in (obj & (g > th), obj & (g <= th)):
            best = max(best, 2 * (pred & (lab > 0)).sum() / (pred.sum() + lab.sum()))
        dices.append(best)
    assert np.mean(dices) < 0.5 and max(dices) < 0.9, dices   # spec: "clearly below 0.9"; measured means <= 0.2


@pytest.mark.parametrize("kind,sign", [("2d-rgb", -1), ("2d-mri", 1), ("3d", 1)])
def test_polarity_default_and_flip(kind, sign):
    """Default: rgb lesions darker, MRI lesions brighter in FLAIR and darker in T1; polarity=-1 flips them."""
    for polarity, expect in ((None, sign), (-sign, -sign)):
        shifts, t1_shifts = [], []
        for i in range(12):
            img, lab = _case(kind, i, params=SynthParams(polarity=polarity))
            if not lab.any():
                continue
            g = _gray(kind, img)
            ring = ndimage.binary_dilation(lab > 0, iterations=4) & (lab == 0) & _foreground_of_image(kind, g)
            shifts.append(g[lab > 0].mean() - g[ring].mean())
            if kind == "2d-mri":
                t1_shifts.append(img[1][lab > 0].mean() - img[1][ring].mean())
        assert np.sign(np.median(shifts)) == expect, shifts
        if kind == "2d-mri":
            assert np.sign(np.median(t1_shifts)) == -expect, t1_shifts


def test_case_seed_is_seedsequence_spawn_child():
    """Case i of seed s is SeedSequence(s).spawn(...)[i], whatever the number of cases."""
    from nnunet_semisam.data.synthetic import _case_seed

    a = np.random.default_rng(_case_seed(3, 7)).random(4)
    b = np.random.default_rng(np.random.SeedSequence(3).spawn(20)[7]).random(4)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# datasets on disk


def test_dataset_layout_and_json(tmp_path):
    folder = make_synthetic_dataset(tmp_path, 7, "2d-rgb", num_labeled=2, num_unlabeled=3, num_test=1,
                                    shape=(32, 32), progress=False)
    assert folder == tmp_path / "Dataset007_SynthRGB"
    names = {sub: sorted(p.name for p in (folder / sub).iterdir())
             for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")}
    assert names == {
        "imagesTr": ["synth_0000_0000.png", "synth_0001_0000.png"],
        "labelsTr": ["synth_0000.png", "synth_0001.png"],
        "imagesUnlabeled": ["synth_0002_0000.png", "synth_0003_0000.png", "synth_0004_0000.png"],
        "imagesTs": ["synth_0005_0000.png"],
        "labelsTs": ["synth_0005.png"],
    }
    assert not list(folder.rglob(".tmp_*"))
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {str(c): "rgb_to_0_1" for c in range(3)}  # RGBTo01Normalization, as converters
    assert dj["labels"] == {"background": 0, "lesion": 1}
    assert dj["numTraining"] == 2 and dj["numUnlabeled"] == 3 and dj["numTest"] == 1
    assert dj["file_ending"] == ".png"
    assert dj["synthetic"]["kind"] == "2d-rgb" and dj["synthetic"]["shape"] == [32, 32]


@pytest.mark.parametrize("kind", ["2d-rgb", "2d-mri", "3d"])
def test_dataset_is_byte_identical_across_runs_and_processes(tmp_path, kind):
    kw = dict(kind=kind, num_labeled=1, num_unlabeled=2, num_test=1, shape=SMALL[kind], seed=4, progress=False)
    a = _files(make_synthetic_dataset(tmp_path / "a", 11, **kw))
    b = _files(make_synthetic_dataset(tmp_path / "b", 11, **kw))
    assert a.keys() == b.keys() and a == b
    c = _files(make_synthetic_dataset(tmp_path / "c", 11, **{**kw, "seed": 5}))
    assert c.keys() == a.keys()
    assert any(a[k] != c[k] for k in a if k != "dataset.json"), "another seed must give other images"
    if kind == "2d-rgb":
        d = _files(make_synthetic_dataset(tmp_path / "d", 11, **kw, num_processes=2))
        assert d == a


def test_images_readable_by_nnunet_readers(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rgb = make_synthetic_dataset(tmp_path, 21, "2d-rgb", 1, 0, 0, shape=(40, 48), progress=False)
    img, props = NaturalImage2DIO().read_images([str(rgb / "imagesTr/synth_0000_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(rgb / "labelsTr/synth_0000.png"))
    expect_img, expect_lab = synth_case(np.random.default_rng(np.random.SeedSequence(0).spawn(1)[0]), "2d-rgb",
                                        (40, 48))
    assert img.shape == (3, 1, 40, 48) and seg.shape == (1, 1, 40, 48)
    np.testing.assert_array_equal(img[:, 0], expect_img)
    np.testing.assert_array_equal(seg[0, 0], expect_lab)

    mri = make_synthetic_dataset(tmp_path, 22, "2d-mri", 1, 0, 0, shape=(40, 48), progress=False)
    files = [str(mri / f"imagesTr/synth_0000_{c:04d}.nii.gz") for c in range(3)]
    img, props = SimpleITKIO().read_images(files)
    seg, _ = SimpleITKIO().read_seg(str(mri / "labelsTr/synth_0000.nii.gz"))
    assert img.shape == (3, 1, 40, 48) and seg.shape == (1, 1, 40, 48)
    assert props["spacing"] == [999.0, 1.0, 1.0] and props["sitk_stuff"]["spacing"] == (1.0, 1.0)
    assert set(np.unique(seg)) <= {0, 1}

    vol = make_synthetic_dataset(tmp_path, 23, "3d", 1, 1, 0, shape=(12, 24, 20), progress=False)
    img, props = SimpleITKIO().read_images([str(vol / "imagesUnlabeled/synth_0001_0000.nii.gz")])
    seg, _ = SimpleITKIO().read_seg(str(vol / "labelsTr/synth_0000.nii.gz"))
    assert img.shape == (1, 12, 24, 20) and seg.shape == (1, 12, 24, 20)
    assert list(props["spacing"]) == [1.5, 1.0, 1.0]
    assert props["sitk_stuff"]["direction"] == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    dj = json.loads((vol / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"} and dj["file_ending"] == ".nii.gz"


def test_refusals_and_overwrite(tmp_path):
    kw = dict(num_labeled=1, num_unlabeled=1, num_test=0, shape=(24, 24), progress=False)
    folder = make_synthetic_dataset(tmp_path, 30, "2d-rgb", **kw)
    with pytest.raises(SemiSAMError, match="not empty"):
        make_synthetic_dataset(tmp_path, 30, "2d-rgb", **kw)
    with pytest.raises(SemiSAMError, match="already uses dataset id 30"):
        make_synthetic_dataset(tmp_path, 30, "2d-rgb", name="Other", **kw)
    assert not (tmp_path / "Dataset030_Other").exists()
    # overwrite replaces the dataset and leaves no stale case behind
    folder2 = make_synthetic_dataset(tmp_path, 30, "2d-rgb", **{**kw, "num_unlabeled": 0}, overwrite=True)
    assert folder2 == folder and not any((folder / "imagesUnlabeled").iterdir())
    assert json.loads((folder / "dataset.json").read_text())["numUnlabeled"] == 0
    for bad, match in ((dict(kind="4d"), "unknown synthetic kind"), (dict(num_labeled=0), "num_labeled"),
                       (dict(shape=(8, 8, 8)), "invalid for kind"), (dict(name="a b"), "dataset name")):
        with pytest.raises(SemiSAMError, match=match):
            make_synthetic_dataset(tmp_path / "bad", 31, **{**dict(kind="2d-rgb", progress=False), **bad})
    assert not (tmp_path / "bad").exists()     # refused before writing anything


# ---------------------------------------------------------------------------------------------------------------
# real commands


def test_cli_make_synthetic_and_refusal(env, tmp_path):
    raw = env["nnUNet_raw"]
    cmd = ["nnunet-semisam", "make-synthetic", raw, "--dataset-id", "41", "--kind", "2d-mri", "--num-labeled", "1",
           "--num-unlabeled", "1", "--num-test", "1", "--size", "24", "24", "--seed", "2", "--no-progress"]
    proc = run_cmd(cmd, env)
    folder = Path(raw) / "Dataset041_SynthMRI"
    assert proc.stdout.strip() == str(folder)
    assert len(list((folder / "imagesUnlabeled").glob("*.nii.gz"))) == 3   # one case, three modalities
    before = _files(folder)
    again = run_cmd(cmd, env, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
    assert _files(folder) == before
    run_cmd(cmd + ["--overwrite"], env)
    assert _files(folder) == before          # same arguments, same bytes
    bad = run_cmd(["nnunet-semisam", "make-synthetic", raw, "-d", "42", "--kind", "3d", "--size", "24", "24",
                   "--no-progress"], env, check=False)
    assert bad.returncode == 2 and "invalid for kind '3d'" in bad.stderr


def test_nnunet_plan_and_preprocess_accepts_dataset(env):
    """nnU-Net's own integrity check and 2d preprocessing run on a generated 2d-rgb dataset."""
    make_synthetic_dataset(env["nnUNet_raw"], 43, "2d-rgb", num_labeled=3, num_unlabeled=1, num_test=0,
                           shape=(32, 32), progress=False)
    run_cmd(["nnUNetv2_plan_and_preprocess", "-d", "43", "-c", "2d", "--verify_dataset_integrity", "-np", "1",
             "-npfp", "1"], env, timeout=600)
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset043_SynthRGB"
    assert (pre / "nnUNetPlans.json").is_file()
    # the three labeled cases are preprocessed; the unlabeled one (synth_0003) is not nnU-Net's business
    assert sorted(p.name for p in (pre / "nnUNetPlans_2d").glob("synth_????.b2nd")) == [
        "synth_0000.b2nd", "synth_0001.b2nd", "synth_0002.b2nd"]
