"""M&N's two-stage co-training schedule and learning-rate-guided (LRG) sampling (METHODS.md §7.4).

Time is counted in *M&N epochs* of `epoch_iterations` optimizer steps (8 in [MN]), derived from the global iteration
`t_it`, so the whole schedule (stage, learner, each model's own epoch counter, learning rates, b_u) is a pure function
of `t_it` and resumes exactly from a checkpoint.

- Stage 1 (M&N epochs `[0, E1)`): both models learn on labeled data every iteration. Per model, linear warm-up from
  0.01 eta0 to eta0 over `[0, W)`, then cosine from eta0 to 0 over `[W, E1)`. b_u = 0.
- Stage 2 (`[E1, E)`): epochs alternate, f first (g in eval makes the pseudo-masks), then g. A model's own stage-2
  epoch counter advances only on its epochs; its LR restarts at eta0 and anneals by cosine to eta_final = 0 over its
  own stage-2 epochs.
- LRG (Eq. 10-11): at the start of the learner's epoch, `b_u = floor((eta0 - eta)/(eta0 - eta_final) * B)`,
  `b_l = B - b_u`, from the learner's own current LR. With the cosine schedule that is `floor(B (1 - cos(pi tau))/2)`
  with tau the learner's elapsed fraction of stage 2 (the official code's linear `floor(tau B)` is not used). A
  1e-9 tolerance absorbs floating-point error at exact integers.
- [MN]'s proportions: 500 stage-1 epochs of which 50 warm-up, then 3500 epochs per model in stage 2 (7500 in all);
  `stage_lengths` scales them to a run of any length. Pseudo-masks of g are refreshed when stage 2 starts and at
  the per-model stage-2 epochs 500, 1000, 1500 and 2500 of 3500 ([MN]: epochs 1000, 1500, 2000, 3000).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MN_STAGE1, MN_WARMUP, MN_STAGE2_PER_MODEL = 500, 50, 3500
#: fractions of stage 2 (per model) at which g's pseudo-masks are recomputed
REFRESH_FRACTIONS = (0.0, 500 / 3500, 1000 / 3500, 1500 / 3500, 2500 / 3500)


@dataclass(frozen=True)
class StageLengths:
    epoch_iterations: int
    stage1: int  # E1, M&N epochs of stage 1
    warmup: int  # W <= E1
    stage2_f: int  # f's own stage-2 epochs
    stage2_g: int  # g's own stage-2 epochs

    @property
    def total_epochs(self) -> int:
        return self.stage1 + self.stage2_f + self.stage2_g


def stage_lengths(total_iterations: int, epoch_iterations: int = 8) -> StageLengths:
    """[MN]'s stages scaled to `total_iterations`: E = T_it // epoch_iterations M&N epochs, E1 = max(1, round(E/15)),
    W = round(E/150) (may be 0), stage 2 = E - E1 epochs split f, g, f, g, ... (f gets the odd one)."""
    epochs = total_iterations // epoch_iterations
    if epochs < 3:
        raise ValueError(f"M&N needs at least 3 M&N epochs ({3 * epoch_iterations} iterations of "
                         f"{epoch_iterations}), got {total_iterations} iterations")
    total_ref = MN_STAGE1 + 2 * MN_STAGE2_PER_MODEL
    e1 = max(1, round(epochs * MN_STAGE1 / total_ref))
    warm = min(e1 - 1, round(epochs * MN_WARMUP / total_ref)) if e1 > 1 else 0
    s2 = epochs - e1
    return StageLengths(epoch_iterations, e1, warm, (s2 + 1) // 2, s2 // 2)


@dataclass(frozen=True)
class Position:
    """Where iteration t_it is in the schedule."""
    mn_epoch: int
    stage: int  # 1 or 2
    learner: str  # "both" (stage 1), "f" or "g"
    epoch_f: int  # f's own epoch index within the current stage (stage 1: = mn_epoch)
    epoch_g: int
    first_iteration_of_epoch: bool

    def as_dict(self) -> dict:
        return asdict(self)


def position(t_it: int, lengths: StageLengths) -> Position:
    e = min(t_it // lengths.epoch_iterations, lengths.total_epochs - 1)
    first = t_it % lengths.epoch_iterations == 0
    if e < lengths.stage1:
        return Position(e, 1, "both", e, e, first)
    k = e - lengths.stage1
    # f-epochs are k = 0, 2, 4, ...; g-epochs k = 1, 3, ...; the learner's counter is the index of its current
    # epoch, the other's the number of its epochs completed
    if k % 2 == 0:
        return Position(e, 2, "f", k // 2, k // 2, first)
    return Position(e, 2, "g", k // 2 + 1, k // 2, first)


def stage1_lr(epoch: int, lr0: float, lengths: StageLengths) -> float:
    """Linear warm-up 0.01 lr0 -> lr0 over [0, W), then cosine lr0 -> 0 over [W, E1)."""
    if epoch < lengths.warmup:
        return lr0 * (0.01 + 0.99 * epoch / lengths.warmup)
    span = lengths.stage1 - lengths.warmup
    return lr0 * 0.5 * (1 + math.cos(math.pi * (epoch - lengths.warmup) / span))


def stage2_lr(own_epoch: int, lr0: float, own_epochs: int, lr_final: float = 0.0) -> float:
    """Cosine lr0 -> lr_final over the model's own stage-2 epochs (restarted at stage 2)."""
    return lr_final + (lr0 - lr_final) * 0.5 * (1 + math.cos(math.pi * own_epoch / own_epochs))


def lrg_unlabeled_count(lr: float, lr0: float, batch_size: int, lr_final: float = 0.0) -> int:
    """Eq. 10: b_u = floor((lr0 - lr)/(lr0 - lr_final) * B), clipped to [0, B]."""
    b_u = math.floor((lr0 - lr) / (lr0 - lr_final) * batch_size + 1e-9)
    return max(0, min(batch_size, b_u))


def model_lr(model: str, t_it: int, lr0: float, lengths: StageLengths) -> float:
    """The LR of model `f` or `g` at iteration t_it (a model keeps its LR during the other's stage-2 epochs)."""
    pos = position(t_it, lengths)
    if pos.stage == 1:
        return stage1_lr(pos.mn_epoch, lr0, lengths)
    own = pos.epoch_f if model == "f" else pos.epoch_g
    own_total = lengths.stage2_f if model == "f" else lengths.stage2_g
    return stage2_lr(min(own, own_total), lr0, own_total)


def batch_split(t_it: int, lr0: float, batch_size: int, lengths: StageLengths) -> tuple[int, int]:
    """(b_l, b_u) of the learner at iteration t_it (Eq. 10-11); stage 1 is all labeled."""
    pos = position(t_it, lengths)
    if pos.stage == 1:
        return batch_size, 0
    b_u = lrg_unlabeled_count(model_lr(pos.learner, t_it, lr0, lengths), lr0, batch_size)
    return batch_size - b_u, b_u


def refreshes_due(t_it: int, lengths: StageLengths, fractions=REFRESH_FRACTIONS) -> int:
    """How many of g's pseudo-mask refreshes are due by iteration t_it (0 in stage 1, >= 1 from stage 2 on): the
    refresh points are fractions of stage 2 measured in f's own epochs (the f-epoch that reaches one refreshes)."""
    pos = position(t_it, lengths)
    if pos.stage == 1:
        return 0
    progress = pos.epoch_f / max(1, lengths.stage2_f)
    return sum(1 for fr in fractions if progress >= fr - 1e-12)
