"""Consistency losses between a student and a teacher prediction (METHODS.md §1.4, §8.1)."""
from __future__ import annotations

import torch


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean Teacher consistency `mean_{v,c} (softmax(z_s) - softmax(z_t))^2` ([S4M] `softmax_mse_loss` + mean).

    Args:
        student_logits: (B, K, *spatial) logits of the student; receives the gradient.
        teacher_logits: (B, K, *spatial) logits of the teacher; detached here (stop-gradient on the target side).
    Returns:
        Scalar: mean over batch, classes and voxels (all K class channels, background included).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    p_s = torch.softmax(student_logits.float(), dim=1)
    p_t = torch.softmax(teacher_logits.detach().float(), dim=1)
    return torch.mean((p_s - p_t) ** 2)


def gaussian_input_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """Input noise for EMA teachers ([S4M], METHODS.md §1.4): `x + clip(N(0, std^2), -clip, clip)`."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)
