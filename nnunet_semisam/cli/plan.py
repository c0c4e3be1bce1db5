"""`nnunet-semisam plan`: nnUNetv2_plan_experiment that also finds this plugin's planners (e.g. TinyMUNetPlanner).

nnU-Net searches planner classes only inside `nnunetv2.experiment_planning`; this verb looks the `-pl` name up in
`nnunet_semisam.planners` first, then in nnU-Net, and calls nnU-Net's `plan_experiment_dataset` with the class. The
options, their defaults and the written plans are those of `nnUNetv2_plan_experiment`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil

from nnunet_semisam.errors import SemiSAMError


def plugin_planners() -> dict:
    """{class name: class} of the ExperimentPlanner subclasses in `nnunet_semisam.planners`."""
    import nnunet_semisam.planners as package
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, ExperimentPlanner) and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def find_planner(name: str) -> type:
    """The planner class called `name`: this plugin's first, then nnU-Net's. SemiSAMError if neither has it."""
    ours = plugin_planners()
    if name in ours:
        return ours[name]
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise SemiSAMError(f"planner class {name!r} not found in nnunet_semisam.planners ({', '.join(sorted(ours))}) "
                           f"or in nnunetv2.experiment_planning")
    return cls


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="nnUNetv2_plan_experiment with this plugin's planners (e.g. -pl TinyMUNetPlanner)",
        description="Experiment planning as nnUNetv2_plan_experiment, but -pl also finds the planners of "
                    "nnunet_semisam.planners. Needs the dataset fingerprint (nnUNetv2_extract_fingerprint -d ID). "
                    "Example: nnunet-semisam plan -d 501 -pl TinyMUNetPlanner, then "
                    "nnUNetv2_preprocess -d 501 -plans_name nnUNetPlans_TinyMUNet -c 2d.",
    )
    p.add_argument("-d", nargs="+", type=int, required=True, help="dataset IDs, e.g. 2 4 5")
    p.add_argument("-pl", default="ExperimentPlanner",
                   help="planner class name, ours (TinyMUNetPlanner) or nnU-Net's (default: %(default)s)")
    p.add_argument("-gpu_memory_target", type=float, default=None,
                   help="GPU memory target in GB (default: the planner's own, 8 for nnU-Net's and ours)")
    p.add_argument("-preprocessor_name", default="DefaultPreprocessor",
                   help="preprocessor class, located in nnunetv2.preprocessing (default: %(default)s)")
    p.add_argument("-overwrite_target_spacing", type=float, nargs="+", default=None,
                   help="custom target spacing for 3d_fullres / 3d_cascade_fullres (three floats)")
    p.add_argument("-overwrite_plans_name", default=None,
                   help="plans identifier to write instead of the planner's default (e.g. nnUNetPlans_TinyMUNet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    planner = find_planner(args.pl)
    if args.overwrite_target_spacing is not None and len(args.overwrite_target_spacing) != 3:
        raise SemiSAMError(f"-overwrite_target_spacing needs three floats (z y x), got {args.overwrite_target_spacing}")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for dataset_id in args.d:  # check every dataset before planning any
        try:
            name = maybe_convert_to_dataset_name(dataset_id)
        except RuntimeError:
            raise SemiSAMError(f"dataset {dataset_id} not found under nnUNet_raw / nnUNet_preprocessed; check that "
                               f"the dataset exists and these environment variables are set") from None
        if nnUNet_preprocessed is None or not os.path.isfile(
                os.path.join(nnUNet_preprocessed, name, "dataset_fingerprint.json")):
            raise SemiSAMError(f"no dataset_fingerprint.json for {name} in nnUNet_preprocessed; run "
                               f"nnUNetv2_extract_fingerprint -d {dataset_id} first")
    for dataset_id in args.d:
        _, identifier = plan_experiment_dataset(dataset_id, planner, args.gpu_memory_target, args.preprocessor_name,
                                                args.overwrite_target_spacing, args.overwrite_plans_name)
        print(f"plans identifier: {identifier}")
    return 0
