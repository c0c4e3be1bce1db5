"""Compiled CPU selective scan (METHODS.md §3.4): numba kernel vs the sequential recurrence, and the dispatcher.

Shapes stay small so that the two kernels compile once per process (cached on disk afterwards) and every case runs
in milliseconds; the same parameter grid as the chunked scan's tests in test_mamba.py.
"""
import numpy as np
import pytest
import torch
from test_mamba import _close, _inputs, _numpy_reference

from nnunet_semisam.networks.mamba import (cpu_kernel, dispatch, mamba_backend, scan_backend, selective_scan_chunked,
                                           selective_scan_fn, selective_scan_sequential)

pytestmark = pytest.mark.skipif(not cpu_kernel.numba_available(), reason="numba does not import here")
numba_scan = cpu_kernel.selective_scan_numba


def test_hand_computed_case():
    """One channel, one state, L = 3 (the recurrence written out by hand in test_mamba.py), no softplus."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[1.0, 0.5, 2.0]]])
    C = torch.tensor([[[1.0, -1.0, 0.5]]])
    D = torch.tensor([0.5])
    s1 = 0.5
    s2 = np.exp(-2.0) * s1 + 1.0
    s3 = np.exp(-0.5) * s2 - 0.5
    out, last = numba_scan(u, delta, A, B, C, D, return_last_state=True)
    assert torch.allclose(out[0, 0], torch.tensor([s1 + 0.5, -s2 + 1.0, 0.5 * s3 - 0.5], dtype=torch.float32),
                          atol=1e-6)
    assert torch.allclose(last, torch.tensor([[[s3]]], dtype=torch.float32), atol=1e-6)


def test_vectorised_exp_and_softplus_against_float64():
    """The kernel's own exp and softplus (METHODS.md §3.4) against numpy in float64 over their whole range: relative
    error of exp within 2e-7 on [-87.3, 88], values below clamped to e^-87.3 (1.22e-38); softplus within 2.5e-7
    relative (absolute 1.22e-38 below -87.3), and x itself above 20 as F.softplus."""
    from numba import njit

    exp32, softplus32 = cpu_kernel._exp32, cpu_kernel._softplus32

    @njit
    def apply(f_id, x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = exp32(x[i]) if f_id == 0 else softplus32(x[i])
        return out

    x = np.concatenate([np.linspace(-87.3, 88.0, 200_001),
                        np.float32([0.0, -1e-8, 1e-8, 0.3465736])]).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    assert np.abs(apply(0, x) / ref - 1).max() < 2e-7
    low = apply(0, np.float32([-90.0, -200.0, -np.inf]))
    assert np.all(low <= 1.25e-38) and np.all(low >= 0)
    x = np.linspace(-100.0, 40.0, 200_001).astype(np.float32)
    sp = apply(1, x)
    ref = torch.nn.functional.softplus(torch.from_numpy(x).double()).numpy()
    ok = x >= -87.3  # below, softplus(x) ~ e^x is returned as e^-87.3 as well (absolute error <= 1.22e-38)
    assert np.abs(sp[ok] / ref[ok] - 1).max() < 2.5e-7 and np.abs(sp[~ok] - ref[~ok]).max() <= 1.25e-38
    assert np.array_equal(sp[x > 20], x[x > 20])


@pytest.mark.parametrize("bc", ["const", "var", "group"])
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", [(True, True, True, True), (False, False, False, False),
                                                            (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("L", [1, 64, 130])
def test_kernel_matches_sequential_values_and_gradients(bc, use_D, use_z, use_bias, softplus, L):
    """Values, last state and the gradients of every input (through out and the last state) vs the reference;
    L = 64 is exactly one stored chunk, 130 three with a partial one."""
    x = _inputs(2, 4, L, 3, bc=bc)
    for k, on in (("D", use_D), ("z", use_z), ("delta_bias", use_bias)):
        if not on:
            x[k] = None
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None}
    ref, ref_last = selective_scan_sequential(**x, delta_softplus=softplus, return_last_state=True)
    out, last = numba_scan(**x, delta_softplus=softplus, return_last_state=True)
    assert type(out.grad_fn).__name__ == "SelectiveScanNumbaFnBackward"
    _close(out, ref)
    _close(last, ref_last)
    with torch.no_grad():  # inference: nothing saved
        out_ng, last_ng = numba_scan(**x, delta_softplus=softplus, return_last_state=True)
    assert torch.equal(out_ng, out.detach()) and torch.equal(last_ng, last.detach())
    g = torch.Generator().manual_seed(1)
    w, w_last = torch.randn(ref.shape, generator=g), torch.randn(ref_last.shape, generator=g)
    g_ref = torch.autograd.grad((ref * w).sum() + (ref_last * w_last).sum(), list(leaves.values()))
    g_out = torch.autograd.grad((out * w).sum() + (last * w_last).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, g_out, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        _close(a, b, what=f"grad {name}")
    only_out = torch.autograd.grad(numba_scan(**x, delta_softplus=softplus).sum(), [x["B"]])[0]  # no last state
    _close(only_out, torch.autograd.grad(selective_scan_sequential(**x, delta_softplus=softplus).sum(), [x["B"]])[0])


def test_bfloat16_inputs_computed_in_float32_and_cast_back():
    x = _inputs(1, 3, 20, 4)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z") else v for k, v in x.items()}
    half["u"].requires_grad_()
    out = numba_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    _close(out.float(), selective_scan_sequential(**half, delta_softplus=True).float(), rtol=1e-2)
    (gu,) = torch.autograd.grad(out.float().sum(), [half["u"]])
    assert gu.dtype == torch.bfloat16


@pytest.mark.parametrize("delta_scale,a_scale", [(0.5, 1.0), (0.01, 0.01)])
def test_long_sequence_65536_forward_backward(delta_scale, a_scale):
    """L = 65,536: values and all gradients vs the float64 sequential reference; no overflow (fast and slow decay)."""
    x = _inputs(1, 2, 65536, 4, seed=3, delta_scale=delta_scale)
    x["A"] = x["A"] * a_scale
    x["delta_bias"] = x["delta_bias"] * 0 + (-4.0 if a_scale < 1 else 0.0)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    out = numba_scan(**x, delta_softplus=True)
    ref, gout, g_ref = _numpy_reference(x)
    assert torch.isfinite(out).all()
    _close(out, torch.from_numpy(ref))
    grads = torch.autograd.grad((out * torch.from_numpy(gout).float()).sum(), list(leaves.values()))
    for name, g in zip(leaves, grads):
        assert torch.isfinite(g).all(), name
        _close(g, torch.from_numpy(np.asarray(g_ref[name])), what=f"grad {name}")


def test_tiny_munet_gradients_equal_across_the_three_cpu_paths(monkeypatch):
    """A whole Tiny-MUNet's parameter gradients with the scan by the sequential reference, the pure-PyTorch chunked
    scan and the numba kernel agree within float32 tolerance. Through BatchNorm and the stacked Mamba layers float32
    rounding grows to ~5e-4 of a tensor's largest gradient for both fast paths alike (measured), hence 2e-3."""
    from nnunet_semisam.networks.mamba import module
    from nnunet_semisam.networks.tiny_munet import paper_tiny_munet

    torch.manual_seed(0)
    net = paper_tiny_munet(3, 2).train()
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for path in ("sequential", "chunked", "numba"):
        monkeypatch.setenv("NNUNET_SEMISAM_SCAN_BACKEND", "numba" if path == "numba" else "pytorch")
        monkeypatch.setattr(module, "selective_scan_chunked",
                            selective_scan_sequential if path == "sequential" else selective_scan_chunked)
        assert mamba_backend(x) == ("numba" if path == "numba" else "pure")
        net.zero_grad(set_to_none=True)
        logits, feats = net(x, return_features=True)
        (logits.square().mean() + sum(f.square().mean() for f in feats)).backward()
        grads[path] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    ref = grads["sequential"]
    assert len(ref) > 100
    for path in ("chunked", "numba"):
        assert grads[path].keys() == ref.keys()
        for name, g in ref.items():
            err = (grads[path][name] - g).abs().max().item()
            assert err <= 2e-3 * max(g.abs().max().item(), 1e-8), f"{path} {name}: {err:.2e}"


