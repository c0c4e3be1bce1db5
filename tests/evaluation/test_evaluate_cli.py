"""`nnunet-semisam evaluate` as a subprocess: the printed table, the written files, one-line errors with exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cmd


def write_nii(path: Path, seg: np.ndarray, spacing_zyx=(2.0, 1.0, 0.5)) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    sitk.WriteImage(img, str(path))


def cube(shape, lo, hi, label=1) -> np.ndarray:
    seg = np.zeros(shape, dtype=np.uint8)
    seg[tuple(slice(a, b) for a, b in zip(lo, hi))] = label
    return seg


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two cases, labels 1 and 2: case_0 perfect; case_1 label 1 shifted by one voxel along the 0.5 mm axis."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    shape = (8, 12, 12)
    g = cube(shape, (1, 1, 1), (5, 6, 6)) + cube(shape, (5, 7, 7), (7, 11, 11), 2)
    write_nii(gt / "case_0.nii.gz", g)
    write_nii(pred / "case_0.nii.gz", g)
    write_nii(gt / "case_1.nii.gz", g)
    p = cube(shape, (1, 1, 2), (5, 6, 7)) + cube(shape, (5, 7, 7), (7, 11, 11), 2)
    write_nii(pred / "case_1.nii.gz", p)
    return pred, gt


def test_cli_prints_table_and_writes_files(folders, tmp_path: Path, env) -> None:
    pred, gt = folders
    out = tmp_path / "out"
    proc = run_cmd(["nnunet-semisam", "evaluate", str(pred), str(gt), "--labels", "1", "2", "-o", str(out),
                    "--quiet"], env)
    for name in ("metrics.json", "metrics.csv", "metrics.md"):
        assert (out / name).is_file() and str(out / name) in proc.stdout
    js = json.loads((out / "metrics.json").read_text())
    # label 1, case_1: 5x5x4 cube vs the same shifted by one voxel -> Dice 2*4*5*4/(2*100) = 0.8, HD 1 vox = 0.5 mm
    m = js["cases"][1]["metrics"]["1"]
    assert m["dice"] == pytest.approx(0.8) and m["hd_vox"] == pytest.approx(1.0) and m["hd_mm"] == pytest.approx(0.5)
    assert js["mean"]["1"]["dice"] == pytest.approx(0.9) and js["mean"]["2"]["dice"] == 1.0
    assert "| 1 | 2 | 90.00 | " in proc.stdout and "| 2 | 2 | 100.00 | 100.00 | 0.00 |" in proc.stdout
    assert proc.stdout.split("| label |")[1].split("\n")[0] in (out / "metrics.md").read_text()


def test_cli_default_output_is_pred_and_paper_mode(folders, env) -> None:
    pred, gt = folders
    run_cmd(["nnunet-semisam", "evaluate", str(pred), str(gt), "--empty-mode", "paper", "-np", "2", "--quiet"], env)
    js = json.loads((pred / "metrics.json").read_text())
    assert js["empty_mode"] == "paper" and js["labels"] == [1, 2] and js["n_cases"] == 2


@pytest.mark.parametrize("case", ["missing_folder", "missing_prediction", "no_match", "shape"])
def test_cli_errors(case: str, folders, tmp_path: Path, env) -> None:
    pred, gt = folders
    expected = {
        "missing_folder": "error: reference folder not found",
        "missing_prediction": "error: 1 of 2 predictions missing",
        "no_match": "error: no prediction in",
        "shape": "error: case case_1.nii.gz: prediction shape",
    }[case]
    if case == "missing_folder":
        gt = tmp_path / "does_not_exist"
    elif case == "missing_prediction":
        (pred / "case_1.nii.gz").unlink()
    elif case == "no_match":
        for f in pred.iterdir():
            f.rename(f.with_name("other_" + f.name))
    else:
        write_nii(pred / "case_1.nii.gz", np.zeros((8, 12, 11), dtype=np.uint8))
    proc = run_cmd(["nnunet-semisam", "evaluate", str(pred), str(gt), "--quiet"], env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(expected)
    assert not (pred / "metrics.json").exists()
