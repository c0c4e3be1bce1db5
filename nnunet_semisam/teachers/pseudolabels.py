"""Teacher pseudo-labels for preprocessed nnU-Net cases: the generation pipeline (METHODS.md §4.5, §5.4).

`generate_pseudolabels` runs a teacher over the cases of a shard: rule U (METHODS.md §2.4, with nnU-Net's own
background mask) gives the uint8 image, `mask_fn`/`boxes_fn` give the prompts, `pseudolabel_case` (plain reference
path or Algorithm 2) the maps, and `nnunet_semisam.data.pseudolabel_store` (the file format) stores them. Each case
uses its own RNG seeded from (seed, case id), so the result does not depend on sharding (`num_parts`/`part_id`) or
on interruptions. A finished case is skipped only when its record's resume key (`pseudolabel_store.case_key`:
parameters incl. the teacher checkpoint hash, the preprocessed case's content, the case's prompts) equals the
current one; a case that was re-preprocessed or whose prompts changed is regenerated.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from nnunet_semisam.data.pseudolabel_store import (PseudoLabelParams, case_content_sha1, case_key, check_manifest,
                                                   read_record, save_pseudolabel, source_stat, write_manifest)
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.box_refine import grow_cut_sides


def case_seed(seed: int, case_id: str) -> np.random.SeedSequence:
    """Per-case seed: independent of case order, shard and resumption."""
    return np.random.SeedSequence([seed, int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16)])


# ------------------------------------------------------------------------------------------------------------------
# generation for one case


def slicewise_reference(teacher, image_u8: np.ndarray, boxes: dict[int, np.ndarray], case_id: str | None = None,
                        batched: bool = False, box_refine_rounds: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plain MedSAM (§2.2 reference path, §4.5 refresh) on every slice that has boxes; embeddings cached per slice.

    image_u8: (Z, Y, X) or (Z, Y, X, 3); boxes: {z: (n, 4)}. Returns prob (Z, Y, X) = max over the slice's boxes,
    conf (Z, Y, X) = True on slices with at least one box ("available"), False elsewhere (no pseudo-label).
    box_refine_rounds > 0: box sides that cut through the teacher's mask grow for up to that many rounds
    (`teachers.box_refine.grow_cut_sides`, decoder only).
    """
    zyx = image_u8.shape[:3]
    prob = np.zeros(zyx, np.float32)
    conf = np.zeros(zyx, bool)
    for z, b in sorted(boxes.items()):
        if len(b) == 0:
            continue
        emb = teacher.embed(image_u8[z], case_id=case_id, slice_idx=int(z))

        def segment(bb: np.ndarray) -> np.ndarray:
            return teacher.segment(emb, bb, zyx[1:], batched=batched).cpu().numpy()

        prob[z] = grow_cut_sides(segment, b, zyx[1:], rounds=box_refine_rounds)[1].max(0)
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
                coarse_mask, min_area=params.box_min_area, max_boxes=params.max_boxes,
                margin=params.box_margin)
        return slicewise_reference(teacher, image_u8, boxes, case_id, box_refine_rounds=params.box_refine_rounds)
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
    prompt_digest_fn: Callable[[CaseSource], str] | None = None,
    post_fn: Callable[[CaseSource, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, str]:
    """Pseudo-label every case of this shard that is not done yet; returns {case_id: "done" | "skipped"}.

    mask_fn(case, data, seg) -> coarse mask (Z, Y, X) or None (gt-boxes: seg > 0; student: its prediction; file: a
    mask from disk). boxes_fn(case, spatial) -> {z: boxes} or None overrides the boxes of the plain path (box files).
    data/seg are the preprocessed arrays (C, *spatial) / (1, *spatial). A finished case is skipped when its record
    matches the parameters and the current shape (resume). case_fn: per-case generator with the signature of
    `pseudolabel_case` (default; MedSAM2 passes its own). workers (plain MedSAM path only; default: the CPU cores,
    at most 8; 1 = inline): MedSAM's preprocessing of the next cases' prompted slices runs in that many threads
    (`MedSAMTeacher.prefetch`), the same results ~`workers` x sooner on CPU-bound runs.
    prompt_digest_fn(case) -> str: digest of the case's prompts beyond its arrays (boxes of a prompt file, a mask
    file, the student checkpoint), part of the resume key; prompts derived from the case's own arrays (gt-boxes)
    are covered by the content digest. The manifest records the expected number of cases (all shards) and
    `complete`. post_fn(case, prob, conf) -> (prob, conf): applied to each case's result before it is saved (the
    closed loop's student fusion, METHODS.md §4.5); whatever it changes belongs in `params` (the resume key).
    """
    from tqdm import tqdm

    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_semisam.teachers.embedding import default_preprocess_workers
    from nnunet_semisam.teachers.uint8_adapter import background_from_seg, to_uint8

    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest(out, params, overwrite)
    psha = params.sha1()
    info = dict(run_info or {})
    mine = shard(sorted(cases, key=lambda c: c.case_id), num_parts, part_id)
    expected = [c.case_id for c in cases]
    mine_ids = [c.case_id for c in mine]
    write_manifest(out, params, info, expected, unverified=mine_ids)
    datasets: dict[str, nnUNetDatasetBlosc2] = {}
    status: dict[str, str] = {}
    keys: dict[str, tuple[str, str, dict]] = {}  # case -> (content digest, prompts digest, source stat)
    plain = params.aug <= 0 and case_fn is None  # plain MedSAM: the slices to embed are known from the boxes
    workers = workers or default_preprocess_workers()

    def prepared():
        """(case, uint8 image, prompt mask, boxes) of every case, in order; None for a finished case."""
        from nnunet_semisam.teachers.prompts import boxes_from_mask_slicewise

        for case in mine:
            ds = datasets.setdefault(case.folder, nnUNetDatasetBlosc2(case.folder))
            stat = source_stat(case.folder, case.case_id)  # before reading: a later change shows as a new stat
            data, seg, _, _ = ds.load_case(case.case_id)
            rec = read_record(out, case.case_id)
            spatial = tuple(data.shape[1:])
            prompts = prompt_digest_fn(case) if prompt_digest_fn is not None else ""
            content = None
            if (not overwrite and rec is not None and rec["params_sha1"] == psha
                    and tuple(rec["shape"][1:]) == spatial and rec.get("key")):
                if rec.get("source_stat") == stat and rec.get("content_sha1"):
                    content = rec["content_sha1"]  # files untouched since the record: no need to re-hash
                else:
                    data, seg = np.asarray(data[:]), np.asarray(seg[:])
                    content = case_content_sha1(data, seg)
                if rec["key"] == case_key(psha, content, prompts):
                    status[case.case_id] = "skipped"
                    yield None
                    continue
            data = np.asarray(data[:])
            seg = np.asarray(seg[:])
            if content is None:
                content = case_content_sha1(data, seg)
            keys[case.case_id] = (content, prompts, stat)
            u8 = to_uint8(data, normalization_schemes, params.teacher_channel, intensity_properties,
                          background=background_from_seg(seg))  # nnU-Net's own mask (METHODS.md §2.4)
            mask = mask_fn(case, data, seg) if mask_fn is not None else None
            boxes = boxes_fn(case, spatial) if boxes_fn is not None else None
            if mask is not None and tuple(mask.shape) != spatial:
                raise SemiSAMError(f"prompt mask of case {case.case_id} has shape {tuple(mask.shape)}, "
                                   f"expected the preprocessed shape {spatial}")
            if plain and boxes is None and mask is not None:
                boxes = boxes_from_mask_slicewise(mask, min_area=params.box_min_area, max_boxes=params.max_boxes,
                                                  margin=params.box_margin)
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
            if post_fn is not None:
                prob, conf = post_fn(case, prob, conf)
            content, prompts, stat = keys.pop(case.case_id)
            save_pseudolabel(out, case.case_id, prob[None], conf[None], psha,
                             source="labeled" if case.labeled else "unlabeled", content_sha1=content,
                             prompts_sha1=prompts, stat=stat)
            status[case.case_id] = "done"
    finally:
        if hasattr(teacher, "close_prefetch"):
            teacher.close_prefetch()
        write_manifest(out, params, info, expected, unverified=[c for c in mine_ids if c not in status])
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
