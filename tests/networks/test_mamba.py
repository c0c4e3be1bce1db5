"""Mamba block (METHODS.md §3.1-3.2): chunked scan vs the sequential recurrence, mamba_ssm state-dict layout."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_semisam.networks.mamba import (Mamba, MambaLayer, count_parameters, mamba_backend, selective_scan,
                                           selective_scan_chunked, selective_scan_flops, selective_scan_sequential)

RTOL = 1e-4  # normwise: max |ours - ref| <= RTOL * max |ref| (float32)


def _close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    ref = ref.detach().double()
    err = (ours.detach().double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} * {scale:.3e}"


def _inputs(b, d, L, n, bc="var", groups=2, seed=0, delta_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    shapes = {"const": (d, n), "var": (b, n, L), "group": (b, groups, n, L)}[bc]
    return dict(u=r(b, d, L), delta=r(b, d, L) * delta_scale, A=-torch.rand(d, n, generator=g) * 4 - 0.05,
                B=r(*shapes), C=r(*shapes), D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.1)


def test_sequential_reference_hand_computed():
    """One channel, one state, L = 3, no softplus: the recurrence written out by hand."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[1.0, -1.0, 0.5]]])
    D = torch.tensor([0.5])
    z = torch.tensor([[[0.0, 1.0, 2.0]]])
    s1 = 0.5 * 1.0 * 1.0
    s2 = math.exp(1.0 * -2.0) * s1 + 1.0 * 0.5 * 2.0
    s3 = math.exp(0.25 * -2.0) * s2 + 0.25 * 2.0 * -1.0
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expected = [(1.0 * s1 + 0.5 * 1.0) * silu(0.0), (-1.0 * s2 + 0.5 * 2.0) * silu(1.0),
                (0.5 * s3 + 0.5 * -1.0) * silu(2.0)]
    for fn in (selective_scan_sequential, selective_scan_chunked):
        out, last = fn(u, delta, A, B, C, D, z, return_last_state=True)
        assert torch.allclose(out[0, 0], torch.tensor(expected), atol=1e-6), fn.__name__
        assert torch.allclose(last, torch.tensor([[[s3]]]), atol=1e-6)


@pytest.mark.parametrize("bc", ["const", "var", "group"])
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                            (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("L,chunk", [(1, 32), (33, 32), (130, 32), (130, 7)])
def test_chunked_matches_sequential_values_and_gradients(bc, use_D, use_z, use_bias, softplus, L, chunk):
    x = _inputs(2, 4, L, 3, bc=bc)
    for k, on in (("D", use_D), ("z", use_z), ("delta_bias", use_bias)):
        if not on:
            x[k] = None
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None}
    ref, ref_last = selective_scan_sequential(**x, delta_softplus=softplus, return_last_state=True)
    out, last = selective_scan_chunked(**x, delta_softplus=softplus, return_last_state=True, chunk_size=chunk)
    _close(out, ref)
    _close(last, ref_last)
    with torch.no_grad():  # the in-place path used for inference
        out_ng, last_ng = selective_scan_chunked(**x, delta_softplus=softplus, return_last_state=True,
                                                 chunk_size=chunk)
    _close(out_ng, ref)
    _close(last_ng, ref_last)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    g_ref = torch.autograd.grad((ref * grad_out).sum(), list(leaves.values()))
    g_out = torch.autograd.grad((out * grad_out).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, g_out, g_ref):
        _close(a, b, what=f"grad {name}")


@pytest.mark.parametrize("L,chunk,block", [(130, 7, 1 << 20), (257, None, 1), (64, 8, 300)])
def test_hand_written_backward_matches_sequential(L, chunk, block, monkeypatch):
    """`_SelectiveScanFn` (input-dependent B, C): gradients of the output and of the last state, one or several
    channel blocks in the backward (block = floats per buffer; 1 forces one channel per block)."""
    from nnunet_semisam.networks.mamba import chunked as mamba

    monkeypatch.setattr(mamba, "_GRAD_BLOCK_ELEMENTS", block)
    x = _inputs(2, 5, L, 4, bc="var", seed=3)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    ref, ref_last = selective_scan_sequential(**x, delta_softplus=True, return_last_state=True)
    out, last = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    assert type(last.grad_fn).__name__ == "_SelectiveScanFnBackward"  # the hand-written backward, not autograd
    _close(out, ref)
    _close(last, ref_last)
    g = torch.Generator().manual_seed(2)
    w, w_last = torch.randn(ref.shape, generator=g), torch.randn(ref_last.shape, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum() + (ref_last * w_last).sum(), list(leaves.values()))
    g_out = torch.autograd.grad((out * w).sum() + (last * w_last).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, g_out, g_ref):
        _close(a, b, what=f"grad {name}")
    only_out = torch.autograd.grad(selective_scan_chunked(**x, delta_softplus=True).sum(), [x["B"]])[0]  # no last
    _close(only_out, torch.autograd.grad(selective_scan_sequential(**x, delta_softplus=True).sum(), [x["B"]])[0])


