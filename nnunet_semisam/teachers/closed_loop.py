"""Closed-loop teacher targets of the MedSAM -> Tiny-MUNet method (METHODS.md §4.5).

- Labeled cases: MedSAM on tight boxes from the ground-truth mask (§2.3 with `box_min_area = 1`), reference path
  (§2.2), computed once at start-up and stored as float16 maps.
- Unlabeled cases, at every refresh: the student predicts the whole image, its foreground (`argmax != 0`) gives the
  §2.3 boxes, MedSAM re-segments from its cached image embeddings (§2.7: the image encoder runs once per case and
  slice over the whole run), and the maps of the previous round are replaced. Images without a box are marked
  unavailable (their KD term is skipped). With `student_fusion` the stored map is `fuse_with_student`: the
  voxel-wise maximum of the teacher's and the student's foreground probability, the latter mapped onto the teacher's
  scale at the calibrated threshold (§4.5, ours).

Both stores use the pseudo-label format of `nnunet_semisam.teachers.pseudolabels` (atomic per-case writes, manifest),
in `<root>/labeled` and `<root>/unlabeled`; a training run keeps them in its fold's output folder, so folds and
trainers do not share state. The labeled targets resume case by case; a refresh interrupted midway is simply redone
(the round number in the trainer's checkpoint is the last completed one).

Progress. A refresh takes tens of seconds to minutes; with a `log` callable (the trainer's `print_to_log_file`) both
stages log a line per tenth of the cases (`ProgressLog`): how many cases the teacher has finished, i.e. whose record
in the store was written since the stage began, out of how many, and the elapsed time.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from time import time
from typing import Callable, Sequence

import numpy as np
import torch

from nnunet_semisam import distributed
from nnunet_semisam.data.case_arrays import foreground_masks
from nnunet_semisam.data.pseudolabel_store import (PseudoLabelParams, load_pseudolabel, manifest_params_sha1,
                                                   read_record, write_manifest)
from nnunet_semisam.distributed import shard_of
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.calibration import calibrate_threshold, to_teacher_scale
from nnunet_semisam.teachers.pseudolabels import CaseSource, generate_pseudolabels

PredictFn = Callable[[np.ndarray], np.ndarray]  # preprocessed case (C, *spatial) -> foreground mask (*spatial)


def fuse_with_student(teacher_prob: np.ndarray, conf: np.ndarray, student_prob: np.ndarray,
                      threshold: float = 0.5) -> np.ndarray:
    """Fused target of one unlabeled case (METHODS.md §4.5, `student_fusion`): `max(q, T(p_s))` where the teacher was
    prompted (`conf`), `q` elsewhere.

    `q` is the teacher's map from the student's boxes, `p_s = 1 - softmax(z)_0` the student's foreground probability
    at the refresh. The teacher segments inside boxes drawn around the student's (often partial) masks, so it misses
    lesion the student found and the student misses lesion the teacher found; the maximum keeps both. The stored map
    is on the teacher's scale: `T = calibration.to_teacher_scale` at the trainer's teacher threshold t*, so the map
    the loss recalibrates is `max(recalibrate(q, t*), p_s)`, the union of the teacher's mask at t* and the student's
    at 0.5 (t* = 0.5: `T` is the identity). Slices without a prompt stay as they are (no target there).
    """
    q = np.asarray(teacher_prob, np.float32)
    p = np.asarray(student_prob, np.float32)
    if q.shape != p.shape or np.shape(conf) != q.shape:
        raise SemiSAMError(f"fuse_with_student: teacher map {q.shape}, student map {p.shape} and conf "
                           f"{np.shape(conf)} must have the same shape")
    return np.where(np.asarray(conf, bool), np.maximum(q, to_teacher_scale(np.clip(p, 0.0, 1.0), threshold)), q)


class ProgressLog:
    """`with ProgressLog(folder, case_ids, stage, log):` logs `<stage>: i/n cases done (t s)` from a background thread
    while a stage writes its per-case records `<folder>/<case>.json`.

    A case counts as done once its record's modification time differs from the one it had when the stage began
    (new or replaced; a removed record does not count), so records of earlier rounds or runs are not counted and no
    clock comparison is involved. One line each time the count passes a multiple of `ceil(n / chunks)` (and at n),
    checked every `poll_s` seconds; `log=None` or no case logs nothing.
    """

    def __init__(self, folder: str | os.PathLike, case_ids: Sequence[str], stage: str,
                 log: Callable[[str], None] | None, chunks: int = 10, poll_s: float = 0.5):
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.stage = stage
        self.log = log
        self.every = max(1, math.ceil(len(self.case_ids) / max(1, int(chunks))))
        self.poll_s = poll_s
        self.logged = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _mtimes(self) -> list[int | None]:
        out = []
        for c in self.case_ids:
            try:
                out.append(os.stat(self.folder / f"{c}.json").st_mtime_ns)
            except OSError:
                out.append(None)
        return out

    def done(self) -> int:
        """Cases whose record was written since the stage began."""
        return sum(now is not None and now != then for now, then in zip(self._mtimes(), self._before))

    def check(self) -> None:
        """Log a line if the count passed the next multiple of `every` (or reached n) since the last line."""
        n = self.done()
        if n > self.logged and (n // self.every > self.logged // self.every or n == len(self.case_ids)):
            self.logged = n
            self.log(f"{self.stage}: {n}/{len(self.case_ids)} cases done ({time() - self.start:.1f} s)")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def __enter__(self) -> "ProgressLog":
        self.start = time()
        if self.log is not None and self.case_ids:
            self._before = self._mtimes()
            self._thread = threading.Thread(target=self._run, name="closed-loop-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if exc[0] is None:
                self.check()
        return False


class SlidingWindowForeground:
    """The student's foreground (`argmax != 0`) on a whole preprocessed case, by nnU-Net's sliding-window predictor.

    The `PredictFn` of a refresh (METHODS.md §4.5): tile step 0.5, Gaussian weighting, no mirroring, on the trainer's
    device. The network is used as it is (the caller puts it in eval mode for the refresh).
    """

    def __init__(self, network: torch.nn.Module, plans_manager, configuration_manager, dataset_json: dict,
                 trainer_name: str, device: torch.device) -> None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                         perform_everything_on_device=True, device=device, verbose=False,
                                         verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.manual_initialization(network, plans_manager, configuration_manager, None, dataset_json,
                                             trainer_name, None)

    @torch.no_grad()
    def logits(self, data: np.ndarray) -> torch.Tensor:
        return self.predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data, np.float32)))

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return (self.logits(data).argmax(0) != 0).cpu().numpy()

    def with_probability(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(foreground mask, foreground probability `1 - softmax_0`) from one sliding-window pass."""
        z = self.logits(data).float()
        return (z.argmax(0) != 0).cpu().numpy(), (1 - torch.softmax(z, 0)[0]).cpu().numpy()


