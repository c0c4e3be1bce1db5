"""`frozen_running_stats` (METHODS.md §4.1: the FPKDM re-run of the student's stages must not move BatchNorm
running statistics): buffers bitwise unchanged, outputs and gradients those of a plain train-mode pass, momentum None,
nesting and restore on exceptions, and the real TinyMUNet's `encode_from`."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnunet_semisam.networks.batchnorm import frozen_running_stats


def stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def small_net(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=momentum))
    with torch.no_grad():  # non-trivial running statistics to start from
        for _ in range(3):
            net(torch.randn(5, 2, 6, 6) * 2 + 1)
    return net.train()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_unchanged_outputs_and_gradients_of_train_mode(momentum):
    net = small_net(momentum)
    ref = copy.deepcopy(net)
    before = stats(net)
    x = torch.randn(4, 2, 6, 6) * 3 - 1

    with frozen_running_stats(net) as inside:
        assert inside is net
        y = net(x)
        y2 = net(x + 1)  # two passes inside: still nothing reaches the real buffers
    assert_same(stats(net), before)
    assert net[1].momentum == momentum  # no hyperparameter touched

    y_ref = ref(x)  # a plain train-mode pass: batch statistics, and it does update its buffers
    assert not torch.equal(stats(ref)["1.running_mean"], before["1.running_mean"])
    assert int(stats(ref)["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1
    assert torch.equal(y, y_ref)
    (y * y_ref.detach()).sum().backward()
    (y_ref * y_ref.detach()).sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    assert not torch.equal(y2, y)


def test_graph_of_an_earlier_pass_still_backpropagates():
    # clean pass outside, perturbed pass inside, one backward through both (the FPKDM pattern)
    net = small_net()
    x = torch.randn(4, 2, 6, 6, requires_grad=True)
    y = net(x)
    after_clean = stats(net)
    with frozen_running_stats(net):
        y_tilde = net(x + 0.1 * torch.randn_like(x))
    (y_tilde - y).pow(2).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())
    assert_same(stats(net), after_clean)  # the clean pass updated them once, the perturbed pass did not


def test_eval_mode_uses_the_unchanged_running_stats():
    net = small_net().eval()
    x = torch.randn(2, 2, 6, 6)
    y_ref = net(x)
    with frozen_running_stats(net):
        assert torch.equal(net(x), y_ref)


def test_nested_and_exception_restore():
    net = small_net()
    before = stats(net)
    originals = {k: v for k, v in net[1]._buffers.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_running_stats(net):
            net(torch.randn(3, 2, 6, 6))
            with frozen_running_stats(net):
                net(torch.randn(3, 2, 6, 6))
            net(torch.randn(3, 2, 6, 6))
            raise RuntimeError("boom")
    assert all(net[1]._buffers[k] is v for k, v in originals.items())  # the very same tensors are back
    assert_same(stats(net), before)
    net(torch.randn(3, 2, 6, 6))  # outside again: a train-mode pass updates the real buffers as usual
    assert int(stats(net)["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1


def test_modules_without_running_stats_and_lazy_batchnorm():
    net = nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False), nn.InstanceNorm2d(2), nn.Conv2d(2, 2, 1))
    x = torch.randn(2, 2, 3, 3)
    with frozen_running_stats(net):
        y = net(x)
    assert torch.equal(y, net(x))
    inorm = nn.InstanceNorm2d(2, track_running_stats=True)  # shares _NormBase and its buffers: frozen too
    before = stats(inorm)
    with frozen_running_stats(inorm):
        inorm(x)
    assert_same(stats(inorm), before)
    with pytest.raises(ValueError, match="lazy"):
        with frozen_running_stats(nn.LazyBatchNorm2d()):
            pass


def test_tiny_munet_encode_from_leaves_running_stats_unchanged():
    from nnunet_semisam.networks.tiny_munet import TinyMUNet

    torch.manual_seed(0)
    net = TinyMUNet(3, 2, features_per_stage=(4, 8, 8, 8, 8, 8), strides=(1, 2, 2, 2, 2, 2),
                    n_mamba_layers_per_stage=(1, 1, 1, 1)).train()
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 64, 64)
    _, feats = net(x, return_features=True)
    _, feats_ref = ref(x, return_features=True)
    before = stats(net)
    assert_same(before, stats(ref))
    f1 = (feats[0] + 0.1 * torch.randn_like(feats[0])).detach()  # one input for both re-runs

    with frozen_running_stats(net):
        out = net.encode_from(1, f1)
    assert_same(stats(net), before)
    out_ref = ref.encode_from(1, f1)  # without the context the second pass moves the statistics of e2..e4
    moved = [k for k, v in stats(ref).items() if not torch.equal(v, before[k])]
    assert moved and all(k.startswith("encoder.") for k in moved)
    for a, b in zip(out, out_ref):
        assert torch.equal(a, b)  # same train-mode (batch-statistics) pass
    sum((a - f).pow(2).sum() for a, f in zip(out, feats[1:])).backward()  # through both passes, as in FPKDM
    sum((a - f).pow(2).sum() for a, f in zip(out_ref, feats_ref[1:])).backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, p_ref.grad), name
