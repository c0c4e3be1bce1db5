"""Mamba block and multi-direction Mamba layer, state-dict compatible with `mamba_ssm.Mamba` (METHODS.md §3.1, §3.2).

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Algorithm 2. The selective
scan runs on the backend `dispatch.mamba_backend` picks: mamba_ssm's fused CUDA kernels, the compiled CPU kernel
(numba), or the pure-PyTorch chunked scan.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.networks.mamba import cpu_kernel
from nnunet_semisam.networks.mamba.chunked import _scan_tokens_nograd, selective_scan_chunked
from nnunet_semisam.networks.mamba.dispatch import _announce, _mamba_ssm_ops, mamba_backend
from nnunet_semisam.networks.mamba.reference import _LOG2_E, _softplus, selective_scan_flops


def _causal_taps(xp: torch.Tensor, taps: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Causal depthwise convolution as shifted multiply-adds: `sum_k taps[k] * xp[k : k + L]` along `dim`, for `xp`
    left-padded there by len(taps) - 1 (taps broadcast against the slices; in place when autograd is off). Faster
    than nn.Conv1d on CPU (2.2 vs 4.2 ms on a (2, 128, 4096) input with 1 thread)."""
    L = xp.shape[dim] - len(taps) + 1
    out = xp.narrow(dim, 0, L) * taps[0]
    for k in range(1, len(taps)):
        if torch.is_grad_enabled():
            out = torch.addcmul(out, xp.narrow(dim, k, L), taps[k])
        else:
            out.addcmul_(xp.narrow(dim, k, L), taps[k])
    return out


