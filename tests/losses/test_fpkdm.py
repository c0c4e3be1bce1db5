"""FPKDM (METHODS.md §4.1): grouped projection vs per-group nn.Linear, pooling, explicit dropout masks, the shared
perturbation (layer-1 responses equal by construction), and gradient flow with a MedSAMTeacher and a TinyMUNet."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.losses.fpkdm import FeatureProjector, GroupedLinearProjection, fpkdm_responses
from nnunet_semisam.losses.kd import response_distillation_loss

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 matmuls of O(1) values, different summation order


def reference_grouped(proj: GroupedLinearProjection, t: torch.Tensor, bias: bool) -> torch.Tensor:
    """Loop reference: replicate-pad bottom/right, then one nn.Linear per 4x4 block applied position by position."""
    B, C, h, w = t.shape
    k = proj.block
    gh, gw = -(-h // k), -(-w // k)
    padded = F.pad(t, (0, gw * k - w, 0, gh * k - h), mode="replicate")
    out = torch.zeros(B, proj.out_dim, gh * k, gw * k)
    for gy in range(gh):
        for gx in range(gw):
            g = gy * gw + gx  # row-major block index
            lin = nn.Linear(proj.in_dim, proj.out_dim, bias=bias)
            with torch.no_grad():
                lin.weight.copy_(proj.weight[g].T)
                if bias:
                    lin.bias.copy_(proj.bias[g])
            for y in range(gy * k, gy * k + k):
                for x in range(gx * k, gx * k + k):
                    out[:, :, y, x] = lin(padded[:, :, y, x])
    return out[:, :, :h, :w]


@pytest.mark.parametrize("grid", [(8, 4), (6, 5), (2, 2)])
def test_grouped_projection_matches_per_group_linear_loop(grid):
    torch.manual_seed(0)
    proj = GroupedLinearProjection(5, 3, grid)
    gh, gw = -(-grid[0] // 4), -(-grid[1] // 4)  # (8,4) -> 2x1 groups, (6,5) -> 2x2 (padded to 8x8), (2,2) -> 1
    assert proj.weight.shape == (gh * gw, 5, 3) and proj.bias.shape == (gh * gw, 3)
    bound = 5 ** -0.5  # U(±in_dim^-1/2)
    assert proj.weight.abs().max() <= bound and proj.bias.abs().max() <= bound and proj.weight.std() > bound / 4
    t = torch.randn(2, 5, *grid)
    for bias in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(proj(t, bias=bias), reference_grouped(proj, t, bias), **TOL)
    # the linear part is linear: P^lin(a) - P^lin(b) = P^lin(a - b); with bias the difference cancels it
    s = torch.randn(2, 5, *grid)
    with torch.no_grad():
        torch.testing.assert_close(proj(t) - proj(s), proj(t - s, bias=False), **TOL)


def test_replicate_padding_of_a_non_multiple_grid_by_hand():
    # 1 input channel, 1 output, grid (5, 1) -> 2 groups (rows 0-3, rows 4-7 padded from row 4); W = (2, 3), b = 0
    proj = GroupedLinearProjection(1, 1, (5, 1))
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([2.0, 3.0]).view(2, 1, 1))
        proj.bias.zero_()
        t = torch.tensor([1.0, 2, 3, 4, 5]).view(1, 1, 5, 1)
        assert proj(t).flatten().tolist() == [2.0, 4, 6, 8, 15]  # rows 0-3 ·2, row 4 ·3
    with pytest.raises(ValueError):
        proj(torch.zeros(1, 1, 4, 1))


def test_pool_average_and_bilinear_fallback():
    proj = FeatureProjector(6, [3, 4, 2], [(8, 8), (4, 2), (3, 3)])
    tokens = torch.randn(2, 8, 8, 6)  # (B, h_t, w_t, D) channels-last
    chw = tokens.permute(0, 3, 1, 2)
    torch.testing.assert_close(proj.pool(tokens, 0), chw)  # same grid: no pooling
    torch.testing.assert_close(proj.pool(tokens, 1), F.avg_pool2d(chw, kernel_size=(2, 4)))  # 8/4, 8/2
    torch.testing.assert_close(proj.pool(tokens, 2), F.interpolate(chw, size=(3, 3), mode="bilinear",
                                                                   align_corners=False))  # 8/3 not exact
    # by hand: a 2x2 average of [[1, 2], [3, 4]] is 2.5
    one = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 2, 1).expand(1, 2, 2, 6)
    p = FeatureProjector(6, [1], [(1, 1)])
    assert torch.allclose(p.pool(one, 0), torch.full((1, 6, 1, 1), 2.5))


def test_dropout_masks_and_project():
    proj = FeatureProjector(6, [3], [(4, 4)], dropout=0.25)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    m = proj.dropout_mask((2, 3, 4, 4), "cpu", g1)
    assert set(m.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # keep / (1 - p), in float32
    assert torch.equal(m, proj.dropout_mask((2, 3, 4, 4), "cpu", g2))  # reproducible with a generator
    tokens = torch.randn(2, 8, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(proj.project(tokens, 0, m), m * proj.levels[0](proj.pool(tokens, 0)))
        torch.testing.assert_close(proj.project(tokens, 0, None, bias=False),
                                   proj.levels[0](proj.pool(tokens, 0), bias=False))
    proj.eval()
    assert torch.equal(proj.dropout_mask((2, 3), "cpu"), torch.ones(2, 3))
    with pytest.raises(ValueError):
        FeatureProjector(6, [3, 4], [(4, 4)])


# ---------------------------------------------------------------------------------------------------------------
# fpkdm_responses with small stand-in networks (fast, all intermediates visible)

D, GRID_T = 6, 8
CHANNELS, GRIDS = [4, 5, 3], [(8, 8), (4, 4), (2, 2)]


class ToyTeacher(nn.Module):
    """Three 'ViT blocks' on an 8x8 grid of D tokens (channels-last), taps = every block output."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(3))

    def taps(self, tokens):
        out = []
        for b in self.blocks:
            tokens = torch.tanh(b(tokens))
            out.append(tokens)
        return out

    def reinject(self, t1):
        out, x = [], t1
        for b in self.blocks[1:]:
            x = torch.tanh(b(x))
            out.append(x)
        return out


