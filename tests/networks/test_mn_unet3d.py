"""[MN]'s simple 3D U-Net (METHODS.md §7.1): layout, parameter count, odd nnU-Net patch sizes, one output."""
import pytest
import torch
from torch import nn

from nnunet_semisam.networks.mn_unet3d import MNUNet3D


def conv_params(c_in: int, c_out: int) -> int:
    return 27 * c_in * c_out + c_out  # 3x3x3 kernel + bias; InstanceNorm3d has no affine parameters by default


def test_official_layout_and_parameter_count():
    net = MNUNet3D(1, 2)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    # encoder: 2 convs per level; decoder: per up-step 1 (up) + 2 (fuse); head 1
    assert len(convs) == 5 * 2 + 4 * 3 + 1
    assert [s[0].out_channels for s in net.encoder] == [32, 64, 128, 256, 512]
    assert [type(m) for m in net.encoder[0]] == [nn.Conv3d, nn.InstanceNorm3d, nn.ReLU] * 2
    widths = [1, 32, 64, 128, 256, 512]
    expected = sum(conv_params(a, b) + conv_params(b, b) for a, b in zip(widths[:-1], widths[1:]))
    for a, b in [(512, 256), (256, 128), (128, 64), (64, 32)]:
        expected += conv_params(a, b) + conv_params(2 * b, b) + conv_params(b, b)
    expected += conv_params(32, 2)
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize("shape", [(16, 32, 32), (12, 24, 24), (5, 20, 13)])
def test_any_patch_size_gives_full_resolution_logits_and_gradients(shape):
    torch.manual_seed(0)
    net = MNUNet3D(2, 3, features=(4, 8, 8, 16, 16))
    x = torch.randn(2, 2, *shape, requires_grad=True)
    y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, *shape)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.decoder.deep_supervision = True  # nnU-Net's switch is accepted and changes nothing
    net.eval()
    with torch.no_grad():
        a = net(x)
        net.decoder.deep_supervision = False
        assert torch.equal(a, net(x))
