"""MC-Net+ and CCT inside their trainers (METHODS.md §8.6, §8.7), in-process on tiny PlainConvUNet plans: the terms
`compute_loss_terms` returns are the library losses on the right rows with the specified weights, the network is the
one `build_network_architecture` gives `nnUNetv2_predict`, and region-based plans are refused in one line. The real
`nnUNetv2_train` / predict runs are in test_baselines_e2e.py."""
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from conftest import tiny_configuration
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.baselines import cct_consistency, mcnet_mutual_consistency, mcnet_supervised_dice
from nnunet_semisam.networks.multi_decoder import MultiDecoderUNet
from nnunet_semisam.schedules import sigmoid_rampup
from nnunet_semisam.trainers.cct import CCTTrainer
from nnunet_semisam.trainers.mcnet_plus import MCNetPlusTrainer

K = 2


def bare_trainer(cls, dim: int, step: int = 10):
    """A trainer without nnU-Net's __init__ (no dataset): the network from `build_network_architecture`, in train
    mode with every decoder's output, the method's own settings, a 100-iteration run at `step`."""
    t = cls.__new__(cls)
    t.configuration_manager = tiny_configuration(dim)
    torch.manual_seed(0)
    t.network = cls.build_network_architecture(None, t.configuration_manager, 1, K, False)
    t.network.train_all_decoders = True
    t.network.train()
    t.num_epochs, t.num_iterations_per_epoch, t.global_step = 10, 10, step
    if cls is MCNetPlusTrainer:
        t.is_3d = dim == 3
        t.supervised_weight, t.consistency_max = (0.5, 1.0) if t.is_3d else (1.0, 0.1)
        t.rampup_fraction, t.sharpen_temperature = (0.4 if t.is_3d else 1.0), 0.1
    else:
        t.consistency_max, t.rampup_fraction = 0.2, 1.0
        t.loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return t


def batch(dim: int):
    torch.manual_seed(3)
    shape = [16, 16] if dim == 2 else [8, 16, 16]
    data, x_u = torch.randn(2, 1, *shape), torch.randn(2, 1, *shape)
    target = (torch.rand(2, 1, *shape) > 0.6).float()
    return data, target, {"strong": x_u, "weak": x_u + 1}


@pytest.mark.parametrize("dim", [2, 3])
def test_mcnet_plus_terms_are_the_library_losses(dim):
    t = bare_trainer(MCNetPlusTrainer, dim, step=10)
    data, target, batch_u = batch(dim)
    terms = t.compute_loss_terms(data, target, batch_u)
    with torch.no_grad():
        probs = [torch.softmax(z, 1) for z in t.network.forward_all(torch.cat([data, batch_u["strong"]], 0))]
    # Dice on the 2 labeled rows (3D binary, 2D D_sq); the mutual consistency over all 4 rows (labeled + unlabeled)
    sup = mcnet_supervised_dice([p[:2] for p in probs], target, binary=dim == 3)
    mc = mcnet_mutual_consistency(probs, 0.1)
    assert terms["supervised"][0] == (0.5 if dim == 3 else 1.0)
    assert terms["supervised"][1].item() == pytest.approx(float(sup), rel=1e-5)
    assert terms["consistency"][1].item() == pytest.approx(float(mc), rel=1e-5)
    # weight: 3D 1 x ramp(10, 0.4 x 100); 2D 0.1 x ramp(10, 100)
    expected_w = 1.0 * sigmoid_rampup(10, 40) if dim == 3 else 0.1 * sigmoid_rampup(10, 100)
    assert terms["consistency"][0] == pytest.approx(expected_w)
    # no stop-gradient anywhere: the consistency alone reaches every decoder
    terms["consistency"][1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in
               (next(d.seg_layers[-1].parameters()) for d in t.network.decoders))


@pytest.mark.parametrize("dim", [2, 3])
def test_cct_terms_are_the_library_losses(dim):
    t = bare_trainer(CCTTrainer, dim, step=50)
    data, target, batch_u = batch(dim)
    torch.manual_seed(7)  # the auxiliary decoders' perturbations draw from the RNG: the same draws twice
    terms = t.compute_loss_terms(data, target, batch_u)
    torch.manual_seed(7)
    with torch.no_grad():
        logits = t.network.forward_all(torch.cat([data, batch_u["strong"]], 0))
    sup = sum(t.loss(z[:2], target) for z in logits) / 4  # main + 3 auxiliary decoders, labeled rows
    probs_u = [torch.softmax(z[2:], 1) for z in logits]  # unlabeled rows only
    assert terms["supervised"][1].item() == pytest.approx(float(sup), rel=1e-5)
    assert terms["consistency"][1].item() == pytest.approx(float(cct_consistency(probs_u[0], probs_u[1:])),
                                                           rel=1e-5)
    assert terms["supervised"][0] == 1.0
    assert terms["consistency"][0] == pytest.approx(0.2 * sigmoid_rampup(50, 100))
    assert terms["consistency"][1].item() > 0  # the perturbed decoders disagree with the main one


@pytest.mark.parametrize("cls, n", [(MCNetPlusTrainer, 3), (CCTTrainer, 4)])
def test_predict_network_is_the_main_decoder(cls, n):
    """`nnUNetv2_predict` calls `build_network_architecture(..., enable_deep_supervision=False)` and runs eval mode."""
    net = cls.build_network_architecture(None, tiny_configuration(2), 1, K, False)
    assert isinstance(net, MultiDecoderUNet) and net.num_decoders == n and not net.train_all_decoders
    net.eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net.decoders[0](net.encoder(x)))


@pytest.mark.parametrize("cls", [MCNetPlusTrainer, CCTTrainer])
def test_a_single_output_in_training_is_an_error(cls):
    """Without `train_all_decoders` the train-mode forward gives the main decoder only: refused, not misread."""
    t = bare_trainer(cls, 2)
    t.network.train_all_decoders = False
    data, target, batch_u = batch(2)
    with pytest.raises(SemiSAMError, match="train_all_decoders"):
        t.compute_loss_terms(data, target, batch_u)


@pytest.mark.parametrize("cls", [MCNetPlusTrainer, CCTTrainer])
def test_region_based_plans_refused(cls, monkeypatch):
    from nnunet_semisam.trainers.semi_supervised import SemiSupervisedTrainer
    monkeypatch.setattr(SemiSupervisedTrainer, "preflight_checks", lambda self: None)
    t = cls.__new__(cls)
    t.label_manager = SimpleNamespace(has_regions=True)
    with pytest.raises(SemiSAMError, match="region-based"):
        t.preflight_checks()
