"""`nnunet-semisam complexity`: parameters and GMACs of a planned network at its patch size (or the paper preset).

MACs are counted as in `nnunet_semisam.networks.complexity`: torch.utils.flop_counter FLOPs / 2 for convolutions and
matrix products, plus the analytic selective-scan count of Mamba layers, reported separately and summed. Works for
any network a plans file names (TinyMUNet, nnU-Net's PlainConvUNet, ...). Prints the JSON record on stdout and one
readable line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnunet_semisam.errors import SemiSAMError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "complexity",
        help="parameters and GMACs of a planned network (or --preset paper)",
        description="Build the network of plans PLANS, configuration CONFIG of dataset ID as nnU-Net does and count "
                    "its parameters and multiply-accumulates for one patch (batch 1). Example: "
                    "nnunet-semisam complexity -d 501 -c 2d -p nnUNetPlans_TinyMUNet; "
                    "nnunet-semisam complexity --preset paper (Tiny-MUNet of METHODS.md 3.3, 1x3x256x256).",
    )
    p.add_argument("-d", type=str, default=None, help="dataset name or ID (with -c)")
    p.add_argument("-c", default="2d", help="configuration (default: %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("--preset", choices=("paper",), default=None,
                   help="count a preset instead of a plans file: 'paper' = paper_tiny_munet(3, 2) at 256x256")
    p.add_argument("--patch", type=int, nargs="+", default=None, metavar="N",
                   help="input size to count at (default: the configuration's patch size; 256 256 for the preset)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if (args.preset is None) == (args.d is None):
        raise SemiSAMError("give either -d ID (with -c, -p) or --preset paper")
    import torch

    from nnunet_semisam.networks.complexity import format_complexity, network_complexity

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if args.preset == "paper":
        from nnunet_semisam.networks.tiny_munet import paper_tiny_munet

        network, channels, patch, name = paper_tiny_munet(3, 2), 3, args.patch or [256, 256], "paper Tiny-MUNet"
        record = {"preset": "paper", "network": "nnunet_semisam.networks.tiny_munet.TinyMUNet"}
    else:
        network, channels, plans_patch, record = _network_from_plans(args.d, args.c, args.p)
        patch, name = args.patch or plans_patch, f"{record['network'].split('.')[-1]} ({args.p}, {args.c})"
    dim = _spatial_dims(network)
    if len(patch) != dim:
        raise SemiSAMError(f"--patch needs {dim} sizes for this {dim}D network, got {patch}")
    result = network_complexity(network, channels, patch)
    record.update(result)
    print(json.dumps(record, indent=2))
    print(format_complexity(name, result), file=sys.stderr)
    return 0


def _spatial_dims(network) -> int:
    """2 or 3: the dimensionality of the network's first convolution."""
    import torch

    conv = next(m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    return 3 if isinstance(conv, torch.nn.Conv3d) else 2


def _network_from_plans(dataset: str, configuration: str, plans_identifier: str):
    """(network, input channels, patch size, record) built exactly as nnU-Net's trainer builds it (no DS)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        name = maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    except RuntimeError:
        raise SemiSAMError(f"dataset {dataset} not found under nnUNet_raw / nnUNet_preprocessed; check that "
                           f"the dataset exists and these environment variables are set") from None
    folder = os.path.join(nnUNet_preprocessed or "", name)
    plans_file = os.path.join(folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise SemiSAMError(f"plans file {plans_file} does not exist; plan first (nnunet-semisam plan -d {dataset} "
                           f"-pl TinyMUNetPlanner) or pass the right -p")
    plans = PlansManager(plans_file)
    if configuration not in plans.available_configurations:
        raise SemiSAMError(f"configuration {configuration!r} is not in {plans_file}; available: "
                           f"{', '.join(plans.available_configurations)}")
    cm = plans.get_configuration(configuration)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    channels = determine_num_input_channels(plans, cm, dataset_json)
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, channels, heads, allow_init=False,
                                     deep_supervision=False)
    record = {"dataset": name, "plans": plans_identifier, "configuration": configuration,
              "network": cm.network_arch_class_name, "patch_size": list(cm.patch_size),
              "batch_size": cm.batch_size}
    return network, channels, list(cm.patch_size), record
