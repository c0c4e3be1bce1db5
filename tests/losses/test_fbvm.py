"""FBVM ([KD] Eq. 3-5, METHODS.md §4.2): hand-computed values, polarity, valid mask, gradient direction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.fbvm import (estimate_polarity, fbvm_loss, fbvm_valid_mask, nonmin_valid_mask,
                                        valid_from_background)

TOL = dict(rtol=1e-5, atol=1e-5)  # ε = 1e-6 in the denominators shifts the hand values by O(1e-6)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def t(rows) -> torch.Tensor:
    """A 2D list -> (1, 1, H, W)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# bright lesion (top row) on a darker background: x = [[3, 5], [0, 2]], hard mask p = [[1, 1], [0, 0]]
#   μF = (3 + 5)/2 = 4, VarF = ((3-4)² + (5-4)²)/2 = 1;  μB = (0 + 2)/2 = 1, VarB = ((0-1)² + (2-1)²)/2 = 1
#   S_var = 1 + 1 = 2,  μF − μB = 3
X_BRIGHT = [[3.0, 5.0], [0.0, 2.0]]
P_HARD = [[1.0, 1.0], [0.0, 0.0]]


def test_hand_bright_lesion_hard_mask_k_and_polarity():
    x, p = t(X_BRIGHT), t(P_HARD)
    torch.testing.assert_close(fbvm_loss(x, p), torch.tensor(2 - sig(3)), **TOL)  # k = 1, s = +1
    torch.testing.assert_close(fbvm_loss(x, p, k=0.5), torch.tensor(2 - sig(1.5)), **TOL)  # k·3 = 1.5
    torch.testing.assert_close(fbvm_loss(x, p, polarity=[-1]), torch.tensor(2 - sig(-3)), **TOL)
    torch.testing.assert_close(fbvm_loss(x, p, polarity=[0]), torch.tensor(2 - 0.5), **TOL)  # sigmoid(0)
    torch.testing.assert_close(fbvm_loss(x, p, polarity="abs"), torch.tensor(2 - sig(3)), **TOL)


def test_hand_darker_lesion_needs_polarity_minus_one_or_abs():
    # dark lesion (top row): x = [[0, 2], [3, 5]], same mask: μF = 1, μB = 4, variances 1 and 1
    x, p = t([[0.0, 2.0], [3.0, 5.0]]), t(P_HARD)
    torch.testing.assert_close(fbvm_loss(x, p), torch.tensor(2 - sig(-3)), **TOL)  # +1: wrong way, small reward
    torch.testing.assert_close(fbvm_loss(x, p, polarity=[-1]), torch.tensor(2 - sig(3)), **TOL)  # -1·(1-4) = 3
    torch.testing.assert_close(fbvm_loss(x, p, polarity="abs"), torch.tensor(2 - sig(3)), **TOL)  # |1-4| = 3


def test_hand_soft_mask():
    # x = (3, 5, 0, 2), p = (1, .5, .5, 0)
    # wF = (1, .5, .5, 0): ΣwF = 2, μF = (3 + 2.5 + 0)/2 = 2.75
    #   VarF = (1·0.25² + .5·2.25² + .5·2.75²)/2 = (0.0625 + 2.53125 + 3.78125)/2 = 3.1875
    # wB = (0, .5, .5, 1): ΣwB = 2, μB = (2.5 + 0 + 2)/2 = 2.25
    #   VarB = (.5·2.75² + .5·2.25² + 1·0.25²)/2 = 3.1875
    # L = 6.375 − sigmoid(2.75 − 2.25)
    x, p = t(X_BRIGHT), t([[1.0, 0.5], [0.5, 0.0]])
    torch.testing.assert_close(fbvm_loss(x, p), torch.tensor(6.375 - sig(0.5)), **TOL)


