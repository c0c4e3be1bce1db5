"""URPC pieces inside the trainer (METHODS.md §8.5), in-process on tiny tensors and tiny PlainConvUNets: the nearest
upsampling of the pyramid and the supervised mean, nnU-Net's DC+CE settings without the DS wrapper, the head-input
hooks (perturbing in train mode, identity in eval, state dict untouched), how many pyramid outputs small plans give,
and what `compute_loss_terms` feeds to each term. The real `nnUNetv2_train` / predict runs are in
test_baselines_e2e.py."""
from types import SimpleNamespace

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_semisam.networks.perturbations import FeatureDropout, FeatureNoise
from nnunet_semisam.trainers.urpc import (URPCTrainer, head_perturbations, install_head_perturbations,
                                          pyramid_supervised_loss, upsample_pyramid)


def tiny_unet(dim: int, n_stages: int, seed: int = 0) -> PlainConvUNet:
    """nnU-Net's default network family (PlainConvUNet, InstanceNorm, LeakyReLU, DS on), 4 features per stage."""
    torch.manual_seed(seed)
    return PlainConvUNet(
        input_channels=1, n_stages=n_stages, features_per_stage=[4] * n_stages,
        conv_op=nn.Conv2d if dim == 2 else nn.Conv3d, kernel_sizes=3, strides=[1] + [2] * (n_stages - 1),
        n_conv_per_stage=1, num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
        norm_op=nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)


def bare_trainer(network: nn.Module | None = None) -> URPCTrainer:
    """A URPCTrainer without nnU-Net's __init__ (no dataset): only what the pieces under test read."""
    t = URPCTrainer.__new__(URPCTrainer)
    t.network, t.urpc_max_outputs, t.urpc_perturb = network, 4, True
    t.log_lines = []
    t.print_to_log_file = lambda *args, **kw: t.log_lines.append(" ".join(map(str, args)))
    return t


def test_nearest_upsampling_of_a_hand_made_pyramid():
    z0 = torch.zeros(1, 1, 4, 4)
    z1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    z2 = torch.full((1, 1, 1, 1), 8.0)
    up = upsample_pyramid([z0, z1, z2], (4, 4))
    assert torch.equal(up[0], z0)
    assert torch.equal(up[1][0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    assert torch.equal(up[2], torch.full((1, 1, 4, 4), 8.0))
    # 3D, anisotropic (nnU-Net's 3D plans often do not pool along Z): each voxel repeated along X only
    z = torch.tensor([5.0, 7.0]).view(1, 1, 1, 1, 2)
    assert torch.equal(upsample_pyramid([z], (1, 1, 4))[0].flatten(), torch.tensor([5.0, 5, 7, 7]))

    # L_sup = mean over levels; with an L1 loss vs zeros: (0 + mean(1,2,3,4) + 8) / 3 = 3.5
    l1 = lambda z, y: (z - y).abs().mean()  # noqa: E731
    assert float(pyramid_supervised_loss(l1, up, torch.zeros(1, 1, 4, 4))) == pytest.approx(3.5)


@pytest.mark.parametrize("ignore_label", [None, 2])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_pyramid_loss_is_nnunets_dc_ce_without_the_ds_wrapper(batch_dice, ignore_label):
    def fake(ds):
        return SimpleNamespace(configuration_manager=SimpleNamespace(batch_dice=batch_dice), is_ddp=False,
                               label_manager=SimpleNamespace(ignore_label=ignore_label, has_regions=False),
                               enable_deep_supervision=ds, _do_i_compile=lambda: False)

    ours = URPCTrainer.build_pyramid_loss(fake(True))
    theirs = nnUNetTrainer._build_loss(fake(False))  # what nnU-Net wraps in DeepSupervisionWrapper
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 1, 6, 6)).float()
    assert float(ours(logits, labels)) == pytest.approx(float(theirs(logits, labels)), abs=1e-7)


def test_head_hooks_perturb_in_train_mode_and_are_identity_in_eval():
    net, plain = tiny_unet(2, 5), tiny_unet(2, 5)
    perturbations = head_perturbations(4)
    assert [(s, type(op)) for s, op in perturbations.items()] == [(3, nn.Dropout), (2, FeatureDropout),
                                                                   (1, FeatureNoise)]
    assert perturbations[3].p == 0.5
    install_head_perturbations(net.decoder, perturbations)
    assert net.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in net.state_dict().items())

    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        net.eval(), plain.eval()
        assert all(torch.equal(a, b) for a, b in zip(net(x), plain(x))), "eval: the plain network's outputs"
        net.decoder.deep_supervision = plain.decoder.deep_supervision = False  # nnU-Net's inference path
        assert torch.equal(net(x), plain(x))
        net.decoder.deep_supervision = plain.decoder.deep_supervision = True
        net.train(), plain.train()
        perturbed, clean = net(x), plain(x)
    assert len(perturbed) == 4
    assert torch.equal(perturbed[0], clean[0]), "z^0 unperturbed and the decoder's features go on unchanged"
    for s in (1, 2, 3):
        assert not torch.allclose(perturbed[s], clean[s]), f"z^{s} perturbed in train mode"


