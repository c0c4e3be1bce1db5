"""Pure-PyTorch chunked selective scan with a hand-written backward (METHODS.md §3.1, backend (c)).

`selective_scan_chunked` has the signature of mamba_ssm's `selective_scan_ref`: the recurrence as a blockwise
parallel scan (step by step inside chunks of about sqrt(L) tokens, vectorised over all chunks; the per-chunk carries
by the same scheme, recursively), so the number of Python steps is about 2 sqrt(L) instead of L. Decays are
multiplied, never divided, so long sequences underflow to 0 instead of overflowing. Runs on any device; on CPU the
compiled kernel (`cpu_kernel.py`) is faster and is what the dispatcher picks when numba imports.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nnunet_semisam.networks.mamba.reference import _LOG2_E, _finish, _softplus


def _linear_recurrence(a: torch.Tensor, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """All states of `s_t = a_t * s_{t-1} + x_t`, `s_{-1} = 0`, along dim -2 of (M, L, N) tensors; blockwise.

    Used for the per-chunk carries of `selective_scan_chunked` (L = number of chunks). Inside each chunk of
    `chunk_size` steps the recurrence runs step by step, vectorised over all chunks, together with the running decay
    product `P_t = a_t ... a_{t0}`; the state entering each chunk obeys the same recurrence over chunks (decay
    `P_end`, input `s_end`), solved by recursion; then `s_t = s_local_t + P_t * carry`. Steps are taken with
    `unbind` (one stacked gradient in backward, see `_scan_steps`).
    """
    M, L, N = x.shape
    if L <= chunk_size:
        xs, As = x.unbind(1), a.unbind(1)
        s = xs[0]
        states = [s]
        for t in range(1, L):
            s = torch.addcmul(xs[t], As[t], s)
            states.append(s)
        return torch.stack(states, dim=1)
    n_chunks = -(-L // chunk_size)
    pad = n_chunks * chunk_size - L
    if pad:  # identity steps at the end: decay 1, input 0
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad), value=0.0)
    xs = x.reshape(M, n_chunks, chunk_size, N).unbind(2)
    As = a.reshape(M, n_chunks, chunk_size, N).unbind(2)
    s, p = xs[0], As[0]
    local, decay = [s], [p]
    for t in range(1, chunk_size):
        s = torch.addcmul(xs[t], As[t], s)
        p = p * As[t]
        local.append(s)
        decay.append(p)
    ends = _linear_recurrence(decay[-1], local[-1], chunk_size)  # true state at the end of each chunk
    carry = F.pad(ends[:, :-1], (0, 0, 1, 0))  # state entering each chunk
    states = torch.stack(local, dim=2) + torch.stack(decay, dim=2) * carry[:, :, None]
    return states.reshape(M, n_chunks * chunk_size, N)[:, :L]


def _steps_first(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(b, k, L) -> (T, b, k, n_chunks), zero-padded to whole chunks: step t of every chunk is one contiguous slab."""
    b, k, L = t.shape
    n_chunks = -(-L // chunk_size)
    if n_chunks * chunk_size != L:
        t = F.pad(t, (0, n_chunks * chunk_size - L))
    return t.reshape(b, k, n_chunks, chunk_size).permute(3, 0, 1, 2).contiguous()


def _bc_steps_first(M: torch.Tensor, dim: int, chunk_size: int) -> torch.Tensor:
    """B or C (d, N) | (b, N, L) | (b, G, N, L) as a tensor broadcastable to (T, b, d, N, n_chunks)."""
    M = M.float()
    if M.dim() == 2:
        return M[None, None, :, :, None]
    if M.dim() == 3:
        return _steps_first(M, chunk_size).unsqueeze(2)
    if M.dim() == 4:
        if dim % M.shape[1]:
            raise ValueError(f"grouped B/C with {M.shape[1]} groups does not divide d = {dim}")
        b, g, n, L = M.shape
        M = _steps_first(M.reshape(b, g * n, L), chunk_size).reshape(chunk_size, b, g, n, -1)
        return M.repeat_interleave(dim // g, dim=2)
    raise ValueError(f"B/C must have 2, 3 or 4 dims (d N | b N L | b G N L), got shape {tuple(M.shape)}")


def _auto_chunk_size(L: int) -> int:
    """About sqrt(L), a power of two in [8, 128]: few Python steps, slabs small enough to stay in cache."""
    return int(min(128, max(8, 2 ** round(math.log2(max(L, 1)) / 2))))


def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                           delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                           return_last_state: bool = False, chunk_size: Optional[int] = None):
    """Selective scan as a blockwise parallel scan in pure PyTorch (METHODS.md §3.1, backend (c)).

    Same signature, shapes, float32 computation and result as `selective_scan_sequential` / mamba_ssm's
    `selective_scan_ref` (u, delta, z (b, d, L); A (d, N); B, C (d, N) | (b, N, L) | (b, G, N, L); D, delta_bias
    (d,); out (b, d, L), last state (b, d, N)). Autograd flows to every input.

    The sequence is cut into chunks of `chunk_size` tokens (default: about sqrt(L), 8..128), laid out step-major so
    that step t of all chunks is one contiguous (b, d, N, n_chunks) slab. Pass 1 runs the recurrence from a zero
    state inside every chunk at once (`chunk_size` vectorised steps) and keeps only the chunk-end states; the chunk
    decay is `exp(A * sum(delta))`. The states entering each chunk follow the same recurrence over chunks
    (`_linear_recurrence`, recursive). Pass 2 re-runs the steps from those states and reads `y_t = C_t . s_t` on the
    fly, so the (b, d, L, N) states are never stored. Without autograd the steps work in place on three slab
    buffers. Decays are multiplied, never divided: long sequences (L = 65,536) underflow towards 0 and cannot
    overflow. With autograd and input-dependent B, C (b, N, L) — Mamba's case — the scan is `_SelectiveScanFn`:
    that in-place forward, saving its inputs and the chunk carries, and a hand-written backward (the adjoint
    recurrence by the same chunked scheme); other B/C layouts differentiate the out-of-place steps with autograd.
    """
    if A.is_complex():
        raise NotImplementedError("complex A (S4D-Lin) is not supported by the pure-PyTorch scan; use a real A")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (u, delta, A, B, C, D, z, delta_bias))):
        return _scan_blocked_nograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    chunk_size)
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = _softplus(delta)
    # input-dependent B, C (Mamba's case): the hand-written backward; other layouts: autograd through the steps
    scan = _SelectiveScanFn.apply if B.dim() == 3 and C.dim() == 3 else _scan_autograd
    y, last = scan(delta, u, A.float(), B.float(), C.float(), chunk_size)
    out = _finish(y, u, D, z, dtype_in)
    return (out, last) if return_last_state else out


