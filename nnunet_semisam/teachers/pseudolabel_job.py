"""One `nnunet-semisam pseudolabel` job as a library call (METHODS.md §4.5, §5.4): validate the request, select the
preprocessed cases, build the prompt source (ground-truth boxes, a trained student model, or a prompt file) and the
teacher, then `teachers.pseudolabels.generate_pseudolabels` into the pseudo-label store.

`PseudoLabelJob` holds the request (the CLI's options, with the same defaults); `run_pseudolabel_job(job)` checks
everything that can be checked before anything is written (one-line `SemiSAMError`s naming the option or file) and
returns the per-case status and the output folder. `cli/pseudolabel.py` only parses and calls it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PseudoLabelJob:
    """The request of one pseudo-label run (the `nnunet-semisam pseudolabel` options; see its --help)."""
    dataset: str
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    prompts: str = "gt-boxes"  # gt-boxes | student | file
    teacher: str = "litemedsam"  # litemedsam | medsam | medsam2
    checkpoint: str | None = None
    model_type: str | None = None
    medsam2_config: str | None = None
    medsam2_image_size: int = 512
    prompt_file: str | None = None
    student_model: str | None = None
    fold: str = "0"
    student_checkpoint: str = "checkpoint_final.pth"
    cases: str | None = None  # unlabeled | labeled | all; None: labeled for gt-boxes, unlabeled otherwise
    aug: int = 0
    var_threshold: float = 0.05
    box_min_area: int = 10
    max_boxes: int = 5
    box_margin: int = 0
    mask_prompt: str = "box"
    teacher_channel: int = 0
    seed: int = 0
    num_parts: int = 1
    part_id: int = 0
    device: str | None = None
    output_folder: str | None = None
    cache_dir: str | None = None
    cache_gb: float = 4.0
    overwrite: bool = False
    workers: int | None = None
    progress: bool = True

    @property
    def which(self) -> str:
        return self.cases or ("labeled" if self.prompts == "gt-boxes" else "unlabeled")

    def validate(self) -> None:
        """The checks that need no file, in the CLI's historical order (one line each)."""
        from nnunet_semisam.errors import SemiSAMError
        from nnunet_semisam.teachers.pseudolabels import shard

        shard(range(1), self.num_parts, self.part_id)  # validates num_parts / part_id
        if self.aug < 0:
            raise SemiSAMError(f"--aug must be >= 0, got {self.aug}")
        if self.box_margin < 0 or (self.box_margin and self.aug > 0):
            raise SemiSAMError(f"--box-margin {self.box_margin}: must be >= 0 px, and applies to the plain path "
                               "(--aug 0) only")
        if not 0 < self.var_threshold <= 0.25:
            raise SemiSAMError(f"--var-threshold must be in (0, 0.25] (variance of values in [0, 1]), got "
                               f"{self.var_threshold}")
        if self.prompts == "file" and not self.prompt_file:
            raise SemiSAMError("--prompts file needs --prompt-file PATH")
        if self.prompts == "student" and not self.student_model:
            raise SemiSAMError("--prompts student needs --student-model MODEL_FOLDER (trained nnU-Net output folder)")
        if self.teacher in ("medsam", "medsam2") and not self.checkpoint:
            raise SemiSAMError(f"--teacher {self.teacher} needs --checkpoint (a local "
                               f"{'medsam_vit_b.pth' if self.teacher == 'medsam' else 'MedSAM2 .pt'}; nothing is "
                               "downloaded); the default --teacher litemedsam needs none")
        if self.prompts == "gt-boxes" and self.which != "labeled":
            raise SemiSAMError("--prompts gt-boxes uses the labels, which unlabeled cases do not have: use --cases "
                               "labeled")


def case_spatial(case) -> tuple[int, ...]:
    """Spatial shape (Z, Y, X) of a preprocessed case, read from its file header (nothing decompressed)."""
    import blosc2

    return tuple(blosc2.open(urlpath=str(Path(case.folder) / f"{case.case_id}.b2nd"), mode="r").shape[1:])


