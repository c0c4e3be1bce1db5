"""M&N (seed 004): a LoRA-tuned pretrained 2D model f co-trained with nnU-Net's 3D network g (METHODS.md §7).

g is the plans network (`self.network`, deep supervision on for L_l), so `nnUNetv2_predict -tr MNCoTrainer`
predicts with g; f (`self.model_f`, `nnunet_semisam.networks.mn_lora2d`: SegFormer from `$nnUNet_semisam_mn_segformer`
when set, else LiteMedSAM's TinyViT) sees the Z-slices of the same augmented 3D crops (§7.2). The schedule is a
function of the global iteration (`nnunet_semisam.mn_schedule`, M&N epochs of `mn_epoch_iterations` steps):

- stage 1: both models, labeled batch only, `L_l` each, warm-up + cosine LR per model;
- stage 2: epochs alternate f, g, f, ...; the learner takes `b_l` labeled and `b_u` unlabeled rows (LRG, Eq. 10-11,
  from its own LR), the other model in eval and without gradients gives the soft targets P, and
  `L_c = b_l/B L_l + b_u/B L_u` (§7.3; a term with 0 rows is dropped). Each model's LR restarts at stage 2 and
  anneals over its own epochs. Only the learner's optimizer steps (`optimizers_and_parameters`).
- unlabeled crops: with p = 0.5 a crop is centred on a foreground voxel of g's latest *saved* pseudo-mask
  (`nnunet_semisam.data.pseudo_mask_crops`), computed by sliding-window prediction of g on the whole preprocessed
  unlabeled volumes when stage 2 starts and at the scaled refresh points; the unlabeled loader is restarted after.

AdamW per model (lr0 f 1e-3, g 1e-4, wd 0.01). Checkpoint: `network_weights`/`optimizer_state` are g's; `semisam` adds
f's weights, f's optimizer, the schedule position and the number of pseudo-mask refreshes done (`--c` resumes
mid-stage; the masks are in `<fold>/mn_pseudo_masks/`). Deviation: the plans' patch and batch size are used, not
[MN]'s (64, 160, 160) x 5. `MNCoTrainer_unet3d`: g is [MN]'s own simple 3D U-Net (`networks.mn_unet3d`).
"""
import os

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_semisam.data.pseudo_mask_crops import PseudoMaskDataset, RandomForegroundDataLoader, save_pseudo_mask
from nnunet_semisam.distributed import barrier, shard_of, unwrap
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.losses.mn import combined_weights, mn_labeled_loss, mn_unlabeled_loss
from nnunet_semisam.mn_schedule import (REFRESH_FRACTIONS, batch_split, model_lr, position, refreshes_due,
                                        stage_lengths)
from nnunet_semisam.networks.mn_lora2d import build_mn_2d_model, parameter_report
from nnunet_semisam.networks.mn_unet3d import FEATURES, MNUNet3D
from nnunet_semisam.networks.slices import apply_slicewise
from nnunet_semisam.trainers.semi_supervised import LossTerms, SemiSupervisedTrainer, full_resolution
from nnunet_semisam.trainers.short_schedules import DEMO, SMOKE, apply_schedule

SEGFORMER_ENV = "nnUNet_semisam_mn_segformer"


class _SetPerIteration:
    """nnU-Net calls `lr_scheduler.step(epoch)` each epoch; M&N sets both LRs every iteration instead."""

    def step(self, *_):
        pass