def test_batch_channels_and_per_channel_polarity():
    # sample 0 = the hard bright case; sample 1 = the soft case. Channel 1 = −channel 0: μ gaps flip sign,
    # variances stay; channel 2 constant 7: variances 0, gap 0.
    x0 = torch.cat([t(X_BRIGHT), -t(X_BRIGHT), torch.full((1, 1, 2, 2), 7.0)], 1)
    p = torch.cat([t(P_HARD), t([[1.0, 0.5], [0.5, 0.0]])])
    x = torch.cat([x0, x0])
    # S_var = mean_b mean_c: sample 0 (2 + 2 + 0)/3, sample 1 (6.375 + 6.375 + 0)/3
    s_var = ((2 + 2 + 0) / 3 + (6.375 + 6.375 + 0) / 3) / 2
    # polarity (+1, −1, 0): sample 0 sigmoid(3), sigmoid(−1·−3), sigmoid(0); sample 1 sigmoid(.5), sigmoid(.5), 1/2
    s_mean = ((sig(3) + sig(3) + 0.5) / 3 + (sig(0.5) + sig(0.5) + 0.5) / 3) / 2
    torch.testing.assert_close(fbvm_loss(x, p, polarity=[1, -1, 0]), torch.tensor(s_var - s_mean), **TOL)
    torch.testing.assert_close(fbvm_loss(x, p, polarity=torch.tensor([1.0, -1.0, 0.0])),
                               torch.tensor(s_var - s_mean), **TOL)
    # default polarity +1 everywhere: channel 1 gets sigmoid(−3) / sigmoid(−.5)
    s_mean_pos = ((sig(3) + sig(-3) + 0.5) / 3 + (sig(0.5) + sig(-0.5) + 0.5) / 3) / 2
    torch.testing.assert_close(fbvm_loss(x, p), torch.tensor(s_var - s_mean_pos), **TOL)
    with pytest.raises(ValueError):
        fbvm_loss(x, p, polarity=[1, -1])
    with pytest.raises(ValueError):
        fbvm_loss(x, p, polarity=[1, 2, 0])
    with pytest.raises(ValueError):
        fbvm_loss(x, p, polarity="sign")


def test_valid_mask_excludes_padding():
    # the 2x2 bright case with a padding column at the minimum (−10), p = 0.7 there (must not count)
    x = t([[3.0, 5.0, -10.0], [0.0, 2.0, -10.0]])
    p = t([[1.0, 1.0, 0.7], [0.0, 0.0, 0.7]])
    v = nonmin_valid_mask(x)
    assert v.dtype == torch.bool and v.tolist() == [[[[True, True, False], [True, True, False]]]]
    torch.testing.assert_close(fbvm_loss(x, p, valid=v), torch.tensor(2 - sig(3)), **TOL)
    torch.testing.assert_close(fbvm_loss(x, p, valid=v.float()), torch.tensor(2 - sig(3)), **TOL)
    # without the mask the padding enters both regions: the value differs
    assert abs(fbvm_loss(x, p).item() - (2 - sig(3))) > 1.0


def test_background_mask_excludes_zero_padding_of_zscored_data_nonmin_does_not():
    # METHODS.md §2.4 correction / §4.2: z-scored tissue has negative values, so nnU-Net's 0-padding (the tissue
    # mean) is not the minimum. Tissue = X_BRIGHT − 2 = [[1, 3], [−2, 0]]: μF = 2, VarF = 1, μB = −1, VarB = 1,
    # L = 2 − sigmoid(3); a padded column of zeros with p = 0.7 must not count.
    x = t([[1.0, 3.0, 0.0], [-2.0, 0.0, 0.0]])
    p = t([[1.0, 1.0, 0.7], [0.0, 0.0, 0.7]]).requires_grad_(True)
    # the trainer's mask: a ones channel padded with 0 by nnU-Net's loader, background = valid <= 0.5
    valid_channel = torch.nn.functional.pad(torch.ones(1, 1, 2, 2), (0, 1))
    background = valid_channel <= 0.5
    v = valid_from_background(background)
    assert v.dtype == torch.float32 and v.tolist() == [[[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]]]
    loss = fbvm_loss(x, p, valid=v)
    torch.testing.assert_close(loss, torch.tensor(2 - sig(3)), **TOL)
    loss.backward()
    assert torch.equal(p.grad[..., 2], torch.zeros(1, 1, 2))  # the padding gets no gradient
    assert (p.grad[..., :2] != 0).all()

    # "nonmin" keeps the zeros (the minimum is −2): the padding enters both regions and the loss is another one
    nm = nonmin_valid_mask(x)
    assert nm[..., 2].all()
    q = p.detach().clone().requires_grad_(True)
    loss_nm = fbvm_loss(x, q, valid=nm)
    assert abs(loss_nm.item() - (2 - sig(3))) > 0.1
    loss_nm.backward()
    assert (q.grad[..., 2] != 0).all()