def _scan_autograd(delta, u, A, B, C, chunk_size):
    """y (b, d, L) and last state (b, d, N) of the chunked scan with out-of-place steps, differentiated by autograd
    (`_scan_steps`; stores two (b, d, N, L) tensors). delta already biased and softplus'd; any B/C layout."""
    b, d, L = u.shape
    T = max(1, min(chunk_size or _auto_chunk_size(L), L))
    A2 = (A * _LOG2_E)[None, :, :, None]  # exp(delta A) = exp2(delta A log2(e)); exp2 is ~5x faster on CPU
    delta_s = _steps_first(delta, T).unsqueeze(-2)  # (T, b, d, 1, nc)
    du_s = _steps_first(delta * u, T).unsqueeze(-2)
    B_s = _bc_steps_first(B, d, T)  # broadcastable to (T, b, d, N, nc)
    C_s = _bc_steps_first(C, d, T)
    chunk_decay = torch.exp2(delta_s.sum(0) * A2)  # (b, d, N, nc)
    y, last = _scan_steps(delta_s, du_s, A2, B_s, C_s, chunk_decay)
    return y.reshape(b, d, -1)[..., :L], last


def _over_chunks(decay: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`s_c = decay_c * s_{c-1} + x_c` (s_{-1} = 0) along the last (chunk) axis of (b, d, N, nc) tensors."""
    b, d, N, nc = x.shape
    s = _linear_recurrence(decay.transpose(-1, -2).reshape(b * d, nc, N), x.transpose(-1, -2).reshape(b * d, nc, N),
                           32)
    return s.reshape(b, d, nc, N).transpose(-1, -2)


def _carry_in(chunk_decay: torch.Tensor, ends_local: torch.Tensor) -> torch.Tensor:
    """State entering each chunk (b, d, N, nc) from the zero-start chunk-end states, by the recurrence over chunks."""
    return F.pad(_over_chunks(chunk_decay, ends_local)[..., :-1], (1, 0))


def _from_steps(t: torch.Tensor, L: int) -> torch.Tensor:
    """Inverse of `_steps_first`: (T, b, k, n_chunks) -> (b, k, L)."""
    T, b, k, nc = t.shape
    return t.permute(1, 2, 3, 0).reshape(b, k, nc * T)[..., :L]


_GRAD_BLOCK_ELEMENTS = 1 << 20  # floats per (T, b, channels, N, n_chunks) buffer of the backward (three of them)


class _SelectiveScanFn(torch.autograd.Function):
    """`y_t = C_t . s_t`, `s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t` for delta (already biased and softplus'd),
    u (b, d, L), A (d, N), B, C (b, N, L), all float32; returns (y (b, d, L), last state (b, d, N)).

    Forward: the in-place chunked scan without autograd (`_scan_blocked_nograd`); it saves its inputs and the state
    entering each chunk (1/T of the states), like mamba_ssm's kernel (autograd through `_scan_steps` stores two
    (b, d, N, L) tensors per scan). Backward, one block of channels at a time (three buffers of at most
    _GRAD_BLOCK_ELEMENTS floats): the decays a_t and inputs x_t of every step as whole-block ops, the states again
    from the saved chunk carries (one pass), then the adjoint
    `h_t = gy_t C_t + a_{t+1} h_{t+1}` (plus the last state's gradient at the end) by the mirrored scheme — steps
    backwards inside every chunk from zero, the adjoint entering each chunk from its successor by the recurrence
    over chunks in reverse (`g_c = a_{c+1,0} h^loc_{c+1,0} + decay_{c+1} g_{c+1}`), the steps again from there —
    and the gradients as whole-block reductions (Gu & Dao 2023, the backward of Algorithm 2):
    `gB_t = sum_d h_t delta_t u_t`, `g(delta u)_t = sum_n h_t B_t`, `gC_t = sum_d gy_t s_t`,
    `g(delta_t A) = h_t s_{t-1} a_t`, hence `g delta_t += sum_n g(delta_t A) A`, `gA = sum_{b,t} g(delta_t A) delta_t`.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk_size):
        ctx.set_materialize_grads(False)
        b, d, L = u.shape
        T = max(1, min(chunk_size or _auto_chunk_size(L), L))
        carries = u.new_empty((b, d, A.shape[1], -(-L // T)), dtype=torch.float32)  # 1/T of the states
        y, last = _scan_blocked_nograd(u, delta, A, B, C, None, None, None, False, True, T, carries)
        ctx.save_for_backward(delta, u, A, B, C, carries)
        ctx.chunk_size = T
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, glast):
        delta, u, A, B, C, carries = (t.float() for t in ctx.saved_tensors)
        b, d, L = u.shape
        N = A.shape[1]
        if gy is None:
            gy = u.new_zeros((b, d, L))
        T = ctx.chunk_size
        nc = -(-L // T)
        B_s, C_s = _steps_first(B, T), _steps_first(C, T)  # (T, b, N, nc)
        gB_s, gC_s = torch.zeros_like(B_s), torch.zeros_like(C_s)
        gdelta, gu, gA = torch.empty_like(u), torch.empty_like(u), torch.empty_like(A)
        db = max(1, min(d, _GRAD_BLOCK_ELEMENTS // (T * b * N * nc)))
        for d0 in range(0, d, db):
            d1 = min(d, d0 + db)
            dl_s = _steps_first(delta[:, d0:d1], T)  # (T, b, n, nc)
            u_s = _steps_first(u[:, d0:d1], T)
            du_s = dl_s * u_s
            gy_s = _steps_first(gy[:, d0:d1], T)
            Ab = A[d0:d1]
            A2b = (Ab * _LOG2_E)[:, :, None]  # exp(delta A) = exp2(delta A log2(e))
            a = torch.exp2(dl_s.unsqueeze(3) * A2b)  # (T, b, n, N, nc): a_t = exp(delta_t A)
            x = du_s.unsqueeze(3) * B_s.unsqueeze(2)  # x_t = delta_t u_t B_t
            chunk_decay = torch.exp2(dl_s.sum(0).unsqueeze(2) * A2b)  # (b, n, N, nc)
            S = x.new_empty((T + 1, *x.shape[1:]))  # S[t + 1] = s_t, S[0] = state entering the chunk (forward's)
            S[0] = carries[:, d0:d1]
            for t in range(T):  # the states again, from the forward's chunk carries
                torch.addcmul(x[t], a[t], S[t], out=S[t + 1])
            H = torch.mul(gy_s.unsqueeze(3), C_s.unsqueeze(2), out=x)  # gy_t C_t, then the adjoint h_t in place
            hl = H[T - 1].clone()
            for t in range(T - 2, -1, -1):  # adjoint at each chunk's first step, from zero after the chunk
                torch.addcmul(H[t], a[t + 1], hl, out=hl)
            # adjoint reaching each chunk's last step from later chunks, g_c (g of the last chunk: d loss / d last)
            e = (a[0] * hl).flip(-1)  # a_{c,0} h^loc_{c,0}, chunks reversed
            first = glast[:, d0:d1].float().unsqueeze(-1) if glast is not None else e.new_zeros((*e.shape[:3], 1))
            g = _over_chunks(F.pad(chunk_decay.flip(-1)[..., :-1], (1, 0)), torch.cat([first, e[..., :-1]], -1))
            H[T - 1] += g.flip(-1)
            for t in range(T - 2, -1, -1):  # exact adjoint
                torch.addcmul(H[t], a[t + 1], H[t + 1], out=H[t])
            gC_s += (S[1:] * gy_s.unsqueeze(3)).sum(2)
            gB_s += (H * du_s.unsqueeze(3)).sum(2)
            gdu_s = (H * B_s.unsqueeze(2)).sum(3)
            gda = a.mul_(H).mul_(S[:-1])  # g(delta_t A) = h_t s_{t-1} a_t, in the decays' buffer
            gdelta[:, d0:d1] = _from_steps((gda * Ab[:, :, None]).sum(3) + gdu_s * u_s, L)
            gu[:, d0:d1] = _from_steps(gdu_s * dl_s, L)
            gA[d0:d1] = (gda * dl_s.unsqueeze(3)).sum((0, 1, 4))
        need = ctx.needs_input_grad
        return (gdelta if need[0] else None, gu if need[1] else None, gA if need[2] else None,
                _from_steps(gB_s, L) if need[3] else None, _from_steps(gC_s, L) if need[4] else None, None)


def _scan_steps(delta_s, du_s, A2, B_s, C_s, chunk_decay):
    """Both passes with out-of-place ops (autograd). Returns y (b, d, nc, T) and the last state (b, d, N).

    The step-major inputs are split with `unbind` once: its backward stacks the T step gradients in one op, where
    indexing `x[t]` in the loop would make autograd build and sum T zero-padded full-size gradients (O(T^2) work).
    Decays and inputs of each step are computed once and reused by pass 2.
    """
    T = delta_s.shape[0]
    deltas, dus = delta_s.unbind(0), du_s.unbind(0)
    Bs = B_s.unbind(0) if B_s.shape[0] > 1 else [B_s[0]] * T
    Cs = C_s.unbind(0) if C_s.shape[0] > 1 else [C_s[0]] * T
    decays = [torch.exp2(deltas[t] * A2) for t in range(T)]  # exp(delta_t A), each (b, d, N, nc)
    inputs = [dus[t] * Bs[t] for t in range(T)]  # delta_t B_t u_t
    s = inputs[0]
    for t in range(1, T):  # pass 1: chunk-end states from a zero start
        s = torch.addcmul(inputs[t], decays[t], s)
    s = _carry_in(chunk_decay, s)
    ys = []
    for t in range(T):  # pass 2: exact states, read out on the fly
        s = torch.addcmul(inputs[t], decays[t], s)
        ys.append((s * Cs[t]).sum(-2))
    return torch.stack(ys, dim=-1), s[..., -1]


# Without autograd the scan runs in place on a few preallocated slabs. Every op of the step loops costs a few us of
# Python/dispatch overhead, and on CPU each elementwise pass is bound by the cache level its operands live in, so
# the work is cut into blocks whose slabs stay in L2 (about _SLAB_ELEMENTS floats) with whole-block temporaries of
# at most _BLOCK_ELEMENTS floats (large temporaries are also page-faulted afresh on every allocation).
_SLAB_ELEMENTS = 1 << 16
_BLOCK_ELEMENTS = 1 << 20


def _nograd_chunk_size(L: int, rows: int, d_state: int) -> int:
    """Chunk length for the no-grad scans: about sqrt(L) (8..128), longer while the per-step slab exceeds L2."""
    T = _auto_chunk_size(L)
    while T < 512 and T < L and rows * d_state * (-(-L // T)) > 4 * _SLAB_ELEMENTS:
        T *= 2
    return max(1, min(T, L))


def _scan_blocked_nograd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size,
                         carries: Optional[torch.Tensor] = None):
    """`selective_scan_chunked` without autograd: the same two passes, in place, one block of channels at a time.

    The scan is independent per channel d, so channels are processed in blocks of `db` such that a block's
    (b, db, L) temporaries hold at most _BLOCK_ELEMENTS floats; inside a block the recurrence runs step-major as in
    `_scan_steps` on three (b, db, N, n_chunks) slabs, y being written straight into a (b, db, n_chunks, T) buffer.
    `carries` (b, d, N, n_chunks), if given, receives the state entering every chunk (for `_SelectiveScanFn`).
    """
    b, d, L = u.shape
    N = A.shape[1]
    T = chunk_size or _nograd_chunk_size(L, b * min(d, max(1, _BLOCK_ELEMENTS // (b * L))), N)
    T = max(1, min(T, L))
    nc = -(-L // T)
    db = max(1, min(d, _BLOCK_ELEMENTS // (b * nc * T)))
    A2 = A.float() * _LOG2_E
    B_s, C_s = (_bc_steps_first(M, d, T) for M in (B, C))  # broadcastable to (T, b, d, N, nc)
    out = torch.empty((b, d, L), dtype=u.dtype, device=u.device)
    last = u.new_empty((b, d, N), dtype=torch.float32) if return_last_state else None
    bufs = None
    for d0 in range(0, d, db):
        d1 = min(d, d0 + db)
        dl = delta[:, d0:d1].float()
        if delta_bias is not None:
            dl = dl + delta_bias[d0:d1, None].float()
        if delta_softplus:
            dl = _softplus(dl)
        ub = u[:, d0:d1].float()
        delta_s = _steps_first(dl, T).unsqueeze(-2)  # (T, b, n, 1, nc)
        du_s = _steps_first(dl * ub, T).unsqueeze(-2)
        A2b = A2[d0:d1, :, None]
        Bb = B_s if B_s.shape[2] == 1 else B_s[:, :, d0:d1]
        Cb = C_s if C_s.shape[2] == 1 else C_s[:, :, d0:d1]
        shape = (b, d1 - d0, N, nc)
        if bufs is None or bufs[0].shape != shape:
            bufs = [dl.new_empty(shape) for _ in range(3)] + [dl.new_empty((b, d1 - d0, nc, T))]
        a, x, st, y = bufs
        st.zero_()

        def step(t: int) -> None:
            torch.mul(delta_s[t], A2b, out=a).exp2_()
            torch.mul(du_s[t], Bb[min(t, Bb.shape[0] - 1)], out=x)
            torch.addcmul(x, st, a, out=st)

        for t in range(T):  # pass 1: chunk-end states from a zero start
            step(t)
        st.copy_(_carry_in(torch.exp2(delta_s.sum(0) * A2b), st))
        if carries is not None:
            carries[:, d0:d1] = st
        for t in range(T):  # pass 2: exact states, read out on the fly
            step(t)
            torch.sum(torch.mul(st, Cb[min(t, Cb.shape[0] - 1)], out=x), dim=-2, out=y[..., t])
        if last is not None:
            last[:, d0:d1] = st[..., -1]
        yb = y.reshape(b, d1 - d0, nc * T)[..., :L]
        if D is not None:
            yb = torch.addcmul(yb, ub, D[d0:d1, None].float())
        if z is not None:
            yb = yb * F.silu(z[:, d0:d1].float())
        out[:, d0:d1] = yb
    return (out, last) if return_last_state else out


def _scan_tokens_nograd(delta: torch.Tensor, du: torch.Tensor, A2: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        chunk_size: Optional[int] = None) -> torch.Tensor:
    """y = C . s of the selective scan in token-major layout, without autograd (used by `Mamba` for inference).

    delta (already biased and softplus'd), du = delta * u: (b, L, d); A2 = A^T * log2(e): (N, d); B, C: (b, L, N)
    (any strides). Returns y (b, L, d) without the D and z terms. The same two chunked passes as
    `selective_scan_chunked`, with (b, n_chunks, N, d) slabs: step t of every chunk is a strided view of the
    token-major inputs, so nothing is transposed, and d is the contiguous (vectorised) axis.
    """
    b, L, d = delta.shape
    N = A2.shape[0]
    T = chunk_size or _nograd_chunk_size(L, b * d, N)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:  # identity steps: decay 1, input 0
        delta, du = F.pad(delta, (0, 0, 0, pad)), F.pad(du, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    dl, dus = delta.reshape(b, nc, T, d), du.reshape(b, nc, T, d)
    Bs, Cs = B.reshape(b, nc, T, N), C.reshape(b, nc, T, N)
    a, x, st = (delta.new_empty((b, nc, N, d)) for _ in range(3))
    st.zero_()
    y = delta.new_empty((b, nc, T, d))

    def step(t: int) -> None:
        torch.mul(dl[:, :, t, None, :], A2, out=a).exp2_()
        torch.mul(Bs[:, :, t, :, None], dus[:, :, t, None, :], out=x)
        torch.addcmul(x, st, a, out=st)

    for t in range(T):
        step(t)
    decay = torch.exp2(dl.sum(2)[:, :, None, :] * A2)  # (b, nc, N, d)
    carry = _linear_recurrence(decay.reshape(b, nc, N * d), st.reshape(b, nc, N * d), 32)
    st[:, 1:] = carry[:, :-1].reshape(b, nc - 1, N, d)
    st[:, 0] = 0
    for t in range(T):
        step(t)
        torch.sum(torch.mul(st, Cs[:, :, t, :, None], out=x), dim=-2, out=y[:, :, t])
    return y.reshape(b, nc * T, d)[:, :L]
