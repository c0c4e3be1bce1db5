"""Teacher threshold calibration (METHODS.md §4.5, `teachers.calibration`): t* and the recalibrated map against
hand-computed values, and `ClosedLoopTargets.labeled_threshold` on stored labeled maps of the session's 2D dataset."""
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.calibration import calibrate_threshold, recalibrate, to_teacher_scale


def test_calibrate_threshold_hand_computed():
    q = np.array([[0.9, 0.6, 0.35, 0.1], [0.05, 0.0, 0.0, 0.0]], np.float32)
    y = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)
    t_star, dice, n = calibrate_threshold([(q, y)], thresholds=(0.5, 0.4, 0.3, 0.2, 0.1, 0.07))
    # 0.5 / 0.4: {0.9, 0.6} -> 2*2/(2+3) = 0.8; 0.3 .. 0.1: the three labeled pixels -> 1 (0.1 > 0.1 is false);
    # 0.07: 0.1 joins -> 2*3/(4+3) = 6/7. The tie 0.3 / 0.2 / 0.1 goes to the largest.
    assert n == 1 and t_star == 0.3
    assert dice == pytest.approx({0.5: 0.8, 0.4: 0.8, 0.3: 1.0, 0.2: 1.0, 0.1: 1.0, 0.07: 6 / 7})
    # a second case, empty label and a weak map: empty at every t >= 0.1 (Dice 1), one false pixel at 0.07 (Dice 0)
    t2, dice2, n2 = calibrate_threshold([(q, y), (np.full((2, 4), 0.08, np.float32), np.zeros((2, 4), bool))],
                                        thresholds=(0.5, 0.1, 0.07))
    assert (t2, n2) == (0.1, 2) and dice2 == pytest.approx({0.5: 0.9, 0.1: 1.0, 0.07: 3 / 7})


def test_calibrate_threshold_errors():
    with pytest.raises(SemiSAMError, match="no labeled case"):
        calibrate_threshold([])
    with pytest.raises(SemiSAMError, match="differ in shape"):
        calibrate_threshold([(np.zeros((2, 2)), np.zeros((2, 3), bool))])
    with pytest.raises(SemiSAMError, match=r"\(0, 1\)"):
        calibrate_threshold([(np.zeros((2, 2)), np.zeros((2, 2), bool))], thresholds=(0.5, 1.0))


def test_recalibrate_hand_computed():
    q = torch.tensor([0.0, 0.3, 0.6, 1.0])
    out = recalibrate(q, 0.3)
    # odds(q') = odds(q) / odds(t): 0.3 -> 0.5, 0.6 -> (1.5 / (3 / 7)) = 3.5 -> 3.5 / 4.5 = 7 / 9;
    # 0 and 1 stay (clamped)
    np.testing.assert_allclose(out.numpy(), [0.0, 0.5, 7 / 9, 1.0], atol=1e-5)
    assert recalibrate(q, 0.5) is q, "t* = 0.5: the teacher's map as it is"
    assert torch.all(out[1:] >= out[:-1]), "monotone: the teacher's ranking of pixels is kept"
    with pytest.raises(SemiSAMError, match="teacher threshold"):
        recalibrate(q, 0.0)


def test_to_teacher_scale_hand_computed_and_inverse():
    p = np.array([0.0, 0.5, 0.7, 1.0], np.float32)
    out = to_teacher_scale(p, 0.3)
    # odds(p') = odds(p) * odds(t): 0.5 -> 0.3, 0.7 -> (7 / 3) * (3 / 7) = 1 -> 0.5; 0 and 1 stay (clamped)
    np.testing.assert_allclose(out, [0.0, 0.3, 0.5, 1.0], atol=1e-5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(to_teacher_scale(p, 0.5), p)
    grid = np.linspace(0.01, 0.99, 50, dtype=np.float32)
    np.testing.assert_allclose(recalibrate(torch.from_numpy(to_teacher_scale(grid, 0.03)), 0.03).numpy(), grid,
                               atol=1e-5)
    with pytest.raises(SemiSAMError, match="teacher threshold"):
        to_teacher_scale(p, 1.0)


def test_labeled_threshold_reads_store_and_labels(tiny2d, tmp_path):
    """Stored maps 0.25 on the label and 0.12 around it: every t in [0.12, 0.25) reproduces the label (Dice 1), so t*
    is the largest grid value below 0.25, 0.2; 0.3 and up see nothing (Dice 0). Lesion-free cases are left out."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_semisam.data.pseudolabel_store import save_pseudolabel
    from nnunet_semisam.teachers.closed_loop import ClosedLoopTargets
    from nnunet_semisam.teachers.pseudolabels import CaseSource

    folder = next(Path(tiny2d["nnUNet_preprocessed"]).glob("Dataset990_*/nnUNetPlans_2d"))
    keys = sorted(f.name[:-5] for f in folder.glob("*.b2nd") if not f.name.endswith("_seg.b2nd"))
    loop = ClosedLoopTargets(None, tmp_path, ["RGBTo01Normalization"])
    with_lesion = 0
    for k in keys:
        seg = np.asarray(nnUNetDatasetBlosc2(folder, [k]).load_case(k)[1][0]) > 0
        ring = np.zeros_like(seg)
        ring[..., 1:-1, 1:-1] = True
        q = np.where(seg, 0.25, np.where(ring, 0.12, 0.0)).reshape(1, *seg.shape[-2:])
        save_pseudolabel(loop.labeled_folder, k, q, np.full(q.shape, seg.any()), "params")
        with_lesion += bool(seg.any())
    t_star, line = loop.labeled_threshold([CaseSource(k, str(folder), True) for k in keys])
    assert t_star == 0.2
    assert f"on {with_lesion} labeled cases" in line and "0.3: 0.0" in line and "0.2: 100.0" in line


def test_teacher_threshold_setting_number_needs_no_store(tmp_path):
    from nnunet_semisam.teachers.closed_loop import ClosedLoopTargets

    loop = ClosedLoopTargets(None, tmp_path, ["RGBTo01Normalization"])
    assert loop.teacher_threshold(0.5, []) == (0.5, "teacher threshold 0.5 (set; 0.5 keeps the teacher's maps as "
                                                    "they are)")
    with pytest.raises(SemiSAMError, match="no labeled case"):
        loop.teacher_threshold("calibrate", [])