def test_dispatcher_picks_the_expected_backend(monkeypatch, capsys):
    x = _inputs(1, 3, 20, 4)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.CPU_AUTO_BACKEND == "numba"  # the shipped default: the kernel on CPU
    assert scan_backend(x["u"]) == "numba" and mamba_backend(x["u"]) == "numba"
    monkeypatch.setattr(dispatch, "CPU_AUTO_BACKEND", "pytorch")  # the chunked scan as the CPU default
    assert scan_backend(x["u"]) == "pytorch" and mamba_backend(x["u"]) == "pure"
    monkeypatch.setenv(dispatch.ENV_VAR, "numba")  # numba on request
    assert scan_backend(x["u"]) == "numba" and mamba_backend(x["u"]) == "numba"
    monkeypatch.delenv(dispatch.ENV_VAR)
    monkeypatch.setattr(dispatch, "CPU_AUTO_BACKEND", "numba")  # numba as the CPU default
    assert scan_backend(x["u"]) == "numba" and mamba_backend(x["u"]) == "numba"
    dispatch._announce.cache_clear()
    out = selective_scan_fn(**x, delta_softplus=True)
    selective_scan_fn(**x, delta_softplus=True)
    assert capsys.readouterr().err.count("compiled CPU selective scan (numba)") == 1  # logged once
    assert torch.equal(out, numba_scan(**x, delta_softplus=True))
    # on request: the pure-PyTorch scan, by argument or by environment variable
    assert torch.equal(selective_scan_fn(**x, delta_softplus=True, backend="pytorch"),
                       selective_scan_chunked(**x, delta_softplus=True))
    monkeypatch.setenv(dispatch.ENV_VAR, "pytorch")
    assert scan_backend(x["u"]) == "pytorch" and mamba_backend(x["u"]) == "pure"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="NNUNET_SEMISAM_SCAN_BACKEND"):
        scan_backend(x["u"])
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(RuntimeError, match="mamba_ssm"):  # no silent switch when a requested backend cannot run
        selective_scan_fn(**x, backend="mamba_ssm")  # x is on CPU