class ToyStudent(nn.Module):
    """F1 (4, 8x8) -> F2 (5, 4x4) -> F3 (3, 2x2) by strided convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.stages = nn.ModuleList([nn.Conv2d(4, 5, 2, stride=2), nn.Conv2d(5, 3, 2, stride=2)])

    def forward(self, x):
        f = [torch.tanh(self.stem(x))]
        return f + self.encode_from(f[0])

    def encode_from(self, f1):
        out, x = [], f1
        for s in self.stages:
            x = torch.tanh(s(x))
            out.append(x)
        return out


class Recorder:
    """Wraps the callables and the projector's mask source to record what fpkdm_responses used."""

    def __init__(self, teacher, student, projector):
        self.teacher, self.student, self.projector = teacher, student, projector
        self.masks, self.teacher_inputs, self.f1_tilde = [], [], None
        orig = projector.dropout_mask

        def dropout_mask(*a, **kw):
            m = orig(*a, **kw)
            self.masks.append(m)
            return m
        projector.dropout_mask = dropout_mask

    @property
    def t1_tilde(self):
        """The perturbed T̃_1: the second re-injection input (the first is the clean T_1)."""
        assert len(self.teacher_inputs) == 2
        return self.teacher_inputs[1]

    def reinject_teacher(self, t1):
        self.teacher_inputs.append(t1.detach().clone())
        return self.teacher.reinject(t1)

    def reinject_student(self, f1):
        self.f1_tilde = f1
        return self.student.encode_from(f1)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    teacher, student = ToyTeacher(), ToyStudent()
    projector = FeatureProjector(D, CHANNELS, GRIDS, dropout=0.3)
    with torch.no_grad():
        taps = teacher.taps(torch.randn(2, GRID_T, GRID_T, D))
    feats = student(torch.randn(2, 2, 8, 8))
    return teacher, student, projector, taps, feats


