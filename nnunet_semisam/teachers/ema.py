"""Exponential-moving-average teacher (Mean Teacher; METHODS.md §1.4 "EMA")."""
from __future__ import annotations

import copy

import torch
from torch import nn

from nnunet_semisam.distributed import unwrap


class EMATeacher(nn.Module):
    """A frozen copy of the student updated as `theta' <- a_t theta' + (1 - a_t) theta` after each optimizer step.

    `a_t = min(1 - 1/(t_it + 1), alpha)` ([S4M] `update_ema_variables`), over parameters only; buffers (e.g.
    BatchNorm running statistics) are copied from the student (METHODS.md §1.4 Interpretation). The teacher always
    runs in `eval()` mode and without gradient. With `deep_supervision_off=True` the copy's nnU-Net decoder returns
    only the full-resolution output. `warmup=False` uses the plain decay `a_t = alpha` from the first update (BCP,
    METHODS.md §8.4).
    """

    def __init__(self, student: nn.Module, alpha: float = 0.99, deep_supervision_off: bool = True,
                 warmup: bool = True):
        super().__init__()
        self.alpha = float(alpha)
        self.warmup = bool(warmup)
        self.model = copy.deepcopy(unwrap(student))
        if deep_supervision_off and hasattr(getattr(self.model, "decoder", None), "deep_supervision"):
            self.model.decoder.deep_supervision = False
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        """The teacher stays in eval mode whatever the caller asks."""
        super().train(False)
        self.model.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """EMA step after optimizer step `step` (0-based t_it). Returns the decay a_t used."""
        a = min(1.0 - 1.0 / (step + 1), self.alpha) if self.warmup else self.alpha
        src = unwrap(student)
        teacher_params = list(self.model.parameters())
        # theta' <- a theta' + (1 - a) theta, as one fused pass over all tensors (lerp towards the student)
        torch._foreach_lerp_(teacher_params, [p.detach() for p in src.parameters()], 1.0 - a)
        for t, s in zip(self.model.buffers(), src.buffers()):
            t.copy_(s)
        return a

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        """Teacher prediction (no gradient); for a deep-supervision network, the full-resolution output."""
        out = self.model(x)
        return out[0] if isinstance(out, (list, tuple)) else out
