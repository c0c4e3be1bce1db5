"""`nnunet-semisam refine` (METHODS.md §5.8): one slice of a prediction re-segmented by the real LiteMedSAM.

The volume is an MR-like float image with a bright elliptic lesion whose size and position change from slice to
slice; the "prediction" is the truth with deliberate errors. LiteMedSAM's encoder costs ~2.5 s per slice on two
cores, so the tests share one loaded teacher (the CLI test runs `main` in this process with it) and run 1 + 3
slices through it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_semisam.deploy.refine import (box_from_click, refine_prediction, replace_label, segment_slices,
                                          teacher_volume)
from nnunet_semisam.errors import SemiSAMError

Z, H, W = 5, 80, 96
SPACING = (0.8, 0.75, 3.0)
ORIGIN = (12.5, -40.0, 77.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x and y swapped and flipped: not the identity


def lesion_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image (Z, H, W) float32, lesion truth (Z, H, W) bool): textured background ~200, lesion +600."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:Z, :H, :W]
    radius = np.array([6.0, 10.0, 13.0, 11.0, 7.0])[:, None, None]
    r = np.sqrt(((yy - (38 + 1.5 * zz)) / radius) ** 2 + ((xx - (50 - zz)) / (1.3 * radius)) ** 2)
    background = 200 + 40 * np.sin(xx / 3.0) * np.cos(yy / 4.0) + rng.normal(0, 15, (Z, H, W))
    return (background + 600 / (1 + np.exp((r - 1) * 12))).astype(np.float32), r <= 1


def write(array: np.ndarray, path: Path) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))
    return path


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def bbox(mask: np.ndarray, margin: int) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()) - margin, int(ys.min()) - margin, int(xs.max()) + margin, int(ys.max()) + margin]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """image.nii.gz, the truth and pred.nii.gz: the truth (label 1) except on slice 2, where the lesion is a small
    shifted disc, a label-2 structure overlaps the lesion's edge and a second label-1 object sits far away; slice 3
    misses the lesion entirely."""
    root = tmp_path_factory.mktemp("refine")
    image, truth = lesion_volume()
    pred = truth.astype(np.uint8)
    pred[2] = 0
    yy, xx = np.mgrid[:H, :W]
    pred[2][(yy - 35) ** 2 + (xx - 40) ** 2 <= 16] = 1  # wrong: a 4-pixel disc off-centre
    pred[2, 45:48, 55:60] = 2  # another class, touching the lesion
    pred[2, 70:75, 5:10] = 1  # another label-1 object, far from the lesion
    pred[3] = 0
    return {"image": write(image, root / "image.nii.gz"), "pred": write(pred, root / "pred.nii.gz"),
            "truth": truth, "pred_array": pred}


@pytest.fixture(scope="module")
def lite():
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

    return LiteMedSAMTeacher.from_package()


class FixedTeacher:
    """A stand-in with LiteMedSAM's `segment_volume` signature that returns a fixed mask on the slices asked for
    (for the replacement and file-handling tests, which need no real segmentation)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask, self.calls = mask, []

    def segment_volume(self, volume_u8, box_3d):
        import torch

        self.calls.append([float(v) for v in box_3d])
        out = np.zeros(volume_u8.shape[:3], np.float32)
        lo, hi = max(0, int(box_3d[2])), min(volume_u8.shape[0] - 1, int(box_3d[5]))
        out[lo:hi + 1] = self.mask
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ pure pieces

