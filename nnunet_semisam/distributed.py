"""Distributed training (PyTorch DDP) for nnU-Net trainers, on GPUs and on CPUs (METHODS.md §1.6).

nnU-Net runs DDP through `nnUNetv2_train -num_gpus N` (one process per GPU on one machine, NCCL). Three things in
its trainer stand between that and this plugin's needs:

- the device is always `cuda:<global rank>`, which is wrong on every node but the first of a multi-node job and
  impossible on a CPU machine (gloo);
- the network is wrapped as `DDP(network, device_ids=[global rank])`, again a CUDA-only call, and with
  `find_unused_parameters=False`, which fails for networks with heads a method does not train (nnU-Net's own
  decoders always build every deep-supervision head);
- it knows only `self.network`: extra trainable modules of a method (projectors, a second network, heads) would get
  no gradient synchronisation, and their random initialisation differs from rank to rank.

`DistributedTrainerMixin` fixes the first two for any `nnUNetTrainer` subclass without copying nnU-Net's code:
the device becomes `cuda:$LOCAL_RANK` (torchrun's variable; the global rank where it is unset, i.e. nnU-Net's own
single-node launcher) or the requested non-CUDA device, and `initialize` runs nnU-Net's `initialize` with the DDP
wrap deferred, then wraps with `wrap_ddp`. The plugin's base trainer (`trainers/semi_supervised.py`) adds the third:
gradients of every stepped parameter outside `self.network` are all-reduced (`all_reduce_gradients`) and every extra
module is broadcast from rank 0 before the first step (`broadcast_module`). `nnunet-semisam train` applies the mixin
to nnU-Net's own trainers too (`with_distributed_fixes`).

The helpers below are no-ops in a single process, so code calls them unconditionally.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

#: environment variable: minutes a collective may wait (long rank-sharded pseudo-label refreshes); default 360
TIMEOUT_ENV = "nnUNet_semisam_ddp_timeout_min"


def is_distributed() -> bool:
    """True inside an initialised process group (DDP)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def process_group_timeout() -> timedelta:
    """Timeout of collectives: `$nnUNet_semisam_ddp_timeout_min` minutes (default 6 h), so that ranks waiting while
    the others finish a pseudo-label refresh do not abort."""
    return timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, 360)))


def local_device(requested: torch.device) -> torch.device:
    """The device of this process: for CUDA `cuda:$LOCAL_RANK` (torchrun; the global rank when unset, as under
    nnU-Net's single-node `mp.spawn`), otherwise the requested device (CPU with the gloo backend)."""
    if requested.type != "cuda":
        return torch.device(requested.type)
    index = int(os.environ.get("LOCAL_RANK", rank()))
    return torch.device("cuda", index)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and torch.compile wrappers (what owns the methods)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    return getattr(module, "_orig_mod", module)


def per_rank_share(global_size: int, ranks: int | None = None, my_rank: int | None = None) -> int:
    """This rank's part of a global batch of `global_size`, split as nnU-Net splits its labeled batch (the first
    `global_size % ranks` ranks take one more)."""
    ranks = world_size() if ranks is None else ranks
    my_rank = rank() if my_rank is None else my_rank
    if global_size < ranks:
        from nnunet_semisam.errors import SemiSAMError

        raise SemiSAMError(f"a global batch of {global_size} cannot be split over {ranks} processes: use fewer "
                           "processes or a larger batch")
    return global_size // ranks + (1 if my_rank < global_size % ranks else 0)


def rank_seeds(base_seed: int, count: int) -> list[int]:
    """`count` independent 32-bit seeds for this rank, from one base seed shared by all ranks (numpy SeedSequence:
    every (rank, index) gets its own stream, so ranks never draw the same sequence)."""
    children = np.random.SeedSequence(base_seed).spawn(world_size())[rank()].spawn(count)
    return [int(c.generate_state(1)[0]) for c in children]


def shared_random_seed() -> int:
    """A random 31-bit seed drawn on rank 0 and broadcast, so every rank derives its streams from the same base."""
    seed = [int(np.random.SeedSequence().generate_state(1)[0] >> 1)]
    if is_distributed():
        dist.broadcast_object_list(seed, src=0)
    return seed[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of `module` with rank `src`'s values, in place (the optimizer keeps its
    references)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `parameters` over all ranks (as DDP does for its module), in one flat buffer per
    dtype and device. Parameters without a gradient are skipped alike on every rank (their set is the same: the
    same code runs on each)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    n = world_size()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def state_digest(module: nn.Module) -> str:
    """sha1 over the bytes of every tensor of `module`'s state dict, in key order: equal digests on two ranks mean
    bitwise-identical modules."""
    h = hashlib.sha1()
    for key, value in unwrap(module).state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DistributedTrainerMixin:
    """DDP on any device and across nodes for an `nnUNetTrainer` subclass (module docstring).

    Mix in before nnU-Net's class (`class T(DistributedTrainerMixin, nnUNetTrainer)`). Single-process runs are
    unchanged. `ddp_find_unused_parameters` (default False, nnU-Net's) is passed to DDP; the plugin's trainers set
    it True because their networks keep heads or branches that a phase does not train.
    """

    ddp_find_unused_parameters = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            self.device = local_device(device)
            if self.device.type != "cuda":
                self.grad_scaler = None  # nnU-Net made a CUDA grad scaler for its cuda:<rank> device
            self.print_to_log_file(f"DDP: rank {rank()} of {world_size()} on {self.device} "
                                   f"(backend {dist.get_backend()})", also_print_to_console=True)

    def initialize(self):
        """nnU-Net's `initialize` with its DDP wrap deferred (it is CUDA-only), then `wrap_ddp`, the per-rank batch
        split and the loss built for DDP (nnU-Net's batch Dice gathers its statistics over ranks)."""
        if not self.is_ddp or self.was_initialized:
            return super().initialize()
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        self.network = self.wrap_ddp(self.network)
        self.loss = self._build_loss()

    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """`module` as a DistributedDataParallel of this process' device (SyncBatchNorm on CUDA, as nnU-Net does;
        gloo has no SyncBatchNorm, so on CPU BatchNorm statistics stay per rank); unchanged outside DDP."""
        if not self.is_ddp:
            return module
        if self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index],
                                                       find_unused_parameters=self.ddp_find_unused_parameters)
        return nn.parallel.DistributedDataParallel(module, find_unused_parameters=self.ddp_find_unused_parameters)


def with_distributed_fixes(trainer_class: type) -> type:
    """`trainer_class` itself if it already has the fixes, else a subclass of the same name with
    `DistributedTrainerMixin` first (the name is what nnU-Net writes into checkpoints and looks up at prediction,
    so `nnUNetv2_predict` finds the original class)."""
    if issubclass(trainer_class, DistributedTrainerMixin):
        return trainer_class
    return type(trainer_class.__name__, (DistributedTrainerMixin, trainer_class),
                {"__module__": trainer_class.__module__, "__qualname__": trainer_class.__qualname__})


def shard_of(items: Sequence, my_rank: int | None = None, ranks: int | None = None) -> list:
    """`items[rank::world_size]`: this rank's share of a job done by all ranks."""
    ranks = world_size() if ranks is None else ranks
    my_rank = rank() if my_rank is None else my_rank
    return list(items)[my_rank::ranks]
