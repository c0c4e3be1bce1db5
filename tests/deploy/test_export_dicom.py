"""DICOM series -> NIfTI -> prediction -> DICOM-SEG and NIfTI export (METHODS.md §5.8).

The source is a CT series written here with pydicom: an oblique orientation, non-square pixels (0.7 mm rows,
0.9 mm columns), 2.5 mm slices, a shifted origin, InstanceNumbers running against the slice position, file names out
of slice order and a RescaleIntercept of -1024. The "prediction" is made with nnU-Net's own reader and writer
(`SimpleITKIO.read_images` on the converted image, `write_seg` with its properties), which is how nnUNetv2_predict
writes its output, so the test needs no trained model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cmd
from nnunet_semisam.cli import main
from nnunet_semisam.errors import SemiSAMError

pydicom = pytest.importorskip("pydicom", reason="optional extra nnunet-semisam[dicom]")
hd = pytest.importorskip("highdicom", reason="optional extra nnunet-semisam[dicom]")

SHAPE = (5, 12, 10)  # (slices, rows, columns)
SPACING = (0.9, 0.7, 2.5)  # SimpleITK order: column spacing, row spacing, slice distance
ORIGIN = np.array([-120.5, 33.25, 410.0])
LABELS = {"background": 0, "liver": 1, "tumour": 2}


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """Rz(a) @ Ry(b) @ Rx(c): columns are the row direction, the column direction and the slice normal."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


DIRECTION = rotation(0.5, 0.3, -0.2)


def write_ct_series(folder: Path, hu: np.ndarray, skip: tuple[int, ...] = ()) -> list[str]:
    """Write `hu` (Z, rows, cols) as single-frame CT files; slice k at ORIGIN + k * 2.5 mm along the normal.
    Returns the SOPInstanceUIDs by slice index (slices in `skip` are left out, making a gap)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    z_n = hu.shape[0]
    uids = []
    for k in range(z_n):
        uid = generate_uid()
        uids.append(uid)
        if k in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20240101", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 2, z_n - k, "test"
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * SPACING[2] * DIRECTION[:, 2]]
        ds.ImageOrientationPatient = [float(v) for v in (*DIRECTION[:, 0], *DIRECTION[:, 1])]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # row spacing, column spacing
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"img{(3 * k) % z_n}_{k}.dcm", enforce_file_format=True)
    return uids


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    """DICOM root with one case folder `case_A/study/series/*.dcm`; returns (root, HU array, SOP UIDs by slice)."""
    root = tmp_path_factory.mktemp("dicom") / "dicom"
    hu = np.random.default_rng(0).integers(-200, 300, SHAPE).astype(np.int16)
    uids = write_ct_series(root / "case_A" / "study1" / "series2", hu)
    return root, hu, uids


def prediction_on(image_file: Path, seg: np.ndarray, pred_dir: Path, case: str) -> Path:
    """What nnUNetv2_predict writes for `image_file`: nnU-Net's SimpleITKIO properties of the input, its
    `write_seg`, and dataset.json next to the predictions."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    io = SimpleITKIO()
    _, props = io.read_images([str(image_file)])
    pred_dir.mkdir(parents=True, exist_ok=True)
    io.write_seg(seg.astype(np.uint8), str(pred_dir / f"{case}.nii.gz"), props)
    (pred_dir / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz",
                                                       "channel_names": {"0": "CT"}, "numTraining": 1}))
    return pred_dir / f"{case}.nii.gz"


def hand_prediction() -> np.ndarray:
    """Labels on the (Z, rows, cols) grid: liver on slices 1 and 3, tumour on slice 3; slices 0, 2, 4 empty."""
    seg = np.zeros(SHAPE, np.uint8)
    seg[1, 3:6, 2:5] = 1
    seg[3, 1:3, 1:3] = 1
    seg[3, 5:9, 4:8] = 2
    return seg


def assert_geometry(img, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, atol=1e-4) -> None:
    np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=atol)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), direction, atol=atol)


def test_dicom_series_to_nifti_to_prediction_to_dicom_seg(tmp_path: Path, dicom_root, env: dict) -> None:
    root, hu, uids = dicom_root
    images = tmp_path / "imagesTs"
    run_cmd(["nnunet-semisam", "dicom-to-nifti", str(root), str(images), "--quiet"], env)
    nifti = images / "case_A_0000.nii.gz"
    assert sorted(p.name for p in images.iterdir()) == [nifti.name]
    img = sitk.ReadImage(str(nifti))
    assert img.GetSize() == SHAPE[::-1]
    assert_geometry(img)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu)  # HU: the intercept applied, slices in order

    seg = hand_prediction()
    pred = prediction_on(nifti, seg, tmp_path / "pred", "case_A")
    out = tmp_path / "seg"
    proc = run_cmd(["nnunet-semisam", "export", "-i", str(pred.parent), "-s", str(root), "-o", str(out),
                    "--format", "dicom-seg", "-tr", "MeanTeacherTrainer", "--quiet"], env)
    assert "case_A: " in proc.stdout and "(3 frames)" in proc.stdout

    dcm = hd.seg.segread(str(out / "case_A.dcm"))
    assert dcm.SegmentationType == "BINARY" and dcm.Modality == "SEG"
    assert [s.SegmentLabel for s in dcm.SegmentSequence] == ["liver", "tumour"]  # one segment per class
    for s in dcm.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentAlgorithmName == "nnunet_semisam/MeanTeacherTrainer"
    # empty frames omitted: liver on 2 slices, tumour on 1; a full SEG would have 5 x 2 = 10 frames
    assert dcm.NumberOfFrames == 3
    assert dcm.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
        next((root / "case_A" / "study1" / "series2").iterdir())).SeriesInstanceUID
    pixels = dcm.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])  # (Z, rows, cols, segments)
    np.testing.assert_array_equal(pixels, np.stack([seg == 1, seg == 2], -1).astype(pixels.dtype))

    # the same prediction exported as NIfTI with the DICOM geometry, by nnU-Net's writer
    main(["export", "-i", str(pred), "-s", str(root), "-o", str(tmp_path / "nii"), "--quiet"])
    exported = sitk.ReadImage(str(tmp_path / "nii" / "case_A.nii.gz"))
    assert_geometry(exported)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), seg)


