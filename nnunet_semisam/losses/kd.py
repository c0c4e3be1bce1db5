"""Output and feature-response distillation losses of the MedSAM -> Tiny-MUNet method ([KD], METHODS.md §4.1, §4.3).

- `kd_loss`: L_KD, the voxel-wise KL divergence from the teacher's foreground probability to the student's two-class
  distribution (§4.3), averaged over the samples that carry a pseudo-label.
- `response_distillation_loss`: L_RD of [KD] Eq. (1)-(2), one minus the cosine similarity between the teacher's and the
  student's perturbation responses, per layer and sample (§4.1 step 4). The responses come from
  `nnunet_semisam.losses.fpkdm.fpkdm_responses`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

CLAMP = 1e-8  # q̂ is clamped here inside the log, so that 0·log 0 = 0 (METHODS.md §4.3)


def _two_class_log_probs(student_logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p̂_0, log p̂_1) with p = softmax(z/τ), p̂ = (p_0, 1 − p_0), each (B, 1, *sp), in float32.

    1 − p_0 = Σ_{k≥1} p_k, so log p̂_1 = logsumexp_{k≥1}(z_k/τ) − logsumexp_k(z_k/τ): exact, finite for finite
    logits, and with the full gradient even where p̂ < 1e-8 (a clamp there would stop it).
    """
    z = student_logits.float() / tau
    lse_all = torch.logsumexp(z, dim=1, keepdim=True)
    log_p0 = z[:, :1] - lse_all
    log_p1 = torch.logsumexp(z[:, 1:], dim=1, keepdim=True) - lse_all
    return log_p0, log_p1


def kd_loss(student_logits: torch.Tensor, teacher_prob: torch.Tensor, weight: torch.Tensor | None = None,
            tau: float = 1.0) -> torch.Tensor:
    """L_KD = τ² · KL(q̂ ‖ p̂) per voxel, weighted mean over voxels per sample, mean over labelled samples (§4.3).

    [KD] Eq. (6) "L_KD" ("KL-based"); METHODS.md §4.3 fixes the form. Per sample b:
    `τ² · Σ_v w_v Σ_{c∈{0,1}} q̂_c log(q̂_c / p̂_c) / Σ_v w_v`, then the mean over the samples with `Σ_v w_v > 0`.
    q̂ = (1 − q, q) for τ = 1, else q̂_1 = sigmoid(logit(q)/τ); q̂ is clamped at 1e-8 inside the log (0·log 0 = 0).
    p = softmax(z/τ) over the K classes and p̂ = (p_0, 1 − p_0) (background vs any foreground; K = 2 gives (p_0, p_1)).

    Args:
        student_logits: (B, K, *spatial) student logits, K >= 2; receives the gradient.
        teacher_prob: (B, 1, *spatial) teacher foreground probability q in [0, 1]; detached here.
        weight: (B, 1, *spatial) float in [0, 1] or bool, the voxels where a pseudo-label exists; None = all voxels.
        tau: temperature τ > 0.
    Returns:
        Scalar (float32). A differentiable zero (`student_logits.sum() * 0`) when no sample has any weight.
    """
    if student_logits.ndim < 3 or student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must be (B, K>=2, *spatial), got {tuple(student_logits.shape)}")
    expected = (student_logits.shape[0], 1, *student_logits.shape[2:])
    if tuple(teacher_prob.shape) != expected:
        raise ValueError(f"teacher_prob must be (B, 1, *spatial) = {expected}, got {tuple(teacher_prob.shape)}")
    if weight is not None and tuple(weight.shape) != expected:
        raise ValueError(f"weight must be (B, 1, *spatial) = {expected}, got {tuple(weight.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    q = teacher_prob.detach().float().clamp(0.0, 1.0)
    if tau != 1.0:
        q = torch.sigmoid(torch.logit(q) / tau)  # logit(0) = -inf -> 0, logit(1) = +inf -> 1
    q_hat = (1.0 - q, q)
    log_p_hat = _two_class_log_probs(student_logits, tau)
    kl = sum(qc * (torch.log(qc.clamp_min(CLAMP)) - lpc) for qc, lpc in zip(q_hat, log_p_hat))  # (B, 1, *sp)

    w = torch.ones_like(kl) if weight is None else weight.detach().to(device=kl.device, dtype=kl.dtype)
    w_sum = w.flatten(1).sum(1)  # (B,)
    has = w_sum > 0
    if not bool(has.any()):
        return student_logits.sum() * 0
    per_sample = (w * kl).flatten(1).sum(1)[has] / w_sum[has]
    return tau ** 2 * per_sample.mean()


def response_distillation_loss(teacher_deltas: Sequence[torch.Tensor], student_deltas: Sequence[torch.Tensor],
                               eps: float = 1e-8) -> torch.Tensor:
    """L_RD of [KD] Eq. (1)-(2) (METHODS.md §4.1 step 4): mean_l mean_b [1 − cos(vec ΔF^t_l[b], vec ΔF^s_l[b])].

    Args:
        teacher_deltas: per layer (layers 2..L in FPKDM) the projected teacher response ΔF^t_l, (B, C_l, *spatial_l).
        student_deltas: the matching student responses ΔF^s_l, same shapes.
        eps: `torch.nn.functional.cosine_similarity`'s eps.
    Returns:
        Scalar (float32) in [0, 2]. Gradient flows into both lists (the teacher side carries the projector's
        weights; the teacher network itself is never in the graph, see `fpkdm_responses`).
    Raises:
        ValueError: empty lists, different numbers of layers, or a pair of different shapes.
    """
    if len(teacher_deltas) == 0 or len(student_deltas) == 0:
        raise ValueError("response_distillation_loss needs at least one layer of responses, got an empty list")
    if len(teacher_deltas) != len(student_deltas):
        raise ValueError(f"{len(teacher_deltas)} teacher layers but {len(student_deltas)} student layers")
    per_layer = []
    for i, (t, s) in enumerate(zip(teacher_deltas, student_deltas)):
        if t.shape != s.shape or t.ndim < 2:
            raise ValueError(f"layer {i}: teacher response {tuple(t.shape)} and student response {tuple(s.shape)} "
                             "must have the same (B, C, *spatial) shape")
        cos = F.cosine_similarity(t.float().flatten(1), s.float().flatten(1), dim=1, eps=eps)  # (B,)
        per_layer.append((1.0 - cos).mean())
    return torch.stack(per_layer).mean()
