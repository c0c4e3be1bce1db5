"""`nnunet-semisam trainers-path`: print the folder to export as `nnUNet_extTrainer`."""
from __future__ import annotations

import argparse


def trainers_path() -> str:
    """Folder holding the installed `nnunet_semisam.trainers` modules (repo `trainers/` for an editable install)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("nnunet_semisam.trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunet_semisam.trainers is not installed; run `pip install -e .` in the repository")
    return os.path.abspath(list(spec.submodule_search_locations)[0])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trainers-path",
        help="print the value for nnUNet_extTrainer",
        description="Print the folder of this plugin's trainers. "
                    "Use: export nnUNet_extTrainer=$(nnunet-semisam trainers-path)",
    )
    p.set_defaults(func=lambda args: print(trainers_path()))
