"""Teacher pseudo-labels for preprocessed nnU-Net cases: generation, storage and loading (METHODS.md §4.5, §5.4).

Store: `$nnUNet_preprocessed/DatasetXXX/<data_identifier>_pseudolabels/`, beside nnU-Net's `<data_identifier>/` and
the plugin's `<data_identifier>_unlabeled/`:
- `CASE.npz`: `prob` float16 (1, *spatial) — the teacher's foreground probability (Algorithm 2: mean * M_conf) — and
  `conf` bool (1, *spatial) — where the pseudo-label may be used (`M_conf`; plain MedSAM: slices that had a prompt).
  `*spatial` is the case's preprocessed grid ((1, Y, X) for 2D images, (Z, Y, X) for volumes).
- `CASE.json`: the per-case manifest record (shape, parameter hash, availability), written after the npz.
- `manifest.json`: run parameters (teacher, checkpoint sha1, prompt source, aug, thresholds, ...) and an index of the
  per-case records. A case counts as done only if its record matches the current parameters and the current
  preprocessed shape, so an interrupted run resumes, and a case whose preprocessed shape changed is detected.
Writes are atomic (`nnunet_semisam.io`). Each case uses its own RNG seeded from (seed, case id), so the result does
not depend on sharding (`num_parts`/`part_id`) or on interruptions.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path, atomic_write_json

PSEUDOLABEL_SUFFIX = "_pseudolabels"
MANIFEST = "manifest.json"
FORMAT = "nnunet_semisam.pseudolabels/1"


@dataclass
class PseudoLabelParams:
    """Everything that changes the output; hashed into `params_sha1`."""

    teacher: str = "medsam"                 # medsam | medsam2
    checkpoint_sha1: str = ""
    model_type: str = ""
    prompt_source: str = "gt-boxes"         # gt-boxes | student | file
    aug: int = 0                            # 0: plain MedSAM reference path; N > 0: Algorithm 2 with N augmentations
    var_threshold: float = 0.05             # u_th of Algorithm 2
    box_min_area: int = 10                  # §2.3 (the labeled-case teacher targets of §4.5 use 1)
    max_boxes: int = 5
    mask_prompt: str = "box"                # how Algorithm 2's mask prompt reaches a 2D MedSAM (see MedSAMSliceTeacher)
    teacher_channel: int = 0
    seed: int = 0
    medsam2_image_size: int = 0             # S of the MedSAM2 teacher (0 for MedSAM)
    extra: dict = field(default_factory=dict)

    def sha1(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def pseudolabel_folder(dataset_name_or_id: int | str, plans_identifier: str = "nnUNetPlans",
                       configuration: str = "2d") -> Path:
    """`$nnUNet_preprocessed/DatasetXXX/<data_identifier>_pseudolabels` for these plans and configuration."""
    from nnunet_semisam.data.unlabeled import UNLABELED_SUFFIX, unlabeled_preprocessed_folder

    unl = unlabeled_preprocessed_folder(dataset_name_or_id, plans_identifier, configuration)
    return unl.parent / (unl.name[: -len(UNLABELED_SUFFIX)] + PSEUDOLABEL_SUFFIX)


def case_seed(seed: int, case_id: str) -> np.random.SeedSequence:
    """Per-case seed: independent of case order, shard and resumption."""
    return np.random.SeedSequence([seed, int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16)])


# ------------------------------------------------------------------------------------------------------------------
# store


def _record_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def save_pseudolabel(folder: str | os.PathLike, case_id: str, prob: np.ndarray, conf: np.ndarray,
                     params_sha1: str, source: str = "") -> dict:
    """Write `CASE.npz` (prob float16, conf bool, both (1, *spatial)) then its record `CASE.json`; atomic."""
    folder = Path(folder)
    prob = np.asarray(prob, np.float32)
    conf = np.asarray(conf, bool)
    if prob.shape != conf.shape:
        raise ValueError(f"prob {prob.shape} and conf {conf.shape} differ")
    with atomic_path(folder / f"{case_id}.npz") as tmp:
        np.savez_compressed(tmp, prob=prob.astype(np.float16), conf=conf)
    rec = {"case_id": case_id, "shape": list(prob.shape), "params_sha1": params_sha1, "source": source,
           "available": bool(conf.any())}
    atomic_write_json(_record_path(folder, case_id), rec)
    return rec


def read_record(folder: str | os.PathLike, case_id: str) -> dict | None:
    """The per-case manifest record, or None if the case has no complete pseudo-label."""
    folder = Path(folder)
    p = _record_path(folder, case_id)
    if not p.is_file() or not (folder / f"{case_id}.npz").is_file():
        return None
    return json.loads(p.read_text())


def load_pseudolabel(folder: str | os.PathLike, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(prob float32 (1, *spatial), conf bool (1, *spatial)) of a case. Raises SemiSAMError if it is missing."""
    f = Path(folder) / f"{case_id}.npz"
    if not f.is_file():
        raise SemiSAMError(f"no pseudo-label for case {case_id} in {folder}: run nnunet-semisam pseudolabel first")
    with np.load(f) as z:
        return z["prob"].astype(np.float32), z["conf"].astype(bool)


