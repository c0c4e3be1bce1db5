"""Tiny-MUNet (METHODS.md §3.3): paper budget, 2D/3D forward/backward with deep supervision, features, plans."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_semisam.networks.complexity import network_complexity
from nnunet_semisam.networks.mamba import MambaLayer, count_parameters, selective_scan_flops
from nnunet_semisam.networks.tiny_munet import TinyMUNet, paper_tiny_munet

SMALL_3D = dict(features_per_stage=(8, 16, 16, 24, 32, 48), conv_op=torch.nn.Conv3d,
                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2]],
                kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                n_mamba_layers_per_stage=(1, 1, 1, 1), norm_op=torch.nn.InstanceNorm3d,
                norm_op_kwargs={"affine": True})


def test_paper_preset_parameters_match_methods_table():
    net = paper_tiny_munet(3, 2)
    # METHODS.md §3.3, block by block
    assert [count_parameters(s) for s in net.encoder.stages] == [10208, 55552, 49984, 162528, 284288, 604608]
    assert [count_parameters(s) for s in net.decoder.stages] == [42880, 22944, 11200, 41216, 11392]
    assert count_parameters(net.decoder.seg_layers[-1]) == 66
    # + the four deep-supervision heads (32..128 -> 2 channels), always built so checkpoints load with DS on or off
    assert count_parameters(net) == 1296866 + (128 + 96 + 64 + 64 + 4) * 2 == 1297578 <= 1.34e6
    assert count_parameters(paper_tiny_munet(4, 2)) - count_parameters(net) == 1297154 - 1296866


def test_paper_preset_macs_within_budget():
    net = paper_tiny_munet(3, 2)
    c = network_complexity(net, 3, (256, 256))
    assert c["input_shape"] == [1, 3, 256, 256]
    assert c["macs_conv_linear"] <= 10.01e9  # METHODS.md rule: conv/linear MACs, scan reported separately
    assert c["macs"] <= 10.01e9  # issue rule: flop_counter FLOPs/2 with the scan included
    assert 3.0e9 < c["macs_conv_linear"] < 4.0e9
    # the scan count is the analytic formula summed over every Mamba layer at its resolution (both directions)
    expected = 0
    for stage, side in zip(net.encoder.stages[2:], (64, 32, 16, 8)):  # F1..F4 grids for a 256x256 input
        for layer in stage:
            if isinstance(layer, MambaLayer):
                expected += selective_scan_flops(2, side * side, layer.mamba.d_inner, 16)
    assert c["macs_scan"] == expected // 2
    assert c["macs"] == c["macs_conv_linear"] + c["macs_scan"]


def test_2d_forward_backward_deep_supervision_and_features():
    torch.manual_seed(0)
    net = paper_tiny_munet(3, 4, deep_supervision=True)
    x = torch.randn(2, 3, 64, 64)
    out, feats = net(x, return_features=True)
    assert [tuple(o.shape) for o in out] == [(2, 4, 64 // 2 ** i, 64 // 2 ** i) for i in range(5)]
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 16), (2, 96, 8, 8), (2, 128, 4, 4), (2, 192, 2, 2)]
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    net.decoder.deep_supervision = False  # what nnU-Net's trainer toggles
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 4, 64, 64)
    # no final nonlinearity: logits are unbounded and do not sum to 1 over classes
    assert not torch.allclose(single.sum(1), torch.ones(1))


def test_training_gradients_equal_with_the_autograd_scan(monkeypatch):
    """The scan's hand-written backward gives a whole Tiny-MUNet the gradients of autograd through the scan steps."""
    from nnunet_semisam.networks.mamba import chunked as mamba

    monkeypatch.setenv("NNUNET_SEMISAM_SCAN_BACKEND", "pytorch")  # the pure-PyTorch scan (not the numba kernel)

    class AutogradScan:  # stand-in for mamba._SelectiveScanFn
        apply = staticmethod(mamba._scan_autograd)

    torch.manual_seed(0)
    net = paper_tiny_munet(3, 2).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for fn in (mamba._SelectiveScanFn, AutogradScan):
        monkeypatch.setattr(mamba, "_SelectiveScanFn", fn)
        net.zero_grad(set_to_none=True)
        logits, feats = net(x, return_features=True)
        (logits.square().mean() + sum(f.square().mean() for f in feats)).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name, g in grads[1].items():
        err = (grads[0][name] - g).abs().max().item()
        assert err <= 1e-4 * max(g.abs().max().item(), 1e-8), f"{name}: {err:.2e}"


def test_3d_forward_backward_deep_supervision():
    torch.manual_seed(0)
    net = TinyMUNet(2, 3, deep_supervision=True, **SMALL_3D)
    x = torch.randn(1, 2, 16, 32, 32)
    out = net(x)
    # cumulative strides: (1,1,1) (1,2,2) (2,4,4) (4,8,8) (4,16,16) -> one head per skip
    assert [tuple(o.shape[2:]) for o in out] == [(16, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4), (4, 2, 2)]
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.compute_conv_feature_map_size((16, 32, 32)) > net.compute_conv_feature_map_size((16, 16, 16))


