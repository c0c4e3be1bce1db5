"""MedSAMMambaKDTrainer: MedSAM -> Tiny-MUNet distillation with a closed pseudo-label loop ([KD], METHODS.md §4).

`nnUNetv2_train DATASET 2d 0 -tr MedSAMMambaKDTrainer` trains a Tiny-MUNet student (METHODS.md §3.3) from a frozen
MedSAM teacher (§2), on the labeled cases and the dataset's `imagesUnlabeled/`:

- Student: with `-p nnUNetPlans_TinyMUNet` the planned TinyMUNet; with nnU-Net's default plans, TinyMUNet built for
  those plans' patch size, channels and classes (`nnunet_semisam.networks.kd_student`; the choice is logged). Its
  input is z-scored per image and channel on the fly. No deep supervision (§1.3). 3D configurations are refused.
- Teacher: MedSAM from `$SEMISAM_TEACHER` (a `medsam_vit_b.pth`, model type detected, or `$SEMISAM_TEACHER_TYPE`),
  default the embedded stand-in teacher shipped with the package (`nnunet_semisam/assets/README.md`); the
  `teacher_weights = "sam"` ablation reads `$SEMISAM_SAM_CHECKPOINT`. Frozen, never in the optimizer.
- Per iteration, labeled batch x_l (with its teacher map q from GT boxes) and unlabeled batch x_u (with q from the
  last refresh, if any) in one forward pass; with sub-batch b in {l, u}:
    L_b = L_KD (§4.3, eq. 6-7) + L_RD (FPKDM, §4.1, eqs. 1-2) + L_FBVM (§4.2, eqs. 3-5),
    L_total = λ1 (L_l + L_sup) + λ2 L_u,  λ1 = 1, λ2 = 0.5,
  where L_sup is nnU-Net's DC+CE on the labeled masks (`use_gt_supervision`, on by default; the paper-literal
  box-only setting is `MedSAMMambaKDTrainer_boxOnly`, METHODS.md §4.4). During `init_epochs` warm-up epochs only
  L_l (+ L_sup) is used.
- FPKDM teacher features come from the fast path (§2.6: min-max, resize to 1024², no grad, bf16 on CUDA) on the
  student's augmented batch; projectors P_l (grouped linear, dropout 0.1) are trained with the student.
  `MedSAMMambaKDTrainer_teacherF1` resizes to 16 x the student's F1 grid instead (faster for small patches,
  `fpkdm_teacher_size`).
- Closed loop (§4.5): GT-box targets for labeled cases at start; at joint epochs `pl_start`, then every `pl_every`,
  the student predicts every unlabeled image (nnU-Net's sliding-window predictor), boxes are extracted and MedSAM
  re-segments from cached embeddings (`nnunet_semisam.teachers.closed_loop`). The round number is logged and saved in
  the checkpoint, with the projectors and the FBVM polarity; `--c` restores them (nnU-Net restores the optimizer).
- Optimisation: SGD(momentum 0.99, nesterov, weight decay 3e-5, none for A_log and D) over student and projectors,
  100 epochs, B_l = B_u = the plans' batch size (nnU-Net's convention; METHODS.md §4.6 suggests 8). Learning rate:
  nnU-Net's recipe (lr 1e-2, poly decay, METHODS.md §1.5) by default, because it measured better than the paper's
  (lr 1e-3, cosine to 1e-5 per epoch, §4.6) on `benchmarks/bench_medsam_mamba_kd.py` (test Dice 62.3 vs 57.0 %, 10%
  labels, README); the paper's is `MedSAMMambaKDTrainer_paperOptim`.

Teacher targets and embeddings live in the fold's output folder (`pseudolabels/`, `teacher_embeddings/`).
`network_weights` in the checkpoint is the student; `nnUNetv2_predict -tr MedSAMMambaKDTrainer` uses it alone.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_semisam.data.soft_targets import SoftTargetDataset, image_channels_only, split_soft_targets
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.fbvm import estimate_polarity, fbvm_loss, nonmin_valid_mask
from nnunet_semisam.losses.fpkdm import FeatureProjector, fpkdm_responses
from nnunet_semisam.losses.kd import kd_loss, response_distillation_loss
from nnunet_semisam.networks.kd_student import build_kd_student, describe_kd_student, standardize_per_image
from nnunet_semisam.schedules import CosineLRScheduler
from nnunet_semisam.teachers.cache import EmbeddingCache
from nnunet_semisam.teachers.closed_loop import ClosedLoopTargets
from nnunet_semisam.teachers.medsam import SAM_SIZE, MedSAMTeacher
from nnunet_semisam.teachers.pseudolabels import CaseSource
from nnunet_semisam.teachers.sam_models import embedded_teacher_checkpoint
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule

TEACHER_ENV = "SEMISAM_TEACHER"
TEACHER_TYPE_ENV = "SEMISAM_TEACHER_TYPE"
SAM_ENV = "SEMISAM_SAM_CHECKPOINT"


def _is_no_decay(name: str) -> bool:
    """Mamba's A_log and D get no weight decay (mamba_ssm's `_no_weight_decay`, METHODS.md §4.6)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("A_log", "D")


