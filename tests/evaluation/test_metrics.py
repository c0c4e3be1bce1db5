"""Metrics (METHODS.md §9): equality with medpy 0.5.2, empty-mask conventions, file and folder evaluation."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as mb
from scipy import ndimage
from skimage import io as skio

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.evaluation.metrics import (binary_metrics, evaluate_case, evaluate_folders,
                                               format_markdown_table, image_diagonal, surface_distances)

TOL = 1e-10
MEDPY_SURFACE = getattr(mb, "__surface_distances")  # medpy's private reference, module-level (not name-mangled)


def blobs(rng: np.random.Generator, shape: tuple[int, ...], box: tuple[slice, ...], threshold: float) -> np.ndarray:
    """Smoothed-noise mask restricted to `box`: several components with holes, empty outside `box`."""
    mask = np.zeros(shape, dtype=bool)
    sub = ndimage.gaussian_filter(rng.random(tuple(s.stop - s.start for s in box)), 1.5) > threshold
    mask[box] = sub
    return mask


def mask_pair(seed: int, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping multi-component masks in a larger image; odd seeds make them touch the image edge."""
    rng = np.random.default_rng(seed)
    shape = (48, 56) if ndim == 2 else (18, 30, 26)
    edge = seed % 2 == 1
    boxes = []
    for _ in range(2):
        lo = [0 if edge else int(rng.integers(2, 6)) for _ in shape]
        hi = [n if edge else n - int(rng.integers(2, 8)) for n in shape]
        boxes.append(tuple(slice(a, b) for a, b in zip(lo, hi)))
    a = blobs(rng, shape, boxes[0], 0.52)
    b = blobs(rng, shape, boxes[1], 0.5)
    assert a.any() and b.any() and (ndimage.label(a)[1] > 1) and (a & b).any()
    return a, b


def medpy_all(a: np.ndarray, b: np.ndarray, spacing) -> dict[str, float]:
    return {"dice": mb.dc(a, b), "jaccard": mb.jc(a, b), "hd": mb.hd(a, b, spacing), "hd95": mb.hd95(a, b, spacing),
            "asd": mb.asd(a, b, spacing), "assd": mb.assd(a, b, spacing)}


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spacing", ["none", "aniso"])
def test_binary_metrics_equal_medpy(ndim: int, seed: int, spacing: str) -> None:
    a, b = mask_pair(seed, ndim)
    sp = None if spacing == "none" else [0.7, 2.5, 1.3][:ndim]
    ours = binary_metrics(a, b, sp)
    ref = medpy_all(a, b, sp)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=TOL, rel=0), k
    assert not any(ours[k] for k in ("pred_empty", "gt_empty", "penalized", "excluded"))
    # ASD is directed prediction -> reference: swapping the arguments changes it (the masks are not symmetric)
    assert binary_metrics(b, a, sp)["asd"] == pytest.approx(mb.asd(b, a, sp), abs=TOL, rel=0)
    assert not math.isclose(ours["asd"], binary_metrics(b, a, sp)["asd"])


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_surface_distances_same_values_and_order_as_medpy(ndim: int, seed: int) -> None:
    a, b = mask_pair(seed, ndim)
    sp = [1.9, 0.6, 1.1][:ndim]
    for x, y in ((a, b), (b, a)):
        np.testing.assert_allclose(surface_distances(x, y, sp), MEDPY_SURFACE(x, y, sp), rtol=0, atol=TOL)
        np.testing.assert_allclose(surface_distances(x, y), MEDPY_SURFACE(x, y), rtol=0, atol=TOL)


def test_hand_computed_two_points() -> None:
    a = np.zeros((10, 10), dtype=np.uint8)
    b = np.zeros_like(a)
    a[0, 0] = 1
    b[3, 4] = 2  # any non-zero value is foreground
    m = binary_metrics(a, b)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    for k in ("hd", "hd95", "asd", "assd"):
        assert m[k] == pytest.approx(5.0, abs=1e-12)  # 3-4-5 triangle
    m = binary_metrics(a, b, spacing=(2.0, 1.0))
    assert m["hd"] == pytest.approx(math.sqrt(6.0 ** 2 + 4.0 ** 2), abs=1e-12)


