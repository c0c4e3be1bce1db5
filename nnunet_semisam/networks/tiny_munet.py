"""Tiny-MUNet: a small U-Net with a Mamba encoder, configurable from nnU-Net plans, 2D and 3D.

METHODS.md §3.3 (channel plan, our design for [KD] §1.2), §3.2 (Mamba layer), §1.3 (deep supervision). One class for
2D and 3D: the convolution, normalisation and nonlinearity classes are injected as in dynamic_network_architectures'
`PlainConvUNet`, and nnU-Net's `get_network_from_plans` builds it from `architecture.arch_kwargs`.

Encoder: `n_conv_stages` convolutional stages (the paper: stem S0 and s1 S1), then one Mamba stage per entry of
`n_mamba_layers_per_stage` (the paper: e1..e4 giving F1..F4), each `Down -> DW residual -> k x MambaLayer`.
Decoder: one `Up` block per skip (bilinear/trilinear upsampling, 1x1 projection, add, fuse), with a segmentation
head at every resolution for nnU-Net's deep supervision. No final nonlinearity.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import _get_current_dispatch_mode

from nnunet_semisam.networks.mamba import MambaLayer

_HAS_FUSED_CONV_GELU = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

IntOrSeq = Union[int, Sequence[int]]

__all__ = ["TinyMUNet", "TinyMUNetEncoder", "TinyMUNetDecoder", "paper_tiny_munet", "PAPER_ARCH_KWARGS"]

# METHODS.md §3.3 table: stem, s1 (conv) and e1..e4 (Mamba); 256x256 input -> F4 at 8x8
PAPER_ARCH_KWARGS = dict(
    features_per_stage=(32, 64, 64, 96, 128, 192),
    strides=(1, 2, 2, 2, 2, 2),
    kernel_sizes=3,
    n_conv_stages=2,
    n_mamba_layers_per_stage=(1, 2, 2, 2),
    conv_op=nn.Conv2d,
    norm_op=nn.BatchNorm2d,
    norm_op_kwargs={"eps": 1e-5, "affine": True},
    nonlin=nn.GELU,
    nonlin_kwargs={},
    d_state=16,
    d_conv=4,
    expand=2,
)


def _per_stage(value, n: int, dim: int, name: str) -> list[tuple[int, ...]]:
    """An int, a per-stage list of ints or a per-stage list of per-axis lists as n tuples of `dim` ints."""
    if isinstance(value, int):
        value = [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per stage ({n}), got {len(value)}: {value}")
    out = []
    for v in value:
        v = (int(v),) * dim if isinstance(v, (int, np.integer)) else tuple(int(i) for i in v)
        if len(v) != dim:
            raise ValueError(f"{name} entries must have {dim} values (one per spatial axis), got {list(v)}")
        out.append(v)
    return out


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4D (2D-image) tensor in channels-last memory format (same values and shape); other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _fused_conv_gelu_ok(x: torch.Tensor, conv: _ConvNd) -> bool:
    """Whether `ConvNormAct`'s eval path may run conv + GELU as one oneDNN call (`mkldnn._convolution_pointwise`,
    the fused op PyTorch's own CPU compiler emits): float32 CPU input, no autograd, numeric padding, an ATen
    built with oneDNN, and no dispatch mode active (FLOP counters and fake tensors see the plain aten ops). Same
    values as conv then GELU up to float rounding (METHODS.md §3.3)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros" and _HAS_FUSED_CONV_GELU
            and _get_current_dispatch_mode() is None)


