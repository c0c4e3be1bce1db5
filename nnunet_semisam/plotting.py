"""Progress figures written next to nnU-Net's `progress.png`."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from nnunet_semisam.io import atomic_path


def plot_loss_terms(logged: Mapping[str, list], terms: Sequence[str], out_png: str | os.PathLike) -> None:
    """Per-term training losses (left axis) and their weights (right axis) over epochs, one curve per term.

    `logged` is nnU-Net's local-logger dict; keys `loss_<term>` / `weight_<term>` (one value per epoch).
    """
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    n = min((len(logged.get(f"loss_{t}", [])) for t in terms), default=0)
    if n == 0:
        return
    fig, ax = plt.subplots(figsize=(12, 6))
    ax2 = ax.twinx()
    x = list(range(n))
    for i, t in enumerate(terms):
        color = f"C{i}"
        ax.plot(x, logged[f"loss_{t}"][:n], color=color, ls="-", label=f"loss {t}", linewidth=2)
        ax2.plot(x, logged[f"weight_{t}"][:n], color=color, ls=":", label=f"weight {t}", linewidth=1.5)
    if "train_losses" in logged:
        ax.plot(x, logged["train_losses"][:n], color="k", ls="-", label="total loss", linewidth=2.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss term (unweighted)")
    ax2.set_ylabel("weight")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
