"""`nnunet-semisam refine PRED IMAGE --slice z (--box x0 y0 x1 y1 | --click x y)`: correct one slice of a prediction
with LiteMedSAM (or MedSAM2 with propagation), replacing that slice's mask atomically (METHODS.md §5.8)."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from nnunet_semisam.deploy.refine import load_refine_teacher, refine_prediction

    load = partial(load_refine_teacher, args.teacher, args.checkpoint, args.device, args.medsam2_config,
                   args.medsam2_image_size)
    options = {k: v for k, v in (("ct_window", args.ct_window and tuple(args.ct_window)),
                                  ("click_box", args.click_size)) if v is not None}
    result = refine_prediction(args.prediction, args.image, args.slice, box=args.box, click=args.click,
                               label=args.label, propagate=args.propagate, output=args.o, teacher_factory=load,
                               intensity=args.intensity, **options)
    for s, (before, after) in result.slices.items():
        print(f"slice {s}: label {args.label} {before} -> {after} voxels")
    print(f"box {list(result.box)}; {result.changed_voxels} voxels changed; wrote {result.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refine", help="re-segment one slice of a prediction from a box or a click (LiteMedSAM / MedSAM2)",
        description="Correct label K of a predicted label map on slice Z: LiteMedSAM re-segments the object in the "
                    "box (a click becomes the box of the clicked component, or a square around it), the label-K "
                    "object there is replaced on that slice only (other labels and slices unchanged) and the file "
                    "is written atomically with the same geometry. --propagate N re-segments slices Z-N..Z+N with "
                    "LiteMedSAM's slice-to-slice propagation (or MedSAM2's). Coordinates: 0-based voxel indices "
                    "(x = first index, y = second, z = third).")
    p.add_argument("prediction", metavar="PRED", help="predicted label map (e.g. pred/case.nii.gz)")
    p.add_argument("image", metavar="IMAGE", help="the image it was predicted from (e.g. imagesTs/case_0000.nii.gz)")
    p.add_argument("--slice", type=int, required=True, metavar="Z", help="slice index (third voxel index)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--box", type=int, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box on the slice, inclusive")
    g.add_argument("--click", type=int, nargs=2, metavar=("X", "Y"), help="a click on the object")
    p.add_argument("--label", type=int, default=1, metavar="K", help="label to replace (default 1)")
    p.add_argument("--propagate", type=int, default=0, metavar="N",
                   help="also re-segment the N slices on each side (default 0: slice Z only)")
    p.add_argument("-o", default=None, metavar="OUT", help="output file (default: overwrite PRED, atomically)")
    p.add_argument("--intensity", choices=("auto", "ct"), default="auto",
                   help="teacher image: auto = p0.5/p99.5 min-max (MR, other), ct = HU window (default auto)")
    p.add_argument("--ct-window", type=float, nargs=2, default=None, metavar=("LEVEL", "WIDTH"),
                   help="HU window for --intensity ct (default 40 400)")
    p.add_argument("--click-size", type=int, default=None, metavar="PX",
                   help="side of the box around a click outside label K (default 32 pixels)")
    p.add_argument("--teacher", choices=("litemedsam", "medsam", "medsam2"), default="litemedsam",
                   help="litemedsam (default, bundled weights), medsam (--checkpoint medsam_vit_b.pth, single slice) "
                        "or medsam2 (--checkpoint MedSAM2 .pt)")
    p.add_argument("--checkpoint", default=None, help="local teacher checkpoint (required for medsam and medsam2)")
    p.add_argument("--medsam2-config", default=None, help="MedSAM2 hydra config (name or yaml path)")
    p.add_argument("--medsam2-image-size", type=int, default=512, help="MedSAM2 slice size (default 512)")
    p.add_argument("--device", "-device", dest="device", default=None, help="cuda | cpu (default: cuda if available)")
    p.set_defaults(func=run)