def _numel(channels: int, size: Sequence[int]) -> np.int64:
    return np.prod([channels, *size], dtype=np.int64)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> nonlin; `CBA` of METHODS.md §3.3 ('same' padding k//2), or `Down` (kernel = stride,
    no padding, no nonlin) with `downsample=True`."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], norm_op: Optional[Type[nn.Module]], norm_op_kwargs: Optional[dict],
                 nonlin: Optional[Type[nn.Module]], nonlin_kwargs: Optional[dict], groups: int = 1,
                 downsample: bool = False):
        padding = (0,) * len(kernel_size) if downsample else tuple(k // 2 for k in kernel_size)
        layers = [conv_op(in_channels, out_channels, tuple(kernel_size), tuple(stride), padding=padding,
                          groups=groups, bias=False)]
        if norm_op is not None:
            layers.append(norm_op(out_channels, **(norm_op_kwargs or {})))
        if nonlin is not None:
            layers.append(nonlin(**(nonlin_kwargs or {})))
        super().__init__(*layers)
        self.out_channels = out_channels
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv -> norm -> nonlin; in eval mode a BatchNorm with running statistics is folded into the conv.

        Folding (w * g / sqrt(v + eps), b - m * g / sqrt(v + eps)) gives the same affine map up to float rounding
        and saves one pass over the output (BatchNorm is slow on channels-last maps on CPU). Gradients still flow
        to the conv and BatchNorm parameters through the folded weights.
        """
        conv, norm = self[0], self[1] if len(self) > 1 else None
        if (self.training or not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_mean is None
                or not norm.track_running_stats):
            return super().forward(x)
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        bias = -norm.running_mean * scale
        if norm.bias is not None:
            bias = bias + norm.bias
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = (conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))).to(x.dtype)
        rest = list(self)[2:]
        if rest and isinstance(rest[0], nn.GELU) and _fused_conv_gelu_ok(x, conv):
            # oneDNN applies the GELU while the conv's output tile is in cache: one pass over the map instead of two
            x = torch.ops.mkldnn._convolution_pointwise(x, weight, bias.to(x.dtype), list(conv.padding),
                                                        list(conv.stride), list(conv.dilation), conv.groups, "gelu",
                                                        [None], rest[0].approximate)
            rest = rest[1:]
        else:
            x = conv._conv_forward(x, weight, bias.to(x.dtype))
        for layer in rest:
            if isinstance(layer, nn.GELU) and not (torch.is_grad_enabled() and x.requires_grad):
                x = torch.ops.aten.gelu_(x, approximate=layer.approximate)  # no fresh (page-faulted) output map
            else:
                x = layer(x)
        return x

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Output elements per sample (nnU-Net's unit: one feature map per conv-norm-nonlin block)."""
        return _numel(self.out_channels, [i // s for i, s in zip(input_size, self.stride)])


class DepthwiseResidual(nn.Module):
    """`x + DW(x)`, DW = depthwise conv -> norm -> nonlin (METHODS.md §3.3)."""

    def __init__(self, conv_op, channels, kernel_size, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.dw = ConvNormAct(conv_op, channels, channels, kernel_size, [1] * len(kernel_size), norm_op,
                              norm_op_kwargs, nonlin, nonlin_kwargs, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dw(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        return self.dw.compute_conv_feature_map_size(input_size) + _numel(self.dw.out_channels, input_size)


def mamba_layer_feature_map_size(layer: MambaLayer, input_size: Sequence[int]) -> np.int64:
    """Memory model of one `MambaLayer` per sample, in nnU-Net's unit (elements of conv-block outputs).

    Counts the (L, .) activations a training step keeps per token and direction: LayerNorm in/out (2C), in_proj
    output x, z (2E), conv and SiLU outputs (2E), x_proj output (r + 2N), dt (E), scan inputs/outputs kept by the
    checkpointed scan (3E), out_proj output (C), residual (C); the recomputed scan's (E, N) states exist for one layer
    at a time and are not included. Divided by `ACTIVATION_ELEMENTS_PER_UNIT`, the number of stored elements nnU-Net's
    unit corresponds to for a conv-norm-nonlin block (conv output, norm output), so that estimates are comparable with
    nnU-Net's reference values.
    """
    m = layer.mamba
    tokens = int(np.prod(input_size, dtype=np.int64))
    per_token = 2 * (2 * m.d_model + 7 * m.d_inner + m.dt_rank + 2 * m.d_state) + 2 * m.d_model
    return np.int64(tokens * per_token // ACTIVATION_ELEMENTS_PER_UNIT)


# a conv -> norm -> nonlin block stores about two maps of its output size (norm input and nonlin input)
ACTIVATION_ELEMENTS_PER_UNIT = 2


class TinyMUNetEncoder(nn.Module):
    """Convolutional stages then Mamba stages; returns every stage output (skips), the last one the bottleneck.

    Stage i < n_conv_stages: CBA(k, stride_i) -> CBA(k, 1). Stage i >= n_conv_stages: Down(stride_i) ->
    DW residual -> `n_mamba_layers_per_stage[j]` x `MambaLayer`. `output_channels`, `strides`, `kernel_sizes`,
    `conv_op`, `stage_kinds` ('conv' | 'mamba') describe the stages for the decoder and the planner.
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], conv_op: Type[_ConvNd],
                 kernel_sizes: IntOrSeq, strides: IntOrSeq, n_conv_stages: int,
                 n_mamba_layers_per_stage: Sequence[int], norm_op: Optional[Type[nn.Module]],
                 norm_op_kwargs: Optional[dict], nonlin: Optional[Type[nn.Module]], nonlin_kwargs: Optional[dict],
                 d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        n_stages = len(features_per_stage)
        dim = convert_conv_op_to_dim(conv_op)
        if len(n_mamba_layers_per_stage) != n_stages - n_conv_stages:
            raise ValueError(
                f"n_mamba_layers_per_stage must have n_stages - n_conv_stages = {n_stages} - {n_conv_stages} = "
                f"{n_stages - n_conv_stages} entries, got {list(n_mamba_layers_per_stage)}")
        if n_conv_stages < 1:
            raise ValueError(f"n_conv_stages must be >= 1 (the stem), got {n_conv_stages}")
        self.conv_op = conv_op
        self.output_channels = [int(f) for f in features_per_stage]
        self.strides = _per_stage(strides, n_stages, dim, "strides")
        self.kernel_sizes = _per_stage(kernel_sizes, n_stages, dim, "kernel_sizes")
        self.n_conv_stages = n_conv_stages
        self.stage_kinds = ["conv"] * n_conv_stages + ["mamba"] * (n_stages - n_conv_stages)
        ops = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        stages, c_in = [], input_channels
        for i, c in enumerate(self.output_channels):
            k, s = self.kernel_sizes[i], self.strides[i]
            if i < n_conv_stages:
                stage = nn.Sequential(ConvNormAct(conv_op, c_in, c, k, s, **ops),
                                      ConvNormAct(conv_op, c, c, k, [1] * dim, **ops))
            else:
                n_layers = int(n_mamba_layers_per_stage[i - n_conv_stages])
                stage = nn.Sequential(
                    ConvNormAct(conv_op, c_in, c, s, s, norm_op, norm_op_kwargs, None, None, downsample=True),
                    DepthwiseResidual(conv_op, c, k, **ops),
                    *[MambaLayer(c, d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(n_layers)])
            stages.append(stage)
            c_in = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, *spatial) -> list of stage outputs (B, C_i, *spatial / prod(strides[:i+1]))."""
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def forward_from(self, stage_index: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of stages stage_index+1 .. end, starting from `x` in place of the output of `stage_index`."""
        outs = []
        for stage in self.stages[stage_index + 1:]:
            x = stage(x)
            outs.append(x)
        return outs

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Memory model per sample (nnU-Net's unit), summed over all stages."""
        total = np.int64(0)
        size = list(input_size)
        for stage in self.stages:
            for block in stage:
                if isinstance(block, MambaLayer):
                    total += mamba_layer_feature_map_size(block, size)
                else:
                    total += block.compute_conv_feature_map_size(size)
                    size = [i // s for i, s in zip(size, getattr(block, "stride", [1] * len(size)))]
        return total


class UpBlock(nn.Module):
    """`Up(a -> b, fuse)` of METHODS.md §3.3: interpolate to the skip's size, 1x1 conv + norm, add skip, fuse.

    fuse 'sep': depthwise conv -> norm -> nonlin -> CBA(1x1); fuse 'full': CBA(k). The interpolation is bilinear in
    2D and trilinear in 3D (align_corners=False). The 1x1 conv (linear over channels) commutes with the
    interpolation (linear over space), so it runs first, at the low resolution: the same function for a quarter
    (an eighth in 3D) of the projection's MACs; the norm follows the interpolation as in METHODS.md.
    """

    def __init__(self, conv_op, in_channels: int, out_channels: int, fuse: str, kernel_size: Sequence[int],
                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        dim = len(kernel_size)
        ones = [1] * dim
        self.mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[dim]
        self.proj = ConvNormAct(conv_op, in_channels, out_channels, ones, ones, norm_op, norm_op_kwargs, None, None)
        ops = dict(norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        if fuse == "sep":
            self.fuse = nn.Sequential(
                ConvNormAct(conv_op, out_channels, out_channels, kernel_size, ones, groups=out_channels, **ops),
                ConvNormAct(conv_op, out_channels, out_channels, ones, ones, **ops))
        elif fuse == "full":
            self.fuse = nn.Sequential(ConvNormAct(conv_op, out_channels, out_channels, kernel_size, ones, **ops))
        else:
            raise ValueError(f"fuse must be 'sep' or 'full', got {fuse!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if not self.training:  # per-channel affine eval norm commutes with interpolation (weights sum to 1): fold
            x = F.interpolate(self.proj(x), size=skip.shape[2:], mode=self.mode, align_corners=False)
            return self.fuse(x + skip)
        x = F.interpolate(self.proj[0](x), size=skip.shape[2:], mode=self.mode, align_corners=False)
        for i in range(1, len(self.proj)):  # the norm
            x = self.proj[i](x)
        return self.fuse(x + skip)

    def compute_conv_feature_map_size(self, skip_size: Sequence[int]) -> np.int64:
        # interpolated projection, its norm, the sum, fuse block(s)
        total = 3 * _numel(self.out_channels, skip_size)
        return total + sum(b.compute_conv_feature_map_size(skip_size) for b in self.fuse)


class TinyMUNetDecoder(nn.Module):
    """U-shaped decoder over a `TinyMUNetEncoder`: one `UpBlock` per skip, from the bottleneck up.

    Fuse type per block: 'sep' where the skip comes from a Mamba stage, 'full' where it comes from a conv stage
    (METHODS.md §3.3). A 1x1 segmentation head with bias follows every block and is always built, so one checkpoint
    loads with deep supervision on or off; `deep_supervision` (toggled by nnU-Net's trainer) selects whether all
    heads' logits are returned, full resolution first, or only the last one.
    """

    def __init__(self, encoder: TinyMUNetEncoder, num_classes: int, deep_supervision: bool,
                 norm_op, norm_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.skip_strides = encoder.strides
        chans = encoder.output_channels
        stages, heads = [], []
        for s in range(len(chans) - 1, 0, -1):  # skip index s-1, input from s
            fuse = "sep" if encoder.stage_kinds[s - 1] == "mamba" else "full"
            stages.append(UpBlock(encoder.conv_op, chans[s], chans[s - 1], fuse, encoder.kernel_sizes[s - 1],
                                  norm_op, norm_op_kwargs, nonlin, nonlin_kwargs))
            heads.append(encoder.conv_op(chans[s - 1], num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: Sequence[torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Skips in encoder order (bottleneck last) -> logits (B, K, *spatial) or the list [full res, 1/2, ...]."""
        x = skips[-1]
        outputs = []
        for s, (stage, head) in enumerate(zip(self.stages, self.seg_layers)):
            x = stage(x, skips[-(s + 2)])
            if self.deep_supervision or s == len(self.stages) - 1:
                outputs.append(head(x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        sizes, size = [], list(input_size)
        for stride in self.skip_strides:
            size = [i // s for i, s in zip(size, stride)]
            sizes.append(size)
        total = np.int64(0)
        for s, stage in enumerate(self.stages):
            skip_size = sizes[-(s + 2)]
            total += stage.compute_conv_feature_map_size(skip_size)
            if self.deep_supervision or s == len(self.stages) - 1:
                total += _numel(self.num_classes, skip_size)
        return total


class TinyMUNet(nn.Module):
    """Mamba-encoder U-Net (METHODS.md §3.3) for 2D or 3D inputs, built from nnU-Net plans.

    Args:
        input_channels, num_classes, deep_supervision: as passed by nnU-Net's `get_network_from_plans`.
        features_per_stage: channels per stage, conv stages first (paper: 32, 64 | 64, 96, 128, 192).
        conv_op: nn.Conv2d or nn.Conv3d; chooses 2D or 3D.
        kernel_sizes: conv kernel per stage (int, or per stage an int or per-axis list), used by the CBA convs of
            the stage, its depthwise residual and the decoder fuse block at that resolution.
        strides: downsampling per stage (int or per-axis list); stage 0 is usually 1. nnU-Net reads the same list
            as `pool_op_kernel_sizes` for its deep-supervision targets.
        n_conv_stages: leading convolutional stages (paper: 2, stem and s1).
        n_mamba_layers_per_stage: `MambaLayer`s in each following Mamba stage (paper: 1, 2, 2, 2).
        norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: normalisation and nonlinearity (paper: BatchNorm, GELU).
        d_state, d_conv, expand: Mamba hyper-parameters (METHODS.md §3.1).

    `forward(x)` returns logits (B, K, *spatial) without final nonlinearity, or with `decoder.deep_supervision` the
    list [full res, 1/2, ...] (one per skip). `forward(x, return_features=True)` also returns the Mamba stage
    outputs [F1, ..., F_L]; `encode_from(level, F)` re-runs the encoder after level `level` (FPKDM, METHODS.md §4.1).
    Input sizes must be divisible by the product of the strides along each axis.
    """

    def __init__(self, input_channels: int, num_classes: int,
                 features_per_stage: Sequence[int] = PAPER_ARCH_KWARGS["features_per_stage"],
                 conv_op: Type[_ConvNd] = nn.Conv2d,
                 kernel_sizes: IntOrSeq = 3,
                 strides: IntOrSeq = PAPER_ARCH_KWARGS["strides"],
                 n_conv_stages: int = 2,
                 n_mamba_layers_per_stage: Sequence[int] = PAPER_ARCH_KWARGS["n_mamba_layers_per_stage"],
                 norm_op: Optional[Type[nn.Module]] = nn.BatchNorm2d,
                 norm_op_kwargs: Optional[dict] = None,
                 nonlin: Optional[Type[nn.Module]] = nn.GELU,
                 nonlin_kwargs: Optional[dict] = None,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 deep_supervision: bool = False):
        super().__init__()
        self.encoder = TinyMUNetEncoder(input_channels, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_stages, n_mamba_layers_per_stage, norm_op, norm_op_kwargs, nonlin,
                                        nonlin_kwargs, d_state, d_conv, expand)
        self.decoder = TinyMUNetDecoder(self.encoder, num_classes, deep_supervision, norm_op, norm_op_kwargs,
                                        nonlin, nonlin_kwargs)
        self.n_conv_stages = n_conv_stages
        self.num_feature_levels = len(features_per_stage) - n_conv_stages

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """(B, C_in, *spatial) -> logits (or DS list); with `return_features`, (logits, [F1, ..., F_L]).

        2D maps run channels-last inside (oneDNN convolutions are up to 10x faster on NHWC than on NCHW for few
        channels, and a channels-last map flattens to the Mamba tokens (B, HW, C) without a copy); the returned
        logits and features are standard contiguous tensors.
        """
        skips = self.encoder(_channels_last(x))
        out = self.decoder(skips)
        out = [o.contiguous() for o in out] if isinstance(out, list) else out.contiguous()
        if return_features:
            return out, [f.contiguous() for f in skips[self.n_conv_stages:]]
        return out

    def encode_from(self, level: int, feature: torch.Tensor) -> list[torch.Tensor]:
        """[F_{level+1}, ..., F_L] recomputed from `feature` in place of F_level (level 1..L, 1-based as F1..F4).

        `feature` has F_level's shape (B, C_level, *spatial_level); gradients flow into it and into the later
        stages. Used by FPKDM to propagate a perturbed F1 (METHODS.md §4.1 step 2).
        """
        if not 1 <= level <= self.num_feature_levels:
            raise ValueError(f"level must be in 1..{self.num_feature_levels}, got {level}")
        outs = self.encoder.forward_from(self.n_conv_stages + level - 1, _channels_last(feature))
        return [f.contiguous() for f in outs]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Memory model per sample for nnU-Net-style planning (see `mamba_layer_feature_map_size`)."""
        dim = convert_conv_op_to_dim(self.encoder.conv_op)
        if len(input_size) != dim:
            raise ValueError(f"input_size must be the {dim} spatial sizes (no batch/channel), got {list(input_size)}")
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He init (neg. slope 1e-2) for Conv2d/3d; the Mamba conv1d and Linear layers keep theirs."""
        InitWeights_He(1e-2)(module)


def paper_tiny_munet(input_channels: int = 3, num_classes: int = 2, deep_supervision: bool = False) -> TinyMUNet:
    """The METHODS.md §3.3 configuration (2D, 256x256 inputs).

    1,297,578 parameters (METHODS.md's 1,296,866 plus the four deep-supervision heads); at 1x3x256x256 about 3.39 G
    conv/linear MACs + 0.16 G selective-scan MACs (`nnunet_semisam.networks.complexity`). METHODS.md's 3.86 G assumes
    two full Mamba passes per layer and the 1x1 decoder projections at the upsampled size; here the bidirectional
    layer shares in_proj/out_proj and the projections run before the (commuting) upsampling: same function.
    """
    net = TinyMUNet(input_channels, num_classes, deep_supervision=deep_supervision, **PAPER_ARCH_KWARGS)
    net.apply(TinyMUNet.initialize)
    return net