class MedSAMMambaKDTrainer(SemiSupervisedTrainer):
    loss_terms = ("supervised", "kd_l", "rd_l", "fbvm_l", "kd_u", "rd_u", "fbvm_u")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise SemiSAMError(f"{self.__class__.__name__} is a 2D method (MedSAM teacher, METHODS.md §4); "
                               f"configuration '{configuration}' is {len(self.configuration_manager.patch_size)}D: "
                               "train the '2d' configuration")
        self.enable_deep_supervision = False  # Tiny-MUNet: single output (METHODS.md §1.3)
        # §4.4 total loss
        self.lambda_labeled = 1.0
        self.lambda_unlabeled = 0.5
        self.use_gt_supervision = True
        # §4.1 FPKDM
        self.use_fpkdm = True
        self.fpkdm_sigma = 0.1
        self.projector_dropout = 0.1
        # §4.2 FBVM
        self.use_fbvm = True
        self.fbvm_k = 1.0
        self.fbvm_valid_mask = "nonmin"  # nonmin | none
        self.fbvm_polarity = "estimate"  # estimate | +1 | abs
        # §4.3 KD
        self.kd_tau = 1.0
        # §4.5 closed loop
        self.init_epochs = 0
        self.pl_start = 10
        self.pl_every = 10
        # teacher (§2, §4.7)
        self.teacher_weights = "medsam"  # medsam | sam
        self.teacher_checkpoint: str | None = None  # None: $SEMISAM_TEACHER, else the embedded teacher
        self.teacher_channel = 0
        self.teacher_input_size: int | str = SAM_SIZE  # FPKDM fast path side; "f1": see `fpkdm_teacher_size`
        # §4.6 optimisation
        self.initial_lr = 1e-2  # nnU-Net's; the paper's 1e-3 + cosine is `_paperOptim` (module docstring)
        self.weight_decay = 3e-5
        self.min_lr = 1e-5  # cosine only
        self.lr_schedule = "poly"  # poly (nnU-Net's PolyLRScheduler) | cosine (paper, §4.6)
        self.num_epochs = 100

        self.teacher: MedSAMTeacher | None = None
        self.projector: FeatureProjector | None = None
        self.teacher_size = SAM_SIZE
        self.targets: ClosedLoopTargets | None = None
        self.polarity: list[float] | None = None
        self.pl_round = 0
        self._predictor = None
        self.logger.local_logger.my_fantastic_logging.setdefault("pseudolabel_round", [])

    # ------------------------------------------------------------------------------------------------ network
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The Tiny-MUNet student for these plans (see `nnunet_semisam.networks.kd_student`); no deep supervision."""
        return build_kd_student(configuration_manager, num_input_channels, num_output_channels)

    def initialize(self):
        super().initialize()
        self.print_to_log_file(describe_kd_student(self.configuration_manager, self.network, self.num_input_channels,
                                                   self.label_manager.num_segmentation_heads))

    # ------------------------------------------------------------------------------------------------ teacher
    def teacher_checkpoint_path(self) -> str:
        """Checkpoint of the teacher: §4.7 `sam` -> $SEMISAM_SAM_CHECKPOINT; else option, $SEMISAM_TEACHER, embedded."""
        if self.teacher_weights == "sam":
            path = os.environ.get(SAM_ENV)
            if not path:
                raise SemiSAMError(f"{self.__class__.__name__} distils from the original SAM: set ${SAM_ENV} to a "
                                   "local sam_vit_b_01ec64.pth (nothing is downloaded)")
            return path
        return self.teacher_checkpoint or os.environ.get(TEACHER_ENV) or embedded_teacher_checkpoint()

    def _setup_teacher_and_projector(self) -> None:
        path = self.teacher_checkpoint_path()
        cache = EmbeddingCache(folder=os.path.join(self.output_folder, "teacher_embeddings"))
        self.teacher = MedSAMTeacher.from_checkpoint(path, model_type=os.environ.get(TEACHER_TYPE_ENV) or None,
                                                     device=self.device, cache=cache)
        self.print_to_log_file(f"teacher: {path} (model type {self.teacher.model_type}, sha1 "
                               f"{(self.teacher.checkpoint_sha1 or '')[:12]}, taps {self.teacher.tap_blocks})")
        schemes = self.configuration_manager.normalization_schemes
        rgb = len(schemes) >= 3 and all(s == "RGBTo01Normalization" for s in schemes[:3])
        self.teacher_channels = (0, 1, 2) if rgb else (self.teacher_channel,)
        if not self.use_fpkdm:
            return
        with torch.no_grad():
            was_training = self.network.training
            self.network.eval()
            probe = torch.zeros(1, self.num_input_channels, *self.configuration_manager.patch_size, device=self.device)
            _, feats = self.network(probe, return_features=True)
            self.network.train(was_training)
        levels = min(len(feats), len(self.teacher.tap_blocks))
        self.teacher_size = self.fpkdm_teacher_size(tuple(feats[0].shape[2:]))
        teacher_dim = self.teacher.sam.image_encoder.patch_embed.proj.out_channels
        self.projector = FeatureProjector(teacher_dim, [f.shape[1] for f in feats[:levels]],
                                          [tuple(f.shape[2:]) for f in feats[:levels]],
                                          dropout=self.projector_dropout).to(self.device)
        n_aux = sum(p.numel() for p in self.projector.parameters())
        self.print_to_log_file(f"FPKDM: {levels} levels, student grids {[tuple(f.shape[2:]) for f in feats[:levels]]}"
                               f", projector parameters {n_aux:,} (not part of the student); teacher fast path at "
                               f"{self.teacher_size}x{self.teacher_size} (teacher_input_size "
                               f"{self.teacher_input_size!r})")

    def fpkdm_teacher_size(self, f1_grid: tuple[int, ...]) -> int:
        """Side of the square teacher input on the FPKDM fast path (METHODS.md §2.6, §4.1).

        An int `teacher_input_size` is used as given: default 1024, MedSAM's native side, so that the teacher sees
        the image at the scale of its pseudo-label pipeline. "f1" (`MedSAMMambaKDTrainer_teacherF1`) picks the
        smallest side whose token grid is as fine as the student's F1: ViT patch side x max(F1 grid), at most 1024.
        At the paper's 256² input (F1 64²) both are 1024²; for smaller patches "f1" runs the ViT on fewer tokens
        (position embeddings interpolated) instead of computing 64² tokens that the projector average-pools: at 64²
        patches 256², ~7x less teacher time, but the teacher then sees the image at 1/4 of the scale it segments
        at, and measured ~2.5 Dice points worse (README, KD benchmark).
        """
        if self.teacher_input_size != "f1":
            return int(self.teacher_input_size)
        patch = int(self.teacher.sam.image_encoder.patch_embed.proj.kernel_size[0])
        return min(SAM_SIZE, patch * max(int(g) for g in f1_grid))

    def configure_optimizers(self):
        """SGD(momentum 0.99, nesterov, wd 3e-5; A_log and D without decay, §4.6) over student and projectors;
        `lr_schedule` "poly": nnU-Net's poly decay from `initial_lr` (default), "cosine": the paper's cosine annealing
        to `min_lr` per epoch."""
        self._setup_teacher_and_projector()
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():
            (no_decay if _is_no_decay(name) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if self.projector is not None:
            groups.append({"params": list(self.projector.parameters()), "weight_decay": self.weight_decay})
        optimizer = torch.optim.SGD(groups, lr=self.initial_lr, momentum=0.99, nesterov=True)
        if self.lr_schedule == "poly":
            return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.min_lr)

    # ------------------------------------------------------------------------------------------------ data
    @property
    def targets_root(self) -> str:
        return os.path.join(self.output_folder, "pseudolabels")

    def get_tr_and_val_datasets(self):
        """nnU-Net's split; training cases carry their GT-box teacher maps as extra channels."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        dataset_tr = SoftTargetDataset(self.preprocessed_dataset_folder, list(dataset_tr.identifiers),
                                       self.folder_with_segs_from_previous_stage,
                                       store_folder=os.path.join(self.targets_root, "labeled"))
        return dataset_tr, dataset_val

    def unlabeled_dataset(self, cases: list[str]):
        return SoftTargetDataset(self.unlabeled_folder, cases, store_folder=os.path.join(self.targets_root, "unlabeled"))

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's pipeline with intensity transforms kept off the appended teacher-map channels."""
        return image_channels_only(super().get_training_transforms(*args, **kwargs), self.num_image_channels)

    # ------------------------------------------------------------------------------------------------ closed loop
    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.targets = ClosedLoopTargets(
            self.teacher, self.targets_root, self.configuration_manager.normalization_schemes,
            self.plans_manager.foreground_intensity_properties_per_channel, self.teacher_channel)
        tr_keys, _ = self.do_split()
        if self.polarity is None:
            self.polarity = self.estimate_fbvm_polarity(tr_keys)
        self.print_to_log_file(f"FBVM polarity per channel (METHODS.md section 4.2): {self.polarity} "
                               f"(mode {self.fbvm_polarity})")
        status = self.targets.labeled_targets(
            [CaseSource(k, self.preprocessed_dataset_folder, True) for k in tr_keys])
        self.print_to_log_file(f"labeled teacher targets from GT boxes: {sum(v == 'done' for v in status.values())} "
                               f"computed, {sum(v == 'skipped' for v in status.values())} reused")
        super().on_train_start()

    def estimate_fbvm_polarity(self, keys: list[str]) -> list[float]:
        """s_c of METHODS.md §4.2 from the labeled training cases (per-image z-scored, as the student sees them)."""
        ds = nnUNetDatasetBlosc2(self.preprocessed_dataset_folder, keys)

        def pairs():
            for k in keys:
                data, seg, _, _ = ds.load_case(k)
                x = np.asarray(data[:], np.float64)
                axes = tuple(range(1, x.ndim))
                x = (x - x.mean(axis=axes, keepdims=True)) / (x.std(axis=axes, keepdims=True) + 1e-8)
                yield x, np.asarray(seg[0]) > 0

        return [float(s) for s in estimate_polarity(pairs())]

    def is_refresh_epoch(self, epoch: int) -> bool:
        """Joint epochs pl_start, pl_start + pl_every, ... (METHODS.md §4.5)."""
        joint = epoch - self.init_epochs
        return joint >= self.pl_start and (joint - self.pl_start) % self.pl_every == 0

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.is_refresh_epoch(self.current_epoch):
            self.refresh_pseudolabels()

    def refresh_pseudolabels(self) -> None:
        """One closed-loop round: student boxes -> MedSAM (cached embeddings) for every unlabeled case."""
        from time import time

        cases = [CaseSource(k, self.unlabeled_folder, False) for k in self.unlabeled_cases]
        start = time()
        self.network.eval()
        try:
            stats = self.targets.refresh(cases, self.predict_foreground, self.pl_round + 1)
        finally:
            self.network.train()
        self.restart_unlabeled_loader()  # batches prepared before the refresh carry the old maps
        self.pl_round += 1
        self.print_to_log_file(f"pseudo-label round {self.pl_round}: {stats['available']}/{stats['cases']} unlabeled "
                               f"cases have a pseudo-label ({time() - start:.1f} s; teacher embedding cache "
                               f"{self.teacher.cache.hits} hits, {self.teacher.cache.misses} misses)")

    @torch.no_grad()
    def predict_foreground(self, data: np.ndarray) -> np.ndarray:
        """Student foreground (`argmax != 0`) of a whole preprocessed case (C, *spatial), by nnU-Net's sliding window."""
        if self._predictor is None:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            self._predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                              perform_everything_on_device=True, device=self.device, verbose=False,
                                              verbose_preprocessing=False, allow_tqdm=False)
            self._predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                                  self.dataset_json, self.__class__.__name__, None)
        logits = self._predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data, np.float32)))
        return (logits.argmax(0) != 0).cpu().numpy()

    # ------------------------------------------------------------------------------------------------ losses
    def _teacher_autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def response_deltas(self, x: torch.Tensor, features: list[torch.Tensor]):
        """FPKDM responses (METHODS.md §4.1) of the whole batch: (teacher deltas, student deltas), layers 2..L."""
        levels = len(self.projector.levels)
        taps_idx = tuple(self.teacher.tap_blocks[:levels])
        taps = [t.float() for t in self.teacher.fast_features(x.detach(), self.teacher_channels, taps_idx,
                                                             self.teacher_size)]

        def reinject_teacher(t1: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad(), self._teacher_autocast():
                out = self.teacher.forward_blocks(t1, start=taps_idx[0] + 1, blocks=taps_idx[1:],
                                                  stop=taps_idx[-1] + 1)
            return [o.float() for o in out]

        def reinject_student(f1: torch.Tensor) -> list[torch.Tensor]:
            return self.network.encode_from(1, f1)[:levels - 1]

        return fpkdm_responses(taps, reinject_teacher, features[:levels], reinject_student, self.projector,
                               self.fpkdm_sigma)

    def _polarity_arg(self):
        if self.fbvm_polarity == "abs":
            return "abs"
        if self.fbvm_polarity == "+1":
            return None
        return self.polarity

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        """Eqs. 6-7: λ1 (L_sup + L_KD + L_RD + L_FBVM)_labeled + λ2 (L_KD + L_RD + L_FBVM)_unlabeled."""
        x_l, q_l, w_l = split_soft_targets(data, self.num_image_channels)
        n = x_l.shape[0]
        parts = [("l", self.lambda_labeled, q_l, w_l)]
        x = x_l
        if self.current_epoch >= self.init_epochs:  # joint stage
            extra = batch_u["extra"]
            parts.append(("u", self.lambda_unlabeled, extra[:, 0:1].clamp(0, 1), extra[:, 1:2].clamp(0, 1)))
            x = torch.cat([x_l, self.student_view(batch_u)], 0)
        logits, features = self.network(x, return_features=True)

        terms: LossTerms = {}
        if self.use_gt_supervision:
            terms["supervised"] = (self.lambda_labeled, self.loss(logits[:n], target))
        deltas = self.response_deltas(x, features) if self.use_fpkdm else None
        x_std = standardize_per_image(x)  # what the student sees (FBVM's image, METHODS.md §4.2)
        fg = 1.0 - torch.softmax(logits.float(), 1)[:, :1]
        valid = nonmin_valid_mask(x_std) if self.fbvm_valid_mask == "nonmin" else None
        for tag, lam, q, w in parts:
            sl = slice(0, n) if tag == "l" else slice(n, None)
            terms[f"kd_{tag}"] = (lam, kd_loss(logits[sl], q, w, tau=self.kd_tau))
            if deltas is not None:
                terms[f"rd_{tag}"] = (lam, response_distillation_loss([d[sl] for d in deltas[0]],
                                                                      [d[sl] for d in deltas[1]]))
            if self.use_fbvm:
                terms[f"fbvm_{tag}"] = (lam, fbvm_loss(x_std[sl], fg[sl], k=self.fbvm_k,
                                                       valid=None if valid is None else valid[sl],
                                                       polarity=self._polarity_arg()))
        return terms

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        self.logger.log("pseudolabel_round", self.pl_round, self.current_epoch)

    def extra_checkpoint_state(self) -> dict:
        state = {**super().extra_checkpoint_state(), "pseudolabel_round": self.pl_round, "polarity": self.polarity}
        if self.projector is not None:
            state["projector"] = self.projector.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.pl_round = int(state["pseudolabel_round"])
        self.polarity = state["polarity"]
        if self.projector is not None and "projector" in state:
            self.projector.load_state_dict(state["projector"])
        total = 0.0 if self.projector is None else sum(float(v.double().sum())
                                                       for v in self.projector.state_dict().values())
        self.print_to_log_file(f"restored pseudo-label round {self.pl_round}, FBVM polarity {self.polarity}, "
                               f"projectors (sum of weights {total:.10e})")


# ---------------------------------------------------------------------------------------------------- variants
def variant(name: str, doc: str, base: type | None = None, **attributes) -> type:
    """A trainer variant in nnU-Net's convention (a subclass that only sets attributes after `super().__init__`).

    `nnUNetv2_train -tr NAME` finds it because it is bound to NAME at module level below.
    """
    base = base or MedSAMMambaKDTrainer

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        schedule = attributes.get("schedule")
        if schedule is not None:
            apply_schedule(self, schedule)
        for key, value in attributes.items():
            if key != "schedule":
                setattr(self, key, value)

    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


MedSAMMambaKDTrainer_boxOnly = variant(
    "MedSAMMambaKDTrainer_boxOnly", "Paper-literal: labeled annotations used only as boxes, no mask loss (METHODS.md "
    "§4.4).", use_gt_supervision=False)
MedSAMMambaKDTrainer_noFPKDM = variant(
    "MedSAMMambaKDTrainer_noFPKDM", "Table 5 ablation: no perturbation-response distillation (and no teacher "
    "features at all).", use_fpkdm=False)
MedSAMMambaKDTrainer_noFBVM = variant(
    "MedSAMMambaKDTrainer_noFBVM", "Table 5 ablation: no foreground/background variance-mean loss.", use_fbvm=False)
MedSAMMambaKDTrainer_SAM = variant(
    "MedSAMMambaKDTrainer_SAM", 'Table 5 ablation "w/o MedSAM": the original SAM ViT-B from $SEMISAM_SAM_CHECKPOINT '
    "as teacher.", teacher_weights="sam")
MedSAMMambaKDTrainer_teacherF1 = variant(
    "MedSAMMambaKDTrainer_teacherF1", "Faster FPKDM teacher features: input side 16 x the student's F1 grid instead "
    "of 1024² (`fpkdm_teacher_size`; the same at the paper's 256² input).", teacher_input_size="f1")
MedSAMMambaKDTrainer_fbvmValidNone = variant(
    "MedSAMMambaKDTrainer_fbvmValidNone", "FBVM over every pixel (no padding mask, METHODS.md §4.7).",
    fbvm_valid_mask="none")
MedSAMMambaKDTrainer_polarityPos = variant(
    "MedSAMMambaKDTrainer_polarityPos", "FBVM with the paper's implicit assumption that lesions are brighter (s_c = "
    "+1, METHODS.md §4.7).", fbvm_polarity="+1")
MedSAMMambaKDTrainer_polarityAbs = variant(
    "MedSAMMambaKDTrainer_polarityAbs", "FBVM mean term on |μF − μB| (METHODS.md §4.7).", fbvm_polarity="abs")
MedSAMMambaKDTrainer_paperOptim = variant(
    "MedSAMMambaKDTrainer_paperOptim", "The paper's optimiser (METHODS.md §4.6): lr 1e-3, cosine annealing to 1e-5 "
    "per epoch.", initial_lr=1e-3, lr_schedule="cosine")
_WARMUP_DOC = "Table 6: {} labeled-only warm-up epochs before the joint stage (METHODS.md §4.5)."
MedSAMMambaKDTrainer_init10 = variant("MedSAMMambaKDTrainer_init10", _WARMUP_DOC.format(10), init_epochs=10)
MedSAMMambaKDTrainer_init20 = variant("MedSAMMambaKDTrainer_init20", _WARMUP_DOC.format(20), init_epochs=20)
MedSAMMambaKDTrainer_init30 = variant("MedSAMMambaKDTrainer_init30", _WARMUP_DOC.format(30), init_epochs=30)
MedSAMMambaKDTrainer_init40 = variant("MedSAMMambaKDTrainer_init40", _WARMUP_DOC.format(40), init_epochs=40)

# ---------------------------------------------------------------------------------------------------- short runs
MedSAMMambaKDTrainer_smoke = variant(
    "MedSAMMambaKDTrainer_smoke", "Tests: `nnUNetTrainer_smoke`'s schedule (2 epochs x 10 iterations), one "
    "closed-loop refresh at epoch 1.", schedule=SMOKE, pl_start=1, pl_every=1)
MedSAMMambaKDTrainer_boxOnly_smoke = variant(
    "MedSAMMambaKDTrainer_boxOnly_smoke", "The box-only setting on the smoke schedule.",
    MedSAMMambaKDTrainer_smoke, use_gt_supervision=False)
MedSAMMambaKDTrainer_demo = variant(
    "MedSAMMambaKDTrainer_demo", "`nnunet-semisam demo`: `nnUNetTrainer_demo`'s schedule, refreshes at epochs 4 and "
    "8.", schedule=DEMO, pl_start=4, pl_every=4)
MedSAMMambaKDTrainer_paperOptim_demo = variant(
    "MedSAMMambaKDTrainer_paperOptim_demo", "The paper's optimiser on the demo schedule (benchmark).",
    MedSAMMambaKDTrainer_demo, initial_lr=1e-3, lr_schedule="cosine")
MedSAMMambaKDTrainer_noFBVM_demo = variant(
    "MedSAMMambaKDTrainer_noFBVM_demo", "The no-FBVM ablation on the demo schedule (benchmark).",
    MedSAMMambaKDTrainer_demo, use_fbvm=False)
MedSAMMambaKDTrainer_noFPKDM_demo = variant(
    "MedSAMMambaKDTrainer_noFPKDM_demo", "The no-FPKDM ablation on the demo schedule (benchmark).",
    MedSAMMambaKDTrainer_demo, use_fpkdm=False)
MedSAMMambaKDTrainer_teacherF1_demo = variant(
    "MedSAMMambaKDTrainer_teacherF1_demo", "The faster F1-grid teacher side on the demo schedule (benchmark).",
    MedSAMMambaKDTrainer_demo, teacher_input_size="f1")
MedSAMMambaKDTrainer_boxOnly_demo = variant(
    "MedSAMMambaKDTrainer_boxOnly_demo", "The box-only setting (METHODS.md §4.4) on the demo schedule "
    "(benchmarks/bench_medsam_mamba_kd.py).", MedSAMMambaKDTrainer_demo, use_gt_supervision=False)