def nifti_source(folder: Path, case: str = "case_B") -> Path:
    """An nnU-Net image folder with one oblique, anisotropic MR-like image `case_0000.nii.gz`."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.random.default_rng(1).normal(100, 20, SHAPE).astype(np.float32))
    img.SetSpacing(SPACING)
    img.SetOrigin(tuple(ORIGIN))
    img.SetDirection(tuple(DIRECTION.ravel()))
    path = folder / f"{case}_0000.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_nifti_export_keeps_the_source_geometry(tmp_path: Path) -> None:
    from nnunet_semisam.deploy.export import export_predictions

    source = nifti_source(tmp_path / "imagesTs")
    seg = hand_prediction()
    pred = prediction_on(source, seg, tmp_path / "pred", "case_B")
    records = export_predictions(pred.parent, source.parent, tmp_path / "out", fmt="nifti", progress=False)
    assert records == [{"case": "case_B", "output": str(tmp_path / "out" / "case_B.nii.gz"), "frames": None}]
    src, out = sitk.ReadImage(str(source)), sitk.ReadImage(records[0]["output"])
    assert out.GetSize() == src.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), src.GetDirection(), atol=1e-6)
    assert out.GetPixelIDValue() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), seg)


def test_nifti_source_asked_for_dicom_seg_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    source = nifti_source(tmp_path / "imagesTs")
    pred = prediction_on(source, hand_prediction(), tmp_path / "pred", "case_B")
    rc = main(["export", "-i", str(pred.parent), "-s", str(source.parent), "-o", str(tmp_path / "out"),
               "--format", "dicom-seg", "-tr", "MeanTeacherTrainer", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: DICOM-SEG needs a DICOM series as source; case case_B's source ")
    assert str(source) in err and not (tmp_path / "out").exists()


def test_export_and_conversion_errors_are_one_line(tmp_path: Path, dicom_root, monkeypatch) -> None:
    from nnunet_semisam.deploy import dicom as dicom_mod
    from nnunet_semisam.deploy.dicom import dicom_to_nifti
    from nnunet_semisam.deploy.export import export_predictions

    root, hu, _ = dicom_root
    gap = tmp_path / "gap"
    write_ct_series(gap / "case_G", hu, skip=(2,))  # a missing slice: 2.5 mm gaps and one of 5 mm
    with pytest.raises(SemiSAMError, match=r"case_G: irregular slice spacing \(2\.5 to 5 mm; missing slices"):
        dicom_to_nifti(gap, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    two = tmp_path / "two"
    write_ct_series(two / "case_T" / "s1", hu[:2])
    write_ct_series(two / "case_T" / "s2", hu[:2])
    with pytest.raises(SemiSAMError, match=r"case folder .*case_T holds 2 DICOM series \(s1, s2\)"):
        dicom_to_nifti(two, tmp_path / "never")

    wrong = tmp_path / "wrong"  # a prediction on another grid (one slice fewer)
    wrong.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(hand_prediction()[:4]), str(wrong / "case_A.nii.gz"))
    (wrong / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    with pytest.raises(SemiSAMError, match=r"prediction .*case_A.nii.gz has size \(10, 12, 4\), its source DICOM "):
        export_predictions(wrong, root, tmp_path / "o1", fmt="nifti", progress=False)
    with pytest.raises(SemiSAMError, match="give -tr TRAINER"):
        export_predictions(wrong, root, tmp_path / "o2", fmt="dicom-seg", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SemiSAMError, match=r"no source for case case_A in .*empty \(expected case_A_0000.nii.gz, "
                                           r"case_A.nii.gz or a DICOM series folder case_A/\)"):
        export_predictions(wrong / "case_A.nii.gz", tmp_path / "empty", tmp_path / "o3", progress=False)

    def no_highdicom(name, *args, **kwargs):
        if name == "highdicom":
            raise ImportError("No module named 'highdicom'")
        return real_import(name, *args, **kwargs)

    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", no_highdicom)
    with pytest.raises(SemiSAMError, match=r"needs the optional packages highdicom and pydicom: pip install "
                                           r"'nnunet-semisam\[dicom\]'"):
        dicom_mod.require_dicom_packages()
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