def test_dispatcher_falls_back_when_numba_does_not_import(monkeypatch):
    """numba made unimportable: the automatic choice is the pure-PyTorch scan, a request for numba is an error."""
    monkeypatch.setattr(cpu_kernel, "numba", None)
    monkeypatch.setattr(cpu_kernel, "NUMBA_IMPORT_ERROR", ImportError("No module named 'numba'"))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "CPU_AUTO_BACKEND", "numba")
    x = _inputs(1, 3, 20, 4)
    assert scan_backend(x["u"]) == "pytorch" and mamba_backend(x["u"]) == "pure"
    assert torch.equal(selective_scan_fn(**x, delta_softplus=True), selective_scan_chunked(**x, delta_softplus=True))
    with pytest.raises(RuntimeError, match="numba does not import"):
        selective_scan_fn(**x, backend="numba")
    with pytest.raises(RuntimeError, match="needs numba"):
        numba_scan(**x)


def test_kernel_leaves_torch_thread_count_unchanged():
    """numba's OpenMP layer resets the process-wide thread count when it starts its pool (first call of a process);
    the kernel restores torch's (here OMP_NUM_THREADS=1, on a machine with more cores), so torch's own ops keep
    their threads and results (BatchNorm statistics were no longer bit-identical between two equal passes)."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom nnunet_semisam.networks.mamba import selective_scan_numba\n"
            "n = torch.get_num_threads()\n"
            "x = [torch.randn(1, 2, 5), torch.rand(1, 2, 5), -torch.rand(2, 3), torch.randn(1, 3, 5), "
            "torch.randn(1, 3, 5)]\n"
            "x[0].requires_grad_()\nselective_scan_numba(*x).sum().backward()\nprint(n, torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"), check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[-2:] == ["1", "1"], out