@pytest.mark.parametrize("dim, n_stages, used, hooked", [
    (2, 6, 4, {3: nn.Dropout, 2: FeatureDropout, 1: FeatureNoise}),  # 5 DS outputs: the first 4
    (2, 5, 4, {3: nn.Dropout, 2: FeatureDropout, 1: FeatureNoise}),
    (3, 4, 3, {2: nn.Dropout, 1: FeatureDropout}),  # like tiny3d's 16x32x32 plan
    (3, 3, 2, {1: nn.Dropout}),
])
def test_number_of_pyramid_outputs_for_small_plans(dim, n_stages, used, hooked):
    net = tiny_unet(dim, n_stages)
    t = bare_trainer(net)
    t.setup_pyramid()
    assert t.num_pyramid_outputs == used
    seg = net.decoder.seg_layers
    assert {s: len(seg[-1 - s]._forward_pre_hooks) for s in range(len(seg))} == \
        {s: int(s in hooked) for s in range(len(seg))}
    assert t.log_lines == [f"URPC: pyramid z^0..z^{used - 1} ({used} of {n_stages - 1} deep-supervision outputs), "
                           "head-input perturbations: " + ", ".join(f"z^{s} {c.__name__}" for s, c in hooked.items())]

    t2 = bare_trainer(tiny_unet(dim, n_stages))
    t2.urpc_perturb = False
    t2.setup_pyramid()
    assert t2.log_lines[0].endswith("head-input perturbations: none")
    assert all(not len(layer._forward_pre_hooks) for layer in t2.network.decoder.seg_layers)


class FixedPyramid(nn.Module):
    """Returns a fixed DS list for a (2 labeled + 1 unlabeled) batch; records the batch it was given."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x):
        self.seen = x
        return self.outputs


def test_compute_loss_terms_supervises_upsampled_labeled_outputs_and_rectifies_unlabeled_ones():
    torch.manual_seed(0)
    n, k = 2, 3
    unl = torch.randn(1, k, 1, 1).expand(1, k, 8, 8)  # the unlabeled row: one constant map at every level
    outputs = [torch.cat([torch.randn(n, k, 8 // 2 ** s, 8 // 2 ** s), unl[:, :, :8 // 2 ** s, :8 // 2 ** s]])
               for s in range(4)]
    outputs.append(torch.randn(3, k, 1, 1) * 10)  # z^4: beyond the first 4, never used
    t = bare_trainer(FixedPyramid(outputs))
    t.num_pyramid_outputs, t.pyramid_loss = 4, lambda z, y: (torch.softmax(z, 1)[:, :1] - y).abs().mean()
    t.global_step, t.num_epochs, t.num_iterations_per_epoch = 10, 2, 10
    t.consistency_max, t.rampup_fraction = 0.2, 1.0

    data, x_u = torch.zeros(n, 1, 8, 8), torch.ones(1, 1, 8, 8)
    y = torch.zeros(n, 1, 8, 8)
    target = [y, torch.full((n, 1, 4, 4), 5.0)]  # nnU-Net's DS targets: only the full-resolution one is used
    terms = t.compute_loss_terms(data, target, {"strong": x_u, "weak": -x_u})

    assert torch.equal(t.network.seen, torch.cat([data, x_u])), "one forward of labeled + strong unlabeled"
    expected = sum(float(torch.softmax(torch.nn.functional.interpolate(z[:n], size=(8, 8)), 1)[:, 0].mean())
                   for z in outputs[:4]) / 4
    weight, sup = terms["supervised"]
    assert weight == 1.0 and float(sup) == pytest.approx(expected, rel=1e-6)
    weight, urpc = terms["urpc"]
    assert float(urpc) == pytest.approx(0.0, abs=1e-6), "identical unlabeled pyramid: no disagreement"
    assert weight == pytest.approx(0.2 * torch.exp(torch.tensor(-5 * 0.5 ** 2)).item())  # ramp(10, 20)
