"""Slicing-SAM3D: a frozen 2D SAM-family image encoder on every Z-slice + a trainable 3D CNN decoder (METHODS.md §5.2).

Forward of a patch `x` (B, C, Z, Y, X):

1. Encoder input: channel `sam_channel` of every Z-slice, min-max normalised to [0, 1] per slice (denominator clipped
   at 1e-8), replicated to 3 channels, bilinear (align_corners=False) to `S x S` (`slice_size`).
2. The frozen encoder (eval, `no_grad`, `requires_grad=False`) on the B*Z slices in chunks gives (B*Z, D, g, g);
   stacked back to the feature volume E (B, D, Z, g, g). Default encoder: LiteMedSAM's TinyViT (METHODS.md §2.8)
   built for side S with the official weights (`LiteMedSAMTeacher.encoder_for(S)`), D = 256, g = S/4; or MedSAM
   ViT-B from a local checkpoint (`SAMViTSliceEncoder`, pos_embed resized to the grid, §2.5), D = 256, g = S/16.
3. Decoder (IN = InstanceNorm3d(affine), LReLU(0.01)): Conv1^3(D->128)+IN+LReLU, a residual block of
   2 x [Conv3^3(128->128)+IN+LReLU]; `n_up` up-stages, each: trilinear x(1, 2, 2), Conv3^3(c->c/2)+IN+LReLU, concat the
   (1-channel) normalised input resized to that grid, Conv3^3(c/2+1->c/2)+IN+LReLU; Conv1^3(->K). `n_up` is what the
   encoder grid needs to reach S/2: log2((S/2)/g), at least 1 (3 for a ViT-B at stride 16 as in §5.2; 1 for TinyViT
   at stride 4). The logits are resized trilinearly to (Z, Y, X).

Only the decoder trains: the encoder's parameters have `requires_grad=False`, it stays in eval mode whatever
`train()` is asked, and runs under `no_grad`. `parameter_report()` states trainable vs frozen counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, k, padding=k // 2), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class TinyViTSliceEncoder(nn.Module):
    """LiteMedSAM's TinyViT + neck for square inputs of side `slice_size`: (N, 3, S, S) -> (N, 256, S/4, S/4).

    TinyViT's own forward hard-codes the 64 x 64 grid of S = 256; this runs its stages and neck on the real grid
    (as `LiteMedSAMTeacher.encode_features`)."""

    stride = 4
    out_channels = 256

    def __init__(self, tinyvit: nn.Module):
        super().__init__()
        self.tinyvit = tinyvit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.tinyvit
        t = enc.patch_embed(x)
        for layer in enc.layers:
            t = layer(t)
        b, n, c = t.shape
        g = int(round(n ** 0.5))
        return enc.neck(t.reshape(b, g, g, c).permute(0, 3, 1, 2))


def litemedsam_slice_encoder(slice_size: int, device: str | torch.device = "cpu") -> TinyViTSliceEncoder:
    """The default frozen encoder: LiteMedSAM's TinyViT for side `slice_size` with the official weights (sha256
    checked by `LiteMedSAMTeacher.from_package`)."""
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

    return TinyViTSliceEncoder(LiteMedSAMTeacher.from_package(device=device).encoder_for(int(slice_size)))


class SAMViTSliceEncoder(nn.Module):
    """A SAM / MedSAM ViT image encoder (`segment_anything`'s `ImageEncoderViT`) for square inputs of side S, a
    multiple of 16: (N, 3, S, S) in [0, 1] -> (N, C_neck, S/16, S/16) (METHODS.md §2.5, §5.2).

    The absolute `pos_embed` (64 x 64 for SAM's 1024 input) is resized bicubically to the S/16 grid
    (`teachers.medsam.interpolate_pos_embed`), the global-attention rel-pos tables by SAM's own `get_rel_pos`, the
    window blocks pad to multiples of 14; at S = 1024 this is exactly `ImageEncoderViT.forward`. The input is MedSAM's
    [0, 1] image (no pixel mean / std), as MedSAM's own inference feeds its encoder."""

    stride = 16

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.out_channels = int(image_encoder.neck[0].out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nnunet_semisam.teachers.medsam import interpolate_pos_embed

        enc = self.image_encoder
        t = enc.patch_embed(x)
        if enc.pos_embed is not None:
            t = t + interpolate_pos_embed(enc.pos_embed, tuple(t.shape[1:3]))
        for block in enc.blocks:
            t = block(t)
        return enc.neck(t.permute(0, 3, 1, 2))


SLICE_ENCODERS = ("litemedsam", "medsam")


def medsam_slice_encoder(checkpoint: str | None = None, device: str | torch.device = "cpu") -> SAMViTSliceEncoder:
    """MedSAM ViT-B's image encoder from a local checkpoint: `checkpoint`, else `$SEMISAM_TEACHER` (the file the
    `medsam` Algorithm 2 teacher reads too; nothing is downloaded), through the one SAM loader
    `teachers.sam_models.load_sam_checkpoint` (any SAM ViT it detects)."""
    import os

    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.teachers.sam_models import load_sam_checkpoint
    from nnunet_semisam.teachers.teacher_sets import CHECKPOINT_ENV

    env = CHECKPOINT_ENV["medsam"]
    path = checkpoint or os.environ.get(env)
    if not path:
        raise SemiSAMError(f"the MedSAM ViT-B slice encoder needs ${env} = a local checkpoint file (nothing is "
                           "downloaded)")
    sam, _, _ = load_sam_checkpoint(path, device=device)
    return SAMViTSliceEncoder(sam.image_encoder)


def build_slice_encoder(name: str, slice_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen encoder `name` (`SLICE_ENCODERS`): 'litemedsam' (default, installed weights) or 'medsam'."""
    from nnunet_semisam.errors import SemiSAMError

    if name == "litemedsam":
        return litemedsam_slice_encoder(slice_size, device)
    if name == "medsam":
        return medsam_slice_encoder(device=device)
    raise SemiSAMError(f"unknown slice encoder {name!r}; choose one of {', '.join(SLICE_ENCODERS)}")


class SlicingSAM3D(nn.Module):
    """Frozen 2D encoder per Z-slice, stacked embeddings, trainable 3D CNN decoder (module docstring)."""

    def __init__(self, encoder: nn.Module, num_classes: int, slice_size: int, sam_channel: int = 0,
                 width: int = 128, encoder_chunk: int = 64):
        super().__init__()
        stride, emb = int(getattr(encoder, "stride")), int(getattr(encoder, "out_channels"))
        if slice_size % stride:
            raise ValueError(f"slice_size {slice_size} is not a multiple of the encoder stride {stride}")
        self.encoder = encoder
        self.slice_size, self.sam_channel, self.encoder_chunk = int(slice_size), int(sam_channel), int(encoder_chunk)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        grid = slice_size // stride
        self.n_up = max(1, int(round(math.log2(max(slice_size / 2 / grid, 1)))))
        self.stem = _conv(emb, width, 1)
        self.res = nn.Sequential(_conv(width, width, 3), _conv(width, width, 3))
        self.up_convs, self.fuse_convs = nn.ModuleList(), nn.ModuleList()
        c = width
        for _ in range(self.n_up):
            self.up_convs.append(_conv(c, c // 2, 3))
            self.fuse_convs.append(_conv(c // 2 + 1, c // 2, 3))
            c //= 2
        self.head = nn.Conv3d(c, num_classes, 1)

    def train(self, mode: bool = True) -> "SlicingSAM3D":
        super().train(mode)
        self.encoder.eval()  # frozen: always eval
        return self

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> per-slice min-max [0, 1] of channel `sam_channel`, (B, 1, Z, Y, X)."""
        v = x[:, self.sam_channel:self.sam_channel + 1].float()
        lo = v.amin(dim=(-2, -1), keepdim=True)
        hi = v.amax(dim=(-2, -1), keepdim=True)
        return (v - lo) / (hi - lo).clamp_min(1e-8)

    @torch.no_grad()
    def embed(self, v01: torch.Tensor) -> torch.Tensor:
        """(B, 1, Z, Y, X) in [0, 1] -> E (B, D, Z, g, g) from the frozen encoder, slice by slice."""
        b, _, z, y, x = v01.shape
        slices = v01.permute(0, 2, 1, 3, 4).reshape(b * z, 1, y, x)
        slices = F.interpolate(slices, size=(self.slice_size,) * 2, mode="bilinear", align_corners=False)
        slices = slices.expand(-1, 3, -1, -1)
        dtype = next(self.encoder.parameters()).dtype
        outs = [self.encoder(slices[i:i + self.encoder_chunk].to(dtype)).float()
                for i in range(0, slices.shape[0], self.encoder_chunk)]
        e = torch.cat(outs, 0)
        return e.reshape(b, z, *e.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v01 = self.encoder_input(x)
        h = self.stem(self.embed(v01))
        h = h + self.res(h)
        for up, fuse in zip(self.up_convs, self.fuse_convs):
            h = F.interpolate(h, scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
            h = up(h)
            guide = F.interpolate(v01, size=h.shape[2:], mode="trilinear", align_corners=False)
            h = fuse(torch.cat([h, guide], 1))
        out = self.head(h)
        return F.interpolate(out, size=x.shape[2:], mode="trilinear", align_corners=False)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def parameter_report(self) -> str:
        frozen = sum(p.numel() for p in self.encoder.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return (f"SlicingSAM3D: {trainable:,} trainable decoder parameters, {frozen:,} frozen encoder parameters "
                f"({type(self.encoder).__name__}), slice size {self.slice_size}, {self.n_up} up-stage(s)")
