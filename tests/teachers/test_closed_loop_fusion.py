"""Student fusion of the closed loop's unlabeled targets (METHODS.md §4.5, `MedSAMMambaKDTrainer_fuseStudent`): the
fusion rule against hand-computed values, and a refresh with the real LiteMedSAM teacher on the session's tiny 2D
dataset, compared with the plain refresh of the same student."""
import json

import numpy as np
import pytest

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.closed_loop import ClosedLoopTargets, fuse_with_student


def test_fuse_with_student_hand_computed():
    q = np.array([[0.9, 0.2], [0.0, 0.6]], np.float32)       # teacher from the student's boxes
    p = np.array([[0.3, 0.7], [0.8, 1.2]], np.float32)       # student foreground probability (1.2: clipped to 1)
    conf = np.array([[True, True], [False, True]])          # (1, 0) had no prompt: left as the teacher's 0
    np.testing.assert_array_equal(fuse_with_student(q, conf, p), np.array([[0.9, 0.7], [0.0, 1.0]], np.float32))
    with pytest.raises(SemiSAMError, match="same shape"):
        fuse_with_student(q, conf, p[:1])


def test_fuse_with_student_at_calibrated_threshold():
    """At t* = 0.3 the student's probability enters on the teacher's scale (odds times 3/7): 0.7 -> 0.5, 0.3 ->
    9/58; recalibrating the fused map then gives max(recalibrate(q), p) (the union of q > t* and p > 0.5)."""
    import torch

    from nnunet_semisam.teachers.calibration import recalibrate

    q = np.array([0.2, 0.35, 0.0, 0.1], np.float32)
    p = np.array([0.7, 0.3, 0.9, 0.3], np.float32)
    conf = np.array([True, True, False, True])
    fused = fuse_with_student(q, conf, p, threshold=0.3)
    np.testing.assert_allclose(fused, [0.5, 0.35, 0.0, 9 / 58], atol=1e-6)
    back = recalibrate(torch.from_numpy(fused), 0.3).numpy()
    expected = np.where(conf, np.maximum(recalibrate(torch.from_numpy(q), 0.3).numpy(), p), 0.0)
    np.testing.assert_allclose(back, expected, atol=1e-5)


class _Student:
    """A fixed 'student': a disc of foreground probability 0.8 in a 0.3 surround (below 0.5: not foreground)."""

    def __init__(self):
        self.calls = 0

    def with_probability(self, data):
        self.calls += 1
        zz, yy, xx = np.indices(data.shape[1:])
        h, w = data.shape[2:]
        prob = np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 5) ** 2, 0.8, 0.3).astype(np.float32)
        return prob > 0.5, prob

    def __call__(self, data):
        return self.with_probability(data)[0]


def _unlabeled_cases(tiny2d, monkeypatch) -> tuple[list[str], list]:
    """The normalization schemes and the preprocessed unlabeled cases of the session's tiny 2D dataset."""
    from nnunet_semisam.data.unlabeled import unlabeled_preprocessed_folder
    from nnunet_semisam.teachers.pseudolabels import CaseSource

    for k, v in tiny2d.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    folder = unlabeled_preprocessed_folder(990, "nnUNetPlans", "2d")
    plans = json.loads((folder.parent / "nnUNetPlans.json").read_text())
    cases = [CaseSource(f.name[:-5], str(folder), False) for f in sorted(folder.glob("*.b2nd"))
             if not f.name.endswith("_seg.b2nd")]
    assert cases
    return plans["configurations"]["2d"]["normalization_schemes"], cases


