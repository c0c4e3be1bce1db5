"""Compiled CPU selective scan: one pass of the recurrence per channel, JIT-compiled by numba (METHODS.md §3.4).

`selective_scan_numba` has the signature and semantics of mamba_ssm's `selective_scan_fn` (u, delta, z (b, d, L);
A (d, N); B, C (d, N) | (b, N, L) | (b, G, N, L); D, delta_bias (d,)) and is differentiable in all of them through
`SelectiveScanNumbaFn` (an autograd Function with a hand-written backward).

Kernels (`@njit(parallel=True, cache=True, fastmath=False)`, float32 throughout, state per (b, d, n) in float32):
- forward: `prange` over the b*d (batch, channel) pairs; each runs the recurrence `s_t = exp(delta_t A) s_{t-1}
  + delta_t u_t B_t`, `y_t = C_t . s_t` once over its L tokens (N states in registers/L1), adds `D u`, multiplies
  by `silu(z)`. In training it also stores the state entering every chunk of `_CKPT` tokens (1/_CKPT of the states).
- backward: `prange` over b * W work items (W about the thread count), each taking the channels d = w, w + W, ...
  of one batch element; per channel the chunks are visited last to first, the chunk's states recomputed from the
  stored chunk-entry state (a (_CKPT + 1, N) local buffer), then the adjoint `h_t = gy_t C_t + exp(delta_{t+1} A)
  h_{t+1}` runs backwards through it. B and C are shared by the channels, so their gradients go into a per-work-item
  buffer (b, W, ...) summed afterwards by torch: no two threads write the same element.

Numba compiles on the first call of a process (seconds) and caches the machine code on disk (`cache=True`): in a
`__pycache__` next to this file, or, where the package directory is not writable (a system install), in numba's
user-wide cache directory (`~/.cache/numba`); `NUMBA_CACHE_DIR` overrides both. The second process loads the cached
code in well under a second.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable

try:  # numba is a core requirement (setup.py), but the pure-PyTorch scan still runs without it
    import numba
    from numba import njit, prange
    NUMBA_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or an llvmlite that does not load on this platform
    numba = None
    NUMBA_IMPORT_ERROR = exc

_CKPT = 64  # tokens per stored chunk-entry state (backward recomputes the states of one chunk at a time)


def numba_available() -> bool:
    """Whether the compiled CPU kernel can run here (numba imports)."""
    return numba is not None


if numba is not None:
    @njit(cache=True, fastmath=False, inline="always")
    def _dt(v, bias, softplus):
        x = v + bias
        if softplus:
            if x > 20.0:
                return x
            return math.log1p(math.exp(x))
        return x

    @njit(parallel=True, cache=True, fastmath=False)
    def _fwd_kernel(u, delta, A, B, C, D, z, bias, softplus, has_z, out, last, ckpt, save_ckpt):
        """u, delta, z, out (b, d, L); A (d, N); B, C (bB, G, LB, N) (bB in {1, b}, LB in {1, L}); D, bias (d,);
        last (b, d, N); ckpt (b, d, nc, N) written when save_ckpt. float32 everywhere."""
        nb, nd, L = u.shape
        N = A.shape[1]
        GB, GC = B.shape[1], C.shape[1]
        for i in prange(nb * nd):
            bi = i // nd
            di = i % nd
            bB = bi if B.shape[0] > 1 else 0
            bC = bi if C.shape[0] > 1 else 0
            gB = di // (nd // GB)
            gC = di // (nd // GC)
            varB = B.shape[2] > 1
            varC = C.shape[2] > 1
            st = np.zeros(N, np.float32)
            Dd = D[di]
            bd = bias[di]
            for t in range(L):
                if save_ckpt and t % _CKPT == 0:
                    for n in range(N):
                        ckpt[bi, di, t // _CKPT, n] = st[n]
                dt = _dt(delta[bi, di, t], bd, softplus)
                ut = u[bi, di, t]
                du = dt * ut
                tB = t if varB else 0
                tC = t if varC else 0
                y = np.float32(0.0)
                for n in range(N):
                    sn = np.float32(math.exp(dt * A[di, n])) * st[n] + du * B[bB, gB, tB, n]
                    st[n] = sn
                    y += sn * C[bC, gC, tC, n]
                o = y + Dd * ut
                if has_z:
                    zt = z[bi, di, t]
                    o = o * (zt / (np.float32(1.0) + np.float32(math.exp(-zt))))
                out[bi, di, t] = o
            for n in range(N):
                last[bi, di, n] = st[n]

    @njit(parallel=True, cache=True, fastmath=False)
    def _bwd_kernel(u, delta, A, B, C, D, z, bias, softplus, has_z, ckpt, gout, glast, has_glast, W,
                    gu, gdelta, gz, gA_p, gD_p, gbias_p, gB_p, gC_p):
        """Gradients of `_fwd_kernel`. gu, gdelta, gz (b, d, L); per batch element gA_p (b, d, N), gD_p, gbias_p
        (b, d); per work item gB_p, gC_p (b, W, G, LB, N) (summed over b and W by the caller)."""
        nb, nd, L = u.shape
        N = A.shape[1]
        GB, GC = B.shape[1], C.shape[1]
        nc = ckpt.shape[2]
        for i in prange(nb * W):
            bi = i // W
            w = i % W
            bB = bi if B.shape[0] > 1 else 0
            bC = bi if C.shape[0] > 1 else 0
            varB = B.shape[2] > 1
            varC = C.shape[2] > 1
            S = np.empty((_CKPT + 1, N), np.float32)  # states of one chunk; S[k + 1] = s_{t0 + k}
            a = np.empty((_CKPT, N), np.float32)  # decays of one chunk
            dts = np.empty(_CKPT, np.float32)
            h = np.empty(N, np.float32)
            for di in range(w, nd, W):
                gB = di // (nd // GB)
                gC = di // (nd // GC)
                Dd = D[di]
                bd = bias[di]
                for n in range(N):
                    h[n] = glast[bi, di, n] if has_glast else np.float32(0.0)  # a_{t+1} h_{t+1}, carried
                gAd = np.zeros(N, np.float32)
                gDd = np.float32(0.0)
                gbd = np.float32(0.0)
                for c in range(nc - 1, -1, -1):
                    t0 = c * _CKPT
                    t1 = min(L, t0 + _CKPT)
                    for n in range(N):
                        S[0, n] = ckpt[bi, di, c, n]
                    for t in range(t0, t1):  # the chunk's states again
                        k = t - t0
                        dt = _dt(delta[bi, di, t], bd, softplus)
                        dts[k] = dt
                        du = dt * u[bi, di, t]
                        tB = t if varB else 0
                        for n in range(N):
                            an = np.float32(math.exp(dt * A[di, n]))
                            a[k, n] = an
                            S[k + 1, n] = an * S[k, n] + du * B[bB, gB, tB, n]
                    for t in range(t1 - 1, t0 - 1, -1):  # adjoint, backwards
                        k = t - t0
                        dt = dts[k]
                        ut = u[bi, di, t]
                        go = gout[bi, di, t]
                        if has_z:
                            zt = z[bi, di, t]
                            sig = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-zt)))
                            y = np.float32(0.0)
                            tC = t if varC else 0
                            for n in range(N):
                                y += S[k + 1, n] * C[bC, gC, tC, n]
                            o = y + Dd * ut
                            gz[bi, di, t] = go * o * sig * (np.float32(1.0) + zt * (np.float32(1.0) - sig))
                            go = go * zt * sig
                        gDd += go * ut
                        tB = t if varB else 0
                        tC = t if varC else 0
                        gdu = np.float32(0.0)
                        gdt = np.float32(0.0)
                        for n in range(N):
                            hn = h[n] + go * C[bC, gC, tC, n]
                            gC_p[bi, w, gC, tC, n] += go * S[k + 1, n]
                            Bn = B[bB, gB, tB, n]
                            gB_p[bi, w, gB, tB, n] += hn * dt * ut
                            gdu += hn * Bn
                            gda = hn * S[k, n] * a[k, n]  # d loss / d(delta_t A_n)
                            gAd[n] += gda * dt
                            gdt += gda * A[di, n]
                            h[n] = a[k, n] * hn
                        gu[bi, di, t] = go * Dd + gdu * dt
                        gdt += gdu * ut
                        if softplus:
                            x = delta[bi, di, t] + bd
                            gdt = gdt / (np.float32(1.0) + np.float32(math.exp(-x)))
                        gdelta[bi, di, t] = gdt
                        gbd += gdt
                for n in range(N):
                    gA_p[bi, di, n] = gAd[n]
                gD_p[bi, di] = gDd
                gbias_p[bi, di] = gbd



def _bc_layout(M: torch.Tensor, d: int) -> torch.Tensor:
    """B or C (d, N) | (b, N, L) | (b, G, N, L) as a contiguous float32 (bB, G, LB, N) array view source."""
    if M.dim() == 2:
        return M.float().reshape(1, d, 1, M.shape[1]).contiguous()
    if M.dim() == 3:
        return M.float().transpose(1, 2).unsqueeze(1).contiguous()
    if M.dim() == 4:
        if d % M.shape[1]:
            raise ValueError(f"grouped B/C with {M.shape[1]} groups does not divide d = {d}")
        return M.float().transpose(2, 3).contiguous()
    raise ValueError(f"B/C must have 2, 3 or 4 dims (d N | b N L | b G N L), got shape {tuple(M.shape)}")


def _bc_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-work-item gradient (b, W, G, LB, N) summed back into the layout and dtype of B or C."""
    g = g.sum(1)  # (b, G, LB, N)
    if like.dim() == 2:
        return g.sum(0)[:, 0].to(like.dtype)  # (d, N)
    if like.dim() == 3:
        return g[:, 0].transpose(1, 2).to(like.dtype)
    return g.transpose(2, 3).to(like.dtype)