class MNCoTrainer(SemiSupervisedTrainer):
    loss_terms = ("labeled_f", "labeled_g", "unlabeled_f", "unlabeled_g")
    compile_network = False
    compile_off_reason = "M&N switches g between train and eval inside a step"
    unlabeled_loader_class = RandomForegroundDataLoader
    unlabeled_foreground_percent = 0.5  # p of a pseudo-mask foreground crop (§7.4)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 240  # 60 000 iterations = [MN]'s 7 500 M&N epochs of 8 (§7.4)
        self.mn_epoch_iterations = 8
        self.lr0_f, self.lr0_g, self.weight_decay_mn = 1e-3, 1e-4, 0.01
        self.segformer_path = os.environ.get(SEGFORMER_ENV) or None
        self.model_f = None
        self.optimizer_f = None
        self.refreshes_done = 0
        self.mn_refresh_fractions = REFRESH_FRACTIONS  # of f's stage-2 epochs, when g's pseudo-masks are recomputed
        self.pseudo_mask_folder = os.path.join(self.output_folder, "mn_pseudo_masks")

    @property
    def lengths(self):
        return stage_lengths(self.total_iterations, self.mn_epoch_iterations)

    def preflight_checks(self) -> None:
        super().preflight_checks()
        if len(self.configuration_manager.patch_size) != 3:
            raise SemiSAMError(f"MNCoTrainer is a 3D method: train a 3d configuration, not {self.configuration_name}")
        if self.num_image_channels not in (1, 3):
            raise SemiSAMError(f"MNCoTrainer's 2D model takes 1 or 3 channels, dataset has {self.num_image_channels}")
        try:
            self.lengths
        except ValueError as e:
            raise SemiSAMError(str(e)) from None

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.lr0_g, weight_decay=self.weight_decay_mn)
        return optimizer, _SetPerIteration()

    def initialize(self):
        super().initialize()
        f = build_mn_2d_model(self.label_manager.num_segmentation_heads, self.configuration_manager.patch_size[1:],
                              self.segformer_path, self.device)
        self.print_to_log_file(parameter_report(f).line(f) + (f" from {self.segformer_path}" if self.segformer_path
                               else " (LiteMedSAM TinyViT weights; set $nnUNet_semisam_mn_segformer for SegFormer)"))
        self.optimizer_f = torch.optim.AdamW([p for p in f.parameters() if p.requires_grad], self.lr0_f,
                                             weight_decay=self.weight_decay_mn)
        self.model_f = self.wrap_ddp(f)
        lengths = self.lengths
        self.print_to_log_file(f"M&N schedule: M&N epochs of {lengths.epoch_iterations} iterations; stage 1 "
                               f"{lengths.stage1} (warm-up {lengths.warmup}), stage 2 {lengths.stage2_f} f-epochs + "
                               f"{lengths.stage2_g} g-epochs, alternating")

    def unlabeled_dataset(self, cases):
        return PseudoMaskDataset(self.unlabeled_folder, cases, mask_folder=self.pseudo_mask_folder)

    # ------------------------------------------------------------------------------------------------ schedule
    def optimizers_and_parameters(self):
        learner = position(self.global_step, self.lengths).learner
        pairs = {"f": (self.optimizer_f, [p for g in self.optimizer_f.param_groups for p in g["params"]]),
                 "g": (self.optimizer, list(self.network.parameters()))}
        return list(pairs.values()) if learner == "both" else [pairs[learner]]

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.model_f.train()

    def train_step(self, batch: dict) -> dict:
        lengths = self.lengths
        for name, opt, lr0 in (("f", self.optimizer_f, self.lr0_f), ("g", self.optimizer, self.lr0_g)):
            for group in opt.param_groups:
                group["lr"] = model_lr(name, self.global_step, lr0, lengths)
        due = refreshes_due(self.global_step, lengths, self.mn_refresh_fractions)
        if due > self.refreshes_done:
            self.refresh_pseudo_masks()
            self.refreshes_done = due
        return super().train_step(batch)

    # ------------------------------------------------------------------------------------------------ losses
    def g_labeled_loss(self, outputs, targets, rows: int) -> torch.Tensor:
        """L_l of g on the first `rows` samples, over nnU-Net's deep-supervision outputs with its weights."""
        if not isinstance(outputs, (list, tuple)):
            return mn_labeled_loss(outputs[:rows], targets[:rows])
        weights = self.loss.weight_factors
        return sum(w * mn_labeled_loss(o[:rows], t[:rows]) for w, o, t in zip(weights, outputs, targets) if w != 0)

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        pos = position(self.global_step, self.lengths)
        y0 = target[0] if isinstance(target, (list, tuple)) else target
        if pos.learner == "both":
            return {"labeled_g": (1.0, self.g_labeled_loss(self.network(data), target, data.shape[0])),
                    "labeled_f": (1.0, mn_labeled_loss(apply_slicewise(self.model_f, data), y0))}
        lr0 = self.lr0_f if pos.learner == "f" else self.lr0_g
        b_l, b_u = batch_split(self.global_step, lr0, data.shape[0], self.lengths)
        x_u = self.student_view(batch_u)[:b_u]
        x = torch.cat([data[:b_l], x_u], 0)
        learner, other = (self.model_f, self.network) if pos.learner == "f" else (self.network, self.model_f)
        target_probs = None
        if b_u:
            other.eval()
            with torch.no_grad():
                z_other = full_resolution(self.network(x_u)) if pos.learner == "f" else apply_slicewise(other, x_u)
                target_probs = torch.softmax(z_other.float(), 1)
            other.train()
        w_l, w_u = combined_weights(b_l, b_u)
        terms: LossTerms = {}
        if pos.learner == "f":
            z = apply_slicewise(self.model_f, x)
            if b_l:
                terms["labeled_f"] = (w_l, mn_labeled_loss(z[:b_l], y0[:b_l]))
            if b_u:
                terms["unlabeled_f"] = (w_u, mn_unlabeled_loss(z[b_l:], target_probs))
        else:
            out = learner(x)
            if b_l:
                terms["labeled_g"] = (w_l, self.g_labeled_loss(out, target, b_l))
            if b_u:
                terms["unlabeled_g"] = (w_u, mn_unlabeled_loss(full_resolution(out)[b_l:], target_probs))
        return terms

    # ------------------------------------------------------------------------------------------------ pseudo-masks
    def refresh_pseudo_masks(self) -> None:
        """g's argmax on every whole unlabeled volume (sliding window, no mirroring), saved for the crop sampler;
        this rank's share under DDP, then the unlabeled loader restarts so new crops use the new masks."""
        g = unwrap(self.network)
        g.eval()
        self.set_deep_supervision_enabled(False)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=True, device=self.device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(g, self.plans_manager, self.configuration_manager, None, self.dataset_json,
                                        self.__class__.__name__, self.inference_allowed_mirroring_axes)
        cases = self.unlabeled_cases
        dataset = nnUNetDatasetBlosc2(self.unlabeled_folder, cases)
        fg = []
        with torch.no_grad():
            for case in shard_of(cases):
                data = torch.from_numpy(np.asarray(dataset.load_case(case)[0][:])).float()
                mask = predictor.predict_sliding_window_return_logits(data).argmax(0).cpu().numpy()
                save_pseudo_mask(self.pseudo_mask_folder, case, mask)
                fg.append(float((mask > 0).mean()))
        barrier()
        self.set_deep_supervision_enabled(True)
        g.train()
        pos = position(self.global_step, self.lengths)
        self.print_to_log_file(f"M&N pseudo-masks of g refreshed at M&N epoch {pos.mn_epoch} (f-epoch {pos.epoch_f}): "
                               f"{len(fg)} unlabeled volumes, mean foreground fraction "
                               f"{np.mean(fg) if fg else float('nan'):.4f}, saved to {self.pseudo_mask_folder}")
        self.restart_unlabeled_loader()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        pos = position(self.global_step, self.lengths)
        return {**super().extra_checkpoint_state(), "model_f": unwrap(self.model_f).state_dict(),
                "optimizer_f": self.optimizer_f.state_dict(), "refreshes_done": self.refreshes_done,
                "position": pos.as_dict(), "model_f_kind": unwrap(self.model_f).kind}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        if state.get("model_f_kind") != unwrap(self.model_f).kind:
            raise SemiSAMError(f"checkpoint's 2D model is {state.get('model_f_kind')!r}, this run builds "
                               f"{unwrap(self.model_f).kind!r} (check ${SEGFORMER_ENV})")
        unwrap(self.model_f).load_state_dict(state["model_f"])
        self.optimizer_f.load_state_dict(state["optimizer_f"])
        self.refreshes_done = int(state["refreshes_done"])
        pos = position(self.global_step, self.lengths)
        total = sum(float(v.double().sum()) for v in unwrap(self.model_f).state_dict().values())
        self.print_to_log_file(f"M&N state restored: stage {pos.stage}, learner {pos.learner}, f-epoch {pos.epoch_f}, "
                               f"g-epoch {pos.epoch_g}, {self.refreshes_done} pseudo-mask refreshes done; "
                               f"model f and its optimizer restored (sum of weights {total:.10e})")


