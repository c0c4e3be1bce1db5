"""FPKDM: feature-perturbation cross-architecture distillation, MedSAM (ViT) -> Tiny-MUNet (Mamba) ([KD] §1.2,
METHODS.md §4.1).

- `GroupedLinearProjection`: teacher channels -> student channels, one FC layer per 4x4 block of grid positions
  (§4.1 "Projection" step 2).
- `FeatureProjector`: the projections P_1..P_L (one per student level), the pooling of teacher taps onto the student
  grids (step 1) and an inverted dropout with explicit masks (step 3), so that two projections can share one mask.
  The teacher width may differ per level (LiteMedSAM's TinyViT taps: 128, 160, 320, 320; METHODS.md §2.8).
- `fpkdm_responses`: one perturbation, seen in both spaces (§4.1 "Perturbation and re-injection" steps 1-3); the
  clean and the perturbed teacher taps 2..L come from one re-injection function, so σ = 0 gives zero responses
  whatever the teacher's precision. Its output goes to `nnunet_semisam.losses.kd.response_distillation_loss`
  (step 4).

Levels are 0-based here (`projector.levels[0]` is P_1 for F_1); `TinyMUNet.encode_from` counts from 1.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GroupedLinearProjection(nn.Module):
    """Per-block linear map over channels: 16 positions of each 4x4 block share one FC layer (METHODS.md §4.1).

    `P(T)[b, :, pos] = T[b, :, pos] · W[g(pos)] + bias[g(pos)]` with g(pos) the row-major index of the block holding
    `pos` (`g = (y // block) * ceil(w / block) + x // block`).

    Args:
        in_dim: teacher channels D (768 for MedSAM ViT-B).
        out_dim: student channels C_l.
        grid: (h_l, w_l), the student grid; fixes the number of groups G = ceil(h/block) · ceil(w/block), so the
            parameters exist at construction (the optimizer sees them).
        block: block side (4).
    Parameters: `weight` (G, in_dim, out_dim), `bias` (G, out_dim), both U(±in_dim^-1/2) like nn.Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], block: int = 4) -> None:
        super().__init__()
        if len(grid) != 2 or min(grid) < 1 or block < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1 and block >= 1, got grid={grid}, block={block}")
        self.in_dim, self.out_dim, self.block = int(in_dim), int(out_dim), int(block)
        self.grid = (int(grid[0]), int(grid[1]))
        self.groups_hw = (math.ceil(self.grid[0] / block), math.ceil(self.grid[1] / block))
        n_groups = self.groups_hw[0] * self.groups_hw[1]
        self.weight = nn.Parameter(torch.empty(n_groups, self.in_dim, self.out_dim))
        self.bias = nn.Parameter(torch.empty(n_groups, self.out_dim))
        self.reset_parameters()

    @property
    def n_groups(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        bound = self.in_dim ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, t: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """(B, in_dim, h, w) channels-first on the student grid -> (B, out_dim, h, w).

        Replicate-pads the bottom/right edges to a multiple of `block`, unfolds into blocks, applies each block's
        FC layer (`einsum('bgpc,gcd->bgpd')`), folds back and crops. `bias=False` gives the linear part P^lin.
        Gradient flows into `t` and the parameters.
        """
        B, C, h, w = t.shape
        if C != self.in_dim or (h, w) != self.grid:
            raise ValueError(f"GroupedLinearProjection expects (B, {self.in_dim}, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(t.shape)}")
        k = self.block
        gh, gw = self.groups_hw
        hp, wp = gh * k, gw * k
        if (hp, wp) != (h, w):
            t = F.pad(t, (0, wp - w, 0, hp - h), mode="replicate")
        t = t.to(self.weight.dtype)
        blocks = t.reshape(B, C, gh, k, gw, k).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, k * k, C)
        out = torch.einsum("bgpc,gcd->bgpd", blocks, self.weight)
        if bias:
            out = out + self.bias[None, :, None, :]
        out = out.reshape(B, gh, gw, k, k, self.out_dim).permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_dim, hp, wp)
        return out[:, :, :h, :w]

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, grid={self.grid}, block={self.block}, " \
               f"groups={self.n_groups}"


