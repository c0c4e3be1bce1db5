"""MultiDecoderUNet, the MC-Net+ and CCT networks (METHODS.md §8.6, §8.7), built from tiny nnU-Net plans in 2D and 3D:
output shapes, the decoder order and what differs between decoders, one shared encoder, the main decoder in eval mode
(what `nnUNetv2_predict` uses), the CCT perturbations acting in train mode only, and deep supervision staying off."""
import pytest
import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from conftest import tiny_configuration
from nnunet_semisam.networks.multi_decoder import (MultiDecoderUNet, UpsampleUNetDecoder, cct_network,
                                                   mcnet_plus_network)
from nnunet_semisam.networks.perturbations import FeatureDropout, FeatureNoise

K = 3  # output channels


def image(dim: int, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 1, *([16, 16] if dim == 2 else [8, 16, 16]))


def upsampling_of(decoder: nn.Module) -> str:
    if isinstance(decoder, UpsampleUNetDecoder):
        return decoder.upsampling_mode
    assert type(decoder) is UNetDecoder
    return "transposed"


@pytest.mark.parametrize("dim, order", [(2, ["linear", "transposed", "nearest"]),
                                        (3, ["transposed", "linear", "nearest"])])
def test_mcnet_plus_three_decoders_in_the_official_order(dim, order):
    torch.manual_seed(0)
    net = mcnet_plus_network(tiny_configuration(dim), 1, K)
    assert isinstance(net, MultiDecoderUNet) and net.num_decoders == 3
    assert [upsampling_of(d) for d in net.decoders] == order
    assert net.decoder is net.decoders[0]
    assert all(not d.deep_supervision for d in net.decoders)
    assert all(d.encoder is net.encoder for d in net.decoders)  # one shared encoder
    # the upsampling of a linear / nearest decoder: Upsample(scale = stride) then a 1x1 conv to the skip's channels
    ups = next(d for d in net.decoders if upsampling_of(d) == "nearest").transpconvs
    assert ups[0][0].scale_factor == tuple(float(s) for s in net.encoder.strides[-1])
    assert ups[0][1].kernel_size == (1,) * dim and ups[0][1].out_channels == net.encoder.output_channels[-2]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("build", [mcnet_plus_network, cct_network])
def test_decoders_differ_only_in_their_upsampling(dim, build):
    """Convolution stages and output convs have the same shapes in every decoder, and their own weights."""
    net = build(tiny_configuration(dim), 1, K)

    def shapes(d, part):
        return [tuple(p.shape) for p in getattr(d, part).parameters()]
    for part in ("stages", "seg_layers"):
        assert all(shapes(d, part) == shapes(net.decoders[0], part) for d in net.decoders)
    first = [p.data_ptr() for p in net.decoders[0].stages.parameters()]
    for d in net.decoders[1:]:
        assert not set(first) & {p.data_ptr() for p in d.stages.parameters()}  # own weights, not shared
    if build is cct_network:
        assert all(upsampling_of(d) == "transposed" for d in net.decoders)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("build, n", [(mcnet_plus_network, 3), (cct_network, 4)])
def test_forward_shapes_and_main_decoder_in_eval(dim, build, n):
    torch.manual_seed(0)
    net = build(tiny_configuration(dim), 1, K)
    x = image(dim)
    net.train()
    outs = net.forward_all(x)
    assert len(outs) == n and all(o.shape == (2, K, *x.shape[2:]) for o in outs)
    assert torch.is_tensor(net(x)) and net(x).shape == (2, K, *x.shape[2:])  # flag off: the main decoder only
    net.train_all_decoders = True
    assert isinstance(net(x), list) and len(net(x)) == n  # what the trainers use in train_step
    net.eval()
    with torch.no_grad():
        z = net(x)  # eval mode: the main decoder, even with the flag set (validation, nnUNetv2_predict)
        assert torch.is_tensor(z)
        assert torch.equal(z, net.decoders[0](net.encoder(x)))
        assert torch.equal(z, net.forward_all(x)[0])
    if build is mcnet_plus_network:  # no perturbation: the decoders still disagree (different ops and weights)
        with torch.no_grad():
            outs = net.forward_all(x)
        assert not torch.allclose(outs[0], outs[1])


def test_cct_perturbs_the_auxiliary_decoders_in_train_mode_only():
    torch.manual_seed(0)
    net = cct_network(tiny_configuration(2), 1, K)
    assert [type(p) for p in net.perturbations] == [nn.Identity, FeatureNoise, nn.Dropout, FeatureDropout]
    assert net.perturbations[1].uniform_range == 0.3 and net.perturbations[2].p == 0.3
    x = image(2)
    # aux decoder a with the same weights as the main one: equal to it exactly when its perturbation is off
    for a in (1, 2, 3):
        net.decoders[a].load_state_dict(net.decoders[0].state_dict())
    net.eval()
    with torch.no_grad():
        outs = net.forward_all(x)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    net.train()
    with torch.no_grad():
        outs = net.forward_all(x)
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])


def test_multi_decoder_rejects_a_perturbed_main_decoder():
    net = mcnet_plus_network(tiny_configuration(2), 1, K)
    with pytest.raises(ValueError, match="main decoder"):
        MultiDecoderUNet(net.encoder, list(net.decoders), [FeatureNoise(), None, None])


def test_state_dict_round_trip_rebuilds_the_same_prediction():
    """What `nnUNetv2_predict` does: a fresh build (other random init) loading the checkpoint predicts the same."""
    torch.manual_seed(0)
    a = mcnet_plus_network(tiny_configuration(3), 1, K)
    torch.manual_seed(5)
    b = mcnet_plus_network(tiny_configuration(3), 1, K)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = image(3, batch=1)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