class MNCoTrainer_smoke(MNCoTrainer):
    """20 iterations (`SMOKE`) in M&N epochs of 2: stage 1 of 1 epoch, then 5 f- and 4 g-epochs; pseudo-masks at the
    start of stage 2 and half-way (f-epoch 3) only, to keep the test short."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)
        self.mn_epoch_iterations = 2
        self.mn_refresh_fractions = (0.0, 0.5)


class MNCoTrainer_demo(MNCoTrainer):
    """300 iterations (`DEMO`) in M&N epochs of 4: stage 1 of 5 epochs, then 35 f- and 35 g-epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)
        self.mn_epoch_iterations = 4


class MNCoTrainer_unet3d(MNCoTrainer):
    """g = [MN]'s own simple 3D U-Net (`networks.mn_unet3d.MNUNet3D`, §7.1) instead of the plans network; one output,
    so L_l of g has no deep supervision. `nnUNetv2_predict -tr MNCoTrainer_unet3d` rebuilds it through here."""
    unet3d_features = FEATURES  # the paper's 32-512

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return MNUNet3D(num_input_channels, num_output_channels, cls.unet3d_features)


class MNCoTrainer_unet3d_smoke(MNCoTrainer_unet3d, MNCoTrainer_smoke):
    """`MNCoTrainer_smoke`'s schedule with [MN]'s 3D U-Net as g at a quarter of its width (8-128 features: the same
    layout, 1/16 of the 25.9 M parameters, for CPU tests)."""
    unet3d_features = tuple(f // 4 for f in FEATURES)


class MNCoTrainer_unet3d_demo(MNCoTrainer_unet3d, MNCoTrainer_demo):
    """`MNCoTrainer_demo`'s schedule with [MN]'s 3D U-Net as g."""