def load_pseudolabel_checked(folder: str | os.PathLike, case_id: str, data_shape: Sequence[int],
                             params_sha1: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`load_pseudolabel` after checking the manifest record against the case's current preprocessed array.

    data_shape: the case's preprocessed data shape (C, *spatial) (or just *spatial prefixed by anything: only the
    spatial part, the last len(record shape) - 1 axes, is compared). Raises SemiSAMError when the record is missing,
    was made for another spatial shape (the preprocessing changed since), or with other parameters.
    """
    rec = read_record(folder, case_id)
    if rec is None:
        raise SemiSAMError(f"no pseudo-label for case {case_id} in {folder}: run nnunet-semisam pseudolabel first")
    want = list(rec["shape"][1:])
    have = list(data_shape[-len(want):]) if want else []
    if have != want:
        raise SemiSAMError(f"pseudo-label of case {case_id} in {folder} was written for spatial shape {want} but the "
                           f"preprocessed case now has {have}: re-run nnunet-semisam pseudolabel")
    if params_sha1 is not None and rec["params_sha1"] != params_sha1:
        raise SemiSAMError(f"pseudo-label of case {case_id} in {folder} was made with other teacher parameters: "
                           "re-run nnunet-semisam pseudolabel")
    return load_pseudolabel(folder, case_id)


def write_manifest(folder: str | os.PathLike, params: PseudoLabelParams, info: dict) -> None:
    """(Re)write manifest.json: parameters, run info and the index of the per-case records found in `folder`."""
    folder = Path(folder)
    cases = {}
    for p in sorted(folder.glob("*.json")):
        if p.name == MANIFEST or p.name.startswith("."):
            continue
        rec = json.loads(p.read_text())
        if (folder / f"{p.stem}.npz").is_file():
            cases[p.stem] = {k: rec[k] for k in ("shape", "params_sha1", "source", "available")}
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "params": asdict(params), "params_sha1": params.sha1(),
                                          **info, "cases": cases})


def check_manifest(folder: str | os.PathLike, params: PseudoLabelParams, overwrite: bool = False) -> None:
    """Refuse to mix pseudo-labels of different parameters in one folder (unless `overwrite`)."""
    m = Path(folder) / MANIFEST
    if m.is_file() and not overwrite:
        old = json.loads(m.read_text())
        if old.get("params_sha1") != params.sha1():
            diff = {k: (old["params"].get(k), v) for k, v in asdict(params).items() if old["params"].get(k) != v}
            raise SemiSAMError(f"{folder} holds pseudo-labels made with other parameters {diff}; pass --overwrite "
                               "to replace them")


# ------------------------------------------------------------------------------------------------------------------
# generation for one case


def slicewise_reference(teacher, image_u8: np.ndarray, boxes: dict[int, np.ndarray], case_id: str | None = None,
                        batched: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Plain MedSAM (§2.2 reference path, §4.5 refresh) on every slice that has boxes; embeddings cached per slice.

    image_u8: (Z, Y, X) or (Z, Y, X, 3); boxes: {z: (n, 4)}. Returns prob (Z, Y, X) = max over the slice's boxes,
    conf (Z, Y, X) = True on slices with at least one box ("available"), False elsewhere (no pseudo-label).
    """
    zyx = image_u8.shape[:3]
    prob = np.zeros(zyx, np.float32)
    conf = np.zeros(zyx, bool)
    for z, b in sorted(boxes.items()):
        if len(b) == 0:
            continue
        emb = teacher.embed(image_u8[z], case_id=case_id, slice_idx=int(z))
        prob[z] = teacher.segment(emb, b, zyx[1:], batched=batched).amax(0).cpu().numpy()
        conf[z] = True
    return prob, conf