def test_hand_computed_squares() -> None:
    # A = 4x4 square, G = the same square shifted right by one column.
    a = np.zeros((8, 8), dtype=bool)
    g = np.zeros_like(a)
    a[2:6, 1:5] = True
    g[2:6, 2:6] = True
    m = binary_metrics(a, g)
    assert m["dice"] == pytest.approx(2 * 12 / 32)
    assert m["jaccard"] == pytest.approx(12 / 20)
    assert m["hd"] == pytest.approx(1.0)  # every border pixel of one square is 0 or 1 px from the other's border
    # A's border has 12 px: the 4 of column 1 and the 2 inner ones of column 4 ((3,4), (4,4): G's border passes at
    # (3,5) and (2,4)) are 1 px away, the other 6 lie on G's border. G mirrors A -> 12 of 24 pooled values are 1.
    assert m["asd"] == pytest.approx(6 / 12)
    assert m["assd"] == pytest.approx(12 / 24)
    assert m["hd95"] == pytest.approx(1.0)


def test_hd95_is_pooled_percentile_not_max_of_directed() -> None:
    a, b = mask_pair(2, 3)
    d_ab, d_ba = surface_distances(a, b), surface_distances(b, a)
    m = binary_metrics(a, b)
    assert m["hd95"] == pytest.approx(np.percentile(np.concatenate([d_ab, d_ba]), 95), abs=TOL)
    assert m["hd"] == pytest.approx(max(d_ab.max(), d_ba.max()), abs=TOL)


def test_strict_empty_conventions() -> None:
    shape = (10, 8)
    e = np.zeros(shape, dtype=bool)
    f = e.copy()
    f[3:6, 2:5] = True
    sp = (2.0, 1.0)
    diag_mm = math.sqrt(20.0 ** 2 + 8.0 ** 2)
    assert image_diagonal(shape, sp) == pytest.approx(diag_mm)
    assert image_diagonal(shape) == pytest.approx(math.sqrt(10 ** 2 + 8 ** 2))

    both = binary_metrics(e, e, sp)
    assert both["dice"] == 1.0 and both["jaccard"] == 1.0
    assert all(both[k] == 0.0 for k in ("hd", "hd95", "asd", "assd"))
    assert both["pred_empty"] and both["gt_empty"] and not both["penalized"]

    for pred, gt in ((e, f), (f, e)):
        m = binary_metrics(pred, gt, sp)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0 and m["penalized"] and not m["excluded"]
        assert all(m[k] == pytest.approx(diag_mm) for k in ("hd", "hd95", "asd", "assd"))
        m_vox = binary_metrics(pred, gt)
        assert m_vox["hd95"] == pytest.approx(math.sqrt(10 ** 2 + 8 ** 2))


def test_paper_empty_conventions() -> None:
    e = np.zeros((6, 7, 5), dtype=bool)
    f = e.copy()
    f[1:4, 2:5, 1:3] = True
    for pred, gt in ((e, f), (e, e)):  # prediction empty: every metric 0
        m = binary_metrics(pred, gt, (1.0, 2.0, 3.0), empty_mode="paper")
        assert all(m[k] == 0.0 for k in ("dice", "jaccard", "hd", "hd95", "asd", "assd"))
        assert not m["penalized"] and not m["excluded"]
    m = binary_metrics(f, e, empty_mode="paper")  # reference empty, prediction not: Dice 0, distances excluded
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0 and m["excluded"] and not m["penalized"]
    assert all(math.isnan(m[k]) for k in ("hd", "hd95", "asd", "assd"))
    # non-empty masks: both modes agree with medpy
    a, b = mask_pair(0, 3)
    assert binary_metrics(a, b, empty_mode="paper") == binary_metrics(a, b, empty_mode="strict")


