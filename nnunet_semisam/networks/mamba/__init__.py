"""Mamba (selective state space) block in PyTorch, state-dict compatible with `mamba_ssm.Mamba`; METHODS.md §3.1-3.4.

Laid out by role, as mamba_ssm's package:
- `reference.py`: the sequential recurrence (`selective_scan_sequential`, mamba_ssm's `selective_scan_ref`), shared
  helpers and the FLOP count;
- `chunked.py`: the pure-PyTorch chunked scan with its hand-written backward (`selective_scan_chunked`);
- `cpu_kernel.py`: the compiled CPU kernel, numba (`selective_scan_numba`);
- `dispatch.py`: `selective_scan_fn`, one signature for all backends (mamba_ssm CUDA, numba CPU, pure PyTorch),
  logging once which one runs; `mamba_backend` for the `Mamba` module;
- `module.py`: `Mamba`, `MambaLayer`.

mamba-ssm is an optional extra (`pip install .[cuda]`); numba is a core requirement (see setup.py).
"""
from nnunet_semisam.networks.mamba.chunked import (_BLOCK_ELEMENTS, _GRAD_BLOCK_ELEMENTS, _scan_autograd,
                                                   _scan_blocked_nograd, _scan_tokens_nograd, _SelectiveScanFn,
                                                   selective_scan_chunked)
from nnunet_semisam.networks.mamba.cpu_kernel import numba_available, selective_scan_numba
from nnunet_semisam.networks.mamba.dispatch import (_announce, _mamba_ssm_ops, mamba_backend, scan_backend,
                                                    selective_scan, selective_scan_fn)
from nnunet_semisam.networks.mamba.module import Mamba, MambaLayer, count_parameters
from nnunet_semisam.networks.mamba.reference import (_LOG2_E, _finish, _softplus, selective_scan_flops,
                                                     selective_scan_sequential)

__all__ = [
    "selective_scan",
    "selective_scan_fn",
    "selective_scan_chunked",
    "selective_scan_numba",
    "selective_scan_sequential",
    "selective_scan_flops",
    "mamba_backend",
    "scan_backend",
    "numba_available",
    "Mamba",
    "MambaLayer",
    "count_parameters",
]

# internals re-exported for the tests and benchmarks that used the single-module layout (patch them in their module)
_INTERNALS = (_BLOCK_ELEMENTS, _GRAD_BLOCK_ELEMENTS, _scan_autograd, _scan_blocked_nograd, _scan_tokens_nograd,
              _SelectiveScanFn, _announce, _mamba_ssm_ops, _LOG2_E, _finish, _softplus)
