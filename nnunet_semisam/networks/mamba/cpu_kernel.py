"""Compiled CPU selective scan: one pass of the recurrence per channel, JIT-compiled by numba (METHODS.md §3.4).

`selective_scan_numba` has the signature and semantics of mamba_ssm's `selective_scan_fn` (u, delta, z (b, d, L);
A (d, N); B, C (d, N) | (b, N, L) | (b, G, N, L); D, delta_bias (d,)) and is differentiable in all of them through
`SelectiveScanNumbaFn` (an autograd Function with a hand-written backward).

Kernels (`@njit(parallel=True, cache=True, fastmath={"contract"})`: IEEE float32 with fused multiply-adds, state
per (b, d, n) in float32; `exp` is the kernel's own vectorisable `_exp32`, and the sums over the N states use
`_dot` / `_dot_row`, the only functions compiled with reassociation, so that LLVM turns the per-state loops into SIMD
code):
- forward: `prange` over the b*d (batch, channel) pairs; each computes delta_t = softplus(delta_t + bias) for its L
  tokens, runs the recurrence `s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t`, `y_t = C_t . s_t + D u_t` once over
  them (N states in registers/L1), then multiplies by `silu(z)`. In training it also keeps delta, y before the gate
  and the state entering every chunk of `_CKPT` tokens (1/_CKPT of the states).
- backward: `prange` over b * W work items (W about the thread count), each taking the channels d = w, w + W, ...
  of one batch element; per channel the chunks are visited last to first, the chunk's states recomputed from the
  stored chunk-entry state (a (_CKPT + 1, N) local buffer), then the adjoint `h_t = gy_t C_t + exp(delta_{t+1} A)
  h_{t+1}` runs backwards through it. B and C are shared by the channels, so their gradients go into a per-work-item
  buffer (b, W, ...) summed afterwards by torch: no two threads write the same element. The gate's and the
  softplus' element-wise gradients are taken by torch around the kernel.

Numba compiles on the first call of a process (seconds) and caches the machine code on disk (`cache=True`): in a
`__pycache__` next to this file, or, where the package directory is not writable (a system install), in numba's
user-wide cache directory (`~/.cache/numba`); `NUMBA_CACHE_DIR` overrides both. The second process loads the cached
code in well under a second.
"""
from __future__ import annotations

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
    # exp of float32 without a libm call, so that LLVM vectorises the loops it sits in (the llvmlite of numba's wheels
    # has no vector math library, and one scalar expf per state update bounded the kernel at ~7 ns per update):
    # Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, Cephes' expf polynomial for e^r (relative error ~1e-7, as
    # libm's expf), times 2^k from a table. x is clamped to [-87.3, 88]: below -87.3 the result is e^-87.3 instead of
    # e^x, both at most 1.22e-38.
    _LOG2E, _LN2_HI, _LN2_LO = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
    _E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
    _E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
    _L3, _L5, _L7, _L9, _L11, _L13 = (np.float32(1 / k) for k in (3, 5, 7, 9, 11, 13))  # log1p's series
    _POW2 = np.ldexp(np.float32(1.0), np.arange(-127, 128)).astype(np.float32)  # _POW2[k + 127] = 2^k

    @njit(cache=True, fastmath={"contract"}, inline="always")
    def _exp32(x):
        """e^x for float32 x, vectorisable (see the comment above)."""
        x = min(max(x, np.float32(-87.3)), np.float32(88.0))
        kf = np.floor(x * _LOG2E + np.float32(0.5))
        r = x - kf * _LN2_HI - kf * _LN2_LO
        m = ((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5
        return (m * r * r + r + np.float32(1.0)) * _POW2[np.int32(kf) + 127]

    @njit(cache=True, fastmath={"contract"}, inline="always")
    def _softplus32(x):
        """log(1 + e^x) as F.softplus (x itself above 20): max(x, 0) + log1p(e^-|x|), log1p(y) = 2 atanh(y / (2 + y))
        by its series to s^13 (s <= 1/3: truncation below 1e-8), vectorisable."""
        if x > np.float32(20.0):
            return x
        e = _exp32(-abs(x))
        q = e / (np.float32(2.0) + e)
        q2 = q * q
        p = (((((_L13 * q2 + _L11) * q2 + _L9) * q2 + _L7) * q2 + _L5) * q2 + _L3) * q2 + np.float32(1.0)
        return max(x, np.float32(0.0)) + np.float32(2.0) * q * p

    @njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
    def _dot(a, b, N):
        """sum_n a[n] b[n] in any order (a vectorised reduction: float32 rounding differs from a sequential sum)."""
        y = np.float32(0.0)
        for n in range(N):
            y += a[n] * b[n]
        return y

    @njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
    def _dot_row(a, M, i, j, k, N):
        """sum_n a[n] M[i, j, k, n], as `_dot` (indices instead of a row view: a view per token costs reference
        counting)."""
        y = np.float32(0.0)
        for n in range(N):
            y += a[n] * M[i, j, k, n]
        return y

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _fwd_kernel(u, delta, A, B, C, D, z, bias, softplus, has_z, out, dt, y, last, ckpt, save):
        """u, delta, z, out, dt, y (b, d, L); A (d, N); B, C (bB, G, LB, N) (bB in {1, b}, LB in {1, L}); D, bias (d,);
        last (b, d, N); ckpt (b, d, nc, N). Writes out, last, the step dt = softplus(delta + bias) and, when `save`
        (training), ckpt and the output before the gate y. float32 everywhere.

        Per (batch, channel) row, three passes over its L tokens: dt (vectorised over tokens), the recurrence
        (vectorised over the N states), the gate out = y * silu(z) (vectorised over tokens)."""
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
            dtr, ur, outr = dt[bi, di], u[bi, di], out[bi, di]
            bd = bias[di]
            if softplus:
                for t in range(L):
                    dtr[t] = _softplus32(delta[bi, di, t] + bd)
            else:
                for t in range(L):
                    dtr[t] = delta[bi, di, t] + bd
            st = np.zeros(N, np.float32)
            Ad = A[di].copy()
            Dd = D[di]
            for t in range(L):
                if save and t % _CKPT == 0:
                    for n in range(N):
                        ckpt[bi, di, t // _CKPT, n] = st[n]
                dtt = dtr[t]
                du = dtt * ur[t]
                tB = t if varB else 0
                for n in range(N):
                    st[n] = _exp32(dtt * Ad[n]) * st[n] + du * B[bB, gB, tB, n]
                outr[t] = _dot_row(st, C, bC, gC, t if varC else 0, N) + Dd * ur[t]
            for n in range(N):
                last[bi, di, n] = st[n]
            if has_z:
                zr = z[bi, di]
                if save:
                    yr = y[bi, di]
                    for t in range(L):
                        yr[t] = outr[t]
                for t in range(L):
                    outr[t] = outr[t] * zr[t] / (np.float32(1.0) + _exp32(-zr[t]))

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _bwd_kernel(u, dt, A, B, C, D, ckpt, gout, glast, has_glast, W, gu, gdt, gA_p, gD_p, gB_p, gC_p):
        """Gradients of `_fwd_kernel` for u, dt, A, D, B, C. gu, gdt (b, d, L); per batch element gA_p (b, d, N),
        gD_p (b, d); per work item gB_p, gC_p (b, W, G, LB, N) (summed over b and W by the caller)."""
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
            h = np.empty(N, np.float32)  # the adjoint carried backwards, a_{t+1} h_{t+1}
            hb = np.empty(N, np.float32)
            gda = np.empty(N, np.float32)  # d loss / d(dt_t A_n)
            for di in range(w, nd, W):
                gB = di // (nd // GB)
                gC = di // (nd // GC)
                Ad = A[di].copy()
                Dd = D[di]
                for n in range(N):
                    h[n] = glast[bi, di, n] if has_glast else np.float32(0.0)
                gAd = np.zeros(N, np.float32)
                gDd = np.float32(0.0)
                for c in range(nc - 1, -1, -1):
                    t0 = c * _CKPT
                    t1 = min(L, t0 + _CKPT)
                    for n in range(N):
                        S[0, n] = ckpt[bi, di, c, n]
                    for t in range(t0, t1):  # the chunk's states again
                        k = t - t0
                        dtt = dt[bi, di, t]
                        du = dtt * u[bi, di, t]
                        ak, Sk, Sk1 = a[k], S[k], S[k + 1]
                        Bt = B[bB, gB, t if varB else 0]
                        for n in range(N):
                            ak[n] = _exp32(dtt * Ad[n])
                            Sk1[n] = ak[n] * Sk[n] + du * Bt[n]
                    for t in range(t1 - 1, t0 - 1, -1):  # adjoint, backwards
                        k = t - t0
                        dtt = dt[bi, di, t]
                        ut = u[bi, di, t]
                        go = gout[bi, di, t]
                        gDd += go * ut
                        tB = t if varB else 0
                        tC = t if varC else 0
                        Bt, Ct = B[bB, gB, tB], C[bC, gC, tC]
                        gBt, gCt = gB_p[bi, w, gB, tB], gC_p[bi, w, gC, tC]
                        ak, Sk, Sk1 = a[k], S[k], S[k + 1]
                        dtu = dtt * ut
                        for n in range(N):
                            hn = h[n] + go * Ct[n]
                            hb[n] = hn
                            gCt[n] += go * Sk1[n]
                            gBt[n] += hn * dtu
                            g = hn * Sk[n] * ak[n]
                            gda[n] = g
                            gAd[n] += g * dtt
                            h[n] = ak[n] * hn
                        gdu = _dot(hb, Bt, N)
                        gu[bi, di, t] = go * Dd + gdu * dtt
                        gdt[bi, di, t] = _dot(gda, Ad, N) + gdu * ut
                for n in range(N):
                    gA_p[bi, di, n] = gAd[n]
                gD_p[bi, di] = gDd


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

    The kernels run the linear recurrence only; the element-wise parts around it run in torch, vectorised: the step
    dt = softplus(delta + delta_bias) before (`reference._softplus`), the gate * silu(z) after, and their gradients
    (sigmoid(delta + delta_bias) and silu's) in the backward. Returns (out (b, d, L) in u's dtype, last state
    (b, d, N) float32). Saves the float32 inputs, dt, the pre-gate output (when z is given) and the chunk-entry
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
        out, dt = torch.empty((b, d, L), dtype=f), torch.empty((b, d, L), dtype=f)
        y = torch.empty((b, d, L) if train and z is not None else (1, 1, 1), dtype=f)
        last = torch.empty((b, d, N), dtype=f)
        ckpt = torch.empty((b, d, -(-L // _CKPT), N) if train else (1, 1, 1, 1), dtype=f)
        _run(_fwd_kernel, _np(uf), _np(df), _np(Af), _np(Bf), _np(Cf), _np(Df), _np(zf), _np(bf), bool(delta_softplus),
             z is not None, _np(out), _np(dt), _np(y), _np(last), _np(ckpt), train)
        if train:
            ctx.save_for_backward(uf, dt, Af, Bf, Cf, Df, ckpt, df if delta_softplus else None,
                                  y if z is not None else None, bf)
            ctx.softplus = bool(delta_softplus)
            ctx.like = (u, delta, A, B, C, D, z, delta_bias)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, glast):
        uf, dt, Af, Bf, Cf, Df, ckpt, df, y, bf = ctx.saved_tensors
        u, delta, A, B, C, D, z, delta_bias = ctx.like
        b, d, L = uf.shape
        N = Af.shape[1]
        f = torch.float32
        gz = None
        if gout is None:
            gout = torch.zeros((b, d, L), dtype=f)
        else:
            gout = gout.to(f)
            if z is not None:  # out = y * silu(z)
                zf = z.detach().to(f)
                sig = torch.sigmoid(zf)
                gz = gout * y * sig * (1 + zf * (1 - sig))
                gout = gout * (zf * sig)
            gout = gout.contiguous()
        has_glast = glast is not None
        glast = glast.to(f).contiguous() if has_glast else torch.zeros((1, 1, 1), dtype=f)
        W = max(1, min(d, -(-2 * torch.get_num_threads() // b)))  # work items per batch element
        gu, gdt = torch.empty((b, d, L), dtype=f), torch.empty((b, d, L), dtype=f)
        gA_p, gD_p = torch.empty((b, d, N), dtype=f), torch.empty((b, d), dtype=f)
        gB_p = torch.zeros((b, W, *Bf.shape[1:]), dtype=f)
        gC_p = torch.zeros((b, W, *Cf.shape[1:]), dtype=f)
        _run(_bwd_kernel, _np(uf), _np(dt), _np(Af), _np(Bf), _np(Cf), _np(Df), _np(ckpt), _np(gout), _np(glast),
             has_glast, W, _np(gu), _np(gdt), _np(gA_p), _np(gD_p), _np(gB_p), _np(gC_p))
        if ctx.softplus:  # d softplus(x) / dx = sigmoid(x), x = delta + delta_bias
            gdt = gdt * torch.sigmoid(df + bf[:, None])
        need = ctx.needs_input_grad
        return (gu.to(u.dtype) if need[0] else None, gdt.to(delta.dtype) if need[1] else None,
                gA_p.sum(0).to(A.dtype) if need[2] else None, _bc_grad(gB_p, B) if need[3] else None,
                _bc_grad(gC_p, C) if need[4] else None, gD_p.sum(0).to(D.dtype) if need[5] else None,
                gz.to(z.dtype) if need[6] and gz is not None else None,
                gdt.sum((0, 2)).to(delta_bias.dtype) if need[7] else None, None)


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