def test_encode_from_reruns_later_stages():
    torch.manual_seed(0)
    net = paper_tiny_munet(3, 2).eval()  # eval: BatchNorm uses running stats, so both passes see the same op
    x = torch.randn(1, 3, 64, 64)
    _, feats = net(x, return_features=True)
    again = net.encode_from(1, feats[0])
    assert len(again) == 3 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again, feats[1:]))
    assert len(net.encode_from(3, feats[2])) == 1 and net.encode_from(4, feats[3]) == []
    f1 = (feats[0].detach() + 0.1 * torch.randn_like(feats[0])).requires_grad_()
    perturbed = net.encode_from(1, f1)
    assert not torch.allclose(perturbed[0], feats[1])
    perturbed[-1].sum().backward()
    assert f1.grad is not None and f1.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="level must be in 1..4"):
        net.encode_from(0, feats[0])


def test_built_from_plans_like_nnunet_and_checkpoint_loads_with_or_without_ds():
    kwargs = {"features_per_stage": [32, 64, 64, 96, 128, 192], "conv_op": "torch.nn.modules.conv.Conv2d",
              "kernel_sizes": [[3, 3]] * 6, "strides": [[1, 1]] + [[2, 2]] * 5, "n_conv_stages": 2,
              "n_mamba_layers_per_stage": [1, 2, 2, 2], "norm_op": "torch.nn.modules.batchnorm.BatchNorm2d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": "torch.nn.GELU", "nonlin_kwargs": {},
              "d_state": 16, "d_conv": 4, "expand": 2}
    before = dict(kwargs)
    torch.manual_seed(0)
    net = get_network_from_plans("nnunet_semisam.networks.tiny_munet.TinyMUNet", kwargs,
                                 ["conv_op", "norm_op", "nonlin"], 3, 2, allow_init=True, deep_supervision=True)
    assert kwargs == before, "the plans' kwargs must not be mutated"
    assert isinstance(net, TinyMUNet) and net.decoder.deep_supervision
    assert count_parameters(net) == count_parameters(paper_tiny_munet())
    # InitWeights_He(1e-2) on Conv2d: std sqrt(2 / (1 + 0.01^2) / fan_in); Mamba's conv1d keeps PyTorch's default
    w = net.encoder.stages[0][1][0].weight
    assert abs(w.std().item() - (2 / 1.0001 / (32 * 9)) ** 0.5) < 0.01
    conv1d = net.encoder.stages[2][2].mamba.conv1d.weight
    assert conv1d.abs().max() <= 1 / 4 ** 0.5  # kaiming-uniform bound of nn.Conv1d, fan_in = 4
    no_ds = get_network_from_plans("nnunet_semisam.networks.tiny_munet.TinyMUNet", kwargs,
                                   ["conv_op", "norm_op", "nonlin"], 3, 2, deep_supervision=False)
    no_ds.load_state_dict(net.state_dict(), strict=True)


def _saved_activation_elements(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Elements of the tensors autograd keeps for backward (parameters excluded), per sample."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(seen.values()) // x.shape[0]


def test_memory_model_is_on_nnunet_scale():
    """compute_conv_feature_map_size tracks what training stores as nnU-Net's estimate does for its PlainConvUNet.

    nnU-Net's planner compares estimates with reference values calibrated on PlainConvUNet; the ratio of stored
    activation elements to the estimate must therefore be about the same for both networks (here within 25 %).
    """
    plain = PlainConvUNet(3, 6, [32, 64, 128, 256, 512, 512], torch.nn.Conv2d, 3, [1, 2, 2, 2, 2, 2], 2, 2, 5, True,
                          torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                          {"inplace": True})
    tiny = paper_tiny_munet(3, 2)
    x = torch.randn(2, 3, 96, 96)
    r_plain = _saved_activation_elements(plain, x) / plain.compute_conv_feature_map_size((96, 96))
    r_tiny = _saved_activation_elements(tiny, x) / tiny.compute_conv_feature_map_size((96, 96))
    assert 0.75 < r_tiny / r_plain < 1.25, (r_tiny, r_plain)


def test_invalid_configuration_says_what_was_expected():
    with pytest.raises(ValueError, match="n_mamba_layers_per_stage must have .* 4 entries"):
        TinyMUNet(3, 2, n_mamba_layers_per_stage=(1, 2, 2))
    with pytest.raises(ValueError, match="strides must have one entry per stage"):
        TinyMUNet(3, 2, strides=(1, 2, 2))
    with pytest.raises(ValueError, match="entries must have 3 values"):
        TinyMUNet(1, 2, **{**SMALL_3D, "strides": [[1, 1]] * 6})
