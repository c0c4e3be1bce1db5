"""VerSemi's dynamic task-prompted head (METHODS.md §6.2): the 180-parameter split, the grouped convolution against
a loop over samples, backbone once / head per prompt, label logits and the task channel."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.networks.dynamic_head import (DynamicHeadUNet, dynamic_head, label_logits, parse_task_override,
                                                  split_dynamic_params)


def test_parameter_split_order():
    theta = torch.arange(360.0).reshape(2, 180)
    p = split_dynamic_params(theta)
    assert torch.equal(p["w1"][0], torch.arange(64.0).reshape(8, 8))
    assert torch.equal(p["w2"][0], torch.arange(64.0, 128).reshape(8, 8))
    assert torch.equal(p["w3"][1], 180 + torch.arange(128.0, 144).reshape(2, 8))
    assert torch.equal(p["w4"][0], torch.arange(144.0, 160).reshape(2, 8))
    assert torch.equal(p["b1"][0], torch.arange(160.0, 168))
    assert torch.equal(p["b2"][0], torch.arange(168.0, 176))
    assert torch.equal(p["b3"][0], torch.tensor([176.0, 177.0]))
    assert torch.equal(p["b4"][1], torch.tensor([358.0, 359.0]))
    with pytest.raises(ValueError):
        split_dynamic_params(torch.zeros(2, 179))


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_grouped_conv_equals_loop_over_samples(spatial):
    torch.manual_seed(0)
    B = 3
    h0 = torch.randn(B, 8, *spatial)
    theta = torch.randn(B, 180)
    out = dynamic_head(h0, split_dynamic_params(theta))
    for b in range(B):  # the head written out for one sample, voxel-wise matrix products
        p = {k: v[b] for k, v in split_dynamic_params(theta).items()}
        v = h0[b].reshape(8, -1)
        h1 = torch.relu(p["w1"] @ v + p["b1"][:, None])
        h2 = torch.relu(p["w2"] @ h1 + p["b2"][:, None])
        ref = (p["w3"] @ h2 + p["b3"][:, None]).reshape(2, *spatial)
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


def test_label_logits_put_the_foreground_in_the_task_channel():
    l2 = torch.tensor([[[0.0, 5.0]], [[3.0, -1.0]]]).permute(0, 2, 1).reshape(2, 2, 1, 1)  # (B=2, 2, 1, 1)
    out = label_logits(l2, torch.tensor([2, 4]), 5)
    assert out.shape == (2, 5, 1, 1)
    assert out[0, :, 0, 0].tolist() == [0.0, -20.0, 5.0, -20.0, -20.0]
    assert out[1, :, 0, 0].tolist() == [3.0, -21.0, -21.0, -21.0, -1.0]
    assert out.argmax(1).flatten().tolist() == [2, 0]


def tiny_unet(nd: int, in_ch: int) -> nn.Module:
    conv = nn.Conv3d if nd == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d
    return PlainConvUNet(in_ch, 3, (4, 8, 16), conv, 3, ((1,) * nd, (2,) * nd, (2,) * nd), 1, 2, (1, 1), True,
                         norm, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})


@pytest.mark.parametrize("nd", [2, 3])
def test_network_prompt_sources_and_head_per_prompt(nd, monkeypatch):
    torch.manual_seed(0)
    net = DynamicHeadUNet(tiny_unet(nd, 2), num_tasks=3, num_image_channels=2).eval()
    assert not any("seg_layers" in k for k in net.state_dict())
    shape = (8,) * nd
    img = torch.randn(2, 2, *shape)
    tasks = torch.tensor([3, 1])
    x = torch.cat([img, tasks.view(2, 1, *([1] * nd)).float().expand(2, 1, *shape)], 1)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 5, *shape)
        g, h0 = net.features(x)
        assert g.shape == (2, 16) and h0.shape == (2, 8, *shape)
        torch.testing.assert_close(out, label_logits(net.head(g, h0, tasks), tasks, 5))
        # the prompt changes the output; the task channel never reaches the backbone
        other = net.head(g, h0, torch.tensor([1, 1]))
        assert not torch.allclose(other[0], net.head(g, h0, tasks)[0])
        x_other_channel = x.clone()
        x_other_channel[:, 2] = 2.0
        torch.testing.assert_close(net.features(x_other_channel)[1], h0)
        torch.testing.assert_close(net(x, torch.tensor([2, 2])), net(x_other_channel))
        net.task_override = 4
        torch.testing.assert_close(net(x), net(x, torch.tensor([4, 4])))
    with pytest.raises(SemiSAMError, match="no task channel"):
        DynamicHeadUNet(tiny_unet(nd, 2), 3, 2)(img)


def test_parse_task_override():
    assert parse_task_override(None, 3) is None and parse_task_override("", 3) is None
    assert parse_task_override("union", 3) == 4 and parse_task_override("2", 3) == 2
    with pytest.raises(SemiSAMError, match="expected a task id 1..4"):
        parse_task_override("5", 3)
