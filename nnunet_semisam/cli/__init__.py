"""`nnunet-semisam <verb>`: the plugin's command line.

Each verb lives in its own module `nnunet_semisam.cli.<module>` exposing `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed namespace and returning an exit code or None). Modules keep
heavy imports (torch, nnunetv2) inside `func`, so `nnunet-semisam --help` stays fast.
A `SemiSAMError` is printed as one line `error: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from nnunet_semisam.errors import SemiSAMError

# verb modules, in the order `--help` lists them; a module may register more than one verb
VERB_MODULES = (
    "nnunet_semisam.cli.demo",
    "nnunet_semisam.cli.synthetic",
    "nnunet_semisam.cli.unlabeled",
    "nnunet_semisam.cli.evaluate",
    "nnunet_semisam.cli.trainers_path",
    "nnunet_semisam.cli.plan",
    "nnunet_semisam.cli.complexity",
    "nnunet_semisam.cli.pseudolabel",
    "nnunet_semisam.cli.convert",
    "nnunet_semisam.cli.benchmark",
    "nnunet_semisam.cli.export",
    "nnunet_semisam.cli.refine",
    "nnunet_semisam.cli.train",
    "nnunet_semisam.cli.merge_datasets",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-semisam",
        description="Semi-supervised learning with foundation-model teachers for nnU-Net v2.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a verb whose module is not part of this build yet
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except SemiSAMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