class Mamba(nn.Module):
    """Mamba block (B, L, D) -> (B, L, D) with mamba_ssm's parameter names, shapes and initialisation.

    METHODS.md §3.1. Constructor arguments are those of `mamba_ssm.Mamba` (mamba_simple.py): `d_model` = D, `d_state`
    = N, `d_conv` (causal depthwise conv width), `expand` (E = expand*D), `dt_rank` ("auto" = ceil(D/16)), the
    dt initialisation range `dt_min`/`dt_max`/`dt_init`/`dt_scale`/`dt_init_floor`, `conv_bias`, `bias` (in/out
    projections), `use_fast_path` (allow mamba_ssm's fused kernels on CUDA), `layer_idx`, `device`, `dtype`.
    State dict: A_log (E, N), D (E,), in_proj.weight (2E, D), conv1d.weight (E, 1, d_conv), conv1d.bias (E,),
    x_proj.weight (r + 2N, E), dt_proj.weight (E, r), dt_proj.bias (E,), out_proj.weight (D, E), so checkpoints move
    between this class and mamba_ssm.Mamba with `load_state_dict(strict=True)`. Incremental decoding (`step`,
    inference_params) is not implemented. In training, the CPU scans (numba kernel, pure-PyTorch `_SelectiveScanFn`)
    store their inputs and the chunk-entry states and recompute the (B, E, L, N) states in the backward pass, as
    mamba_ssm's kernel does. The pure-PyTorch inference path is token-major (`_bidirectional_tokens_nograd`); the
    numba kernel runs both directions as one batch through `_mix`, in training and inference.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: Optional[int] = None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt projection init preserving variance; bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real init, kept in float32, no weight decay
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); the non-fused path of mamba_ssm (METHODS.md §3.1 steps 1-5) or its fused kernel."""
        backend = mamba_backend(hidden_states, self.use_fast_path)
        _announce(backend)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
        if backend == "mamba_ssm-fused":
            return _mamba_ssm_ops().mamba_inner_fn(
                xz.contiguous(), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()), None, None,
                self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = xz.chunk(2, dim=1)
        return self.out_proj(self._mix(x, z, backend).transpose(1, 2))

    def forward_bidirectional(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(M(h) + flip(M(flip(h)))) / 2` for h (B, L, D): forward and reversed scan with shared weights.

        in_proj and out_proj act per token, so on the non-fused paths they run once (in_proj(flip(h)) =
        flip(in_proj(h)); the two out_proj terms are summed before the projection): the same result as two `forward`
        calls with about half the projection MACs. The fused path runs `forward` on the batch [h; flip(h)].
        """
        backend = mamba_backend(hidden_states, self.use_fast_path)
        b = hidden_states.shape[0]
        if backend == "mamba_ssm-fused":
            both = self.forward(torch.cat([hidden_states, hidden_states.flip(1)], dim=0))
            return 0.5 * (both[:b] + both[b:].flip(1))
        _announce(backend)
        # no-grad inference on the pure-PyTorch backend: its token-major path (the numba kernel, where it runs, is
        # faster still: 0.22 vs 0.31 s per 256x256 image with 1 thread, METHODS.md §3.4)
        if backend == "pure" and not (torch.is_grad_enabled() and (
                hidden_states.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return self._bidirectional_tokens_nograd(hidden_states)
        # in_proj straight into the channel-major (B, 2E, L) layout the scan reads (as mamba_ssm computes it): the
        # concatenations below then copy contiguous rows instead of gathering a transposed view
        xz = torch.bmm(self.in_proj.weight.expand(b, -1, -1), hidden_states.transpose(1, 2))
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)  # (B, E, L)
        y = self._mix(torch.cat([x, x.flip(-1)], dim=0), torch.cat([z, z.flip(-1)], dim=0), backend)  # (2B, E, L)
        y = 0.5 * (y[:b] + y[b:].flip(-1))
        return self.out_proj(y.transpose(1, 2))

    def _bidirectional_tokens_nograd(self, h: torch.Tensor) -> torch.Tensor:
        """`forward_bidirectional` without autograd, token-major (B, L, .) from in_proj to out_proj: no transposes.

        Both directions run as one batch [h; flip(h)]: causal depthwise conv as d_conv shifted multiply-adds on a
        left-padded (2B, L + d_conv - 1, E) buffer, x_proj/dt_proj as matmuls on contiguous rows, then
        `_scan_tokens_nograd`; same arithmetic as the autograd path up to float rounding.
        """
        b, L, _ = h.shape
        E, N, r, K = self.d_inner, self.d_state, self.dt_rank, self.d_conv
        xz = self.in_proj(h)  # (B, L, 2E)
        xp = xz.new_zeros((2 * b, L + K - 1, E))
        xp[:b, K - 1:] = xz[..., :E]
        xp[b:, K - 1:] = xz[..., :E].flip(1)
        x = _causal_taps(xp, list(self.conv1d.weight[:, 0, :].t()), dim=1)  # taps (E,) each
        if self.conv1d.bias is not None:
            x.add_(self.conv1d.bias)
        x = F.silu(x, inplace=True)  # (2B, L, E)
        x_dbl = F.linear(x, self.x_proj.weight)  # (2B, L, r + 2N)
        delta = _softplus(torch.addmm(self.dt_proj.bias.float(), x_dbl[..., :r].reshape(-1, r),
                                       self.dt_proj.weight.t()).reshape(2 * b, L, E))
        A2 = (-torch.exp(self.A_log.float()) * _LOG2_E).t().contiguous()  # (N, E)
        y = _scan_tokens_nograd(delta, delta * x, A2, x_dbl[..., r:r + N], x_dbl[..., r + N:])
        y.addcmul_(x, self.D.float())
        z = xz[..., E:]
        y[:b].mul_(F.silu(z))
        y[b:].mul_(F.silu(z.flip(1)))
        y = torch.add(y[:b], y[b:].flip(1), alpha=1.0).mul_(0.5)
        return self.out_proj(y.to(h.dtype))

    def _mix(self, x: torch.Tensor, z: torch.Tensor, backend: str) -> torch.Tensor:
        """Steps 2-4 after in_proj: causal conv, x_proj, dt_proj, selective scan; x, z (B, E, L) -> y (B, E, L)."""
        w = self.conv1d.weight[:, 0, :]  # (E, K)
        xc = _causal_taps(F.pad(x, (self.d_conv - 1, 0)), [w[:, k:k + 1] for k in range(self.d_conv)], dim=-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias[:, None]
        x = F.silu(xc)
        n = x.shape[0]  # x_proj and dt_proj channel-major, as mamba_ssm: no transposed copies
        x_dbl = torch.bmm(self.x_proj.weight.expand(n, -1, -1), x)  # (B, r + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)  # B, C: (B, N, L)
        dt = torch.bmm(self.dt_proj.weight.expand(n, -1, -1), dt)  # (B, E, L); bias added inside the scan
        args = (x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z, self.dt_proj.bias.float(), True)
        if backend == "mamba_ssm-scan":
            return _mamba_ssm_ops().selective_scan_fn(*args[:3], B.contiguous(), C.contiguous(), *args[5:])
        if backend == "numba":
            return cpu_kernel.selective_scan_numba(*args)
        return selective_scan_chunked(*args)


class MambaLayer(nn.Module):
    """Residual multi-direction Mamba over the flattened spatial tokens of a (B, C, *spatial) map.

    METHODS.md §3.2 (`MambaLayer2D`), for 2D and 3D alike: tokens `t = flatten(x)^T` (B, L, C) in row-major order
    (index = y*W + x in 2D, z*H*W + y*W + x in 3D), `n = LayerNorm(t)`, `y = (M(n) + flip(M(flip(n)))) / 2` with one
    shared `Mamba` M (`Mamba.forward_bidirectional`: both scans run as one batch of 2B), output `x + reshape(y)`.
    In 3D this is the same bidirectional scan of the flattened volume (not tri-directional). Runs in float32 with
    autocast disabled (as U-Mamba), result cast back to x's dtype. Parameters: 6C^2 + 4Cr + 112C with r = ceil(C/16).
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C, *spatial)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            tokens = self.norm(xf.flatten(2).transpose(1, 2))  # (B, L, C)
            y = self.mamba.forward_bidirectional(tokens)
            out = xf + y.transpose(1, 2).reshape(xf.shape)
        return out.to(x.dtype)

    def scan_flops(self, batch: int, num_tokens: int) -> int:
        """Selective-scan FLOPs of one forward (both directions) for `batch` maps of `num_tokens` tokens."""
        return selective_scan_flops(2 * batch, num_tokens, self.mamba.d_inner, self.mamba.d_state)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