def _run(kernel, *args) -> None:
    """Run a kernel with numba's worker count following torch's (OMP_NUM_THREADS / torch.set_num_threads), capped by
    numba's pool; torch's thread count is restored afterwards, because numba's OpenMP threading layer, when it starts
    its pool on the first call, resets the process-wide OpenMP thread count that torch uses too."""
    n = torch.get_num_threads()
    try:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class SelectiveScanNumbaFn(torch.autograd.Function):
    """Autograd Function around `_fwd_kernel` / `_bwd_kernel` (CPU tensors, computed in float32).

    Returns (out (b, d, L) in u's dtype, last state (b, d, N) float32). Saves the float32 inputs and the chunk-entry
    states (b, d, ceil(L / _CKPT), N) for the backward; without autograd nothing is saved.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.set_materialize_grads(False)
        b, d, L = u.shape
        N = A.shape[1]
        f = torch.float32
        uf, df = u.detach().to(f).contiguous(), delta.detach().to(f).contiguous()
        Af = A.detach().to(f).contiguous()
        Bf, Cf = _bc_layout(B.detach(), d), _bc_layout(C.detach(), d)
        Df = D.detach().to(f).contiguous() if D is not None else torch.zeros(d, dtype=f)
        zf = z.detach().to(f).contiguous() if z is not None else torch.zeros((1, 1, 1), dtype=f)
        bf = delta_bias.detach().to(f).contiguous() if delta_bias is not None else torch.zeros(d, dtype=f)
        train = any(ctx.needs_input_grad)
        out = torch.empty((b, d, L), dtype=f)
        last = torch.empty((b, d, N), dtype=f)
        ckpt = torch.empty((b, d, -(-L // _CKPT), N) if train else (1, 1, 1, 1), dtype=f)
        _run(_fwd_kernel, _np(uf), _np(df), _np(Af), _np(Bf), _np(Cf), _np(Df), _np(zf), _np(bf), bool(delta_softplus),
                    z is not None, _np(out), _np(last), _np(ckpt), train)
        if train:
            ctx.save_for_backward(uf, df, Af, Bf, Cf, Df, zf, bf, ckpt)
            ctx.softplus, ctx.has_z = bool(delta_softplus), z is not None
            ctx.like = (u, delta, A, B, C, D, z, delta_bias)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, glast):
        uf, df, Af, Bf, Cf, Df, zf, bf, ckpt = ctx.saved_tensors
        b, d, L = uf.shape
        N = Af.shape[1]
        f = torch.float32
        gout = gout.to(f).contiguous() if gout is not None else torch.zeros((b, d, L), dtype=f)
        has_glast = glast is not None
        glast = glast.to(f).contiguous() if has_glast else torch.zeros((1, 1, 1), dtype=f)
        W = max(1, min(d, -(-2 * torch.get_num_threads() // b)))  # work items per batch element
        gu, gdelta = torch.empty((b, d, L), dtype=f), torch.empty((b, d, L), dtype=f)
        gz = torch.empty((b, d, L), dtype=f) if ctx.has_z else torch.zeros((1, 1, 1), dtype=f)
        gA_p, gD_p, gbias_p = torch.empty((b, d, N), dtype=f), torch.empty((b, d), dtype=f), torch.empty((b, d), dtype=f)
        gB_p = torch.zeros((b, W, *Bf.shape[1:]), dtype=f)
        gC_p = torch.zeros((b, W, *Cf.shape[1:]), dtype=f)
        _run(_bwd_kernel, _np(uf), _np(df), _np(Af), _np(Bf), _np(Cf), _np(Df), _np(zf), _np(bf), ctx.softplus, ctx.has_z,
                    _np(ckpt), _np(gout), _np(glast), has_glast, W, _np(gu), _np(gdelta), _np(gz), _np(gA_p),
                    _np(gD_p), _np(gbias_p), _np(gB_p), _np(gC_p))
        u, delta, A, B, C, D, z, delta_bias = ctx.like
        need = ctx.needs_input_grad
        return (gu.to(u.dtype) if need[0] else None, gdelta.to(delta.dtype) if need[1] else None,
                gA_p.sum(0).to(A.dtype) if need[2] else None, _bc_grad(gB_p, B) if need[3] else None,
                _bc_grad(gC_p, C) if need[4] else None, gD_p.sum(0).to(D.dtype) if need[5] else None,
                gz.to(z.dtype) if need[6] else None, gbias_p.sum(0).to(delta_bias.dtype) if need[7] else None, None)


def selective_scan_numba(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                         delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False):
    """Selective scan by the compiled CPU kernel; mamba_ssm's `selective_scan_fn` signature and semantics.

    CPU tensors only; computed in float32, returned in u's dtype (last state float32). Raises RuntimeError when
    numba does not import (use `selective_scan_fn`, which falls back to the pure-PyTorch scan).
    """
    if numba is None:
        raise RuntimeError(f"the compiled CPU scan needs numba, which does not import here: {NUMBA_IMPORT_ERROR}")
    if A.is_complex():
        raise NotImplementedError("complex A (S4D-Lin) is not supported by the CPU kernel; use a real A")
    if u.device.type != "cpu":
        raise ValueError(f"the numba selective scan runs on CPU tensors, got device {u.device}")
    out, last = SelectiveScanNumbaFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