def test_refresh_with_fusion_stores_max_of_teacher_and_student(tiny2d, tmp_path, monkeypatch):
    from nnunet_semisam.data.pseudolabel_store import load_pseudolabel
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

    schemes, cases = _unlabeled_cases(tiny2d, monkeypatch)
    cases = cases[:3]
    teacher = LiteMedSAMTeacher.from_package()
    student = _Student()
    from nnunet_semisam.teachers.calibration import to_teacher_scale

    stores = {}
    for key, fusion, t in (("plain", False, 0.5), ("fused", True, 0.5), ("fused@0.2", True, 0.2)):
        loop = ClosedLoopTargets(teacher, tmp_path / key, schemes, workers=1, student_fusion=fusion,
                                 fusion_threshold=t)
        stats = loop.refresh(cases, student, round_index=1)
        assert stats == {"cases": len(cases), "available": len(cases)}
        stores[key] = loop.unlabeled_folder
    assert student.calls == 3 * len(cases), "each refresh predicts each case once (fused: mask and probability)"
    extra = {k: json.loads((stores[k] / "manifest.json").read_text())["params"]["extra"] for k in stores}
    assert extra["fused"]["fusion"] == "max-student" and "fusion" not in extra["plain"]
    assert "fusion_threshold" not in extra["fused"] and extra["fused@0.2"]["fusion_threshold"] == 0.2
    for c in cases:
        (q, conf), (fused, conf_f), (fused_t, _) = (load_pseudolabel(stores[k], c.case_id)
                                                    for k in ("plain", "fused", "fused@0.2"))
        np.testing.assert_array_equal(conf, conf_f)
        assert conf.all(), "every slice had a box from the disc"
        _, p = student.with_probability(np.zeros((1, *q.shape[1:]), np.float32))
        for out, t in ((fused, 0.5), (fused_t, 0.2)):
            # the store keeps float16; max commutes with rounding
            p16 = to_teacher_scale(p[None], t).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(out, np.maximum(q, p16))
            assert (out > q).any() and (out == q).any(), "both sources contribute"
        assert (fused_t <= fused).all() and (fused_t < fused).any(), "t* < 0.5 lowers p_s on the teacher's scale"


def test_refresh_with_box_margin_prompts_widened_student_boxes(tiny2d, tmp_path, monkeypatch):
    """`box_margin` (`MedSAMMambaKDTrainer.student_box_margin`): the teacher receives the student's tight boxes
    widened by the margin on every side (clipped to the image), the margin is part of the store's parameters (a
    changed margin redoes the cases), and the stored map is the teacher's answer to the widened boxes."""
    from nnunet_semisam.data.pseudolabel_store import load_pseudolabel
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher
    from nnunet_semisam.teachers.prompts import boxes_from_mask

    schemes, cases = _unlabeled_cases(tiny2d, monkeypatch)
    case = cases[0]
    teacher = LiteMedSAMTeacher.from_package()
    seen, segment = [], teacher.segment
    monkeypatch.setattr(teacher, "segment", lambda emb, boxes, hw, **kw: (seen.append((np.array(boxes), emb)),
                                                                          segment(emb, boxes, hw, **kw))[1])
    student = _Student()
    params = {}
    for margin in (0, 3):
        loop = ClosedLoopTargets(teacher, tmp_path / f"m{margin}", schemes, workers=1, box_margin=margin)
        loop.refresh([case], student, round_index=1)
        params[margin] = json.loads((loop.unlabeled_folder / "manifest.json").read_text())["params"]
    assert params[0]["box_margin"] == 0 and params[3]["box_margin"] == 3
    (tight, emb), (wide, _) = seen
    disc = student(np.zeros((1, *load_pseudolabel(tmp_path / "m0" / "unlabeled", case.case_id)[0].shape[1:])))[0]
    np.testing.assert_array_equal(tight, boxes_from_mask(disc, min_area=10))
    h, w = disc.shape
    np.testing.assert_array_equal(wide, np.clip(tight + [-3, -3, 3, 3], 0, [w - 1, h - 1, w - 1, h - 1]))
    q_wide = load_pseudolabel(tmp_path / "m3" / "unlabeled", case.case_id)[0][0, 0]  # (1, Z=1, Y, X) store
    expected = segment(emb, wide, (h, w)).max(0).values.numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(q_wide, expected)
