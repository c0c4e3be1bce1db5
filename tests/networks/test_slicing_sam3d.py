"""SlicingSAM3D (METHODS.md §5.2): shapes, gradients only in the decoder, frozen encoder unchanged after a step."""
import pytest
import torch

from nnunet_semisam.networks.slicing_sam3d import SlicingSAM3D, TinyViTSliceEncoder, litemedsam_slice_encoder


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SlicingSAM3D(litemedsam_slice_encoder(16), num_classes=2, slice_size=16)


def test_forward_shape_and_upstages(net):
    x = torch.randn(2, 3, 4, 20, 24)
    out = net(x)
    assert out.shape == (2, 2, 4, 20, 24)
    assert net.n_up == 1  # TinyViT grid S/4 -> S/2 needs one x2 stage
    assert isinstance(net.encoder, TinyViTSliceEncoder)
    emb = net.embed(net.encoder_input(x))
    assert emb.shape == (2, 256, 4, 4, 4)


def test_gradients_only_in_decoder_and_encoder_unchanged(net):
    net.train()
    assert not net.encoder.training  # frozen encoder stays in eval
    enc_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    dec_before = [p.detach().clone() for p in net.decoder_parameters()]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(1, 3, 4, 16, 16)
    loss = net(x).square().mean()
    loss.backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.decoder_parameters())
    opt.step()
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(a, b.detach()) for a, b in zip(dec_before, net.decoder_parameters()))


def test_parameter_report_counts(net):
    report = net.parameter_report()
    frozen = sum(p.numel() for p in net.encoder.parameters())
    trainable = sum(p.numel() for p in net.decoder_parameters())
    assert f"{trainable:,} trainable" in report and f"{frozen:,} frozen" in report
    assert trainable == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert frozen > 5_000_000  # TinyViT + neck


def test_upstages_follow_the_encoder_grid():
    class Stride16(torch.nn.Module):  # a ViT-B-like grid (S/16): three up-stages to reach S/2 (§5.2)
        stride, out_channels = 16, 8

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 16, stride=16)

        def forward(self, x):
            return self.proj(x)

    net = SlicingSAM3D(Stride16(), num_classes=3, slice_size=32, width=16)
    assert net.n_up == 3
    assert net(torch.randn(1, 1, 3, 10, 12)).shape == (1, 3, 3, 10, 12)
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        SlicingSAM3D(Stride16(), num_classes=2, slice_size=40)


def test_encoder_input_per_slice_minmax(net):
    x = torch.zeros(1, 2, 2, 2, 2)
    x[0, 0, 0] = torch.tensor([[1.0, 3.0], [5.0, 3.0]])
    x[0, 0, 1] = 7.0  # constant slice -> 0 (denominator clipped)
    v = net.encoder_input(x)
    assert torch.allclose(v[0, 0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.5]]))
    assert torch.all(v[0, 0, 1] == 0)
