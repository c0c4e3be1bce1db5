"""VerSemi's task-prompted dynamic head on an nnU-Net plans network (METHODS.md §6.2, §6.5, §6.6).

    skips = E(x_img);  d = D(skips) (last decoder stage, C_0 channels, no seg layer);  b = skips[-1] (C_b channels)
    g   = GAP(ReLU(BN(b)))                         (B, C_b)       global branch
    e   = one_hot(t - 1, K + 1)                    (B, K+1)       task prompt, t in 1..K+1 (K+1 = synthetic union task)
    th  = Linear([g; e])                           (B, 180)       controller (with bias)
    h0  = Conv1x1(C_0 -> 8)(ReLU(BN(d)))           (B, 8, *S)
    F(x, t) = w3 ReLU(w2 ReLU(w1 h0 + b1) + b2) + b3   (B, 2, *S) per sample, from th split as `HEAD_LAYOUT`

The per-sample 1x1 convolutions run as one grouped convolution (groups = B) over the batch folded into channels.
`w4, b4` are part of the 180 parameters (the official layout) but their output is never used, so it is not
computed. `features` runs the backbone once; `head` can then be applied for any number of prompts (§6.5).

nnU-Net's side: the network is built with `num_output_channels = K + 2` (the merged dataset's labels: background,
task 1..K, union K+1; `merge-datasets`), and `forward(x)` without prompts returns label logits with K+2 channels:
channel 0 is the head's background logit, channel t its foreground logit, every other channel 20 below both, so
the argmax writes label t where the task's structure is. The prompt t of each sample is read from the last input
channel (the constant task channel of `merge-datasets`), unless `task_override` is set (env
`nnUNet_semisam_versemi_task`: a task id or `union`, read when the network is built). The backbone never sees the
task channel.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.errors import SemiSAMError

#: name, shape of the dynamic parameters in their order along dim 1 of the controller output (row-major weights)
HEAD_LAYOUT = (("w1", (8, 8)), ("w2", (8, 8)), ("w3", (2, 8)), ("w4", (2, 8)),
               ("b1", (8,)), ("b2", (8,)), ("b3", (2,)), ("b4", (2,)))
NUM_DYNAMIC_PARAMS = 180
HEAD_CHANNELS = 8
TASK_ENV = "nnUNet_semisam_versemi_task"


def split_dynamic_params(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 180) controller output -> {name: (B, *shape)} in `HEAD_LAYOUT` order."""
    if theta.ndim != 2 or theta.shape[1] != NUM_DYNAMIC_PARAMS:
        raise ValueError(f"expected (B, {NUM_DYNAMIC_PARAMS}) dynamic parameters, got {tuple(theta.shape)}")
    out, start = {}, 0
    for name, shape in HEAD_LAYOUT:
        n = 1
        for s in shape:
            n *= s
        out[name] = theta[:, start:start + n].reshape(theta.shape[0], *shape)
        start += n
    return out


def _grouped_1x1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample 1x1 conv as one grouped conv: x (1, B*in, *S), w (B, out, in), b (B, out) -> (1, B*out, *S)."""
    nd = x.ndim - 2
    conv = F.conv3d if nd == 3 else F.conv2d if nd == 2 else F.conv1d
    B, out, inp = w.shape
    return conv(x, w.reshape(B * out, inp, *([1] * nd)), b.reshape(B * out), groups=B)


def dynamic_head(h0: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 3-layer per-sample head on h0 (B, 8, *S) -> (B, 2, *S) logits (module docstring)."""
    B, _, *spatial = h0.shape
    x = h0.reshape(1, -1, *spatial)
    x = F.relu(_grouped_1x1(x, params["w1"], params["b1"]))
    x = F.relu(_grouped_1x1(x, params["w2"], params["b2"]))
    return _grouped_1x1(x, params["w3"], params["b3"]).reshape(B, 2, *spatial)