class FilePrompts:
    """`--prompt-file`: boxes from a JSON file or masks from a folder; validated against the cases before any write.

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
                                       "and boxes [[x0, y0, x1, y1], ...] of integer pixels, "
                                       f"got {b!r}"[:300]) from None
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
                spatial = case_spatial(case)
                m = np.asarray(self._read_mask(f))
                shape = tuple(m.shape[1:]) if m.ndim == len(spatial) + 1 else tuple(m.shape)
                if shape != spatial:
                    raise SemiSAMError(f"--prompt-file {f}: mask of case {case.case_id} has shape {tuple(m.shape)}, "
                                       f"expected the preprocessed shape {spatial} (Z, Y, X)")
                continue
            per = self.boxes_of.get(case.case_id)
            if not per:
                continue
            z_n, y_n, x_n = case_spatial(case)[-3:]
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


def student_mask_fn(model_dir: str, fold: str, checkpoint: str, device):
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


def select_cases(job: PseudoLabelJob):
    """(cases, plans dict, configuration manager, preprocessed dataset folder) of `job.which`; one-line errors for a
    missing plans file, configuration, preprocessed folder or unlabeled case, and for labeled / unlabeled ids that
    collide."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_semisam.data.nnunet_paths import preprocessed_dataset_folder
    from nnunet_semisam.data.unlabeled import list_preprocessed_unlabeled, unlabeled_preprocessed_folder
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.teachers.pseudolabels import CaseSource

    d, c, p, which = job.dataset, job.configuration, job.plans, job.which
    pp = preprocessed_dataset_folder(d)
    plans_file = pp / f"{p}.json"
    if not plans_file.is_file():
        raise SemiSAMError(f"{plans_file} does not exist: run nnUNetv2_plan_and_preprocess -d {d} first")
    plans = json.loads(plans_file.read_text())
    pm = PlansManager(plans)
    if c not in pm.available_configurations:
        raise SemiSAMError(f"configuration {c!r} is not in {plans_file.name}")
    cm = pm.get_configuration(c)
    labeled_folder = pp / cm.data_identifier
    cases: list[CaseSource] = []
    if which in ("labeled", "all"):
        if not labeled_folder.is_dir():
            raise SemiSAMError(f"{labeled_folder} does not exist: run nnUNetv2_preprocess -d {d} -c {c}")
        cases += [CaseSource(n[:-5], str(labeled_folder), True) for n in sorted(f.name for f in
                  labeled_folder.glob("*.b2nd")) if not n.endswith("_seg.b2nd")]
    if which in ("unlabeled", "all"):
        unl = unlabeled_preprocessed_folder(d, p, c)
        ids = list_preprocessed_unlabeled(unl)
        if not ids:
            raise SemiSAMError(f"no preprocessed unlabeled cases in {unl}: run nnunet-semisam preprocess-unlabeled "
                               f"-d {d} -c {c}")
        if which == "all":  # one output file per case id: a shared id would give one case the other's label
            from nnunet_semisam.data.disjoint import check_disjoint

            check_disjoint([k.case_id for k in cases], ids, labeled_source=f"labeled cases ({labeled_folder})",
                           unlabeled_source=f"unlabeled cases ({unl})",
                           fix="rename them in imagesUnlabeled/ and rerun nnunet-semisam preprocess-unlabeled")
        cases += [CaseSource(k, str(unl), False) for k in ids]
    if not cases:
        raise SemiSAMError(f"no {which} cases found for dataset {d}, configuration {c}")
    return cases, plans, cm, pp


def load_job_teacher(job: PseudoLabelJob, device, cache):
    """(teacher, model type, checkpoint sha1, checkpoint path or name) of `job.teacher`."""
    if job.teacher in ("litemedsam", "medsam"):
        from nnunet_semisam.teachers.factory import load_teacher

        teacher = load_teacher(job.checkpoint, device=device, cache=cache, model_type=job.model_type)
        return (teacher, teacher.model_type, teacher.checkpoint_sha1,
                job.checkpoint or getattr(teacher, "checkpoint_path", "litemedsam"))
    from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher

    teacher = MedSAM2Teacher.from_checkpoint(job.checkpoint, config=job.medsam2_config, device=device,
                                             image_size=job.medsam2_image_size)
    return teacher, teacher.config_name, teacher.checkpoint_sha1, job.checkpoint