def test_valid_from_background_float_threshold_and_errors():
    bg = torch.tensor([0.0, 0.49, 0.5, 1.0]).view(1, 1, 2, 2)  # background where >= 0.5 (= valid <= 0.5)
    assert valid_from_background(bg).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.equal(valid_from_background(bg >= 0.5), valid_from_background(bg))
    assert valid_from_background(torch.zeros(2, 1, 2, 3, 4, dtype=torch.bool)).shape == (2, 1, 2, 3, 4)  # 3D
    with pytest.raises(ValueError, match="B, 1"):
        valid_from_background(torch.zeros(1, 2, 4, 4, dtype=torch.bool))


def test_fbvm_valid_mask_picks_by_setting_and_names_a_wrong_one():
    x = t([[0.0, 1.0], [0.0, 2.0]])
    bg = torch.tensor([[True, False], [False, False]]).view(1, 1, 2, 2)
    assert fbvm_valid_mask("background", x, bg).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert fbvm_valid_mask("nonmin", x, bg)[0, 0].tolist() == [[False, True], [False, True]]
    assert fbvm_valid_mask("none", x, bg) is None
    with pytest.raises(ValueError, match="'nonzero'"):
        fbvm_valid_mask("nonzero", x, bg)


def test_nonmin_valid_mask_is_per_sample_and_channel():
    # channel 0 at its minimum in column 0, channel 1 at its minimum in row 0: only (0, 0) is at both minima
    x = torch.tensor([[[1.0, 2.0], [1.0, 3.0]], [[0.0, 0.0], [5.0, 6.0]]])[None]
    assert nonmin_valid_mask(x)[0, 0].tolist() == [[False, True], [True, True]]
    # per sample: a second sample shifted by +100 gives the same mask; tol: 1e-7 above the min is not valid
    assert torch.equal(nonmin_valid_mask(torch.cat([x, x + 100]))[1], nonmin_valid_mask(x)[0])
    y = t([[0.0, 1e-7], [0.0, 1.0]])
    assert nonmin_valid_mask(y)[0, 0].tolist() == [[False, False], [False, True]]


