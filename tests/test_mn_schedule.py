"""M&N schedule and LRG sampling (METHODS.md §7.4): stage lengths, alternation and per-model epoch counters, the
learning rates, and the LRG batch split along the cosine schedule."""
import math

import pytest

from nnunet_semisam.mn_schedule import (StageLengths, batch_split, lrg_unlabeled_count, model_lr, position,
                                        refreshes_due, stage1_lr, stage_lengths)


def test_stage_lengths_of_the_paper_and_scaled():
    paper = stage_lengths(60000, 8)
    assert (paper.stage1, paper.warmup, paper.stage2_f, paper.stage2_g) == (500, 50, 3500, 3500)
    small = stage_lengths(20, 2)
    assert small.total_epochs == 10 and small.stage1 == 1 and small.stage2_f == 5 and small.stage2_g == 4
    with pytest.raises(ValueError):
        stage_lengths(4, 2)


def test_alternation_and_own_epoch_counters():
    lengths = StageLengths(epoch_iterations=2, stage1=2, warmup=1, stage2_f=3, stage2_g=3)
    learners, counters = [], []
    for t in range(0, 16, 2):
        p = position(t, lengths)
        learners.append(p.learner)
        counters.append((p.epoch_f, p.epoch_g))
        assert p.first_iteration_of_epoch and not position(t + 1, lengths).first_iteration_of_epoch
    assert learners == ["both", "both", "f", "g", "f", "g", "f", "g"]
    # stage 2: f's counter advances only on f-epochs, g's only on g-epochs
    assert counters[2:] == [(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]
    assert position(3, lengths).stage == 1 and position(4, lengths).stage == 2


def test_stage1_warmup_then_cosine():
    lengths = StageLengths(8, stage1=500, warmup=50, stage2_f=3500, stage2_g=3500)
    assert stage1_lr(0, 1e-3, lengths) == pytest.approx(1e-5)
    assert stage1_lr(25, 1e-3, lengths) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert stage1_lr(50, 1e-3, lengths) == pytest.approx(1e-3)
    assert stage1_lr(275, 1e-3, lengths) == pytest.approx(0.5e-3)


def test_lrg_split_along_the_cosine_schedule():
    lengths = StageLengths(8, stage1=500, warmup=50, stage2_f=3500, stage2_g=3500)
    B = 5
    # stage 1: no unlabeled sample whatever the LR
    assert all(batch_split(t, 1e-3, B, lengths) == (5, 0) for t in (0, 8 * 49, 8 * 499 + 7))

    def f_epoch_iteration(own):  # first iteration of f's own stage-2 epoch `own`
        return 8 * (500 + 2 * own)

    for own in (0, 875, 1750, 2625, 3499):
        tau = own / 3500
        expected_bu = math.floor(B * (1 - math.cos(math.pi * tau)) / 2 + 1e-9)
        t = f_epoch_iteration(own)
        assert position(t, lengths).learner == "f"
        assert model_lr("f", t, 1e-3, lengths) == pytest.approx(1e-3 * (1 + math.cos(math.pi * tau)) / 2)
        assert batch_split(t, 1e-3, B, lengths) == (B - expected_bu, expected_bu)
    # the values themselves: tau 0 -> 0, 1/4 -> floor(0.732) = 0, 1/2 -> 2 (2.5), 3/4 -> floor(4.27) = 4
    assert [batch_split(f_epoch_iteration(o), 1e-3, B, lengths)[1] for o in (0, 875, 1750, 2625)] == [0, 0, 2, 4]
    # g (its own LR 1e-4) has the same b_u at the same progress
    assert batch_split(f_epoch_iteration(1750) + 8, 1e-4, B, lengths)[1] == 2
    # not the official linear floor(tau B): at tau 1/4 that would be 1
    assert math.floor(0.25 * B) == 1


def test_lrg_formula_edges():
    assert lrg_unlabeled_count(1e-3, 1e-3, 4) == 0
    assert lrg_unlabeled_count(0.0, 1e-3, 4) == 4
    assert lrg_unlabeled_count(0.5e-3, 1e-3, 4) == 2  # exact integer despite float rounding


def test_pseudo_mask_refresh_points():
    lengths = StageLengths(8, stage1=500, warmup=50, stage2_f=3500, stage2_g=3500)
    assert refreshes_due(8 * 499, lengths) == 0
    assert refreshes_due(8 * 500, lengths) == 1
    assert refreshes_due(8 * (500 + 2 * 499), lengths) == 1
    assert refreshes_due(8 * (500 + 2 * 500), lengths) == 2
    assert refreshes_due(8 * (500 + 2 * 3499 + 1), lengths) == 5
