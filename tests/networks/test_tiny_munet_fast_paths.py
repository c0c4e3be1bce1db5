"""Tiny-MUNet inference fast paths: eval-mode BatchNorm folding and channels-last layout give the same function."""
import pytest
import torch
from torch import nn

from nnunet_semisam.networks import tiny_munet
from nnunet_semisam.networks.tiny_munet import ConvNormAct, TinyMUNet

SMALL_2D = dict(features_per_stage=(8, 16, 16, 24), strides=(1, 2, 2, 2), n_conv_stages=2,
                n_mamba_layers_per_stage=(1, 1))


def _randomise_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _unfolded_eval(net: TinyMUNet, x: torch.Tensor, **kw):
    """Eval-mode function without folding: modules in train mode (unfolded code paths), BatchNorms in eval."""
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        return net(x, **kw)
    finally:
        net.eval()


def test_eval_folding_and_channels_last_match_unfolded_forward():
    torch.manual_seed(0)
    net = TinyMUNet(3, 2, deep_supervision=True, **SMALL_2D)
    _randomise_bn(net)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref, ref_feats = _unfolded_eval(net, x, return_features=True)
        net.eval()
        out, feats = net(x, return_features=True)
    assert len(out) == len(ref) == 3
    for o, r in zip(out + feats, ref + ref_feats):
        assert o.shape == r.shape and o.is_contiguous()
        assert torch.allclose(o, r, rtol=1e-4, atol=1e-5), (o - r).abs().max()
    # gradients still reach the conv and BatchNorm parameters through the folded weights
    net.eval()
    net(x)[0].square().mean().backward()
    bn = net.encoder.stages[0][0][1]
    assert bn.weight.grad is not None and torch.isfinite(bn.weight.grad).all() and bn.weight.grad.abs().sum() > 0


def test_encode_from_returns_contiguous_features():
    torch.manual_seed(0)
    net = TinyMUNet(3, 2, **SMALL_2D).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, feats = net(x, return_features=True)
        again = net.encode_from(1, feats[0])
    assert len(again) == 1 and again[0].is_contiguous()
    assert torch.allclose(again[0], feats[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim, approximate", [(2, "none"), (3, "none"), (2, "tanh")])
def test_eval_conv_gelu_runs_fused_and_matches_conv_norm_gelu(dim, approximate, monkeypatch):
    """The no-grad eval path runs conv + folded BatchNorm + GELU as one oneDNN call; same values as the 3 modules."""
    if not tiny_munet._HAS_FUSED_CONV_GELU:
        pytest.skip("this PyTorch has no oneDNN fused convolution")
    calls = []
    fused = torch.ops.mkldnn._convolution_pointwise

    class Spy:  # torch.ops namespaces cannot be monkeypatched attribute by attribute
        @staticmethod
        def _convolution_pointwise(*args):
            calls.append(args[7:])
            return fused(*args)

    torch.manual_seed(0)
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dim == 2 else (nn.Conv3d, nn.BatchNorm3d)
    m = ConvNormAct(conv, 4, 8, [3] * dim, [1] * dim, bn, None, nn.GELU, {"approximate": approximate})
    _randomise_bn(m)
    x = torch.randn(2, 4, *([6, 9, 10][-dim:]))
    m.eval()
    with torch.no_grad():
        ref = m[2](m[1](m[0](x)))
        monkeypatch.setattr(torch.ops, "mkldnn", Spy)
        out = m(x)
    assert calls == [("gelu", [None], approximate)]
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()
