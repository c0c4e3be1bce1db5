"""BatchNorm helpers for second passes through a network (METHODS.md §4.1, FPKDM re-injection).

FPKDM re-runs the student's stages e2..e4 on the perturbed F̃_1 (`TinyMUNet.encode_from(1, F̃_1)`, §4.1 step 2) in
the same training iteration as the clean forward pass. In train mode every BatchNorm of those stages would then
update its running statistics a second time per iteration, from perturbed features, and count the extra batch in
`num_batches_tracked`: the statistics used at inference would no longer be those of the data. `frozen_running_stats`
runs such a pass with the running statistics left exactly as they were.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` with the running statistics of all its BatchNorms left unchanged (bitwise) on exit.

    Inside the context every `torch.nn.modules.batchnorm._BatchNorm` in `module` (BatchNorm1d/2d/3d, SyncBatchNorm,
    `module` itself included; also InstanceNorm with `track_running_stats=True`, which shares the base class
    `_NormBase` and the buffers) behaves as usual: in train mode it normalises with the batch statistics, so outputs and
    gradients are exactly those of a plain train-mode pass (same kernels, same arguments); in eval mode it uses the
    running statistics, whose values are unchanged.

    How: on entry each BatchNorm's `running_mean`, `running_var` and `num_batches_tracked` buffers are replaced by
    clones, which the pass inside may update; on exit (also on an exception) the original tensors are put back and
    the clones dropped. Chosen over setting `momentum = 0` for the pass because
    - the original tensors are never written, so they stay bitwise equal whatever the momentum (also `None`, the
      cumulative average, whose factor 1/num_batches_tracked only ever acts on a clone) and whatever the batch
      gives (0 · inf or 0 · NaN from a degenerate batch would poison a momentum-0 update);
    - no in-place write on the buffers: restoring them with `copy_` would bump their autograd version counters, and
      the clean pass's graph, which saved them, would refuse to backpropagate;
    - no hyperparameter is touched, so nothing depends on how the BatchNorm class reads `momentum`.
    The contexts nest (an inner one swaps and restores the outer one's clones). While inside, `module.state_dict()`
    shows the clones; do not move the module to another device or load a state dict inside the context (the
    originals put back on exit would be the old tensors). BatchNorms without running statistics
    (`track_running_stats=False`) are left alone.

    Args:
        module: any nn.Module, e.g. the student network (`TinyMUNet`).
    Yields:
        `module`.
    Raises:
        ValueError: a lazy BatchNorm whose buffers are not initialised yet (run one plain forward first).
    """
    saved: list[tuple[nn.Module, str, object]] = []
    norms = [m for m in module.modules() if isinstance(m, _NormBase)]
    for m in norms:
        for name in _STAT_BUFFERS:
            buf = m._buffers.get(name)
            if buf is not None and is_lazy(buf):
                raise ValueError(f"frozen_running_stats: {type(m).__name__} has uninitialised (lazy) buffers; run "
                                 "one forward pass outside the context first")
    try:
        for m in norms:
            for name in _STAT_BUFFERS:
                buf = m._buffers.get(name)
                if buf is not None:
                    saved.append((m, name, buf))
                    m._buffers[name] = buf.clone()
        yield module
    finally:
        for m, name, buf in reversed(saved):
            m._buffers[name] = buf