def run_pseudolabel_job(job: PseudoLabelJob) -> tuple[dict[str, str], Path]:
    """Validate, select the cases, build prompts and teacher, generate; returns (status per case, output folder)."""
    import torch

    from nnunet_semisam.data.pseudolabel_store import PseudoLabelParams, pseudolabel_folder
    from nnunet_semisam.errors import SemiSAMError
    from nnunet_semisam.teachers.cache import EmbeddingCache
    from nnunet_semisam.teachers.pseudolabels import generate_pseudolabels

    # ---- validate everything before writing anything
    job.validate()
    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SemiSAMError("--device cuda but no CUDA device is available; use --device cpu")
    cases, plans, cm, pp = select_cases(job)
    mask_fn = boxes_fn = digest_fn = None
    if job.prompts == "gt-boxes":
        mask_fn = lambda case, data, seg: seg[0] > 0  # noqa: E731 - labels on the preprocessed grid (content key)
    elif job.prompts == "file":
        file_prompts = FilePrompts(job.prompt_file)
        file_prompts.validate(cases)  # before anything is written
        mask_fn, boxes_fn, digest_fn = file_prompts.mask_fn, file_prompts.boxes_fn, file_prompts.digest
    elif job.prompts == "student":
        if not (Path(job.student_model) / "plans.json").is_file():
            raise SemiSAMError(f"--student-model {job.student_model} is not a trained nnU-Net model folder "
                               "(no plans.json)")
        student_ckpt = Path(job.student_model) / f"fold_{job.fold}" / job.student_checkpoint
        if not student_ckpt.is_file():
            raise SemiSAMError(f"{student_ckpt} does not exist: train fold {job.fold} of --student-model first, or "
                               f"pass -f / -chk")

    out = Path(job.output_folder) if job.output_folder else pseudolabel_folder(job.dataset, job.plans,
                                                                                job.configuration)
    cache = EmbeddingCache(job.cache_dir or out / ".embedding_cache", max_bytes=int(job.cache_gb * (1 << 30)))
    teacher, model_type, sha1, ckpt = load_job_teacher(job, device, cache)
    if job.prompts == "student":
        from nnunet_semisam.io import file_digest

        mask_fn = student_mask_fn(job.student_model, job.fold, job.student_checkpoint, device)
        student_key = f"student:{job.fold}:{job.student_checkpoint}:{file_digest(student_ckpt, 'sha1')}"
        digest_fn = lambda case: student_key  # noqa: E731 - a retrained student redoes every case

    params = PseudoLabelParams(
        teacher=job.teacher if job.teacher == "medsam2" else ("litemedsam" if model_type == "litemedsam" else "medsam"),
        checkpoint_sha1=sha1, model_type=model_type or "", prompt_source=job.prompts,
        aug=job.aug, var_threshold=job.var_threshold, box_min_area=job.box_min_area, max_boxes=job.max_boxes,
        box_margin=job.box_margin,
        mask_prompt=job.mask_prompt, teacher_channel=job.teacher_channel, seed=job.seed,
        medsam2_image_size=job.medsam2_image_size if job.teacher == "medsam2" else 0,
        extra={"prompt_file": str(job.prompt_file) if job.prompt_file else None,
               "student_model": job.student_model, "fold": job.fold if job.student_model else None})
    run_info = {"dataset": pp.name, "configuration": job.configuration, "plans_identifier": job.plans,
                "checkpoint": str(Path(ckpt).resolve()), "cases_selected": job.which}
    case_fn = None
    if job.teacher == "medsam2":
        from nnunet_semisam.teachers.medsam2 import medsam2_pseudolabel_case as case_fn
    status = generate_pseudolabels(teacher, cases, out, params, cm.normalization_schemes,
                                   plans.get("foreground_intensity_properties_per_channel"), mask_fn, boxes_fn,
                                   job.num_parts, job.part_id, job.overwrite, job.progress, run_info,
                                   case_fn=case_fn, workers=job.workers, prompt_digest_fn=digest_fn)
    return status, out