def test_responses_shapes_and_shared_perturbation(toy):
    teacher, student, projector, taps, feats = toy
    rec = Recorder(teacher, student, projector)
    sigma = 0.1
    t_d, s_d = fpkdm_responses(taps[0], rec.reinject_teacher, feats, rec.reinject_student, projector, sigma=sigma,
                               generator=torch.Generator().manual_seed(1))
    # step 1: the clean taps 2..L go through the same re-injection as the perturbed ones, clean first
    assert torch.equal(rec.teacher_inputs[0], taps[0])
    assert [tuple(x.shape) for x in t_d] == [tuple(x.shape) for x in s_d] == [(2, 5, 4, 4), (2, 3, 2, 2)]
    assert len(rec.masks) == 3 and [tuple(m.shape) for m in rec.masks] == [tuple(f.shape) for f in feats]

    # step 1: T̃_1 − T_1 = σ·std(T_1)·ε_t, ε_t ~ N(0, 1): per-sample std ratio ≈ σ (384 draws: within 15 %)
    noise = rec.t1_tilde - taps[0]
    ratio = noise.flatten(1).std(1) / taps[0].flatten(1).std(1)
    assert torch.allclose(ratio, torch.full_like(ratio, sigma), rtol=0.15)

    # step 2: ε_s = F̃_1 − F_1 has the direction of mask_1 · P_1^lin(pool(teacher noise)) (= the teacher's layer-1
    # response ΔF^t_1): cos = 1 per sample, and per-sample std σ·std(F_1)
    eps_s = (rec.f1_tilde - feats[0]).detach()
    with torch.no_grad():
        dt1 = projector.project(noise, 0, rec.masks[0], bias=False)
    cos1 = F.cosine_similarity(eps_s.flatten(1), dt1.flatten(1), dim=1)
    torch.testing.assert_close(cos1, torch.ones(2), rtol=0, atol=1e-5)
    assert (response_distillation_loss([dt1], [eps_s]).item()) < 1e-5  # layer 1 would be 0 by construction
    torch.testing.assert_close(eps_s.flatten(1).std(1), sigma * feats[0].detach().flatten(1).std(1), **TOL)
    assert torch.all(eps_s[rec.masks[0] == 0] == 0)  # the dropout mask of level 1 is in ε_s

    # step 3: student responses are F̃_l − F_l of the re-run student
    f_tilde = student.encode_from(rec.f1_tilde)
    for l in (1, 2):
        torch.testing.assert_close(s_d[l - 1], f_tilde[l - 1] - feats[l], **TOL)