def label_logits(logits2: torch.Tensor, task_ids: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(B, 2, *S) head logits -> (B, num_labels, *S) nnU-Net label logits: channel 0 background, channel t_b the
    foreground of sample b, all others `min(bg, fg) - 20`."""
    B, _, *spatial = logits2.shape
    low = torch.minimum(logits2[:, :1], logits2[:, 1:]) - 20.0
    out = torch.cat([logits2[:, :1], low.expand(B, num_labels - 1, *spatial)], 1)
    index = task_ids.long().view(B, 1, *([1] * len(spatial))).expand(B, 1, *spatial)
    return out.scatter(1, index, logits2[:, 1:])


def parse_task_override(value: str | None, num_tasks: int) -> int | None:
    """`$nnUNet_semisam_versemi_task`: None/'' -> None, 'union' -> K+1, else an int in 1..K+1."""
    if value is None or value.strip() == "":
        return None
    if value.strip().casefold() == "union":
        return num_tasks + 1
    try:
        task = int(value)
    except ValueError:
        task = -1
    if not 1 <= task <= num_tasks + 1:
        raise SemiSAMError(f"{TASK_ENV}={value!r}: expected a task id 1..{num_tasks + 1} or 'union'")
    return task


class DynamicHeadUNet(nn.Module):
    """An nnU-Net encoder-decoder (with `.encoder`, `.decoder` of dynamic_network_architectures) whose seg layer is
    replaced by the task-prompted dynamic head (module docstring)."""

    def __init__(self, backbone: nn.Module, num_tasks: int, num_image_channels: int,
                 task_override: int | None = None):
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"need at least one task, got {num_tasks}")
        self.encoder = backbone.encoder
        self.decoder = backbone.decoder
        self.decoder.seg_layers = nn.ModuleList()  # replaced by the head
        self.decoder.deep_supervision = False
        self.num_tasks = num_tasks
        self.num_image_channels = num_image_channels
        self.task_override = task_override
        nd = len(self.encoder.strides[0])
        bn = nn.BatchNorm3d if nd == 3 else nn.BatchNorm2d
        c_b, c_0 = self.encoder.output_channels[-1], self.encoder.output_channels[0]
        self.global_norm = bn(c_b)
        self.pre_norm = bn(c_0)
        self.pre_conv = self.encoder.conv_op(c_0, HEAD_CHANNELS, 1)
        self.controller = nn.Linear(c_b + num_tasks + 1, NUM_DYNAMIC_PARAMS)

    @property
    def num_labels(self) -> int:
        """nnU-Net output channels: background, K tasks, the union task."""
        return self.num_tasks + 2

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, h0) of the image channels of x: the backbone's one pass (§6.5)."""
        skips = self.encoder(x[:, :self.num_image_channels])
        lres = skips[-1]
        for s in range(len(self.decoder.stages)):
            y = torch.cat((self.decoder.transpconvs[s](lres), skips[-(s + 2)]), 1)
            lres = self.decoder.stages[s](y)
        g = F.relu(self.global_norm(skips[-1])).flatten(2).mean(2)
        h0 = self.pre_conv(F.relu(self.pre_norm(lres)))
        return g, h0

    def head(self, g: torch.Tensor, h0: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """F(x, t): 2-class logits (B, 2, *S) for prompts task_ids (B,) in 1..K+1."""
        prompt = F.one_hot(task_ids.long().to(g.device) - 1, self.num_tasks + 1).to(g.dtype)
        theta = self.controller(torch.cat([g, prompt], 1))
        return dynamic_head(h0, split_dynamic_params(theta))

    def task_ids_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Prompt per sample: `task_override`, else the rounded max of the task channel (zero padding aside)."""
        if self.task_override is not None:
            return torch.full((x.shape[0],), self.task_override, dtype=torch.long, device=x.device)
        if x.shape[1] <= self.num_image_channels:
            raise SemiSAMError(f"the input has {x.shape[1]} channel(s) and no task channel after the "
                               f"{self.num_image_channels} image channel(s); set {TASK_ENV}")
        t = x[:, self.num_image_channels].flatten(1).amax(1).round().long()
        return t.clamp(1, self.num_tasks + 1)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None,
                prompts: list[tuple[int, int, torch.Tensor]] | None = None):
        """nnU-Net label logits (B, K+2, *S) with each sample's prompt (validation, `nnUNetv2_predict`).

        Training (`prompts` given): one backbone pass over x, then the 2-class head logits of every
        `(start, stop, task_ids)` prompt group on samples start:stop, as a list. Going through `forward` keeps
        DDP's gradient synchronisation."""
        if prompts is not None:
            g, h0 = self.features(x)
            return [self.head(g[a:b], h0[a:b], t) for a, b, t in prompts]
        if task_ids is None:
            task_ids = self.task_ids_from_input(x)
        g, h0 = self.features(x)
        return label_logits(self.head(g, h0, task_ids), task_ids, self.num_labels)


def versemi_network(configuration_manager, num_input_channels: int, num_output_channels: int) -> DynamicHeadUNet:
    """The VerSemi network of a merged dataset's plans: nnU-Net's plans network on the image channels (all input
    channels but the last, the task channel), deep supervision off, with the dynamic head; K = outputs - 2."""
    from nnunet_semisam.networks.multi_decoder import plans_network

    num_tasks = num_output_channels - 2
    if num_tasks < 1 or num_input_channels < 2:
        raise SemiSAMError(f"VerSemi needs a dataset made by `nnunet-semisam merge-datasets` (labels background, "
                           f"task 1..K, union; a last task channel); got {num_output_channels} label(s) and "
                           f"{num_input_channels} input channel(s)")
    backbone = plans_network(configuration_manager, num_input_channels - 1, 2)
    override = parse_task_override(os.environ.get(TASK_ENV), num_tasks)
    return DynamicHeadUNet(backbone, num_tasks, num_input_channels - 1, override)