def pseudolabel_case(teacher, image_u8: np.ndarray, coarse_mask: np.ndarray | None, params: PseudoLabelParams,
                     case_id: str, boxes: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-label of one case: prob float32 (Z, Y, X), conf bool (Z, Y, X).

    teacher: a `MedSAMTeacher` (2D, applied per Z-slice). image_u8: rule-U output (Z, Y, X[, 3]).
    coarse_mask: prompt mask (Z, Y, X) (GT, student prediction, or filled file boxes); `boxes` overrides the boxes
    derived from it for the plain path. params.aug == 0: plain MedSAM with §2.3 boxes; aug = N > 0: Algorithm 2
    (N lattice augmentations, mask/box and point prompts, variance filter `var_threshold`).
    """
    from nnunet_semisam.teachers.algorithm2 import MedSAMSliceTeacher, algorithm2
    from nnunet_semisam.teachers.prompts import boxes_from_mask_slicewise

    zyx = image_u8.shape[:3]
    if params.aug <= 0:
        if boxes is None:
            boxes = {} if coarse_mask is None else boxes_from_mask_slicewise(
                coarse_mask, min_area=params.box_min_area, max_boxes=params.max_boxes)
        return slicewise_reference(teacher, image_u8, boxes, case_id)
    if coarse_mask is None:
        return np.zeros(zyx, np.float32), np.zeros(zyx, bool)
    img = image_u8.astype(np.float32)
    img = img[None] if img.ndim == 3 else np.moveaxis(img, -1, 0)
    st = MedSAMSliceTeacher(teacher, mask_prompt=params.mask_prompt, box_min_area=params.box_min_area,
                            max_boxes=params.max_boxes)
    rng = np.random.default_rng(case_seed(params.seed, case_id))
    return algorithm2(img, coarse_mask, st, rng, n_aug=params.aug, u_th=params.var_threshold,
                      point_mode="slicewise")


# ------------------------------------------------------------------------------------------------------------------
# a whole folder


@dataclass
class CaseSource:
    """Where one case comes from: its preprocessed folder and whether it is labeled."""

    case_id: str
    folder: str
    labeled: bool


def shard(items: Sequence, num_parts: int, part_id: int) -> list:
    """`items[part_id::num_parts]` (nnUNetv2_predict's convention); validates the arguments."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SemiSAMError(f"--part-id must be in [0, --num-parts - 1], got part {part_id} of {num_parts}")
    return list(items)[part_id::num_parts]


def generate_pseudolabels(
    teacher,
    cases: Sequence[CaseSource],
    out_folder: str | os.PathLike,
    params: PseudoLabelParams,
    normalization_schemes: Sequence[str],
    intensity_properties: dict | None = None,
    mask_fn: Callable[[CaseSource, np.ndarray, np.ndarray], np.ndarray | None] | None = None,
    boxes_fn: Callable[[CaseSource, tuple], dict[int, np.ndarray] | None] | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    run_info: dict | None = None,
    case_fn: Callable | None = None,
    workers: int | None = None,
) -> dict[str, str]:
    """Pseudo-label every case of this shard that is not done yet; returns {case_id: "done" | "skipped"}.

    mask_fn(case, data, seg) -> coarse mask (Z, Y, X) or None (gt-boxes: seg > 0; student: its prediction; file: a
    mask from disk). boxes_fn(case, spatial) -> {z: boxes} or None overrides the boxes of the plain path (box files).
    data/seg are the preprocessed arrays (C, *spatial) / (1, *spatial). A finished case is skipped when its record
    matches the parameters and the current shape (resume). case_fn: per-case generator with the signature of
    `pseudolabel_case` (default; MedSAM2 passes its own). workers (plain MedSAM path only; default: the CPU cores,
    at most 8; 1 = inline): MedSAM's preprocessing of the next cases' prompted slices runs in that many threads
    (`MedSAMTeacher.prefetch`), the same results ~`workers` x sooner on CPU-bound runs.
    """
    from tqdm import tqdm

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_semisam.teachers.medsam import default_preprocess_workers
    from nnunet_semisam.teachers.uint8_adapter import to_uint8

    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, params, overwrite)
    psha = params.sha1()
    info = dict(run_info or {})
    write_manifest(out, params, info)
    mine = shard(sorted(cases, key=lambda c: c.case_id), num_parts, part_id)
    datasets: dict[str, nnUNetDatasetBlosc2] = {}
    status: dict[str, str] = {}
    plain = params.aug <= 0 and case_fn is None  # plain MedSAM: the slices to embed are known from the boxes
    workers = workers or default_preprocess_workers()

    def prepared():
        """(case, uint8 image, prompt mask, boxes) of every case, in order; None for a finished case."""
        from nnunet_semisam.teachers.prompts import boxes_from_mask_slicewise

        for case in mine:
            ds = datasets.setdefault(case.folder, nnUNetDatasetBlosc2(case.folder))
            data, seg, _, _ = ds.load_case(case.case_id)
            rec = read_record(out, case.case_id)
            spatial = tuple(data.shape[1:])
            if (not overwrite and rec is not None and rec["params_sha1"] == psha
                    and tuple(rec["shape"][1:]) == spatial):
                status[case.case_id] = "skipped"
                yield None
                continue
            data = np.asarray(data[:])
            seg = np.asarray(seg[:])
            u8 = to_uint8(data, normalization_schemes, params.teacher_channel, intensity_properties)
            mask = mask_fn(case, data, seg) if mask_fn is not None else None
            boxes = boxes_fn(case, spatial) if boxes_fn is not None else None
            if mask is not None and tuple(mask.shape) != spatial:
                raise SemiSAMError(f"prompt mask of case {case.case_id} has shape {tuple(mask.shape)}, "
                                   f"expected the preprocessed shape {spatial}")
            if plain and boxes is None and mask is not None:
                boxes = boxes_from_mask_slicewise(mask, min_area=params.box_min_area, max_boxes=params.max_boxes)
            yield case, u8, mask, boxes

    def schedule(item) -> None:  # MedSAM's ~1 s skimage resize of the next cases' prompted slices, in threads
        if item is None:
            return
        case, u8, _, boxes = item
        teacher.prefetch([(u8[z], case.case_id, int(z)) for z, b in sorted((boxes or {}).items()) if len(b)],
                         workers)

    todo = prepared()
    if plain and workers > 1 and hasattr(teacher, "prefetch"):
        todo = lookahead(todo, 2 * workers, schedule)
    try:
        for item in tqdm(todo, desc=f"pseudo-labels ({params.teacher})", disable=not progress, total=len(mine)):
            if item is None:
                continue
            case, u8, mask, boxes = item
            prob, conf = (case_fn or pseudolabel_case)(teacher, u8, mask, params, case.case_id, boxes)
            save_pseudolabel(out, case.case_id, prob[None], conf[None], psha,
                             source="labeled" if case.labeled else "unlabeled")
            status[case.case_id] = "done"
    finally:
        if hasattr(teacher, "close_prefetch"):
            teacher.close_prefetch()
        write_manifest(out, params, info)
    return status


def lookahead(items: Iterable, n: int, on_enter: Callable[[Any], None]) -> Iterator:
    """Yield `items` in order, each `n` items after `on_enter(item)` was called for it (prefetch scheduling)."""
    buffer: deque = deque()
    for item in items:
        on_enter(item)
        buffer.append(item)
        if len(buffer) > n:
            yield buffer.popleft()
    while buffer:
        yield buffer.popleft()


def stale_cases(out_folder: str | os.PathLike, cases: Iterable[CaseSource], params_sha1: str | None = None
                ) -> list[str]:
    """Case ids whose pseudo-label is missing, has another shape than the preprocessed case, or other params."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    bad = []
    for c in cases:
        data, _, _, _ = nnUNetDatasetBlosc2(c.folder).load_case(c.case_id)
        try:
            load_pseudolabel_checked(out_folder, c.case_id, data.shape, params_sha1)
        except SemiSAMError:
            bad.append(c.case_id)
    return bad
