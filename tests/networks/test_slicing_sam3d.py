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


@pytest.fixture(scope="module")
def small_sam_checkpoint(tmp_path_factory):
    """A small randomly initialised SAM of segment_anything's own classes (`semisam_tiny`: ViT width 24, depth 4),
    saved as a checkpoint file; MedSAM ViT-B itself cannot be downloaded here."""
    from nnunet_semisam.teachers.sam_models import TINY_ARCH, build_sam_custom, save_sam_checkpoint

    torch.manual_seed(0)
    sam = build_sam_custom(**TINY_ARCH)
    path = tmp_path_factory.mktemp("vit") / "small_sam.pth"
    save_sam_checkpoint(sam, path, "semisam_tiny", arch=TINY_ARCH)
    return sam, path


def test_medsam_vit_encoder_loads_a_checkpoint_and_equals_sam_at_1024(small_sam_checkpoint, monkeypatch):
    """`$SEMISAM_TEACHER` -> SAMViTSliceEncoder with SAM's parameter names; at SAM's own 1024 input it is exactly
    `ImageEncoderViT.forward`; at S = 32 the grid is 2 x 2 (pos_embed resized, §2.5)."""
    from nnunet_semisam.networks.slicing_sam3d import SAMViTSliceEncoder, build_slice_encoder

    sam, path = small_sam_checkpoint
    monkeypatch.setenv("SEMISAM_TEACHER", str(path))
    enc = build_slice_encoder("medsam", 32)
    assert isinstance(enc, SAMViTSliceEncoder) and (enc.stride, enc.out_channels) == (16, 64)
    ours, theirs = enc.image_encoder.state_dict(), sam.image_encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        assert torch.allclose(enc(x), sam.image_encoder(x), atol=1e-5)
        assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 64, 2, 2)


def test_slicing_sam3d_on_the_vit_encoder_trains_only_the_decoder(small_sam_checkpoint, monkeypatch):
    """§5.2 with a stride-16 ViT: three up-stages (S/16 -> S/2), gradients only in the decoder."""
    from nnunet_semisam.networks.slicing_sam3d import build_slice_encoder

    monkeypatch.setenv("SEMISAM_TEACHER", str(small_sam_checkpoint[1]))
    torch.manual_seed(0)
    net = SlicingSAM3D(build_slice_encoder("medsam", 32), num_classes=2, slice_size=32, width=16).train()
    assert net.n_up == 3 and not net.encoder.training
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    out = net(torch.randn(1, 2, 3, 20, 24))
    assert out.shape == (1, 2, 3, 20, 24)
    out.square().mean().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert all(p.grad is not None for p in net.decoder_parameters())
    torch.optim.SGD(net.decoder_parameters(), lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in net.encoder.state_dict().items())


def test_slice_encoder_errors_are_one_line(monkeypatch, tmp_path):
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.networks.slicing_sam3d import build_slice_encoder

    monkeypatch.delenv("SEMISAM_TEACHER", raising=False)
    with pytest.raises(SemiSAMError, match=r"needs \$SEMISAM_TEACHER = a local checkpoint"):
        build_slice_encoder("medsam", 32)
    monkeypatch.setenv("SEMISAM_TEACHER", str(tmp_path / "missing.pth"))
    with pytest.raises(SemiSAMError, match="missing.pth"):
        build_slice_encoder("medsam", 32)
    with pytest.raises(SemiSAMError, match="unknown slice encoder 'vit_x'"):
        build_slice_encoder("vit_x", 32)


def test_medsam_encoder_variant_and_plans_key_build_the_vit_student(small_sam_checkpoint, monkeypatch):
    """`SemiSAMPlusTrainer_medsamEncoder` (S = 256) and the plans key `sam_encoder` on the default trainer both
    build the ViT student (what `nnUNetv2_predict` rebuilds)."""
    from conftest import tiny_configuration
    from nnunet_semisam.networks.slicing_sam3d import SAMViTSliceEncoder
    from nnunet_semisam.trainers.semisam_plus import SemiSAMPlusTrainer
    from nnunet_semisam.trainers.semisam_plus_variants import SemiSAMPlusTrainer_medsamEncoder

    monkeypatch.setenv("SEMISAM_TEACHER", str(small_sam_checkpoint[1]))
    cm = tiny_configuration(3)
    net = SemiSAMPlusTrainer_medsamEncoder.build_network_architecture(None, cm, 1, 2)
    assert isinstance(net.encoder, SAMViTSliceEncoder) and (net.slice_size, net.n_up) == (256, 3)
    cm.configuration.update(sam_encoder="medsam", sam_slice_size=32)
    net = SemiSAMPlusTrainer.build_network_architecture(None, cm, 1, 2)
    assert isinstance(net.encoder, SAMViTSliceEncoder) and net.slice_size == 32
