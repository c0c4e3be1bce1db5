"""Gradient clipping covers every parameter the optimizer steps, extra modules included (e.g. FPKDM projectors)."""
import torch

from nnunet_semisam.trainers.semi_supervised import SemiSupervisedTrainer


def _stub_trainer(network: torch.nn.Module, extra: torch.nn.Module) -> SemiSupervisedTrainer:
    """A SemiSupervisedTrainer with just what `train_step` touches (nnU-Net's noDataLoading-benchmark idea)."""
    t = object.__new__(SemiSupervisedTrainer)
    t.device = torch.device("cpu")
    t.network, t.extra = network, extra
    t.optimizer = torch.optim.SGD([{"params": list(network.parameters())}, {"params": list(extra.parameters())}],
                                  lr=1.0)
    t.grad_scaler = None
    t.is_ddp = False  # one process (DDP adds a gradient all-reduce, tests/distributed)
    t.grad_clip_norm = 12.0
    t.global_step = 0
    t.next_unlabeled_batch = lambda: {}
    # a loss whose gradient on the extra module is huge and on the network small
    t.compute_loss_terms = lambda data, target, batch_u: {
        "supervised": (1.0, network(data).sum() + 1e4 * extra(data).sum())}
    return t


def test_clip_includes_parameters_outside_the_network():
    torch.manual_seed(0)
    net, extra = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    t = _stub_trainer(net, extra)
    before = [p.detach().clone() for p in t.optimized_parameters()]
    t.train_step({"data": torch.ones(2, 3), "target": torch.zeros(2, 1)})
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(t.optimized_parameters(), before)])
    # lr 1: the update is the clipped gradient; its norm over all stepped parameters is the clip norm
    assert float(step.norm()) <= 12.0 + 1e-4, "the extra module's gradient was not clipped"
    assert t.optimized_parameters() == list(net.parameters()) + list(extra.parameters())