def test_dispatcher_and_dtype_on_cpu(monkeypatch):
    monkeypatch.setenv("NNUNET_SEMISAM_SCAN_BACKEND", "pytorch")  # the pure-PyTorch path, on request
    x = _inputs(1, 3, 20, 4)
    ref = selective_scan_sequential(**x, delta_softplus=True)
    assert torch.equal(selective_scan(**x, delta_softplus=True), selective_scan_chunked(**x, delta_softplus=True))
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z") else v for k, v in x.items()}
    out = selective_scan_chunked(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16  # computed in float32, cast back like selective_scan_ref
    assert mamba_backend(x["u"]) in ("numba", "pure")  # the compiled CPU kernel when numba imports
    assert ref.dtype == torch.float32


def _numpy_reference(x, softplus=True):
    """Sequential scan in float64 numpy with its hand-written adjoint (reverse-time recurrence).

    Returns out (b, d, L) and the gradients of sum(out * gout) for gout = cos(index), for every input.
    """
    u, dr, A, B, C, D, z, bias = (x[k].detach().double().numpy() for k in
                                  ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    b, d, L = u.shape
    pre = dr + bias[:, None]
    delta = np.logaddexp(0, pre) if softplus else pre
    a = np.exp(delta[..., None] * A[None, :, None, :])  # (b, d, L, n)
    Bt, Ct = B.transpose(0, 2, 1), C.transpose(0, 2, 1)  # (b, L, n)
    xin = (delta * u)[..., None] * Bt[:, None]
    s = np.zeros((b, d, L, A.shape[1]))
    state = np.zeros((b, d, A.shape[1]))
    for t in range(L):
        state = a[:, :, t] * state + xin[:, :, t]
        s[:, :, t] = state
    y = (s * Ct[:, None]).sum(-1)
    sig = 1 / (1 + np.exp(-z))
    silu = z * sig
    out = (y + u * D[:, None]) * silu
    gout = np.cos(np.arange(out.size).reshape(out.shape))
    gy = gout * silu
    grads = {"z": gout * (y + u * D[:, None]) * (sig * (1 + z * (1 - sig))), "D": (gy * u).sum((0, 2))}
    gu = gy * D[:, None]
    gs = gy[..., None] * Ct[:, None]  # direct contribution to ds_t
    lam = np.zeros_like(state)
    gx = np.zeros_like(s)
    ga = np.zeros_like(s)
    for t in range(L - 1, -1, -1):
        lam = gs[:, :, t] + (a[:, :, t + 1] * lam if t + 1 < L else 0)
        gx[:, :, t] = lam
        ga[:, :, t] = lam * (s[:, :, t - 1] if t > 0 else 0)
    grads["C"] = (gy[..., None] * s).sum(1).transpose(0, 2, 1)
    g_delta = (ga * a * A[None, :, None, :]).sum(-1) + (gx * Bt[:, None]).sum(-1) * u
    grads["A"] = (ga * a * delta[..., None]).sum((0, 2))
    grads["B"] = (gx * (delta * u)[..., None]).sum(1).transpose(0, 2, 1)
    grads["u"] = gu + (gx * Bt[:, None]).sum(-1) * delta
    g_pre = g_delta * (1 / (1 + np.exp(-pre)) if softplus else 1)
    grads["delta"], grads["delta_bias"] = g_pre, g_pre.sum((0, 2))
    return out, gout, grads


@pytest.mark.parametrize("delta_scale,a_scale", [(0.5, 1.0), (0.01, 0.01)])
def test_long_sequence_65536_forward_backward(delta_scale, a_scale):
    """L = 65,536 (a 256x256 map): values and all gradients vs a float64 sequential reference, nothing overflows.

    (0.5, 1): fast decay (decay products underflow to 0); (0.01, 0.01): the state keeps almost everything over the
    whole sequence, so the chunk carries matter everywhere.
    """
    x = _inputs(1, 2, 65536, 4, seed=3, delta_scale=delta_scale)
    x["A"] = x["A"] * a_scale
    x["delta_bias"] = x["delta_bias"] * 0 + (-4.0 if a_scale < 1 else 0.0)  # softplus(-4) ~ 0.018
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    out = selective_scan_chunked(**x, delta_softplus=True)
    ref, gout, g_ref = _numpy_reference(x)
    assert torch.isfinite(out).all()
    _close(out, torch.from_numpy(ref))
    grads = torch.autograd.grad((out * torch.from_numpy(gout).float()).sum(), list(leaves.values()))
    for name, g in zip(leaves, grads):
        assert torch.isfinite(g).all(), name
        _close(g, torch.from_numpy(np.asarray(g_ref[name])), what=f"grad {name}")


# mamba_ssm 2.3.x, modules/mamba_simple.py, Mamba(d_model=64) with defaults (d_state 16, d_conv 4, expand 2,
# dt_rank ceil(64/16) = 4, bias False, conv_bias True): state_dict() names and shapes, in order.
MAMBA_SSM_STATE_DICT_D64 = [
    ("A_log", (128, 16)),
    ("D", (128,)),
    ("in_proj.weight", (256, 64)),
    ("conv1d.weight", (128, 1, 4)),
    ("conv1d.bias", (128,)),
    ("x_proj.weight", (36, 128)),
    ("dt_proj.weight", (128, 4)),
    ("dt_proj.bias", (128,)),
    ("out_proj.weight", (64, 128)),
]


def test_state_dict_names_and_shapes_equal_mamba_ssm():
    m = Mamba(64)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == MAMBA_SSM_STATE_DICT_D64
    for dm, expected in ((64, 32640), (96, 68160), (128, 116480), (192, 251520)):  # METHODS.md §3.1
        r = math.ceil(dm / 16)
        assert count_parameters(Mamba(dm)) == expected == 6 * dm ** 2 + 4 * dm * r + 110 * dm
    # a checkpoint with mamba_ssm's names loads strictly, and the other way round
    foreign = {k: torch.randn(s) for k, s in MAMBA_SSM_STATE_DICT_D64}
    m.load_state_dict(foreign, strict=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in foreign.items())


def test_initialisation_as_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(32, dt_min=0.001, dt_max=0.1)
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
    assert torch.equal(m.D, torch.ones(64))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= m.dt_rank ** -0.5
    assert m.conv1d.groups == 64 and m.conv1d.padding == (3,)


def _mamba_reference_forward(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """mamba_simple.Mamba.forward's non-fused branch with selective_scan_ref (sequential)."""
    L = h.shape[1]
    xz = (m.in_proj.weight @ h.reshape(-1, h.shape[-1]).t()).reshape(-1, h.shape[0], L).permute(1, 0, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(-1, x.shape[1]))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(-1, h.shape[0], L).permute(1, 0, 2)
    B = B.reshape(h.shape[0], L, -1).transpose(1, 2)
    C = C.reshape(h.shape[0], L, -1).transpose(1, 2)
    y = selective_scan_sequential(x, dt, -torch.exp(m.A_log.float()), B, C, m.D.float(), z=z,
                                  delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def test_mamba_forward_and_bidirectional_match_reference():
    torch.manual_seed(0)
    m = Mamba(24)
    h = torch.randn(2, 50, 24, requires_grad=True)
    ref = _mamba_reference_forward(m, h)
    out = m(h)
    _close(out, ref)
    g_ref = torch.autograd.grad(ref.square().sum(), [h, m.A_log, m.in_proj.weight, m.dt_proj.bias])
    g_out = torch.autograd.grad(out.square().sum(), [h, m.A_log, m.in_proj.weight, m.dt_proj.bias])
    for a, b in zip(g_out, g_ref):
        _close(a, b)
    bi = m.forward_bidirectional(h)
    bi_ref = 0.5 * (_mamba_reference_forward(m, h) + _mamba_reference_forward(m, h.flip(1)).flip(1))
    _close(bi, bi_ref)


@pytest.mark.parametrize("shape", [(2, 16, 6, 5), (1, 16, 3, 4, 5)])
def test_mamba_layer_2d_3d(shape):
    torch.manual_seed(0)
    layer = MambaLayer(16)
    c = 16
    assert count_parameters(layer) == 6 * c ** 2 + 4 * c * math.ceil(c / 16) + 112 * c  # METHODS.md §3.2
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    # METHODS.md §3.2 written out: row-major tokens, LayerNorm, shared Mamba both ways, residual
    tokens = layer.norm(x.flatten(2).transpose(1, 2))
    m = layer.mamba
    ref = x + (0.5 * (_mamba_reference_forward(m, tokens) + _mamba_reference_forward(m, tokens.flip(1)).flip(1))
               ).transpose(1, 2).reshape(x.shape)
    _close(y, ref)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x.detach().to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    _close(yb.float(), ref, rtol=2e-2)  # float32 inside (autocast off), bf16 only at the boundary
    assert layer.scan_flops(2, 30) == selective_scan_flops(4, 30, 32, 16) == 9 * 4 * 30 * 32 * 16 + 2 * 4 * 32 * 30


def _mamba_ssm_available() -> bool:
    import importlib

    try:
        importlib.import_module("mamba_ssm")
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _mamba_ssm_available(), reason="needs CUDA and an importable mamba_ssm (pip install .[cuda])")
def test_fused_path_matches_pure_path_on_gpu():
    from mamba_ssm import Mamba as MambaSSM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    theirs = MambaSSM(64).cuda()
    ours = Mamba(64).cuda()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    h = torch.randn(2, 300, 64, device="cuda")
    assert mamba_backend(h) in ("mamba_ssm-fused", "mamba_ssm-scan")
    fused = ours(h)
    _close(fused, theirs(h))
    ours.use_fast_path = False
    assert mamba_backend(h, ours.use_fast_path) == "pure"
    _close(ours(h), fused)
    _close(selective_scan_chunked(**{k: v.cuda() for k, v in _inputs(2, 8, 500, 16).items()}, delta_softplus=True),
           selective_scan(**{k: v.cuda() for k, v in _inputs(2, 8, 500, 16).items()}, delta_softplus=True))


@pytest.mark.parametrize("bc", ["const", "var", "group"])
def test_nograd_scan_in_channel_blocks_matches_sequential(bc, monkeypatch):
    """The no-grad scan cut into several channel blocks (tiny block budget) and chunks, with padding."""
    from nnunet_semisam.networks.mamba import chunked as mamba_mod

    monkeypatch.setattr(mamba_mod, "_BLOCK_ELEMENTS", 2 * 37 * 3)  # -> 2 channels per block, 4 blocks
    x = _inputs(2, 8, 37, 4, bc=bc, groups=2)
    ref, ref_last = selective_scan_sequential(**x, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        for chunk in (None, 5, 16):
            out, last = selective_scan_chunked(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk)
            _close(out, ref, what=f"chunk {chunk}")
            _close(last, ref_last, what=f"last state, chunk {chunk}")


@pytest.mark.parametrize("L", [1, 7, 50, 300])
def test_mamba_bidirectional_nograd_token_major_matches_reference(L, monkeypatch):
    """Inference path of `forward_bidirectional` (token-major, shifted-add conv) vs METHODS.md §3.2 with the
    sequential scan."""
    monkeypatch.setenv("NNUNET_SEMISAM_SCAN_BACKEND", "pytorch")  # the pure-PyTorch inference path
    torch.manual_seed(L)
    m = Mamba(24)
    h = torch.randn(2, L, 24)
    ref = 0.5 * (_mamba_reference_forward(m, h) + _mamba_reference_forward(m, h.flip(1)).flip(1))
    with torch.no_grad():
        out = m.forward_bidirectional(h)
    _close(out, ref)
    with torch.no_grad():  # chunked in several chunks with padding
        from nnunet_semisam.networks.mamba import chunked as mamba_mod

        b, E, N = 4, m.d_inner, m.d_state
        g = torch.Generator().manual_seed(1)
        delta = F.softplus(torch.randn(b, L, E, generator=g))
        u = torch.randn(b, L, E, generator=g)
        A = -torch.exp(m.A_log.float())
        Bm, Cm = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
        y = mamba_mod._scan_tokens_nograd(delta, delta * u, (A * mamba_mod._LOG2_E).t().contiguous(), Bm, Cm,
                                          chunk_size=3)
        y_ref = selective_scan_sequential(u.transpose(1, 2), delta.transpose(1, 2), A, Bm.transpose(1, 2),
                                          Cm.transpose(1, 2))
        _close(y.transpose(1, 2), y_ref)


def test_fast_softplus_matches_torch_values_and_gradient():
    from nnunet_semisam.networks.mamba import _softplus

    x = torch.cat([torch.linspace(-60, 60, 2001), torch.tensor([-1e-3, 1e-3, 19.9, 20.1, 88.0])]).double()
    ref = torch.nn.functional.softplus(x.float())
    with torch.no_grad():
        assert torch.allclose(_softplus(x.float()), ref, rtol=1e-6, atol=6e-7)
    xg = x.float().clone().requires_grad_()
    _softplus(xg).sum().backward()
    assert torch.allclose(xg.grad, torch.sigmoid(x.float()), atol=1e-6)