def test_3d_equals_flattened_2d():
    x = torch.randn(2, 2, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    p = torch.rand(2, 1, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    got = fbvm_loss(x, p, polarity=[1, -1])
    ref = fbvm_loss(x.reshape(2, 2, 6, 4), p.reshape(2, 1, 6, 4), polarity=[1, -1])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    p = torch.rand(1, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    f = lambda q: fbvm_loss(x, q, k=1.3, polarity=[1, -1])  # noqa: E731
    # fbvm_loss computes in float32; central differences with h = 1e-3 resolve the gradient to ~1e-3
    f(p).backward()
    h = 1e-3
    fd = torch.zeros_like(p)
    for i in range(9):
        e = torch.zeros_like(p).flatten()
        e[i] = h
        e = e.view_as(p)
        fd.view(-1)[i] = (f(p.detach() + e) - f(p.detach() - e)) / (2 * h)
    torch.testing.assert_close(p.grad, fd, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("polarity, brighter_goes_up", [(None, True), ([1], True), ([-1], False)])
def test_gradient_moves_foreground_towards_the_polarity_side(polarity, brighter_goes_up):
    # left half bright (2), right half dark (0), plus a little texture; p starts at 1/2 everywhere
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2] = 2.0
    x = x + 0.1 * torch.tensor([[1.0, -1.0, 1.0, -1.0]]).repeat(4, 1)
    p = torch.full((1, 1, 4, 4), 0.5, requires_grad=True)
    fbvm_loss(x, p, polarity=polarity).backward()
    bright, dark = p.grad[..., :2], p.grad[..., 2:]
    # descent (−grad) raises p where the grad is negative
    if brighter_goes_up:
        assert (bright < 0).all() and (dark > 0).all()
    else:
        assert (bright > 0).all() and (dark < 0).all()
    # one SGD step moves the soft mask's mass to that side
    with torch.no_grad():
        q = (p - 0.5 * p.grad).clamp(0, 1)
    assert (q[..., :2].mean() > q[..., 2:].mean()) == brighter_goes_up


def test_abs_gradient_separates_from_an_asymmetric_start():
    # "abs" widens the gap on whichever side it already is. Start on the dark side: p = 0.4 on the bright half
    # (x = 2), 0.6 on the dark half (x = 0): μF = 0.4·2 = 0.8 < μB = 0.6·2 = 1.2, so |μF − μB| = −(μF − μB) here
    # and "abs" has exactly the gradient of polarity −1, not that of +1.
    x = torch.zeros(1, 1, 2, 4)
    x[..., :2] = 2.0
    p0 = torch.tensor([[[[0.4, 0.4, 0.6, 0.6], [0.4, 0.4, 0.6, 0.6]]]])
    grads = {}
    for pol in ("abs", [-1], [1]):
        p = p0.clone().requires_grad_(True)
        fbvm_loss(x, p, polarity=pol).backward()
        grads[str(pol)] = p.grad
    torch.testing.assert_close(grads["abs"], grads["[-1]"], rtol=0, atol=1e-7)
    assert (grads["abs"][..., 2:] < grads["[1]"][..., 2:]).all()  # abs pulls harder onto the dark half
    assert (grads["abs"][..., 2:] < 0).all() and (grads["abs"][..., :2] > 0).all()


def test_only_fg_prob_gets_gradient():
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    p = torch.rand(1, 1, 3, 3, requires_grad=True)
    fbvm_loss(x, p).backward()
    assert x.grad is None and p.grad is not None


def test_estimate_polarity_hand_computed():
    m = np.array([[True, True], [False, False]])
    # case 1: ch0 fg (1, 1) bg (0, 0) -> +1; ch1 fg (0, 0) bg (.5, .5) -> −0.5; ch2 fg mean 0.52, bg 0.5 -> +0.02
    c1 = np.stack([[[1, 1], [0, 0]], [[0, 0], [0.5, 0.5]], [[0.52, 0.52], [0.5, 0.5]]]).astype(np.float32)
    # case 2: ch0 fg (0.6, 0.6) bg (0, 0) -> +0.6; ch1 fg (0, 0) bg (0.2, 0.4) -> −0.3; ch2 fg 0.58 bg 0.5 -> +0.08
    c2 = np.stack([[[0.6, 0.6], [0, 0]], [[0, 0], [0.2, 0.4]], [[0.58, 0.58], [0.5, 0.5]]]).astype(np.float32)
    # means over cases: ch0 0.8 -> +1, ch1 −0.4 -> −1, ch2 0.05 < 0.1 -> 0
    empty = np.zeros((2, 2), bool)
    full = np.ones((2, 2), bool)
    junk = np.full((3, 2, 2), 100.0)  # would flip the means if these skipped cases were used
    pairs = [(c1, m), (junk, empty), (c2, m.astype(np.uint8)), (-junk, full)]
    s = estimate_polarity(iter(pairs))
    assert s.dtype == np.float64 and s.tolist() == [1.0, -1.0, 0.0]
    assert estimate_polarity(pairs, threshold=0.01).tolist() == [1.0, -1.0, 1.0]  # 0.05 >= 0.01


def test_estimate_polarity_errors():
    with pytest.raises(SemiSAMError, match="none of the 1"):
        estimate_polarity([(np.zeros((1, 2, 2)), np.zeros((2, 2), bool))])
    with pytest.raises(SemiSAMError, match="does not match"):
        estimate_polarity([(np.zeros((1, 2, 2)), np.zeros((3, 2), bool))])
    m = np.array([[True, False], [False, False]])
    with pytest.raises(SemiSAMError, match="channels"):
        estimate_polarity([(np.zeros((1, 2, 2)), m), (np.zeros((2, 2, 2)), m)])