class ClosedLoopTargets:
    """Teacher targets for labeled (GT boxes) and unlabeled (student boxes) cases; see the module docstring.

    Args:
        teacher: a `MedSAMTeacher` (with an `EmbeddingCache` so refreshes skip the image encoder).
        root: folder of the two stores.
        normalization_schemes, intensity_properties: the plans configuration's, for rule U (METHODS.md §2.4).
        teacher_channel: channel the teacher sees for non-RGB data.
        box_min_area / max_boxes: §2.3 for student boxes (labeled GT boxes use `box_min_area = 1`, §4.5).
        box_margin: px added to every side of the student's boxes (§4.5: a student trained on a few labels
            under-segments, and a tight box then cuts the teacher's mask); GT boxes stay tight (§2.3).
        box_refine_rounds: student boxes whose sides cut through the teacher's mask grow for up to this many rounds
            (`teachers.box_refine`, §4.5); 0 keeps the student's tight boxes. GT boxes are never grown.
        workers: threads for MedSAM's preprocessing of upcoming cases (default: the CPU cores, at most 8; the
            training loop waits for a refresh, so its cores are free).
        progress: tqdm bars on stderr (command-line use).
        log: a callable taking one line (a trainer's `print_to_log_file`) for progress lines (`ProgressLog`);
            None logs nothing.
        log_chunks: how many progress lines one stage logs at most.
        student_fusion: store `fuse_with_student` of the teacher's map and the student's probability for unlabeled
            cases (the refresh's predictor must then have `with_probability`); False stores the teacher's map.
        fusion_threshold: the teacher threshold t* the fusion maps the student's probability to (set by the trainer
            once t* is known; 0.5: the teacher's maps as they are).
    """

    def __init__(self, teacher, root: str | os.PathLike, normalization_schemes: Sequence[str],
                 intensity_properties: dict | None = None, teacher_channel: int = 0, box_min_area: int = 10,
                 max_boxes: int = 5, progress: bool = False, workers: int | None = None,
                 log: Callable[[str], None] | None = None, log_chunks: int = 10, box_refine_rounds: int = 0,
                 student_fusion: bool = False, fusion_threshold: float = 0.5, box_margin: int = 0):
        self.teacher = teacher
        self.root = Path(root)
        self.labeled_folder = self.root / "labeled"
        self.unlabeled_folder = self.root / "unlabeled"
        self.normalization_schemes = list(normalization_schemes)
        self.intensity_properties = intensity_properties
        self.teacher_channel = teacher_channel
        self.box_min_area = box_min_area
        self.max_boxes = max_boxes
        self.box_refine_rounds = int(box_refine_rounds)
        self.box_margin = int(box_margin)
        self.progress = progress
        self.workers = workers
        self.log = log
        self.log_chunks = max(1, int(log_chunks))
        self.student_fusion = bool(student_fusion)
        self.fusion_threshold = float(fusion_threshold)

    def _params(self, prompt_source: str, box_min_area: int, extra: dict, box_refine_rounds: int = 0,
                box_margin: int = 0) -> PseudoLabelParams:
        return PseudoLabelParams(teacher=self.teacher.model_type or "medsam",
                                 checkpoint_sha1=self.teacher.checkpoint_sha1 or "",
                                 model_type=self.teacher.model_type or "", prompt_source=prompt_source, aug=0,
                                 box_min_area=box_min_area, max_boxes=self.max_boxes,
                                 teacher_channel=self.teacher_channel, box_refine_rounds=box_refine_rounds,
                                 box_margin=box_margin, extra=extra)

    def labeled_targets(self, cases: Sequence[CaseSource]) -> dict[str, str]:
        """MedSAM from GT boxes for every labeled case not done yet (resumable); {case: done | skipped} for the
        cases of this DDP rank's shard (all cases in one process)."""
        params = self._params("gt-boxes", 1, {"closed_loop": "labeled"})
        info = {"stage": "labeled GT-box targets (METHODS.md §4.5)"}
        overwrite = self._stale_manifest(self.labeled_folder, params)
        distributed.barrier()  # every rank has judged the old manifest before any rank writes
        with ProgressLog(self.labeled_folder, shard_of(sorted(c.case_id for c in cases)),
                         "labeled GT-box targets", self.log, self.log_chunks):
            status = generate_pseudolabels(
                self.teacher, cases, self.labeled_folder, params, self.normalization_schemes,
                self.intensity_properties, mask_fn=lambda case, data, seg: seg[0] > 0, progress=self.progress,
                run_info=info, overwrite=overwrite, workers=self.workers, num_parts=distributed.world_size(),
                part_id=distributed.rank())
        self._finish_shards(self.labeled_folder, params, info, cases)
        return status

    def refresh(self, cases: Sequence[CaseSource], predict_foreground: PredictFn, round_index: int) -> dict[str, int]:
        """Round `round_index`: student boxes -> MedSAM for every unlabeled case, replacing the previous maps.

        Under DDP every rank does its shard of the cases (`distributed.shard_of` order), with its own copy of the
        student (identical on every rank), and waits for the others: every rank then reads the same targets.
        Returns {"cases": n, "available": number of cases with at least one box} over all cases.
        """
        extra = {"closed_loop": "unlabeled", "round": int(round_index)}
        if self.student_fusion:
            extra["fusion"] = "max-student"
            if self.fusion_threshold != 0.5:
                extra["fusion_threshold"] = self.fusion_threshold
        params = self._params("student", self.box_min_area, extra, self.box_refine_rounds, self.box_margin)
        student: dict[str, np.ndarray] = {}

        def mask_fn(case, data, seg):
            if not self.student_fusion:
                return np.asarray(predict_foreground(data), bool)
            mask, student[case.case_id] = predict_foreground.with_probability(data)
            return np.asarray(mask, bool)

        def fuse(case, prob, conf):
            return fuse_with_student(prob, conf, student.pop(case.case_id).reshape(prob.shape),
                                     self.fusion_threshold), conf

        info = {"stage": f"closed-loop refresh round {round_index} (METHODS.md §4.5)"}
        distributed.barrier()  # nobody reads or rewrites the store while a rank still trains on the old maps
        with ProgressLog(self.unlabeled_folder, shard_of(sorted(c.case_id for c in cases)),
                         f"closed-loop refresh round {round_index}", self.log, self.log_chunks):
            generate_pseudolabels(
                self.teacher, cases, self.unlabeled_folder, params, self.normalization_schemes,
                self.intensity_properties,
                mask_fn=mask_fn, post_fn=fuse if self.student_fusion else None, progress=self.progress,
                run_info=info, overwrite=True, workers=self.workers, num_parts=distributed.world_size(),
                part_id=distributed.rank())
        self._finish_shards(self.unlabeled_folder, params, info, cases)
        available = sum(bool((read_record(self.unlabeled_folder, c.case_id) or {}).get("available")) for c in cases)
        return {"cases": len(cases), "available": int(available)}

    def labeled_start(self, cases: Sequence[CaseSource]) -> str:
        """`labeled_targets` at the start of training; returns the line for the training log."""
        status = self.labeled_targets(cases)
        return (f"labeled teacher targets from GT boxes: {sum(v == 'done' for v in status.values())} computed, "
                f"{sum(v == 'skipped' for v in status.values())} reused")

    def teacher_threshold(self, setting: float | str, cases: Sequence[CaseSource]) -> tuple[float, str]:
        """The threshold the KD terms recalibrate the teacher's maps at, and the log line: `labeled_threshold` for
        "calibrate", else the number given (0.5: the teacher's maps as they are)."""
        if setting == "calibrate":
            return self.labeled_threshold(cases)
        return float(setting), f"teacher threshold {float(setting)} (set; 0.5 keeps the teacher's maps as they are)"

    def labeled_threshold(self, cases: Sequence[CaseSource]) -> tuple[float, str]:
        """t* of the labeled GT-box maps against their labels (`teachers.calibration`, §4.5) and the log line.

        Reads the stored labeled maps (run `labeled_targets` first) and each case's preprocessed label
        (foreground `seg > 0`, the mask the GT boxes came from); cases without a prompted map (no lesion) are left
        out, they score the same at every threshold.
        """
        prompted = {}  # case id -> stored map, for the cases with a prompted map (2D: one image each)
        for c in cases:
            prob, conf = load_pseudolabel(self.labeled_folder, c.case_id)
            if conf.any():
                prompted[c.case_id] = prob[0]

        def pairs():
            for folder in sorted({c.folder for c in cases}):  # one nnU-Net dataset per preprocessed folder
                ids = [c.case_id for c in cases if c.folder == folder and c.case_id in prompted]
                for case_id, mask in zip(ids, foreground_masks(folder, ids)):
                    yield prompted[case_id], mask.reshape(prompted[case_id].shape)

        t_star, dice, n = calibrate_threshold(pairs())
        return t_star, (f"teacher threshold calibrated on {n} labeled cases: t* = {t_star} (mean GT-box Dice % by "
                        "threshold: " + ", ".join(f"{t}: {100 * d:.1f}" for t, d in dice.items()) + ")")

    def student_round(self, network: torch.nn.Module, cases: Sequence[CaseSource], round_index: int,
                      **predictor_kwargs) -> str:
        """One closed-loop round from a training network (§4.5): its sliding-window foreground
        (`SlidingWindowForeground(network, **predictor_kwargs)`, in eval mode for the round, training mode restored
        after) gives the boxes of `refresh`. Returns the line for the training log (time, embedding-cache hits)."""
        start = time()
        predict = SlidingWindowForeground(distributed.unwrap(network), **predictor_kwargs)
        was_training = network.training
        network.eval()
        try:
            stats = self.refresh(cases, predict, round_index)
        finally:
            network.train(was_training)
        cache = self.teacher.cache
        return (f"pseudo-label round {round_index}: {stats['available']}/{stats['cases']} unlabeled cases have a "
                f"pseudo-label ({time() - start:.1f} s; teacher embedding cache {cache.hits} hits, "
                f"{cache.misses} misses)")

    @staticmethod
    def _finish_shards(folder: Path, params: PseudoLabelParams, info: dict, cases: Sequence[CaseSource]) -> None:
        """DDP: wait for every rank's shard, then rank 0 re-indexes the manifest over all records (each shard wrote
        it from what it had seen); the second barrier keeps readers behind that write."""
        if distributed.is_distributed():
            distributed.barrier()
            if distributed.rank() == 0:
                write_manifest(folder, params, info, [c.case_id for c in cases])
            distributed.barrier()

    @staticmethod
    def _stale_manifest(folder: Path, params: PseudoLabelParams) -> bool:
        """True when `folder` holds targets of other parameters (e.g. another teacher): they are all redone."""
        old = manifest_params_sha1(folder)
        return old is not None and old != params.sha1()
