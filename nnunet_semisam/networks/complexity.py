"""Parameter and multiply-accumulate counts of a network at a given input size, Mamba scans included.

Two MAC figures (METHODS.md §3.3 and issue 3):
- `macs_conv_linear`: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2 of one forward pass. It counts
  convolutions (transposed too) and matrix products (Linear, mm, bmm), i.e. METHODS.md's rule "Conv, ConvTranspose and
  Linear multiply-accumulates"; normalisation, activations, interpolation and element-wise ops count 0.
- `macs_scan`: the selective scans, which run as element-wise ops the flop counter does not see. Counted analytically
  by forward hooks on every `MambaLayer` / `Mamba` call with `selective_scan_flops` (9 b L E N + 2 b E L FLOPs per
  scan, VMamba's fvcore rule), both scan directions included; MACs = FLOPs / 2.
`macs` = `macs_conv_linear + macs_scan` is the issue's figure ("FLOPs/2 as counted by torch.utils.flop_counter, Mamba
scan included").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_semisam.networks.mamba import Mamba, MambaLayer, count_parameters, selective_scan_flops

__all__ = ["network_complexity", "format_complexity"]


def network_complexity(network: nn.Module, input_channels: int, patch_size: Sequence[int],
                       batch_size: int = 1) -> dict:
    """Parameters and MACs of `network` for one forward pass on a (batch_size, input_channels, *patch_size) input.

    Runs the forward on zeros under `torch.no_grad()` in eval mode (restored afterwards) on the network's device.
    Returns a JSON-ready dict: `parameters`, `input_shape`, `macs_conv_linear`, `macs_scan`, `macs` (ints) and the
    same three in GMACs (`gmacs_*`, floats).
    """
    device = next(network.parameters()).device
    x = torch.zeros((batch_size, input_channels, *[int(i) for i in patch_size]), device=device)
    scan_flops = [0]

    def layer_hook(module: MambaLayer, args, output) -> None:
        inp = args[0]
        scan_flops[0] += module.scan_flops(inp.shape[0], int(torch.tensor(inp.shape[2:]).prod()))

    def mamba_hook(module: Mamba, args, output) -> None:
        b, length = args[0].shape[:2]
        scan_flops[0] += selective_scan_flops(b, length, module.d_inner, module.d_state)

    handles = []
    for m in network.modules():
        if isinstance(m, MambaLayer):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, Mamba):
            handles.append(m.register_forward_hook(mamba_hook))
    was_training = network.training
    network.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            network(x)
    finally:
        for h in handles:
            h.remove()
        network.train(was_training)
    macs_cl = counter.get_total_flops() // 2
    macs_scan = scan_flops[0] // 2
    return {
        "parameters": count_parameters(network),
        "input_shape": list(x.shape),
        "macs_conv_linear": int(macs_cl),
        "macs_scan": int(macs_scan),
        "macs": int(macs_cl + macs_scan),
        "gmacs_conv_linear": macs_cl / 1e9,
        "gmacs_scan": macs_scan / 1e9,
        "gmacs": (macs_cl + macs_scan) / 1e9,
    }


def format_complexity(name: str, c: dict) -> str:
    """One readable line: parameters in millions and GMACs with the scan share."""
    return (f"{name}: {c['parameters'] / 1e6:.3f} M parameters, {c['gmacs']:.3f} GMACs at input "
            f"{'x'.join(str(i) for i in c['input_shape'])} (conv/linear {c['gmacs_conv_linear']:.3f} + "
            f"selective scan {c['gmacs_scan']:.3f})")
