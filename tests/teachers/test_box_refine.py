"""Box refinement of the closed loop (METHODS.md §4.5, `teachers.box_refine`): hand-computed cases with a teacher
that, like SAM, segments its object only inside the box it is given."""
import numpy as np

from nnunet_semisam.data.pseudolabel_store import PseudoLabelParams
from nnunet_semisam.teachers.box_refine import cut_sides, grow_cut_sides
from nnunet_semisam.teachers.pseudolabels import pseudolabel_case


def inside_box_teacher(obj: np.ndarray, calls: list):
    """segment(boxes) -> obj restricted to each box (1.0 / 0.0), recording every call's boxes."""
    def segment(boxes: np.ndarray) -> np.ndarray:
        calls.append(np.asarray(boxes).copy())
        out = np.zeros((len(boxes), *obj.shape), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            out[i, y0:y1 + 1, x0:x1 + 1] = obj[y0:y1 + 1, x0:x1 + 1]
        return out
    return segment


def square(h=40, w=40, lo=10, hi=29):
    obj = np.zeros((h, w), np.float32)
    obj[lo:hi + 1, lo:hi + 1] = 1
    return obj


def test_cut_sides_by_edge_coverage():
    mask = square() > 0
    assert cut_sides(mask, np.array([15, 15, 20, 20]), 0.5) == (True, True, True, True)  # inside the object
    # the box [6, 6, 29, 29]: left / top edges (col 6, row 6) empty, right / bottom edges covered 20 of 24 px
    assert cut_sides(mask, np.array([6, 6, 29, 29]), 0.5) == (False, False, True, True)
    assert cut_sides(mask, np.array([6, 6, 29, 29]), 0.9) == (False, False, False, False)  # 20/24 < 0.9


def test_a_box_inside_the_object_grows_until_it_holds_it():
    calls = []
    boxes, prob = grow_cut_sides(inside_box_teacher(square(), calls), np.array([[15, 15, 20, 20]]), (40, 40))
    # round 1: every side cut, extent 6 -> +-3 = [12, 12, 23, 23]; round 2: extent 12 -> +-6 = [6, 6, 29, 29];
    # round 3: right / bottom still cut (20/24), extent 24 -> +12, clipped to 39
    assert [c.tolist() for c in calls] == [[[15, 15, 20, 20]], [[12, 12, 23, 23]], [[6, 6, 29, 29]],
                                           [[6, 6, 39, 39]]]
    assert boxes.tolist() == [[6, 6, 39, 39]]
    np.testing.assert_array_equal(prob[0], square())  # the whole object, where the first box gave 6x6 pixels


def test_a_box_around_a_round_object_is_left_alone():
    yy, xx = np.mgrid[:40, :40]
    disk = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 64).astype(np.float32)  # radius 8: rows / cols 12..28
    calls = []
    boxes, prob = grow_cut_sides(inside_box_teacher(disk, calls), np.array([[12, 12, 28, 28]]), (40, 40))
    assert len(calls) == 1 and boxes.tolist() == [[12, 12, 28, 28]]  # each side touched by 1 of 17 pixels
    np.testing.assert_array_equal(prob[0], disk)


def test_zero_rounds_is_the_plain_teacher():
    calls = []
    boxes, prob = grow_cut_sides(inside_box_teacher(square(), calls), np.array([[15, 15, 20, 20]]), (40, 40),
                                 rounds=0)
    assert len(calls) == 1 and boxes.tolist() == [[15, 15, 20, 20]] and prob[0].sum() == 36


class InsideBoxTeacher:
    """The `MedSAMTeacher` interface used by the plain pseudo-label path (embed, segment), SAM-like inside boxes."""

    def __init__(self, obj):
        self.obj = obj

    def embed(self, image, case_id=None, slice_idx=0):
        return None

    def segment(self, embedding, boxes, original_hw, batched=False):
        import torch

        return torch.from_numpy(inside_box_teacher(self.obj, [])(np.asarray(boxes)))


def test_pseudolabel_case_applies_the_rounds_of_its_parameters():
    obj = square()
    image = np.zeros((1, 40, 40), np.uint8)
    boxes = {0: np.array([[15, 15, 20, 20]])}
    plain, conf = pseudolabel_case(InsideBoxTeacher(obj), image, None, PseudoLabelParams(), "c", boxes)
    refined, _ = pseudolabel_case(InsideBoxTeacher(obj), image, None, PseudoLabelParams(box_refine_rounds=3), "c",
                                  boxes)
    assert plain[0].sum() == 36 and conf.all()
    np.testing.assert_array_equal(refined[0], obj)
    assert PseudoLabelParams(box_refine_rounds=3).sha1() != PseudoLabelParams().sha1()  # part of the resume key
