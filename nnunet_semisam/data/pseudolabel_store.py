"""The pseudo-label file format: the one module that writes and reads teacher targets (METHODS.md §4.5, §5.4).

Every producer (`nnunet-semisam pseudolabel`, the KD trainer's closed loop) writes through `save_pseudolabel` and
`write_manifest`; every consumer (the soft-target loader used in training, `pseudolabel` resume, the checks) reads
through `read_record`, `load_pseudolabel(_checked)` or `soft_target_channels`.

Layout of a store folder (for `nnunet-semisam pseudolabel`: `$nnUNet_preprocessed/DatasetXXX/
<data_identifier>_pseudolabels/`, beside nnU-Net's `<data_identifier>/` and the plugin's `<data_identifier>_unlabeled/`;
for a training run: `<fold folder>/pseudolabels/{labeled,unlabeled}/`):
- `CASE.npz`: `prob` float16 (1, *spatial), the teacher's foreground probability (Algorithm 2: mean * M_conf), and
  `conf` bool (1, *spatial), where the pseudo-label may be used (`M_conf`; plain MedSAM: slices that had a prompt).
  `*spatial` is the case's preprocessed grid ((1, Y, X) for 2D images, (Z, Y, X) for volumes).
- `CASE.json`: the per-case record (shape, parameter hash, source, availability, resume key), written after the
  npz, so a case is complete exactly when its record exists.
- `manifest.json`: the run's parameters (`PseudoLabelParams`: teacher, checkpoint sha1, prompt source, aug,
  thresholds, ...), run information, the expected number of cases and whether all of them are done (`complete`),
  and an index of the per-case records.
Resume key (`case_key`): sha1 of the parameter hash (teacher checkpoint hash included), the digest of the
preprocessed case's arrays (`content_sha1`: image and seg, so a re-preprocessed or replaced case is redone) and the
digest of that case's prompts (`prompts_sha1`: its boxes in a prompt file, its mask file, the student checkpoint).
A record whose key differs from the current one is stale and the case is regenerated. The content digest is
recomputed only when the case's files changed size or mtime since the record (`source_stat`).
Writes are atomic (`nnunet_semisam.io`): a reader sees the old or the new file, never a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path, atomic_write_json

if TYPE_CHECKING:  # the generator's case type; imported for the annotation only (no cycle at run time)
    from nnunet_semisam.teachers.pseudolabels import CaseSource

PSEUDOLABEL_SUFFIX = "_pseudolabels"
MANIFEST = "manifest.json"
FORMAT = "nnunet_semisam.pseudolabels/1"
NUM_SOFT_CHANNELS = 2  # q, conf: what `soft_target_channels` returns


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
    box_refine_rounds: int = 0              # plain path: rounds of growing box sides that cut the mask (§4.5)
    box_margin: int = 0                     # px added to every side of a mask's boxes (§2.3, §4.5)
    extra: dict = field(default_factory=dict)

    def sha1(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def pseudolabel_folder(dataset_name_or_id: int | str, plans_identifier: str = "nnUNetPlans",
                       configuration: str = "2d") -> Path:
    """`$nnUNet_preprocessed/DatasetXXX/<data_identifier>_pseudolabels` for these plans and configuration."""
    from nnunet_semisam.data.unlabeled import UNLABELED_SUFFIX, unlabeled_preprocessed_folder

    unl = unlabeled_preprocessed_folder(dataset_name_or_id, plans_identifier, configuration)
    return unl.parent / (unl.name[: -len(UNLABELED_SUFFIX)] + PSEUDOLABEL_SUFFIX)


# ------------------------------------------------------------------------------------------------------------------
# store


def _record_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def case_content_sha1(*arrays: np.ndarray | None) -> str:
    """Digest of a preprocessed case's arrays (shape, dtype and values of each; None counts as absent)."""
    h = hashlib.sha1()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def source_stat(folder: str | os.PathLike, case_id: str) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of a preprocessed case's array files (`CASE.b2nd`, `CASE_seg.b2nd`)."""
    out = {}
    for name in (f"{case_id}.b2nd", f"{case_id}_seg.b2nd"):
        try:
            st = os.stat(Path(folder) / name)
        except FileNotFoundError:
            continue
        out[name] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


def case_key(params_sha1: str, content_sha1: str, prompts_sha1: str = "") -> str:
    """The resume key of one pseudo-label: what it was made with (parameters, case content, the case's prompts)."""
    return hashlib.sha1(json.dumps([params_sha1, content_sha1, prompts_sha1]).encode()).hexdigest()


def save_pseudolabel(folder: str | os.PathLike, case_id: str, prob: np.ndarray, conf: np.ndarray,
                     params_sha1: str, source: str = "", content_sha1: str | None = None,
                     prompts_sha1: str | None = None, stat: dict | None = None) -> dict:
    """Write `CASE.npz` (prob float16, conf bool, both (1, *spatial)) then its record `CASE.json`; atomic.

    content_sha1 / prompts_sha1 / stat (`case_content_sha1`, the prompts' digest, `source_stat`): recorded with the
    resume key `case_key(params_sha1, content_sha1, prompts_sha1)` when `content_sha1` is given.
    """
    folder = Path(folder)
    prob = np.asarray(prob, np.float32)
    conf = np.asarray(conf, bool)
    if prob.shape != conf.shape:
        raise ValueError(f"prob {prob.shape} and conf {conf.shape} differ")
    with atomic_path(folder / f"{case_id}.npz") as tmp:
        np.savez_compressed(tmp, prob=prob.astype(np.float16), conf=conf)
    rec = {"case_id": case_id, "shape": list(prob.shape), "params_sha1": params_sha1, "source": source,
           "available": bool(conf.any())}
    if content_sha1 is not None:
        rec.update(key=case_key(params_sha1, content_sha1, prompts_sha1 or ""), content_sha1=content_sha1,
                   prompts_sha1=prompts_sha1 or "", source_stat=stat or {})
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


