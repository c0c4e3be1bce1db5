"""`split-labels`: counts, determinism, stratification, patient groups, refusal/--force, resume after interruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import nnunet_semisam.data.split_labels as sl
from conftest import run_cmd
from nnunet_semisam.data.split_labels import (HELDOUT_LABELS, SPLIT_RECORD, UNLABELED_IMAGES, size_strata,
                                              split_labels, stratified_select)
from nnunet_semisam.errors import SemiSAMError

SIZE = 20
# 40 cases: 10 lesion-free, 10 tiny (1 px), 20 large (36..100 px)
KINDS = ["free"] * 10 + ["tiny"] * 10 + ["large"] * 20


def make_natural_dataset(raw: Path, dataset_id: int = 7, kinds=KINDS) -> Path:
    """`DatasetNNN_Toy/` in nnU-Net's natural-image format: RGB `_0000.png` + 0/1 label PNG per case."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    ds = raw / f"Dataset{dataset_id:03d}_Toy"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i, kind in enumerate(kinds):
        lab = np.zeros((SIZE, SIZE), np.uint8)
        if kind == "tiny":
            lab[i % SIZE, 3] = 1
        elif kind == "large":
            side = 6 + i % 5
            lab[2:2 + side, 2:2 + side] = 1
        rgb = np.stack([lab * 200 + 20] * 3, -1).astype(np.uint8)
        Image.fromarray(rgb).save(ds / "imagesTr" / f"case{i:03d}_0000.png")
        Image.fromarray(lab).save(ds / "labelsTr" / f"case{i:03d}.png")
    generate_dataset_json(str(ds), {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, len(kinds), ".png",
                          overwrite_image_reader_writer="NaturalImage2DIO")
    return ds


def _dj(ds: Path) -> dict:
    return json.loads((ds / "dataset.json").read_text())


def _ids(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def _kind(case: str) -> str:
    return KINDS[int(case[4:7])]


def test_fraction_counts_layout_and_dataset_json(tmp_path: Path) -> None:
    ds = make_natural_dataset(tmp_path / "raw")
    plan = split_labels(ds, fraction=0.1, seed=0, progress=False)
    assert len(plan["labeled"]) == 4 and len(plan["unlabeled"]) == 36 and plan["unit"] == "case"
    assert _ids(ds / "imagesTr", "_0000.png") == plan["labeled"] == _ids(ds / "labelsTr", ".png")
    assert _ids(ds / UNLABELED_IMAGES, "_0000.png") == plan["unlabeled"] == _ids(ds / HELDOUT_LABELS, ".png")
    dj = _dj(ds)
    assert dj["numTraining"] == 4 and dj["numUnlabeled"] == 36
    assert json.loads((ds / SPLIT_RECORD).read_text())["status"] == "done"

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(ds), num_processes=1)  # nnU-Net still accepts the labeled part


def test_num_labeled_and_rounding(tmp_path: Path) -> None:
    ds = make_natural_dataset(tmp_path / "raw")
    assert len(split_labels(ds, num_labeled=6, progress=False)["labeled"]) == 6
    ds2 = make_natural_dataset(tmp_path / "raw2")
    assert len(split_labels(ds2, fraction=0.2, progress=False)["labeled"]) == 8  # 40 * 0.2
    ds3 = make_natural_dataset(tmp_path / "raw3", kinds=KINDS[:30])
    assert len(split_labels(ds3, fraction=0.05, progress=False)["labeled"]) == 2  # 1.5 rounds half up


def test_same_seed_same_split_other_seed_differs(tmp_path: Path) -> None:
    a = split_labels(make_natural_dataset(tmp_path / "a"), fraction=0.2, seed=1, progress=False)
    b = split_labels(make_natural_dataset(tmp_path / "b"), fraction=0.2, seed=1, progress=False)
    c = split_labels(make_natural_dataset(tmp_path / "c"), fraction=0.2, seed=2, progress=False)
    assert a["labeled"] == b["labeled"]
    assert a["labeled"] != c["labeled"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_free_and_tiny_cases_on_both_sides(tmp_path: Path, seed: int) -> None:
    ds = make_natural_dataset(tmp_path / "raw")
    plan = split_labels(ds, fraction=0.2, seed=seed, progress=False)
    labeled = [_kind(c) for c in plan["labeled"]]
    unlabeled = [_kind(c) for c in plan["unlabeled"]]
    # 8 labeled of 40. Strata: lesion-free 10; the 30 lesion cases in size quartiles of 8, 8, 7, 7 (the first
    # holds 8 of the 10 one-pixel lesions). Quotas 8 * n_s / 40 = 2, 1.6, 1.6, 1.4, 1.4 -> 2, 2, 2, 1, 1.
    counts = {s: v["labeled"] for s, v in plan["strata"].items()}
    assert counts == {"lesion-free": 2, "size-1": 2, "size-2": 2, "size-3": 1, "size-4": 1}
    assert plan["strata"]["lesion-free"] == {"labeled": 2, "unlabeled": 8, "foreground_fraction": [0.0, 0.0]}
    assert labeled.count("free") == 2 and unlabeled.count("free") == 8
    assert 2 <= labeled.count("tiny") <= 4 and unlabeled.count("tiny") >= 6  # size-1 gives 2, size-2 up to 2 more


def test_stratified_select_hand_computed() -> None:
    fg = {"a": 0.0, "b": 0.0, "c": 0.01, "d": 0.02, "e": 0.5, "f": 0.6, "g": 0.7, "h": 0.8}
    strata = size_strata(fg)
    assert strata == {"lesion-free": ["a", "b"], "size-1": ["c", "d"], "size-2": ["e", "f"], "size-3": ["g"],
                      "size-4": ["h"]}
    for seed in range(6):
        labeled, unlabeled, summary = stratified_select(fg, 4, seed)
        # quotas 4 * n_s / 8 = 1, 1, 1, 0.5, 0.5: one of each pair, and one of g/h by the random tie-break
        assert len(labeled) == 4 and sorted(labeled + unlabeled) == sorted(fg)
        for pair in (("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")):
            assert len(set(pair) & set(labeled)) == 1
        assert sum(s["labeled"] for s in summary.values()) == 4
    with pytest.raises(SemiSAMError, match="at least 1 labeled and 1 unlabeled"):
        stratified_select(fg, 8, 0)


def test_second_run_refused_force_restores_and_resplits(tmp_path: Path) -> None:
    ds = make_natural_dataset(tmp_path / "raw")
    first = split_labels(ds, num_labeled=4, seed=0, progress=False)
    with pytest.raises(SemiSAMError, match="already split .*--force"):
        split_labels(ds, num_labeled=4, seed=0, progress=False)
    second = split_labels(ds, fraction=0.5, seed=5, force=True, progress=False)
    assert len(second["labeled"]) == 20 and second["labeled"] != first["labeled"]
    all_cases = sorted(_ids(ds / "imagesTr", "_0000.png") + _ids(ds / UNLABELED_IMAGES, "_0000.png"))
    assert all_cases == [f"case{i:03d}" for i in range(40)]
    assert _ids(ds / "labelsTr", ".png") == second["labeled"]
    assert _ids(ds / HELDOUT_LABELS, ".png") == second["unlabeled"]
    # held-out labels travel with their images: the restored label is the case's own
    for case in second["labeled"]:
        img = np.asarray(Image.open(ds / "imagesTr" / f"{case}_0000.png"))[..., 0]
        lab = np.asarray(Image.open(ds / "labelsTr" / f"{case}.png"))
        np.testing.assert_array_equal(img == 220, lab == 1)
    assert _dj(ds)["numTraining"] == 20 and _dj(ds)["numUnlabeled"] == 20


def test_interrupted_split_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    ds = make_natural_dataset(tmp_path / "raw")
    reference = split_labels(make_natural_dataset(tmp_path / "ref"), fraction=0.25, seed=4, progress=False)

    real_move, calls = sl._move, {"n": 0}

    def flaky_move(src, dst):
        calls["n"] += 1
        if calls["n"] == 24:  # mid-way through a case: its image moved, its label not yet
            raise KeyboardInterrupt
        real_move(src, dst)

    monkeypatch.setattr(sl, "_move", flaky_move)
    with pytest.raises(KeyboardInterrupt):
        split_labels(ds, fraction=0.25, seed=4, progress=False)
    monkeypatch.setattr(sl, "_move", real_move)
    assert json.loads((ds / SPLIT_RECORD).read_text())["status"] == "planned"
    assert _dj(ds)["numTraining"] == 40  # dataset.json is only updated once every file has moved

    with pytest.raises(SemiSAMError, match="interrupted split with other settings"):
        split_labels(ds, fraction=0.5, seed=4, progress=False)
    done = split_labels(ds, fraction=0.25, seed=4, progress=False)
    assert done["labeled"] == reference["labeled"] and done["status"] == "done"
    assert _ids(ds / "imagesTr", "_0000.png") == _ids(ds / "labelsTr", ".png") == reference["labeled"]
    assert _ids(ds / HELDOUT_LABELS, ".png") == reference["unlabeled"]
    assert _dj(ds)["numTraining"] == 10 and _dj(ds)["numUnlabeled"] == 30


def test_patient_groups_from_conversion_record(tmp_path: Path) -> None:
    """Slices of one patient (NIfTI, as msd-brats2d writes them) are labeled or unlabeled together."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    ds = tmp_path / "raw" / "Dataset009_Slices"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    groups = {}
    for p in range(10):
        for z in range(3 if p % 2 else 5):
            case = f"BRATS_{p:03d}_z{z:03d}"
            groups[case] = f"BRATS_{p:03d}"
            lab = np.zeros((1, 8, 8), np.uint8)
            lab[0, :p % 4, :2] = 1  # patients 0, 4, 8 are tumour-free
            for c in range(2):
                sitk.WriteImage(sitk.GetImageFromArray(lab.astype(np.float32) + c),
                                str(ds / "imagesTr" / f"{case}_{c:04d}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(ds / "labelsTr" / f"{case}.nii.gz"))
    generate_dataset_json(str(ds), {0: "FLAIR", 1: "T1w"}, {"background": 0, "whole tumour": 1}, len(groups),
                          ".nii.gz")
    (ds / "conversion.json").write_text(json.dumps({"groups": groups}))
    plan = split_labels(ds, fraction=0.2, seed=0, progress=False)
    assert plan["unit"] == "patient" and plan["num_units"] == 10 and len(plan["labeled_units"]) == 2
    labeled_patients = {groups[c] for c in plan["labeled"]}
    assert labeled_patients == set(plan["labeled_units"])
    assert labeled_patients.isdisjoint({groups[c] for c in plan["unlabeled"]})
    assert plan["strata"]["lesion-free"]["labeled"] + plan["strata"]["lesion-free"]["unlabeled"] == 3
    assert _dj(ds)["numTraining"] == len(plan["labeled"]) == sum(3 if int(p[-3:]) % 2 else 5 for p in labeled_patients)

    by_case = split_labels(ds, fraction=0.2, seed=0, force=True, by_case=True, progress=False)
    assert by_case["unit"] == "case" and len(by_case["labeled"]) == round(0.2 * len(groups))


def test_argument_and_dataset_errors(tmp_path: Path, monkeypatch) -> None:
    ds = make_natural_dataset(tmp_path / "raw", kinds=KINDS[:5])
    with pytest.raises(SemiSAMError, match="exactly one"):
        split_labels(ds, progress=False)
    with pytest.raises(SemiSAMError, match="--fraction must be in"):
        split_labels(ds, fraction=1.0, progress=False)
    with pytest.raises(SemiSAMError, match="cannot keep 5 of 5"):
        split_labels(ds, num_labeled=5, progress=False)
    (ds / "labelsTr" / "case002.png").unlink()
    with pytest.raises(SemiSAMError, match="missing label .*case002.png"):
        split_labels(ds, num_labeled=2, progress=False)
    assert not (ds / SPLIT_RECORD).exists() and not (ds / UNLABELED_IMAGES).exists()

    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(SemiSAMError, match="is not set"):
        sl.resolve_raw_dataset(7)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert sl.resolve_raw_dataset("7") == ds
    with pytest.raises(SemiSAMError, match="unknown dataset"):
        sl.resolve_raw_dataset(8)


def test_cli_split_labels_refuses_twice_and_force(tmp_path: Path, env: dict) -> None:
    ds = make_natural_dataset(Path(env["nnUNet_raw"]), dataset_id=31)
    proc = run_cmd(["nnunet-semisam", "split-labels", "-d", "31", "--num-labeled", "4", "--seed", "2", "-np", "2",
                    "--quiet"], env)
    assert "4 of 40 cases labeled" in proc.stdout
    assert len(list((ds / UNLABELED_IMAGES).glob("*.png"))) == 36
    again = run_cmd(["nnunet-semisam", "split-labels", "-d", "31", "--num-labeled", "4", "--quiet"], env, check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr
    forced = run_cmd(["nnunet-semisam", "split-labels", "-d", "31", "--fraction", "0.1", "--force", "--quiet"], env)
    assert "restored 36 held-out cases" in forced.stdout
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 4
    unknown = run_cmd(["nnunet-semisam", "split-labels", "-d", "99", "--fraction", "0.1"], env, check=False)
    assert unknown.returncode == 2 and "unknown dataset" in unknown.stderr
    shutil.rmtree(ds)
