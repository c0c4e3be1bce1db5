"""M&N losses (METHODS.md §7.3).

- `L_l = CE(z, y) + D_vnet(softmax z, onehot y)`, weights 1 and 1.
- `L_u = KL(P || softmax z) + D_vnet(softmax z, P)`, P the other model's softmax (soft, T = 1, no grad). The KL is
  target -> prediction, `sum_c P_c (log P_c - log p_c)` summed over classes and averaged over voxels (P_c = 0 adds 0).
- `L_c = b_l/(b_l+b_u) L_l + b_u/(b_l+b_u) L_u` (Eq. 5 literally), each term on its own sub-batch; a term whose count
  is 0 is dropped (`combined_weights`). The official code instead concatenates both sub-batches into one Dice and one
  `KLDivLoss(reduction='mean')` (which also divides by K); that is not what this module does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_semisam.losses.primitives import dice_vnet, one_hot


def mn_labeled_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_l: cross-entropy (mean over voxels) + D_vnet of the softmax against the one-hot labels (n, 1, ...)."""
    spatial = logits.ndim - 2
    lab = labels[:, 0] if labels.ndim == logits.ndim else labels
    ce = F.cross_entropy(logits, lab.long())
    return ce + dice_vnet(torch.softmax(logits, 1), one_hot(lab, logits.shape[1], spatial))


def kl_target_to_prediction(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || softmax z) = sum_c P_c (log P_c - log p_c), summed over classes, mean over voxels."""
    log_p = torch.log_softmax(logits, 1)
    per_voxel = (torch.xlogy(target_probs, target_probs) - target_probs * log_p).sum(1)
    return per_voxel.mean()


def mn_unlabeled_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """L_u: KL(P || softmax z) + D_vnet(softmax z, P); `target_probs` is detached here."""
    target_probs = target_probs.detach()
    return kl_target_to_prediction(target_probs, logits) + dice_vnet(torch.softmax(logits, 1), target_probs)


def combined_weights(b_l: int, b_u: int) -> tuple[float, float]:
    """Eq. 5's weights (b_l/(b_l+b_u), b_u/(b_l+b_u)); (0, 0) for an empty batch."""
    total = b_l + b_u
    return (b_l / total, b_u / total) if total else (0.0, 0.0)