def test_argument_errors() -> None:
    a, b = mask_pair(0, 2)
    with pytest.raises(SemiSAMError, match="spacing"):
        binary_metrics(a, b, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(SemiSAMError, match="shape"):
        binary_metrics(a, b[:-1])
    with pytest.raises(SemiSAMError, match="empty_mode"):
        binary_metrics(a, b, empty_mode="lenient")
    with pytest.raises(ValueError):
        surface_distances(a, np.zeros_like(b))


def test_format_markdown_table() -> None:
    rows = [{"method": "MT", "Dice %": 85.456, "HD": float("nan"), "ok": True}, {"method": "a|b", "Dice %": 3}]
    assert format_markdown_table(rows, ["method", "Dice %", "HD", "ok"]) == (
        "| method | Dice % | HD | ok |\n"
        "|---|---|---|---|\n"
        "| MT | 85.46 | n/a | yes |\n"
        "| a\\|b | 3 |  |  |\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# files and folders
# ---------------------------------------------------------------------------------------------------------------------
def write_nii(path: Path, seg: np.ndarray, spacing_zyx) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    sitk.WriteImage(img, str(path))


def label_map(seed: int, shape=(14, 24, 20), labels=(1, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, dtype=np.uint8)
    for i, lab in enumerate(labels):
        seg[blobs(rng, shape, tuple(slice(1 + i, n - 2) for n in shape), 0.53)] = lab
    return seg


SPACING = (2.5, 0.75, 1.25)  # exact in float32 (NIfTI stores the spacing as float32)


def test_evaluate_case_mm_and_vox_multilabel(tmp_path: Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    gt, pred = label_map(0), label_map(1)
    write_nii(tmp_path / "gt.nii.gz", gt, SPACING)
    write_nii(tmp_path / "pred.nii.gz", pred, SPACING)
    res = evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "gt.nii.gz", [1, 2, 3], SimpleITKIO)
    assert res["spacing"] == pytest.approx(SPACING) and res["gt_labels"] == [1, 2]
    for lab in (1, 2):
        m = res["metrics"][lab]
        mm = medpy_all(pred == lab, gt == lab, SPACING)
        vox = medpy_all(pred == lab, gt == lab, None)
        for k in ("hd", "hd95", "asd", "assd"):
            assert m[k + "_mm"] == pytest.approx(mm[k], abs=TOL, rel=0)
            assert m[k + "_vox"] == pytest.approx(vox[k], abs=TOL, rel=0)
        assert m["dice"] == pytest.approx(mm["dice"], abs=TOL) and m["jaccard"] == pytest.approx(mm["jaccard"])
        assert m["hd95_mm"] != pytest.approx(m["hd95_vox"])
    assert res["metrics"][3]["dice"] == 1.0 and res["metrics"][3]["hd_mm"] == 0.0  # absent in both: perfect


def test_evaluate_case_2d_png_and_2d_nifti(tmp_path: Path) -> None:
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    a, b = mask_pair(1, 2)  # touches the image edge: a 3D reading (one slice) would make every pixel a border pixel
    skio.imsave(tmp_path / "p.png", a.astype(np.uint8), check_contrast=False)
    skio.imsave(tmp_path / "g.png", b.astype(np.uint8), check_contrast=False)
    res = evaluate_case(tmp_path / "p.png", tmp_path / "g.png", [1], NaturalImage2DIO())
    ref = medpy_all(a, b, None)
    for k in ("hd", "hd95", "asd", "assd"):
        assert res["metrics"][1][k + "_vox"] == pytest.approx(ref[k], abs=TOL, rel=0)
        assert res["metrics"][1][k + "_mm"] == pytest.approx(ref[k], abs=TOL, rel=0)  # png: spacing 1

    for name, m in (("p2.nii.gz", a), ("g2.nii.gz", b)):
        img = sitk.GetImageFromArray(m.astype(np.uint8))
        img.SetSpacing((0.5, 2.0))  # x, y
        sitk.WriteImage(img, str(tmp_path / name))
    res = evaluate_case(tmp_path / "p2.nii.gz", tmp_path / "g2.nii.gz", [1], SimpleITKIO)
    assert res["spacing"] == pytest.approx([2.0, 0.5]) and res["shape"] == list(a.shape)
    assert res["metrics"][1]["hd95_mm"] == pytest.approx(mb.hd95(a, b, (2.0, 0.5)), abs=TOL, rel=0)


def test_evaluate_case_shape_mismatch_names_case(tmp_path: Path) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    write_nii(tmp_path / "case_7.nii.gz", label_map(0), SPACING)
    write_nii(tmp_path / "pred.nii.gz", label_map(0)[:, :-1], SPACING)
    with pytest.raises(SemiSAMError, match="case_7.nii.gz.*shape"):
        evaluate_case(tmp_path / "pred.nii.gz", tmp_path / "case_7.nii.gz", [1], SimpleITKIO)


@pytest.fixture
def nii_folders(tmp_path: Path) -> tuple[Path, Path]:
    """3 cases; label 2 is missing from the reference of case_2 but predicted there (a penalized pair)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for i in range(3):
        g = label_map(10 + i)
        if i == 2:
            g[g == 2] = 0
        write_nii(gt / f"case_{i}.nii.gz", g, SPACING)
        write_nii(pred / f"case_{i}.nii.gz", label_map(20 + i), SPACING)
    write_nii(pred / "extra_without_reference.nii.gz", label_map(0), SPACING)
    (pred / "plans.json").write_text("{}")
    return pred, gt


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_folders_outputs_agree(nii_folders, tmp_path: Path) -> None:
    pred, gt = nii_folders
    res = evaluate_folders(pred, gt, progress=False)
    assert res["labels"] == [1, 2] and res["n_cases"] == 3 and res["file_ending"] == ".nii.gz"
    js = json.loads((pred / "metrics.json").read_text())
    rows = read_csv(pred / "metrics.csv")
    md = (pred / "metrics.md").read_text()
    assert not [p for p in pred.iterdir() if p.name.startswith(".tmp_")]
    assert len(rows) == 3 * 2 and [c["case"] for c in js["cases"]] == [f"case_{i}.nii.gz" for i in range(3)]

    # per case: JSON = CSV = direct binary_metrics
    for row in rows:
        case = next(c for c in js["cases"] if c["case"] == row["case"])
        m = case["metrics"][row["label"]]
        lab = int(row["label"])
        g = sitk.GetArrayFromImage(sitk.ReadImage(str(gt / row["case"]))) == lab
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / row["case"]))) == lab
        direct = binary_metrics(p, g, SPACING)
        for k in ("dice", "jaccard", "hd_mm", "hd95_mm", "asd_mm", "assd_mm", "hd_vox", "asd_vox"):
            assert float(row[k]) == m[k]
        for k in ("hd", "hd95", "asd", "assd"):
            assert m[k + "_mm"] == pytest.approx(direct[k], abs=TOL, rel=0)
        assert bool(int(row["penalized"])) == m["penalized"] == (row["case"] == "case_2.nii.gz" and lab == 2)

    # means over cases, penalty included and counted
    for lab in ("1", "2"):
        vals = [c["metrics"][lab]["hd95_mm"] for c in js["cases"]]
        assert js["mean"][lab]["hd95_mm"] == pytest.approx(np.mean(vals))
        assert js["mean"][lab]["n_cases"] == 3
    assert js["mean"]["2"]["n_penalized"] == 1 and js["mean"]["1"]["n_penalized"] == 0
    assert js["cases"][2]["metrics"]["2"]["hd_mm"] == pytest.approx(image_diagonal((14, 24, 20), SPACING))
    assert js["mean"]["mean"]["dice"] == pytest.approx((js["mean"]["1"]["dice"] + js["mean"]["2"]["dice"]) / 2)

    # Markdown table of the means
    line = next(l for l in md.splitlines() if l.startswith("| 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and cells[2] == f"{100 * js['mean']['1']['dice']:.2f}"
    assert cells[4] == f"{js['mean']['1']['hd_mm']:.2f}" and cells[8] == f"{js['mean']['1']['hd95_vox']:.2f}"
    assert res["markdown"] in md


def test_evaluate_folders_paper_mode_excludes_nan(nii_folders, tmp_path: Path) -> None:
    pred, gt = nii_folders
    res = evaluate_folders(pred, gt, output_dir=tmp_path / "out", empty_mode="paper", progress=False)
    assert (tmp_path / "out" / "metrics.csv").is_file() and not (pred / "metrics.json").exists()
    cases = res["cases"]
    assert cases[2]["metrics"]["2"]["hd95_mm"] is None and cases[2]["metrics"]["2"]["excluded"]
    vals = [c["metrics"]["2"]["hd95_mm"] for c in cases[:2]]
    assert res["mean"]["2"]["hd95_mm"] == pytest.approx(np.mean(vals))
    assert res["mean"]["2"]["n_excluded"] == 1
    assert res["mean"]["2"]["dice"] == pytest.approx(np.mean([c["metrics"]["2"]["dice"] for c in cases]))
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert math.isnan(float(next(r for r in rows if r["case"] == "case_2.nii.gz" and r["label"] == "2")["hd_mm"]))


def test_evaluate_folders_labels_from_dataset_json_and_argument(nii_folders) -> None:
    pred, gt = nii_folders
    (gt / "dataset.json").write_text(json.dumps(
        {"labels": {"background": 0, "liver": 1, "tumour": 2, "vessel": 3}, "file_ending": ".nii.gz"}))
    res = evaluate_folders(pred, gt, progress=False)
    assert res["labels"] == [1, 2, 3]
    assert res["mean"]["3"]["dice"] == 1.0 and res["mean"]["3"]["hd_mm"] == 0.0  # absent everywhere: perfect
    assert "| 2 (tumour) |" in res["markdown"]
    res = evaluate_folders(pred, gt, labels=[2], progress=False)
    assert res["labels"] == [2] and set(res["mean"]) == {"2", "mean"}


def test_evaluate_folders_parallel_equals_serial(nii_folders, tmp_path: Path) -> None:
    pred, gt = nii_folders
    serial = evaluate_folders(pred, gt, output_dir=tmp_path / "s", progress=False)
    parallel = evaluate_folders(pred, gt, output_dir=tmp_path / "p", num_processes=2, progress=False)
    assert serial["cases"] == [dict(c) for c in parallel["cases"]] and serial["mean"] == parallel["mean"]


def test_evaluate_folders_png(tmp_path: Path) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    pairs = [mask_pair(s, 2) for s in range(2)]
    for i, (a, b) in enumerate(pairs):
        skio.imsave(pred / f"img_{i}.png", (a * 1).astype(np.uint8), check_contrast=False)
        skio.imsave(gt / f"img_{i}.png", (b * 1).astype(np.uint8), check_contrast=False)
    res = evaluate_folders(pred, gt, progress=False)
    assert res["file_ending"] == ".png" and res["labels"] == [1]
    expected = np.mean([mb.hd95(a, b) for a, b in pairs])
    assert res["mean"]["1"]["hd95_vox"] == pytest.approx(expected, abs=TOL)
    assert res["mean"]["1"]["hd95_mm"] == pytest.approx(expected, abs=TOL)


def test_evaluate_folders_errors(nii_folders, tmp_path: Path) -> None:
    pred, gt = nii_folders
    with pytest.raises(SemiSAMError, match="prediction folder not found"):
        evaluate_folders(tmp_path / "nope", gt, progress=False)
    (pred / "case_1.nii.gz").unlink()
    (pred / "case_2.nii.gz").unlink()
    with pytest.raises(SemiSAMError, match=r"2 of 3 predictions missing in .*, first: case_1\.nii\.gz"):
        evaluate_folders(pred, gt, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SemiSAMError, match="no segmentation files"):
        evaluate_folders(pred, empty, progress=False)
    with pytest.raises(SemiSAMError, match="no prediction in"):
        evaluate_folders(empty, gt, progress=False)
    write_nii(pred / "case_1.nii.gz", label_map(0)[:-1], SPACING)
    write_nii(pred / "case_2.nii.gz", label_map(0), SPACING)
    with pytest.raises(SemiSAMError, match="case_1.nii.gz: prediction shape"):
        evaluate_folders(pred, gt, progress=False)
    assert not (pred / "metrics.json").exists()  # raised before writing any output
