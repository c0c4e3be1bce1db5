"""Reference selective scan: the sequential recurrence of mamba_ssm's `selective_scan_ref` (METHODS.md §3.1).

One Python step per token; the yardstick the chunked scan and the compiled CPU kernel are tested against. Also the
small helpers every backend shares (`_finish`: the D and z terms; `_softplus`) and the analytic FLOP count.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_LOG2_E = 1.4426950408889634  # log2(e)


def _finish(y: torch.Tensor, u: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
            dtype: torch.dtype) -> torch.Tensor:
    """`(y + u*D) * silu(z)` cast to the input dtype, as in selective_scan_ref."""
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """`log(1 + exp(x))` as `max(x, 0) + log2(1 + 2^(-|x| log2 e)) ln 2`: the same values as `F.softplus` to ~5e-7
    absolute (its threshold-20 linear branch included), about 4x faster on CPU, where F.softplus and log1p are not
    vectorised (~12 ns per element). Differentiable (gradient sigmoid(x), except at exactly x = 0)."""
    e = torch.exp2(x.abs() * -_LOG2_E)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.log2(e + 1) * (1 / _LOG2_E) + x.clamp_min(0)
    return torch.log2(e.add_(1)).mul_(1 / _LOG2_E).add_(x.clamp_min(0))


def selective_scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                              delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                              return_last_state: bool = False):
    """Reference selective scan, one step per token: `s_l = exp(delta_l A) s_{l-1} + delta_l B_l u_l`, `y_l = C_l s_l`.

    Line-by-line transcription of mamba_ssm's `selective_scan_ref` (METHODS.md §3.1, backend (b)) for real A,
    including its per-step einsum. Shapes: u, delta, z (b, d, L); A (d, N); B, C (d, N) | (b, N, L) | (b, G, N, L);
    D, delta_bias (d,). Computed in float32, returned in u's dtype, shape (b, d, L) (plus the last state (b, d, N) if
    `return_last_state`). Differentiable in all inputs. Slow (L Python steps): the yardstick for the chunked scan.
    """
    if A.is_complex():
        raise NotImplementedError("complex A (S4D-Lin) is not supported; use a real A")
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    A = A.float()
    B = B.float()
    C = C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 2:
        delta_B_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        delta_B_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    for i in range(u.shape[2]):
        x = delta_A[:, :, i] * x + delta_B_u[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    out = _finish(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (out, x) if return_last_state else out



def selective_scan_flops(batch: int, length: int, d_inner: int, d_state: int, with_D: bool = True,
                         with_z: bool = True) -> int:
    """Floating-point operations of one selective scan: `9*b*L*d*N (+ b*d*L for D) (+ b*d*L for z)`.

    The count fvcore-based Mamba papers use (VMamba's `flops_selective_scan_fn`): discretisation exp(delta A) and
    delta B u, the multiply-add recurrence and the C readout. `torch.utils.flop_counter` sees none of it (the pure
    scan has no matmul), so complexity reports add it analytically; MACs = FLOPs / 2.
    """
    flops = 9 * batch * length * d_inner * d_state
    if with_D:
        flops += batch * d_inner * length
    if with_z:
        flops += batch * d_inner * length
    return flops