def test_replace_label_and_click_box_by_hand() -> None:
    seg = np.array([[0, 1, 1, 0, 0, 0, 1, 1],
                    [0, 1, 0, 0, 2, 0, 1, 1],
                    [0, 0, 0, 0, 2, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    new = np.zeros((4, 8), bool)
    new[1:3, 2:6] = True
    # box x 1..2, y 0..1 touches the left label-1 object (cleared); the object at x 6..7 and the one at (0, 3) stay;
    # the new mask takes background and the cleared object, never label 2
    out = replace_label(seg, new, 1, [1, 0, 2, 1])
    expected = np.array([[0, 0, 0, 0, 0, 0, 1, 1],
                         [0, 0, 1, 1, 2, 1, 1, 1],
                         [0, 0, 1, 1, 2, 1, 0, 0],
                         [1, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and seg[0, 1] == 1  # a new array; the input is untouched

    lab = seg == 1
    np.testing.assert_array_equal(box_from_click(lab, (6, 0), margin=1), [5, 0, 7, 2])  # component x 6..7, y 0..1
    np.testing.assert_array_equal(box_from_click(lab, (3, 2), click_box=4), [1, 0, 4, 3])  # background: 4-px square
    np.testing.assert_array_equal(box_from_click(lab, (7, 3), click_box=32), [0, 0, 7, 3])  # clipped to the slice


def test_teacher_image_rules_by_hand() -> None:
    hu = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    # CT: window level 40 width 400 -> [-160, 240], min-max to 0..255 (truncation)
    np.testing.assert_array_equal(teacher_volume(hu, "ct"), [[[0, 0, 127, 255, 255]]])
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    assert teacher_volume(rgb) is rgb
    with pytest.raises(SemiSAMError, match="4 components per voxel"):
        teacher_volume(np.zeros((1, 2, 2, 4)))


# ------------------------------------------------------------------------------------- real LiteMedSAM refine

def test_box_refine_replaces_exactly_that_slice_with_a_litemedsam_mask(case, lite, tmp_path: Path) -> None:
    truth, old = case["truth"], case["pred_array"]
    assert dice(old[2] == 1, truth[2]) < 0.2  # the prediction is wrong on slice 2
    box = bbox(truth[2], 4)
    out = tmp_path / "refined.nii.gz"
    result = refine_prediction(case["pred"], case["image"], 2, box=box, label=1, output=out, teacher=lite)
    assert result.output == out and result.box == tuple(box) and list(result.slices) == [2]
    new = read(out)
    others = np.arange(Z) != 2
    np.testing.assert_array_equal(new[others], old[others])  # every other slice bit for bit
    np.testing.assert_array_equal(new[2] == 2, old[2] == 2)  # the other class untouched
    np.testing.assert_array_equal(new[2, 60:, :20], old[2, 60:, :20])  # the far label-1 object kept
    lesion = new[2] == 1
    lesion[60:, :20] = False
    assert dice(lesion, truth[2] & (old[2] != 2)) > 0.8  # a plausible LiteMedSAM mask of the lesion
    assert result.changed_voxels == int((new != old).sum()) > 0
    src, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(case["pred"]))
    assert src.GetSpacing() == ref.GetSpacing() and src.GetOrigin() == ref.GetOrigin()
    assert src.GetDirection() == ref.GetDirection() and src.GetPixelID() == ref.GetPixelID()


def test_cli_click_on_a_missed_lesion_with_propagation(case, lite, tmp_path: Path, monkeypatch, capsys) -> None:
    from nnunet_semisam.cli import main
    from nnunet_semisam.deploy import refine as refine_mod

    loaded = []
    monkeypatch.setattr(refine_mod, "load_refine_teacher", lambda *args: loaded.append(args) or lite)  # shared
    truth, old = case["truth"], case["pred_array"]
    out = tmp_path / "refined.nii.gz"
    ys, xs = np.nonzero(truth[3])
    click = [str(int(xs.mean())), str(int(ys.mean()))]  # on background: the prediction missed slice 3's lesion
    assert main(["refine", str(case["pred"]), str(case["image"]), "--slice", "3", "--click", *click,
                 "--propagate", "1", "-o", str(out), "-device", "cpu"]) == 0
    assert loaded == [("litemedsam", None, "cpu", None, 512)]
    stdout = capsys.readouterr().out
    assert "slice 3: label 1 0 -> " in stdout and f"wrote {out}" in stdout
    new = read(out)
    np.testing.assert_array_equal(new[:2], old[:2])  # only slices 2..4 were re-segmented
    assert dice(new[3] == 1, truth[3]) > 0.8
    # slice 4 (a small lesion) from the widened box of slice 3's mask, the official rule (0.67 measured)
    assert dice(new[4] == 1, truth[4]) > 0.5
    lesion2 = new[2] == 1
    lesion2[60:, :20] = False
    assert dice(lesion2, truth[2] & (old[2] != 2)) > 0.8  # propagated from slice 3's mask
    np.testing.assert_array_equal(new[2] == 2, old[2] == 2)


# --------------------------------------------------------------------------------- files, errors, MedSAM2

def test_in_place_write_is_atomic_and_errors_are_one_line(case, tmp_path: Path, monkeypatch, capsys) -> None:
    pred = tmp_path / "pred.nii.gz"
    pred.write_bytes(case["pred"].read_bytes())
    before = pred.read_bytes()
    mask = np.zeros((H, W), np.float32)
    mask[30:50, 40:60] = 1
    teacher = FixedTeacher(mask)

    def broken_write(image, path, *args, **kwargs):  # writes half a file, then fails (disk full, kill, ...)
        Path(path).write_bytes(b"\x1f\x8b" + b"0" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        refine_prediction(pred, case["image"], 1, box=[40, 30, 59, 49], teacher=teacher)
    assert pred.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]
    with pytest.raises(RuntimeError):
        refine_prediction(pred, case["image"], 1, box=[40, 30, 59, 49], teacher=teacher, output=tmp_path / "o.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]  # no partial output, no temporary
    monkeypatch.undo()

    result = refine_prediction(pred, case["image"], 1, box=[40, 30, 59, 49], teacher=teacher, propagate=1)
    assert result.output == pred and sorted(result.slices) == [0, 1, 2]  # in place by default
    assert teacher.calls[-1] == [40.0, 30.0, 0.0, 59.0, 49.0, 2.0]  # LiteMedSAM's propagation over z - 1 .. z + 1
    new = read(pred)
    assert (new[1, 30:50, 40:60] == 1).all() and (new[3:] == case["pred_array"][3:]).all()

    for kwargs, message in (
            ({"slice_index": 5, "box": [1, 1, 5, 5]}, r"--slice 5 outside the volume's 5 slices \(0..4\)"),
            ({"slice_index": 1, "box": [1, 1, 96, 5]}, r"box corner \(96, 5\) lies outside the image \(x < 96"),
            ({"slice_index": 1, "box": [5, 1, 1, 5]}, "x0 <= x1"),
            ({"slice_index": 1}, "give exactly one prompt"),
            ({"slice_index": 1, "click": [3, 80]}, r"click \(3, 80\) lies outside the image \(x < 96, y < 80\)"),
            ({"slice_index": 1, "box": [1, 1, 5, 5], "label": 0}, "--label 0 must be a foreground label")):
        with pytest.raises(SemiSAMError, match=message):
            refine_prediction(pred, case["image"], teacher=teacher, **kwargs)
    other = write(np.zeros((Z, H, W - 1), np.float32), tmp_path / "other.nii.gz")
    with pytest.raises(SemiSAMError, match=r"has size \(96, 80, 5\), its source .*other.nii.gz \(95, 80, 5\)"):
        refine_prediction(pred, other, 1, box=[1, 1, 5, 5], teacher=teacher)
    from nnunet_semisam.cli import main
    from nnunet_semisam.deploy import refine as refine_mod

    with pytest.raises(SemiSAMError, match="--teacher medsam2 needs --checkpoint"):
        refine_mod.load_refine_teacher("medsam2")

    def never(*args, **kwargs):
        raise AssertionError("the teacher is loaded only after the inputs are checked")

    monkeypatch.setattr(refine_mod, "load_refine_teacher", never)
    rc = main(["refine", str(pred), str(case["image"]), "--slice", "9", "--box", "1", "1", "5", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: --slice 9 outside the volume's 5 slices (0..4)\n"


def test_medsam2_propagation_touches_only_the_neighbouring_slices(case, monkeypatch) -> None:
    pytest.importorskip("sam2", reason="optional extra nnunet-semisam[medsam2]")
    import torch

    from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher

    tiny = ["++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
            "++model.image_encoder.trunk.stages=[1,1,1,2]", "++model.image_encoder.trunk.global_att_blocks=[4]",
            "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]", "++model.memory_attention.num_layers=1",
            "++model.memory_attention.layer.dim_feedforward=64", "++model.num_maskmem=2"]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    torch.manual_seed(0)
    teacher = MedSAM2Teacher.from_checkpoint(None, image_size=64, hydra_overrides=tiny)  # random weights
    volume = teacher_volume(read(case["image"]))
    masks = segment_slices(teacher, volume, 4, [30, 30, 60, 60], propagate=2)
    assert sorted(masks) == [2, 3, 4]  # z - 2 .. z + 2, clipped to the volume
    assert all(m.shape == (H, W) and m.dtype == bool for m in masks.values())
