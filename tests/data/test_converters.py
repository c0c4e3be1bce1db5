"""Dataset converters on fake source trees built in each dataset's documented layout (names, formats, axes, labels).

Every test writes a tiny copy of the real layout, converts it and checks: the split (sizes, determinism, no patient
on both sides), the label values, that image and label geometry agree (and match the source), resumability, and
that the first missing source file is named before anything is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import run_cmd
from nnunet_semisam.data.converters import convert_dataset
from nnunet_semisam.data.converters.common import CONVERSION_RECORD, round_half_up, slice_geometry
from nnunet_semisam.errors import SemiSAMError

RNG_SEED = 1234


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _cases(folder: Path, ending: str) -> list[str]:
    return sorted(p.name[: -len("_0000" + ending)] for p in folder.glob(f"*_0000{ending}"))


def _assert_sitk_pairs_match(dataset: Path, num_channels: int) -> None:
    """Every case: all channel files and the label share size, spacing, origin and direction."""
    for subset in ("Tr", "Ts"):
        for case in _cases(dataset / f"images{subset}", ".nii.gz"):
            lab = sitk.ReadImage(str(dataset / f"labels{subset}" / f"{case}.nii.gz"))
            for c in range(num_channels):
                img = sitk.ReadImage(str(dataset / f"images{subset}" / f"{case}_{c:04d}.nii.gz"))
                assert img.GetSize() == lab.GetSize()
                np.testing.assert_allclose(img.GetSpacing(), lab.GetSpacing(), rtol=1e-6)
                np.testing.assert_allclose(img.GetOrigin(), lab.GetOrigin(), atol=1e-5)
                np.testing.assert_allclose(img.GetDirection(), lab.GetDirection(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- fake sources

def _rgb_and_mask(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([(xx * 7 + 20) % 256, (yy * 11 + 40) % 256, ((xx + yy) * 5) % 256], -1).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y0:y0 + h // 3 + 2, x0:x0 + w // 3 + 2] = 255
    return rgb, mask


def make_kvasir(root: Path, n: int = 10) -> tuple[Path, dict[str, np.ndarray]]:
    """`Kvasir-SEG/images/<id>.jpg` + `Kvasir-SEG/masks/<id>.jpg` (JPEG masks, 3-channel, ~0/255), varied sizes."""
    rng = np.random.default_rng(RNG_SEED)
    base = root / "Kvasir-SEG"
    (base / "images").mkdir(parents=True)
    (base / "masks").mkdir()
    masks = {}
    for i in range(n):
        h, w = (24, 36) if i % 2 else (30, 20)
        rgb, mask = _rgb_and_mask(rng, h, w)
        name = f"cju{i:02d}qkwl35piu0993l0dewei"
        Image.fromarray(rgb).save(base / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(np.repeat(mask[..., None], 3, -1)).save(base / "masks" / f"{name}.jpg", quality=75)
        masks[name] = mask
    (base / "kavsir_bboxes.json").write_text("{}")
    return base, masks


def make_isic2018(root: Path, n: int = 10) -> Path:
    """`ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg`,
    `ISIC2018_Task1_Training_GroundTruth/..._segmentation.png`."""
    rng = np.random.default_rng(RNG_SEED + 1)
    (root / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    (root / "ISIC2018_Task1_Training_GroundTruth").mkdir()
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC BY-NC")
    for i in range(n):
        rgb, mask = _rgb_and_mask(rng, 20, 28)
        Image.fromarray(rgb).save(root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{24306 + i:07d}.jpg")
        Image.fromarray(mask).save(root / "ISIC2018_Task1_Training_GroundTruth" /
                                   f"ISIC_{24306 + i:07d}_segmentation.png")
    return root


def make_ham10000(root: Path, n: int = 10) -> Path:
    """HAM10000 (Dataverse): `HAM10000_images_part_{1,2}/ISIC_*.jpg`, `HAM10000_segmentations_lesion_tschandl/`."""
    rng = np.random.default_rng(RNG_SEED + 2)
    masks = root / "HAM10000_segmentations_lesion_tschandl"
    masks.mkdir(parents=True)
    for i in range(n):
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(exist_ok=True)
        rgb, mask = _rgb_and_mask(rng, 18, 24)
        Image.fromarray(rgb).save(part / f"ISIC_{24306 + i:07d}.jpg")
        Image.fromarray(mask).save(masks / f"ISIC_{24306 + i:07d}_segmentation.png")
    (root / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    return root


BRATS_SHAPE = (12, 10, 9)  # nibabel (x, y, z)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 120.0], [0, 0, 1.5, -60.0], [0, 0, 0, 1]])


def make_msd_brats(root: Path, n: int = 5) -> Path:
    """`Task01_BrainTumour/{dataset.json, imagesTr/BRATS_NNN.nii.gz (4D: FLAIR, T1w, t1gd, T2w), labelsTr/}`.

    Modality c has value 100 * (c + 1) + z inside a "brain" box (slices 1..7), 0 outside; labels 1/2/3 on
    slices 3..5 (patient 0 has no tumour at all). The '._' file mimics the macOS resource forks of the archive.
    """
    task = root / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    training = []
    x, y, z = BRATS_SHAPE
    for i in range(n):
        name = f"BRATS_{i + 1:03d}"
        img = np.zeros((x, y, z, 4), np.float32)
        for c in range(4):
            img[2:10, 2:8, 1:8, c] = 100.0 * (c + 1) + np.arange(z)[1:8] + i
        lab = np.zeros((x, y, z), np.uint8)
        if i > 0:
            lab[4:7, 3:6, 3:6] = 2
            lab[5, 4, 3:6] = 1
            lab[4, 3, 4] = 3
        nib.save(nib.Nifti1Image(img, BRATS_AFFINE), task / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab, BRATS_AFFINE), task / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0\5\26\7")
    (task / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": n, "numTest": 0, "training": training, "test": []}))
    return task


def make_msd_3d(root: Path, task_name: str, n: int, modalities: dict, labels: dict) -> Path:
    """`TaskXX_Name/` with 3D (one modality) or 4D images, binary labels, an oblique-free but non-trivial affine."""
    rng = np.random.default_rng(RNG_SEED + 3)
    task = root / task_name
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    affine = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    training = []
    stem = task_name.split("_", 1)[1].lower()
    for i in range(n):
        shape = (6, 5, 4)
        data = rng.integers(-200, 300,
                            size=shape + ((len(modalities),) if len(modalities) > 1 else ())).astype(np.int16)
        lab = (rng.random(shape) > 0.7).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, affine), task / "imagesTr" / f"{stem}_{i + 1}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), task / "labelsTr" / f"{stem}_{i + 1}.nii.gz")
        training.append({"image": f"./imagesTr/{stem}_{i + 1}.nii.gz", "label": f"./labelsTr/{stem}_{i + 1}.nii.gz"})
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), affine), task / "imagesTs" / f"{stem}_99.nii.gz")
    (task / "dataset.json").write_text(json.dumps({
        "name": task_name.split("_", 1)[1], "modality": modalities, "labels": labels, "licence": "CC-BY-SA 4.0",
        "numTraining": n, "training": training, "test": [f"./imagesTs/{stem}_99.nii.gz"]}))
    return task


def make_la(root: Path, n_train: int = 8, n_test: int = 2) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """UA-MT `data/`: `2018LA_Seg_Training Set/<case>/mri_norm2.h5` (image, label as (x, y, z)), train/test.list."""
    import h5py

    rng = np.random.default_rng(RNG_SEED + 4)
    folder = root / "data" / "2018LA_Seg_Training Set"
    cases, arrays = [], {}
    for i in range(n_train + n_test):
        name = f"{i:02d}RZDK210BSMWAA6467LU"
        (folder / name).mkdir(parents=True)
        image = rng.normal(size=(9, 7, 5)).astype(np.float32)
        label = (image > 0.5).astype(np.uint8)
        with h5py.File(folder / name / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=image, compression="gzip")
            f.create_dataset("label", data=label, compression="gzip")
        cases.append(name)
        arrays[name] = (image, label)
    (root / "data" / "train.list").write_text("\n".join(cases[:n_train]) + "\n")
    (root / "data" / "test.list").write_text("\n".join(cases[n_train:]) + "\n")
    return root / "data", arrays


PANC_SPACING = (0.7, 0.8, 2.0)  # column spacing, row spacing, slice spacing
PANC_ROWS, PANC_COLS, PANC_SLICES = 12, 10, 5


def make_pancreas(root: Path, n: int = 3) -> Path:
    """TCIA: `Pancreas-CT/PANCREAS_NNNN/<study>/<series>/1-NNN.dcm` and
    `TCIA_pancreas_labels-02-05-2017/labelNNNN.nii.gz`.

    Slices are non-square (12 rows x 10 columns) and their InstanceNumber runs against the z position, so a
    converter that sorted by instance or forgot the label's (column, row, instance) order would misalign the label.
    The label is the CT > 0 pattern of each slice, so alignment can be checked voxel by voxel.
    """
    rng = np.random.default_rng(RNG_SEED + 5)
    labels = root / "TCIA_pancreas_labels-02-05-2017"
    labels.mkdir(parents=True)
    for p in range(1, n + 1):
        ct = rng.integers(-300, 300, size=(PANC_SLICES, PANC_ROWS, PANC_COLS)).astype(np.int16)  # (z, row, col)
        vol = sitk.GetImageFromArray(ct)
        vol.SetSpacing(PANC_SPACING)
        vol.SetOrigin((-150.0 + p, -170.0, -300.0))
        series = root / "Pancreas-CT" / f"PANCREAS_{p:04d}" / f"11-24-2015-PANCREAS{p:04d}-Pancreas-{18957 + p}" \
            / f"Pancreas-{99667 + p}"
        series.mkdir(parents=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        uid = f"1.2.826.0.1.3680043.2.1125.{p}"
        label_by_instance = np.zeros((PANC_COLS, PANC_ROWS, PANC_SLICES), np.uint8)
        for z in range(PANC_SLICES):
            instance = PANC_SLICES - z  # 1 = highest z
            sl = vol[:, :, z]
            for tag, value in (("0008|0060", "CT"), ("0020|000e", uid + ".1"), ("0020|000d", uid),
                               ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|0018", f"{uid}.2.{instance}"),
                               ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0010|0020", f"PANCREAS_{p:04d}"),
                               ("0020|0013", str(instance)), ("0018|0050", str(PANC_SPACING[2])),
                               ("0020|0032", "\\".join(str(v) for v in vol.TransformIndexToPhysicalPoint((0, 0, z))))):
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(series / f"1-{instance:03d}.dcm"))
            writer.Execute(sl)
            label_by_instance[:, :, instance - 1] = (ct[z] > 0).T  # (col, row) as in the TCIA label files
        nib.save(nib.Nifti1Image(label_by_instance, np.diag([-0.8, 0.8, 2.0, 1.0])), labels / f"label{p:04d}.nii.gz")
    return root


# ------------------------------------------------------------------------------------------------- natural 2D

def test_kvasir_split_masks_and_nnunet_acceptance(tmp_path: Path) -> None:
    src, masks = make_kvasir(tmp_path / "src")
    out = convert_dataset("kvasir", src.parent, 11, out_root=tmp_path / "raw", progress=False)
    assert out == tmp_path / "raw" / "Dataset011_KvasirSEG"
    dj = _json(out / "dataset.json")
    assert dj["numTraining"] == 8 and dj["numTest"] == 2 and dj["file_ending"] == ".png"
    assert dj["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"}
    assert dj["labels"] == {"background": 0, "polyp": 1}
    rec = _json(out / CONVERSION_RECORD)
    assert rec["status"] == "complete" and len(rec["split"]["train"]) == 8 and len(rec["split"]["test"]) == 2
    assert set(rec["split"]["train"]).isdisjoint(rec["split"]["test"])
    assert _cases(out / "imagesTr", ".png") == rec["split"]["train"]
    assert _cases(out / "imagesTs", ".png") == rec["split"]["test"]
    for subset in ("Tr", "Ts"):
        for case in _cases(out / f"images{subset}", ".png"):
            rgb = np.asarray(Image.open(out / f"images{subset}" / f"{case}_0000.png"))
            lab = np.asarray(Image.open(out / f"labels{subset}" / f"{case}.png"))
            assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[:2] == lab.shape
            assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
            # JPEG ringing is removed by the threshold at 128: the mask is the drawn rectangle exactly
            np.testing.assert_array_equal(lab, masks[case] // 255)

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    verify_dataset_integrity(str(out), num_processes=1)
    case = rec["split"]["train"][0]
    img, props = NaturalImage2DIO().read_images([str(out / "imagesTr" / f"{case}_0000.png")])
    seg, seg_props = NaturalImage2DIO().read_seg(str(out / "labelsTr" / f"{case}.png"))
    assert img.shape[0] == 3 and img.shape[1:] == seg.shape[1:] and props["spacing"] == seg_props["spacing"]


def test_kvasir_split_is_seeded(tmp_path: Path) -> None:
    src, _ = make_kvasir(tmp_path / "src")
    a = convert_dataset("kvasir", src, 1, out_root=tmp_path / "a", progress=False)
    b = convert_dataset("kvasir", src, 1, out_root=tmp_path / "b", progress=False)
    c = convert_dataset("kvasir", src, 1, out_root=tmp_path / "c", seed=3, progress=False)
    split = lambda d: _json(d / CONVERSION_RECORD)["split"]  # noqa: E731
    assert split(a) == split(b)
    assert split(a)["test"] != split(c)["test"]  # seeds 0 and 3 draw different test pairs


def test_resize_matches_pil_bilinear_and_nearest(tmp_path: Path) -> None:
    src, masks = make_kvasir(tmp_path / "src", n=4)
    out = convert_dataset("kvasir", src, 2, out_root=tmp_path / "raw", resize=16, progress=False)
    for subset in ("Tr", "Ts"):
        for case in _cases(out / f"images{subset}", ".png"):
            rgb = np.asarray(Image.open(out / f"images{subset}" / f"{case}_0000.png"))
            lab = np.asarray(Image.open(out / f"labels{subset}" / f"{case}.png"))
            assert rgb.shape == (16, 16, 3) and lab.shape == (16, 16)
            source = Image.open(src / "images" / f"{case}.jpg").convert("RGB")
            expected = np.asarray(source.resize((16, 16), Image.Resampling.BILINEAR))
            np.testing.assert_array_equal(rgb, expected)
            expected_mask = np.asarray(Image.fromarray((masks[case] >= 128).astype(np.uint8)).resize(
                (16, 16), Image.Resampling.NEAREST))
            np.testing.assert_array_equal(lab, expected_mask)
    assert "resized to 16x16" in _json(out / "dataset.json")["description"]


def test_ham10000_isic2018_layout(tmp_path: Path) -> None:
    src = make_isic2018(tmp_path / "src")
    out = convert_dataset("ham10000", src, 3, out_root=tmp_path / "raw", progress=False)
    dj = _json(out / "dataset.json")
    assert (dj["numTraining"], dj["numTest"]) == (8, 2)
    cases = _cases(out / "imagesTr", ".png") + _cases(out / "imagesTs", ".png")
    assert sorted(cases) == [f"ISIC_{24306 + i:07d}" for i in range(10)]
    for case in _cases(out / "imagesTr", ".png"):
        gt = np.asarray(Image.open(src / "ISIC2018_Task1_Training_GroundTruth" / f"{case}_segmentation.png"))
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labelsTr" / f"{case}.png")), gt // 255)


def test_ham10000_dataverse_layout_with_max_cases(tmp_path: Path) -> None:
    src = make_ham10000(tmp_path / "src", n=10)
    out = convert_dataset("ham10000", src, 4, out_root=tmp_path / "raw", max_cases=8, progress=False)
    rec = _json(out / CONVERSION_RECORD)
    assert len(rec["split"]["train"]) == 6 and len(rec["split"]["test"]) == 2  # 8 * 0.2 = 1.6 -> 2
    again = convert_dataset("ham10000", src, 4, out_root=tmp_path / "raw2", max_cases=8, progress=False)
    assert _json(again / CONVERSION_RECORD)["split"] == rec["split"]


@pytest.mark.parametrize("fmt, maker, missing", [
    ("kvasir", make_kvasir, "Kvasir-SEG/masks/cju03qkwl35piu0993l0dewei.jpg"),
    ("ham10000", make_isic2018, "ISIC2018_Task1_Training_GroundTruth/ISIC_0024309_segmentation.png"),
])
def test_missing_mask_is_named_before_any_output(tmp_path: Path, fmt, maker, missing) -> None:
    maker(tmp_path / "src")
    (tmp_path / "src" / missing).unlink()
    with pytest.raises(SemiSAMError, match="missing file .*" + missing.split("/")[-1]):
        convert_dataset(fmt, tmp_path / "src", 5, out_root=tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("fmt, expected", [
    ("kvasir", "images"), ("ham10000", "ISIC2018_Task1-2_Training_Input"), ("msd-brats2d", "dataset.json"),
    ("msd", "dataset.json"), ("la-h5", "2018LA_Seg_Training Set"), ("pancreas-ct", "Pancreas-CT"),
])
def test_wrong_layout_names_first_missing_part(tmp_path: Path, fmt, expected) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SemiSAMError, match="missing (file|folder) .*" + expected):
        convert_dataset(fmt, tmp_path / "empty", 6, out_root=tmp_path / "raw", progress=False)


def test_resume_finishes_interrupted_run_and_keeps_done_cases(tmp_path: Path) -> None:
    src, _ = make_kvasir(tmp_path / "src", n=6)
    out = convert_dataset("kvasir", src, 7, out_root=tmp_path / "raw", progress=False)
    # simulate a run killed mid-way: one case lost its label, dataset.json not yet written, a temp file left over
    rec = _json(out / CONVERSION_RECORD)
    (out / CONVERSION_RECORD).write_text(json.dumps({**rec, "status": "converting"}))
    (out / "dataset.json").unlink()
    lost = rec["split"]["train"][0]
    (out / "labelsTr" / f"{lost}.png").unlink()
    (out / "imagesTr" / ".tmp_x_123.png").write_bytes(b"partial")
    kept = out / "imagesTr" / f"{rec['split']['train'][1]}_0000.png"
    old = kept.stat().st_mtime_ns
    os.utime(kept, ns=(old - 10**9, old - 10**9))
    convert_dataset("kvasir", src, 7, out_root=tmp_path / "raw", progress=False)
    assert (out / "labelsTr" / f"{lost}.png").is_file()
    assert kept.stat().st_mtime_ns == old - 10**9  # finished cases are not rewritten
    assert not list((out / "imagesTr").glob(".tmp_*"))
    assert _json(out / "dataset.json")["numTraining"] == 5
    assert _json(out / CONVERSION_RECORD)["status"] == "complete"


def test_rerun_with_other_options_is_refused(tmp_path: Path) -> None:
    src, _ = make_kvasir(tmp_path / "src", n=4)
    convert_dataset("kvasir", src, 8, out_root=tmp_path / "raw", progress=False)
    with pytest.raises(SemiSAMError, match="other options"):
        convert_dataset("kvasir", src, 8, out_root=tmp_path / "raw", seed=5, progress=False)
    with pytest.raises(SemiSAMError, match="already used"):
        convert_dataset("kvasir", src, 8, name="Other", out_root=tmp_path / "raw", progress=False)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    root, _ = make_la(tmp_path / "src", 3, 1)
    with pytest.raises(SemiSAMError, match="--resize applies to 2D"):
        convert_dataset("la-h5", root, 9, out_root=tmp_path / "raw", resize=256, progress=False)
    with pytest.raises(SemiSAMError, match="train.list/test.list"):
        convert_dataset("la-h5", root, 9, out_root=tmp_path / "raw", num_test=2, progress=False)
    with pytest.raises(SemiSAMError, match="nnUNet_raw is not set"):
        env = dict(os.environ)
        os.environ.pop("nnUNet_raw", None)
        try:
            convert_dataset("la-h5", root, 9, progress=False)
        finally:
            os.environ.clear()
            os.environ.update(env)


# ---------------------------------------------------------------------------------------------- MSD BrainTumour 2D

def test_msd_brats2d_channels_labels_slices_and_patient_split(tmp_path: Path) -> None:
    task = make_msd_brats(tmp_path / "src", n=5)
    out = convert_dataset("msd-brats2d", task, 12, out_root=tmp_path / "raw", empty_fraction=0.5, progress=False)
    dj = _json(out / "dataset.json")
    assert dj["channel_names"] == {"0": "FLAIR", "1": "T1w", "2": "T2w"}
    assert dj["labels"] == {"background": 0, "whole tumour": 1}
    rec = _json(out / CONVERSION_RECORD)
    assert (len(rec["split"]["train"]), len(rec["split"]["test"])) == (4, 1)  # patients: round(5 * 0.2) = 1
    groups = rec["groups"]
    for subset, patients in (("Tr", rec["split"]["train"]), ("Ts", rec["split"]["test"])):
        assert {groups[c] for c in _cases(out / f"images{subset}", ".nii.gz")} <= set(patients)  # no leakage

    # slices: tumour slices 3..5 always; brain slices 1..7 without tumour: round(0.5 * 4) = 2 of {1, 2, 6, 7}
    all_cases = {c: s for s in ("Tr", "Ts") for c in _cases(out / f"images{s}", ".nii.gz")}
    for i in range(5):
        patient = f"BRATS_{i + 1:03d}"
        zs = sorted(int(c[-3:]) for c in all_cases if groups[c] == patient)
        if i == 0:  # no tumour: round(0.5 * 7) = 4 of the 7 brain slices
            assert len(zs) == 4 and set(zs) <= set(range(1, 8))
        else:
            assert {3, 4, 5} <= set(zs) and len(zs) == 5 and set(zs) <= set(range(1, 8))
        assert 0 not in zs and 8 not in zs  # slices without brain are dropped

    src_img = sitk.ReadImage(str(task / "imagesTr" / "BRATS_003.nii.gz"))
    src_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(task / "labelsTr" / "BRATS_003.nii.gz")))
    vol = sitk.Extract(src_img, list(src_img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    case = "BRATS_003_z004"
    subset = all_cases[case]
    for c, modality in enumerate((0, 1, 3)):  # FLAIR, T1w, T2w; t1gd (value 300 + z) is left out
        sl = sitk.ReadImage(str(out / f"images{subset}" / f"{case}_{c:04d}.nii.gz"))
        arr = sitk.GetArrayFromImage(sl)
        assert arr.shape == (1, BRATS_SHAPE[1], BRATS_SHAPE[0])
        assert arr.max() == pytest.approx(100.0 * (modality + 1) + 4 + 2)
        np.testing.assert_allclose(sl.GetOrigin(), vol.TransformIndexToPhysicalPoint((0, 0, 4)), atol=1e-4)
        np.testing.assert_allclose(sl.GetSpacing(), vol.GetSpacing(), rtol=1e-6)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"labels{subset}" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(lab[0], (src_lab[4] > 0).astype(np.uint8))
    _assert_sitk_pairs_match(out, 3)

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(out), num_processes=1)


def test_msd_brats2d_resize_keeps_physical_extent(tmp_path: Path) -> None:
    task = make_msd_brats(tmp_path / "src", n=2)
    out = convert_dataset("msd-brats2d", task, 13, out_root=tmp_path / "raw", resize=16, num_test=1, progress=False)
    src_img = sitk.ReadImage(str(task / "imagesTr" / "BRATS_002.nii.gz"))
    vol = sitk.Extract(src_img, list(src_img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    subset = "Tr" if (out / "imagesTr" / "BRATS_002_z004_0000.nii.gz").is_file() else "Ts"
    sl = sitk.ReadImage(str(out / f"images{subset}" / "BRATS_002_z004_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / f"labels{subset}" / "BRATS_002_z004.nii.gz"))
    assert sl.GetSize() == (16, 16, 1) == lab.GetSize()
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint(  # noqa: E731
        [(im.GetSize()[0] - 1) / 2, (im.GetSize()[1] - 1) / 2, 0.0]))
    np.testing.assert_allclose(centre(sl), centre(vol[:, :, 4:5]), atol=1e-4)
    np.testing.assert_allclose(np.array(sl.GetSpacing()[:2]) * 16, np.array(vol.GetSpacing()[:2]) * (12, 10))
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}
    geom = slice_geometry(vol, 4, (16, 16))
    np.testing.assert_allclose(sl.GetOrigin(), geom[1], atol=1e-4)
    _assert_sitk_pairs_match(out, 3)


def test_msd_brats2d_needs_flair_t1_t2(tmp_path: Path) -> None:
    task = make_msd_brats(tmp_path / "src", n=2)
    meta = _json(task / "dataset.json")
    meta["modality"] = {"0": "FLAIR", "1": "t1gd"}
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SemiSAMError, match="needs T1w"):
        convert_dataset("msd-brats2d", task, 14, out_root=tmp_path / "raw", progress=False)


# -------------------------------------------------------------------------------------------------- MSD 3D

def test_msd_spleen_copies_volumes_with_vs_test_size(tmp_path: Path) -> None:
    task = make_msd_3d(tmp_path / "src", "Task09_Spleen", 13, {"0": "CT"}, {"0": "background", "1": "spleen"})
    out = convert_dataset("msd", task, 15, out_root=tmp_path / "raw", progress=False)
    assert out.name == "Dataset015_Spleen"
    dj = _json(out / "dataset.json")
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "spleen": 1}
    assert (dj["numTraining"], dj["numTest"]) == (2, 11)  # [VS]: 11 spleen test cases
    for subset in ("Tr", "Ts"):
        for case in _cases(out / f"images{subset}", ".nii.gz"):
            assert (out / f"images{subset}" / f"{case}_0000.nii.gz").read_bytes() == \
                (task / "imagesTr" / f"{case}.nii.gz").read_bytes()
            assert (out / f"labels{subset}" / f"{case}.nii.gz").read_bytes() == \
                (task / "labelsTr" / f"{case}.nii.gz").read_bytes()
    assert not list((out / "imagesTs").glob("spleen_99*"))  # MSD imagesTs has no labels and is not used


def test_msd_4d_task_is_split_into_channels_with_geometry(tmp_path: Path) -> None:
    task = make_msd_3d(tmp_path / "src", "Task05_Prostate", 5, {"0": "T2", "1": "ADC"},
                       {"0": "background", "1": "PZ"})
    out = convert_dataset("msd", task, 16, out_root=tmp_path / "raw", progress=False)
    dj = _json(out / "dataset.json")
    assert dj["channel_names"] == {"0": "T2", "1": "ADC"} and (dj["numTraining"], dj["numTest"]) == (4, 1)
    _assert_sitk_pairs_match(out, 2)
    src = nib.load(task / "imagesTr" / "prostate_2.nii.gz")
    subset = "Tr" if (out / "imagesTr" / "prostate_2_0001.nii.gz").is_file() else "Ts"
    ch1 = nib.load(out / f"images{subset}" / "prostate_2_0001.nii.gz")
    np.testing.assert_array_equal(np.asarray(ch1.dataobj), np.asarray(src.dataobj)[..., 1])
    np.testing.assert_allclose(ch1.affine, src.affine, atol=1e-4)


# --------------------------------------------------------------------------------------------------- LA h5

@pytest.mark.parametrize("point_at_training_folder", [False, True])
def test_la_h5_lists_axes_and_spacing(tmp_path: Path, point_at_training_folder: bool) -> None:
    data, arrays = make_la(tmp_path / "src")
    source = data / "2018LA_Seg_Training Set" if point_at_training_folder else data
    out = convert_dataset("la-h5", source, 17, out_root=tmp_path / "raw", progress=False)
    train = (data / "train.list").read_text().split()
    test = (data / "test.list").read_text().split()
    assert _cases(out / "imagesTr", ".nii.gz") == sorted(train)
    assert _cases(out / "imagesTs", ".nii.gz") == sorted(test)
    name = test[0]
    img = sitk.ReadImage(str(out / "imagesTs" / f"{name}_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTs" / f"{name}.nii.gz"))
    assert img.GetSize() == arrays[name][0].shape  # h5 (x, y, z) is the image's (x, y, z)
    np.testing.assert_allclose(img.GetSpacing(), (0.625, 0.625, 0.625))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arrays[name][0].transpose(2, 1, 0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), arrays[name][1].transpose(2, 1, 0))
    assert img[3, 2, 1] == pytest.approx(float(arrays[name][0][3, 2, 1]))
    _assert_sitk_pairs_match(out, 1)


def test_la_h5_missing_volume_is_named(tmp_path: Path) -> None:
    data, _ = make_la(tmp_path / "src", 3, 1)
    victim = (data / "test.list").read_text().split()[0]
    (data / "2018LA_Seg_Training Set" / victim / "mri_norm2.h5").unlink()
    with pytest.raises(SemiSAMError, match=f"missing file .*{victim}/mri_norm2.h5"):
        convert_dataset("la-h5", data, 18, out_root=tmp_path / "raw", progress=False)


# ---------------------------------------------------------------------------------------------- Pancreas-CT

def test_pancreas_dicom_geometry_label_alignment_and_tail_split(tmp_path: Path) -> None:
    src = make_pancreas(tmp_path / "src", n=3)
    out = convert_dataset("pancreas-ct", src, 19, out_root=tmp_path / "raw", num_test=1, progress=False)
    assert _cases(out / "imagesTr", ".nii.gz") == ["PANCREAS_0001", "PANCREAS_0002"]
    assert _cases(out / "imagesTs", ".nii.gz") == ["PANCREAS_0003"]  # ordered split: the last patients are test
    for subset, case in (("Tr", "PANCREAS_0001"), ("Ts", "PANCREAS_0003")):
        img = sitk.ReadImage(str(out / f"images{subset}" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out / f"labels{subset}" / f"{case}.nii.gz"))
        assert img.GetSize() == (PANC_COLS, PANC_ROWS, PANC_SLICES)
        np.testing.assert_allclose(img.GetSpacing(), PANC_SPACING, rtol=1e-5)
        p = int(case[-4:])
        np.testing.assert_allclose(img.GetOrigin(), (-150.0 + p, -170.0, -300.0), atol=1e-3)
        ct = sitk.GetArrayFromImage(img)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), (ct > 0).astype(np.uint8))  # voxel alignment
    _assert_sitk_pairs_match(out, 1)
    dj = _json(out / "dataset.json")
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "pancreas": 1}


def test_pancreas_default_split_is_last_20(tmp_path: Path) -> None:
    from nnunet_semisam.data.converters.common import ConvertOptions, Unit
    from nnunet_semisam.data.converters.pancreas_ct import PancreasCTConverter

    units = [Unit(f"PANCREAS_{i:04d}") for i in range(82, 0, -1)]
    split = PancreasCTConverter().split(units, ConvertOptions())
    test = sorted(u for u, s in split.items() if s == "Ts")
    assert len(test) == 20 and test[0] == "PANCREAS_0063" and test[-1] == "PANCREAS_0082"
    assert round_half_up(484 * 0.2) == 97 and round_half_up(1000 * 0.2) == 200  # [KD] 387/97 and 800/200


def test_pancreas_missing_label_is_named(tmp_path: Path) -> None:
    src = make_pancreas(tmp_path / "src", n=2)
    (src / "TCIA_pancreas_labels-02-05-2017" / "label0002.nii.gz").unlink()
    with pytest.raises(SemiSAMError, match="missing file .*label0002.nii.gz"):
        convert_dataset("pancreas-ct", src, 20, out_root=tmp_path / "raw", progress=False)


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_convert_with_workers_and_layout_error(tmp_path: Path, env: dict) -> None:
    src, _ = make_kvasir(tmp_path / "src", n=6)
    env = {**env, "PYTHONIOENCODING": "ascii"}  # ASCII progress bars: run_cmd decodes with the locale's encoding
    proc = run_cmd(["nnunet-semisam", "convert", "kvasir", str(src), "--dataset-id", "21", "--resize", "16",
                    "-np", "2"], env)
    out = Path(env["nnUNet_raw"]) / "Dataset021_KvasirSEG"
    assert "5 training and 1 test cases" in proc.stdout
    assert "convert kvasir: 100%" in proc.stderr and "6/6" in proc.stderr  # tqdm bar
    assert len(list((out / "imagesTr").glob("*_0000.png"))) == 5
    assert np.asarray(Image.open(next((out / "labelsTs").glob("*.png")))).shape == (16, 16)
    again = run_cmd(["nnunet-semisam", "convert", "kvasir", str(src), "-d", "21", "--resize", "16", "--quiet"], env)
    assert "nothing to do" in again.stdout

    (src / "masks" / "cju02qkwl35piu0993l0dewei.jpg").unlink()
    bad = run_cmd(["nnunet-semisam", "convert", "kvasir", str(src), "-d", "22"], env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: source layout mismatch: missing file")
    assert "cju02qkwl35piu0993l0dewei.jpg" in bad.stderr
    assert not (Path(env["nnUNet_raw"]) / "Dataset022_KvasirSEG").exists()
