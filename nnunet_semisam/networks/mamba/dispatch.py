"""One selective-scan entry point for every device (METHODS.md §3.4): `selective_scan_fn`.

Dispatch order, decided per call from the tensor's device and what imports:
1. `mamba_ssm` — its fused CUDA kernel, when `mamba_ssm` imports and u is on CUDA;
2. `numba` — the compiled CPU kernel (`cpu_kernel.py`), when u is on CPU and numba imports (CPU_AUTO_BACKEND,
   "numba"; set it to "pytorch" to make the chunked scan the CPU default);
3. `pytorch` — the pure-PyTorch chunked scan (`chunked.py`), on any other device or when neither applies.
`backend=` (argument) or the environment variable NNUNET_SEMISAM_SCAN_BACKEND (`auto` | `numba` | `pytorch`)
requests one; a requested backend that cannot run here is an error, not a silent switch. Which backend runs is
printed to stderr once per process and backend.
"""
from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace
from typing import Optional

import torch

from nnunet_semisam.networks.mamba import cpu_kernel
from nnunet_semisam.networks.mamba.chunked import selective_scan_chunked

ENV_VAR = "NNUNET_SEMISAM_SCAN_BACKEND"
SCAN_BACKENDS = ("auto", "mamba_ssm", "numba", "pytorch")
# What `auto` runs on CPU: the compiled kernel, since its exp is vectorised. Measured with 1 thread (README): forward
# 28 vs 108 ms for the chunked scan at L = 4,096, forward + backward 141 vs 401 ms; a paper Tiny-MUNet inference
# (256x256) 0.22 vs 0.31 s through the token-major PyTorch path, a training step 1.43 vs 2.40 s.
CPU_AUTO_BACKEND = "numba"


@functools.lru_cache(maxsize=None)
def _mamba_ssm_ops() -> Optional[SimpleNamespace]:
    """mamba_ssm's fused functions, or None when mamba_ssm (a CUDA-only build) does not import here."""
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    except Exception:  # ImportError, or OSError/RuntimeError from a broken CUDA extension
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    return SimpleNamespace(selective_scan_fn=selective_scan_fn, mamba_inner_fn=mamba_inner_fn,
                           causal_conv1d_fn=causal_conv1d_fn)


_WHAT = {
    "mamba_ssm-fused": "mamba_ssm fused kernels (mamba_inner_fn, causal_conv1d)",
    "mamba_ssm-scan": "mamba_ssm selective_scan_fn CUDA kernel (causal_conv1d not installed)",
    "mamba_ssm": "mamba_ssm selective_scan_fn CUDA kernel",
    "numba": "compiled CPU selective scan (numba)",
    "pytorch": "pure-PyTorch chunked selective scan",
    "pure": "pure-PyTorch chunked selective scan (mamba_ssm not importable or tensor not on CUDA)",
}


@functools.lru_cache(maxsize=None)
def _announce(backend: str) -> None:
    """Print once per process and backend which Mamba / scan implementation runs (no silent path switching)."""
    print(f"nnunet_semisam Mamba: using the {_WHAT[backend]}", file=sys.stderr, flush=True)


def _requested(backend: Optional[str]) -> str:
    req = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if req not in SCAN_BACKENDS:
        raise ValueError(f"selective-scan backend {req!r} (argument or {ENV_VAR}) is not one of {SCAN_BACKENDS}")
    return req


def scan_backend(u: torch.Tensor, backend: Optional[str] = None) -> str:
    """Which scan `selective_scan_fn` runs for input `u`: 'mamba_ssm', 'numba' or 'pytorch' (see module docstring)."""
    req = _requested(backend)
    if req == "auto":
        if u.is_cuda and _mamba_ssm_ops() is not None:
            return "mamba_ssm"
        if u.device.type == "cpu" and CPU_AUTO_BACKEND == "numba" and cpu_kernel.numba_available():
            return "numba"
        return "pytorch"
    if req == "mamba_ssm" and not (u.is_cuda and _mamba_ssm_ops() is not None):
        raise RuntimeError(f"scan backend 'mamba_ssm' requested but mamba_ssm does not import or u is on {u.device}")
    if req == "numba" and not (u.device.type == "cpu" and cpu_kernel.numba_available()):
        raise RuntimeError(f"scan backend 'numba' requested but numba does not import "
                           f"({cpu_kernel.NUMBA_IMPORT_ERROR}) or u is on {u.device}")
    return req


def mamba_backend(x: torch.Tensor, use_fast_path: bool = True) -> str:
    """Which implementation `Mamba.forward` uses for input `x`: 'mamba_ssm-fused', 'mamba_ssm-scan', 'numba' or
    'pure' (the pure-PyTorch scan). `use_fast_path=False` turns off mamba_ssm's kernels, as in mamba_ssm."""
    req = _requested(None)
    if x.is_cuda and use_fast_path and req in ("auto", "mamba_ssm"):
        ops = _mamba_ssm_ops()
        if ops is not None:
            return "mamba_ssm-fused" if ops.causal_conv1d_fn is not None else "mamba_ssm-scan"
    if (x.device.type == "cpu" and (req == "numba" or (req == "auto" and CPU_AUTO_BACKEND == "numba"))
            and cpu_kernel.numba_available()):
        return "numba"
    if req == "numba" and x.device.type == "cpu":
        scan_backend(x, "numba")  # raises with the reason
    return "pure"


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                      delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                      return_last_state: bool = False, backend: Optional[str] = None):
    """Selective scan with mamba_ssm's `selective_scan_fn` signature on the best backend for u's device.

    Shapes: u, delta, z (b, d, L); A (d, N); B, C (d, N) | (b, N, L) | (b, G, N, L); D, delta_bias (d,); returns
    out (b, d, L) in u's dtype (and the last state (b, d, N) if `return_last_state`). Differentiable in all inputs
    on every backend. `backend` ('auto', 'mamba_ssm', 'numba', 'pytorch') overrides NNUNET_SEMISAM_SCAN_BACKEND.
    """
    which = scan_backend(u, backend)
    _announce(which)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if which == "mamba_ssm":
        return _mamba_ssm_ops().selective_scan_fn(*args)
    if which == "numba":
        return cpu_kernel.selective_scan_numba(*args)
    return selective_scan_chunked(*args)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """`selective_scan_fn` with the automatic backend (kept for the existing import path)."""
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