def write_manifest(folder: str | os.PathLike, params: PseudoLabelParams, info: dict,
                   expected: Iterable[str] | None = None, unverified: Iterable[str] = ()) -> dict:
    """(Re)write manifest.json: parameters, run info and the index of the per-case records found in `folder`.

    expected: the case ids the run is to produce (all shards); the manifest then records `num_expected`,
    `num_done` (expected cases with a record of these parameters, not counting `unverified` ones: cases of this
    run not yet checked against their current content) and `complete` (all done), so a partial or interrupted run
    can be told from a finished one by reading the manifest. Returns the manifest.
    """
    folder = Path(folder)
    psha = params.sha1()
    cases = {}
    for p in sorted(folder.glob("*.json")):
        if p.name == MANIFEST or p.name.startswith("."):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (folder / f"{p.stem}.npz").is_file() and isinstance(rec, dict) and "params_sha1" in rec:
            cases[p.stem] = {k: rec.get(k) for k in ("shape", "params_sha1", "source", "available", "key")}
    extra: dict = {}
    if expected is not None:
        expected = sorted(set(expected))
        skip = set(unverified)
        done = [c for c in expected if c not in skip and (cases.get(c) or {}).get("params_sha1") == psha]
        extra = {"num_expected": len(expected), "num_done": len(done), "complete": len(done) == len(expected),
                 "expected_cases": expected}
    man = {"format": FORMAT, "params": asdict(params), "params_sha1": psha, **info, **extra, "cases": cases}
    atomic_write_json(folder / MANIFEST, man)
    return man


def merge_shards(folder: str | os.PathLike) -> dict:
    """Re-index `folder`'s manifest over every per-case record present, after shards (`--num-parts`, DDP ranks,
    SLURM array tasks) wrote their own cases concurrently: each shard rewrote the manifest from what it had seen,
    so the last one may miss records of shards that finished at the same time. Records are per case and written
    atomically, so shards never conflict; only the index is redone. Returns the new manifest (`complete` when every
    expected case has a record of the manifest's parameters)."""
    m = Path(folder) / MANIFEST
    if not m.is_file():
        raise SemiSAMError(f"{folder} has no {MANIFEST}: not a pseudo-label folder (run nnunet-semisam pseudolabel)")
    old = json.loads(m.read_text())
    if "expected_cases" not in old:
        raise SemiSAMError(f"{m} lists no expected cases (written by an older version): re-run one shard of "
                           "nnunet-semisam pseudolabel to refresh it")
    params = PseudoLabelParams(**old["params"])
    known = {"format", "params", "params_sha1", "num_expected", "num_done", "complete", "expected_cases", "cases"}
    info = {k: v for k, v in old.items() if k not in known}
    return write_manifest(folder, params, info, old["expected_cases"])


def check_manifest(folder: str | os.PathLike, params: PseudoLabelParams, overwrite: bool = False) -> None:
    """Refuse to mix pseudo-labels of different parameters in one folder (unless `overwrite`)."""
    m = Path(folder) / MANIFEST
    if m.is_file() and not overwrite:
        old = json.loads(m.read_text())
        if old.get("params_sha1") != params.sha1():
            diff = {k: (old["params"].get(k), v) for k, v in asdict(params).items() if old["params"].get(k) != v}
            raise SemiSAMError(f"{folder} holds pseudo-labels made with other parameters {diff}; pass --overwrite "
                               "to replace them")


def manifest_params_sha1(folder: str | os.PathLike) -> str | None:
    """`params_sha1` of the store's manifest, or None when the folder has none."""
    m = Path(folder) / MANIFEST
    return json.loads(m.read_text()).get("params_sha1") if m.is_file() else None


def soft_target_channels(folder: str | os.PathLike | None, case_id: str, spatial: Sequence[int]) -> np.ndarray:
    """(2, *spatial) float32 `[q, conf]` of a case for training, zeros when it has no complete, matching pseudo-label.

    Used by the soft-target loader at every sample load (METHODS.md §4.5): a missing case, a file being replaced, or
    a map of another spatial shape (stale after re-preprocessing) gives `q = 0, conf = 0`, i.e. no KD term.
    """
    out = np.zeros((NUM_SOFT_CHANNELS, *spatial), np.float32)
    if folder is None or read_record(folder, case_id) is None:
        return out
    try:
        prob, conf = load_pseudolabel(folder, case_id)
    except (SemiSAMError, OSError, KeyError, ValueError):
        return out
    if tuple(prob.shape[1:]) == tuple(spatial):
        out[0] = prob[0]
        out[1] = conf[0]
    return out


def stale_cases(out_folder: str | os.PathLike, cases: Iterable[CaseSource], params_sha1: str | None = None
                ) -> list[str]:
    """Case ids whose pseudo-label is missing, has another shape than the preprocessed case, other params, or was
    made from other case content (the record's `content_sha1`, when it has one)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    bad = []
    for c in cases:
        data, seg, _, _ = nnUNetDatasetBlosc2(c.folder).load_case(c.case_id)
        try:
            load_pseudolabel_checked(out_folder, c.case_id, data.shape, params_sha1)
        except SemiSAMError:
            bad.append(c.case_id)
            continue
        rec = read_record(out_folder, c.case_id) or {}
        if rec.get("content_sha1") and rec["content_sha1"] != case_content_sha1(data[:], seg[:]):
            bad.append(c.case_id)
    return bad