class FeatureProjector(nn.Module):
    """P_1..P_L of METHODS.md §4.1: pool each teacher tap onto its student grid, grouped projection, dropout.

    Args:
        teacher_dim: the teacher's tap widths: one int D for all levels (MedSAM ViT-B: 768), or one width per level
            (LiteMedSAM's TinyViT stages, METHODS.md §2.8: 128, 160, 320, 320). Level l's projection maps
            `teacher_dims[l]` channels; the state-dict keys (`levels.{l}.weight` / `.bias`) are the same either way.
        student_channels: C_l per level (paper: 64, 96, 128, 192).
        student_grids: (h_l, w_l) per level (paper at 256² input: 64², 32², 16², 8²).
        block: grouped-projection block side (4: 16 positions share one FC layer).
        dropout: p of the inverted dropout (0.1, an Interpretation; [KD] gives no rate).
    The dropout masks are explicit (`dropout_mask`) so that the clean and the perturbed projection of one level use
    the same mask (§4.1 steps 2-3); masks are all ones in `eval()` mode. Levels are 0-based.
    Attributes: `teacher_dims` (tuple, one width per level); `teacher_dim` (the int when all widths are equal, else
    None).
    """

    def __init__(self, teacher_dim: int | Sequence[int], student_channels: Sequence[int],
                 student_grids: Sequence[tuple[int, int]], block: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if len(student_channels) != len(student_grids) or len(student_channels) == 0:
            raise ValueError(f"need one grid per student level: {len(student_channels)} channel counts, "
                             f"{len(student_grids)} grids")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = len(student_channels)
        if isinstance(teacher_dim, (int, np.integer)):
            dims = (int(teacher_dim),) * n
        else:
            dims = tuple(int(d) for d in teacher_dim)
            if len(dims) != n:
                raise ValueError(f"teacher_dim must be an int or one width per level ({n}), got {list(dims)}")
        if min(dims) < 1:
            raise ValueError(f"teacher widths must be >= 1, got {list(dims)}")
        self.teacher_dims = dims
        self.teacher_dim = dims[0] if len(set(dims)) == 1 else None
        self.p = float(dropout)
        self.levels = nn.ModuleList(GroupedLinearProjection(d, c, tuple(g), block)
                                    for d, c, g in zip(dims, student_channels, student_grids))

    def pool(self, tokens: torch.Tensor, level: int) -> torch.Tensor:
        """Teacher tap (B, h_t, w_t, D) channels-last -> (B, D, h_l, w_l) on level `level`'s student grid.

        Average pooling by (h_t/h_l, w_t/w_l) when both divide exactly, else bilinear resize (align_corners=False).
        """
        h, w = self.levels[level].grid
        x = tokens.permute(0, 3, 1, 2)
        ht, wt = x.shape[-2:]
        if (ht, wt) == (h, w):
            return x
        if ht % h == 0 and wt % w == 0:
            return F.avg_pool2d(x, kernel_size=(ht // h, wt // w))
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)

    def dropout_mask(self, shape: Sequence[int], device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Inverted-dropout mask of `shape` (keep / (1 − p), values in {0, 1/(1−p)}), or ones in eval mode / p = 0."""
        if not self.training or self.p == 0.0:
            return torch.ones(tuple(shape), device=device)
        keep = torch.rand(tuple(shape), generator=generator, device=device) >= self.p
        return keep.float() / (1.0 - self.p)

    def project(self, tokens: torch.Tensor, level: int, mask: torch.Tensor | None, bias: bool = True) -> torch.Tensor:
        """`mask * P_level(pool(tokens, level))`: (B, h_t, w_t, D) -> (B, C_l, h_l, w_l); mask None = no dropout.

        `bias=False` gives `mask * P^lin_level(...)`, the part that acts on differences (the bias cancels).
        """
        out = self.levels[level](self.pool(tokens, level), bias=bias)
        return out if mask is None else out * mask


def _per_sample_std(x: torch.Tensor) -> torch.Tensor:
    """std over all elements of each sample (unbiased, as torch.std), shaped (B, 1, ..., 1) for broadcasting."""
    return x.float().flatten(1).std(dim=1).view(-1, *([1] * (x.ndim - 1)))


def fpkdm_responses(
    teacher_t1: torch.Tensor | Sequence[torch.Tensor],
    reinject_teacher: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    student_features: Sequence[torch.Tensor],
    reinject_student: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    projector: FeatureProjector,
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher and student responses to one shared perturbation of layer 1 (METHODS.md §4.1 steps 1-3, [KD] §1.2).

    1. ε_t ~ N(0, 1) of T_1's shape; T̃_1 = T_1 + σ·std(T_1)·ε_t (std per sample over all elements, detached).
       The clean and the perturbed later taps come from the SAME function, under no_grad, clean first:
       [T_2..T_L] = reinject_teacher(T_1), [T̃_2..T̃_L] = reinject_teacher(T̃_1). A clean T_l from the teacher's own
       forward pass would differ from the re-injection path by its rounding (bf16 autocast on CUDA), and that
       path-mismatch noise would be part of the "response" even at σ = 0; with one path, σ = 0 gives exactly 0.
    2. ε_s = mask_1 · P_1^lin(pool(σ·std(T_1)·ε_t)), rescaled per sample to std σ·std(sg(F_1)) (direction from the
       teacher, magnitude set); F̃_1 = F_1 + ε_s; [F̃_2..F̃_L] = reinject_student(F̃_1).
    3. For l = 2..L: ΔF^s_l = F̃_l − F_l and ΔF^t_l = mask_l · P_l^lin(pool(T̃_l − T_l)), one dropout mask per level
       (drawn from `projector.dropout_mask`, so ones in eval mode). Layer 1 is left out: its two responses are equal
       by construction.

    Args:
        teacher_t1: T_1 (B, h_t, w_t, D_1) channels-last, detached here (e.g. `TeacherFeatures.first_tap`). For
            backward compatibility a list of taps [T_1..T_L] is accepted too; only T_1 is used (the clean T_2..T_L
            are recomputed through `reinject_teacher`) and its length must equal the number of student levels.
        reinject_teacher: T_1 (clean or perturbed) -> [T_2..T_L], each (B, h_l', w_l', D_l) channels-last, e.g.
            `TeacherFeatures.reinject` or `lambda t: teacher.forward_blocks(t, start=teacher.tap_blocks[0] + 1)`
            (MedSAMTeacher). Called twice per call here; it must be deterministic for σ = 0 to give 0.
        student_features: [F_1..F_L], each (B, C_l, h_l, w_l), in the student's graph; L = their number.
        reinject_student: F̃_1 -> [F̃_2..F̃_L], e.g. `lambda f: net.encode_from(1, f)`; in train mode wrap it in
            `nnunet_semisam.networks.batchnorm.frozen_running_stats(net)` so that this second pass leaves the
            BatchNorm running statistics alone.
        projector: the FeatureProjector with at least L levels matching the student grids and the tap widths.
        sigma: σ (`fpkdm_sigma`).
        generator: optional torch.Generator (on the taps' device) for ε_t and the dropout masks.
    Returns:
        (teacher_deltas, student_deltas): two lists of L − 1 tensors (B, C_l, h_l, w_l), for l = 2..L (teacher side in
        float32 outside autocast, student side in the student's dtype). Gradient flows into the student (through F_l
        and F̃_l) and into the projector weights (W_1 via ε_s, W_l via ΔF^t_l); the biases cancel and get none;
        nothing flows into the teacher.
    Raises:
        ValueError: a tap list whose length differs from the student levels, L < 2, too few projector levels, or
            re-injection outputs of the wrong number.
    """
    L = len(student_features)
    if isinstance(teacher_t1, torch.Tensor):
        t1 = teacher_t1.detach()
    else:
        taps = list(teacher_t1)
        if len(taps) != L:
            raise ValueError(f"{len(taps)} teacher taps but {L} student features: the levels must pair up")
        if not taps:
            raise ValueError("FPKDM needs at least 2 levels (responses are measured on layers 2..L), got 0")
        t1 = taps[0].detach()
    if L < 2:
        raise ValueError(f"FPKDM needs at least 2 levels (responses are measured on layers 2..L), got {L}")
    if len(projector.levels) < L:
        raise ValueError(f"the projector has {len(projector.levels)} levels, fewer than the {L} feature levels")

    eps_t = torch.randn(t1.shape, generator=generator, device=t1.device, dtype=torch.float32)
    noise_t = sigma * _per_sample_std(t1) * eps_t  # σ·std(T_1)·ε_t, float32
    with torch.no_grad():
        t_clean = [t.detach() for t in reinject_teacher(t1)]
        t_tilde = [t.detach() for t in reinject_teacher((t1.float() + noise_t).to(t1.dtype))]
    for name, out in (("clean", t_clean), ("perturbed", t_tilde)):
        if len(out) != L - 1:
            raise ValueError(f"reinject_teacher returned {len(out)} taps for the {name} T_1, expected L - 1 = {L - 1}")

    masks = [projector.dropout_mask(f.shape, f.device, generator) for f in student_features]

    f1 = student_features[0]
    direction = projector.project(noise_t, 0, masks[0], bias=False)  # (B, C_1, h_1, w_1), float32
    scale = sigma * _per_sample_std(f1.detach()) / _per_sample_std(direction).clamp_min(1e-12)
    eps_s = (direction * scale).to(f1.dtype)
    f_tilde = list(reinject_student(f1 + eps_s))
    if len(f_tilde) != L - 1:
        raise ValueError(f"reinject_student returned {len(f_tilde)} features, expected L - 1 = {L - 1}")

    teacher_deltas, student_deltas = [], []
    for lvl in range(1, L):
        teacher_deltas.append(projector.project(t_tilde[lvl - 1].float() - t_clean[lvl - 1].float(), lvl, masks[lvl],
                                                bias=False))
        student_deltas.append(f_tilde[lvl - 1] - student_features[lvl])
    return teacher_deltas, student_deltas