def test_teacher_response_shares_the_clean_projection_mask(toy):
    teacher, student, projector, taps, feats = toy
    rec = Recorder(teacher, student, projector)
    t_d, _ = fpkdm_responses(taps[0], rec.reinject_teacher, feats, rec.reinject_student, projector,
                             generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_tilde = teacher.reinject(rec.t1_tilde)
        t_clean = teacher.reinject(taps[0])
    for l in (1, 2):
        m = rec.masks[l]
        assert (m == 0).any() and (m > 0).any()  # dropout active (p = 0.3, train mode)
        # ΔF^t_l = Drop(P_l(T̃_l)) − Drop(P_l(T_l)) with ONE mask: the bias cancels, dropped entries are exactly 0
        with torch.no_grad():
            clean = projector.project(t_clean[l - 1], l, m, bias=True)
            perturbed = projector.project(t_tilde[l - 1], l, m, bias=True)
        torch.testing.assert_close(t_d[l - 1].detach(), perturbed - clean, **TOL)
        assert torch.all(t_d[l - 1][m == 0] == 0)
    # independent masks per level (level 2's mask is not level 3's)
    assert not torch.equal(rec.masks[1][:, :3, :2, :2], rec.masks[2])


def test_eval_mode_uses_no_dropout_and_errors(toy):
    teacher, student, projector, taps, feats = toy
    projector.eval()
    rec = Recorder(teacher, student, projector)
    fpkdm_responses(taps[0], rec.reinject_teacher, feats, rec.reinject_student, projector)
    assert all(torch.equal(m, torch.ones_like(m)) for m in rec.masks)
    with pytest.raises(ValueError, match="pair up"):  # a tap list (the old signature) must match the levels
        fpkdm_responses(taps[:2], teacher.reinject, feats, student.encode_from, projector)
    with pytest.raises(ValueError, match="at least 2"):
        fpkdm_responses(taps[0], teacher.reinject, feats[:1], student.encode_from, projector)
    with pytest.raises(ValueError, match="at least 2"):
        fpkdm_responses(taps[:1], teacher.reinject, feats[:1], student.encode_from, projector)
    with pytest.raises(ValueError, match="reinject_teacher"):
        fpkdm_responses(taps[0], lambda t: teacher.reinject(t)[:1], feats, student.encode_from, projector)


def test_no_gradient_into_the_teacher_even_if_it_asks_for_one(toy):
    teacher, student, projector, _, _ = toy
    for p in teacher.parameters():
        p.requires_grad_(True)
    taps = teacher.taps(torch.randn(2, GRID_T, GRID_T, D))  # taps carrying a graph: fpkdm must detach them
    feats = student(torch.randn(2, 2, 8, 8))
    loss = response_distillation_loss(*fpkdm_responses(taps[0], teacher.reinject, feats, student.encode_from,
                                                       projector))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(lvl.weight.grad.abs().sum() > 0 and lvl.bias.grad is None for lvl in projector.levels)


# ---------------------------------------------------------------------------------------------------------------
# the real pieces: a tiny random SAM in MedSAMTeacher and a small TinyMUNet (64x64 input: F1..F4 = 16², 8², 4², 2²)

def test_one_sgd_step_on_l_rd_moves_student_and_projector_not_the_teacher():
    from nnunet_semisam.networks.tiny_munet import TinyMUNet
    from nnunet_semisam.teachers.medsam import MedSAMTeacher
    from nnunet_semisam.teachers.sam_models import build_sam_custom

    torch.manual_seed(0)
    sam = build_sam_custom(encoder_embed_dim=8, encoder_depth=4, encoder_num_heads=1, encoder_global_attn_indexes=(),
                           prompt_embed_dim=16, decoder_mlp_dim=16, decoder_num_heads=2, iou_head_hidden_dim=16)
    with torch.no_grad():  # random init leaves pos_embed / rel-pos at 0: perturb so that the blocks differ
        for p in sam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = MedSAMTeacher(sam, "cpu", model_type="semisam_tiny")  # taps = blocks (0, 1, 2, 3)
    for p in teacher.sam.parameters():  # an unfrozen teacher: fpkdm_responses itself must keep it out of the graph
        p.requires_grad_(True)
    net = TinyMUNet(3, 2, features_per_stage=(4, 8, 8, 8, 8, 8), strides=(1, 2, 2, 2, 2, 2),
                    n_mamba_layers_per_stage=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    taps = teacher.block_features(teacher.fast_preprocess(x, size=256))  # 4 x (2, 16, 16, 8), with a graph here
    assert [tuple(t.shape) for t in taps] == [(2, 16, 16, 8)] * 4

    logits, feats = net(x, return_features=True)
    grids = [tuple(f.shape[-2:]) for f in feats]
    assert grids == [(16, 16), (8, 8), (4, 4), (2, 2)]  # pool: identity, avg 2, avg 4, avg 8; level 4 pads 2 -> 4
    projector = FeatureProjector(8, [f.shape[1] for f in feats], grids)
    teacher_before = copy.deepcopy(teacher.sam.state_dict())
    student_before = copy.deepcopy(net.state_dict())
    proj_before = copy.deepcopy(projector.state_dict())
    opt = torch.optim.SGD([*net.parameters(), *projector.parameters(), *teacher.sam.parameters()], lr=0.5)

    t_d, s_d = fpkdm_responses(taps[0], lambda t: teacher.forward_blocks(t, start=teacher.tap_blocks[0] + 1), feats,
                               lambda f: net.encode_from(1, f), projector, generator=torch.Generator().manual_seed(0))
    assert [tuple(d.shape) for d in s_d] == [(2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    loss = response_distillation_loss(t_d, s_d)
    assert 0.2 < loss.item() < 1.8  # random nets: responses far from aligned
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert all(p.grad is None for p in teacher.sam.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.sam.state_dict().items())
    changed = {k: not torch.equal(v, proj_before[k]) for k, v in projector.state_dict().items()}
    assert changed == {f"levels.{i}.{n}": n == "weight" for i in range(4) for n in ("weight", "bias")}
    for name, p in net.named_parameters():
        moved = not torch.equal(p.detach(), student_before[name])
        assert moved == name.startswith("encoder."), name  # L_RD reaches the whole encoder, not the decoder


# ---------------------------------------------------------------------------------------------------------------
# one re-injection path for the clean and the perturbed teacher taps (METHODS.md §4.1 step 1)

def lossy(reinject):
    """A re-injection through a lower-precision path (bf16 rounding at its input and outputs, like bf16 autocast):
    its clean taps differ from the float32 taps of the teacher's own forward pass."""
    def run(t1):
        return [t.to(torch.bfloat16).float() for t in reinject(t1.to(torch.bfloat16).float())]
    return run


@pytest.mark.parametrize("as_list", [False, True])
def test_sigma_zero_gives_exactly_zero_teacher_responses_through_a_lossy_path(toy, as_list):
    teacher, student, projector, taps, feats = toy
    reinject = lossy(teacher.reinject)
    # the old scheme (clean T_2..T_L from the forward pass, perturbed ones from the re-injection) would see the
    # path mismatch as a response even at σ = 0:
    with torch.no_grad():
        mismatch = [projector.project(a - b, l + 1, None, bias=False) for l, (a, b)
                    in enumerate(zip(reinject(taps[0]), taps[1:]))]
    assert all(m.abs().max() > 1e-4 for m in mismatch)

    t_d, s_d = fpkdm_responses(taps if as_list else taps[0], reinject, feats, student.encode_from, projector,
                               sigma=0.0, generator=torch.Generator().manual_seed(0))
    assert len(t_d) == 2 and all(torch.equal(d, torch.zeros_like(d)) for d in t_d)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in s_d)  # ε_s = 0 too: F̃_l = F_l


def test_a_tap_list_uses_only_t1_and_matches_the_tensor_call(toy):
    teacher, student, projector, taps, feats = toy
    junk = [taps[0]] + [torch.full_like(t, 1e3) for t in taps[1:]]  # T_2..T_L of the list are not used
    a = fpkdm_responses(junk, teacher.reinject, feats, student.encode_from, projector,
                        generator=torch.Generator().manual_seed(5))
    b = fpkdm_responses(taps[0], teacher.reinject, feats, student.encode_from, projector,
                        generator=torch.Generator().manual_seed(5))
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------------------
# per-level teacher widths (LiteMedSAM's TinyViT: 128, 160, 320, 320; METHODS.md §2.8)

def test_projector_with_per_level_teacher_widths():
    dims = (3, 5, 7)
    proj = FeatureProjector(dims, CHANNELS, GRIDS)
    assert proj.teacher_dims == dims and proj.teacher_dim is None
    assert [lvl.in_dim for lvl in proj.levels] == list(dims)
    for l, d in enumerate(dims):
        tokens = torch.randn(2, GRID_T, GRID_T, d)
        assert proj.project(tokens, l, None).shape == (2, CHANNELS[l], *GRIDS[l])
        assert proj.levels[l].weight.abs().max() <= d ** -0.5  # U(±in_dim^-1/2) per level
        with pytest.raises(ValueError):
            proj.project(torch.randn(2, GRID_T, GRID_T, d + 1), l, None)
    with pytest.raises(ValueError, match="one width per level"):
        FeatureProjector((3, 5), CHANNELS, GRIDS)


def test_an_int_teacher_width_keeps_the_parameters_and_keys():
    torch.manual_seed(0)
    a = FeatureProjector(D, CHANNELS, GRIDS)
    torch.manual_seed(0)
    b = FeatureProjector([D] * 3, CHANNELS, GRIDS)
    assert a.teacher_dim == b.teacher_dim == D and a.teacher_dims == (D,) * 3
    shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    # levels.{l}.weight (G_l, D, C_l), levels.{l}.bias (G_l, C_l); G = ceil(h/4)·ceil(w/4) = 4, 1, 1
    assert shapes == {"levels.0.weight": (4, D, 4), "levels.0.bias": (4, 4), "levels.1.weight": (1, D, 5),
                      "levels.1.bias": (1, 5), "levels.2.weight": (1, D, 3), "levels.2.bias": (1, 3)}
    assert {k: tuple(v.shape) for k, v in b.state_dict().items()} == shapes
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # same init draws too
    b.load_state_dict(a.state_dict())


def test_responses_with_per_level_teacher_widths():
    torch.manual_seed(0)
    dims = (6, 9, 4)  # T_1 6 channels, T_2 9, T_3 4
    blocks = nn.ModuleList([nn.Linear(6, 9), nn.Linear(9, 4)])

    def reinject(t1):
        t2 = torch.tanh(blocks[0](t1))
        return [t2, torch.tanh(blocks[1](t2))]

    projector = FeatureProjector(dims, CHANNELS, GRIDS)
    student = ToyStudent()
    feats = student(torch.randn(2, 2, 8, 8))
    t_d, s_d = fpkdm_responses(torch.randn(2, GRID_T, GRID_T, 6), reinject, feats, student.encode_from, projector)
    assert [tuple(x.shape) for x in t_d] == [tuple(x.shape) for x in s_d] == [(2, 5, 4, 4), (2, 3, 2, 2)]
    response_distillation_loss(t_d, s_d).backward()
    assert all(lvl.weight.grad.abs().sum() > 0 for lvl in projector.levels)
