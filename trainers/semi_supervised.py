"""SemiSupervisedTrainer: what every semi-supervised method of this plugin needs, once (METHODS.md §1.2-1.3).

A thin `nnUNetTrainer` subclass. Per iteration it draws nnU-Net's usual labeled batch (its loader, augmentation and
deep supervision, foreground oversampling) plus `B_u` unlabeled patches from `<data_identifier>_unlabeled/` (see
`nnunet_semisam.data.unlabeled`), each as a weak and a strong view of the same patch
(`nnunet_semisam.data.views`). Unlabeled crops are uniform random (no foreground oversampling). Labeled and
unlabeled images go through the network in one forward pass, so normalisation statistics cover both.

A method subclass implements `unlabeled_loss_terms(student_logits_u, batch_u)` returning named terms
`{name: (weight, value)}`; the step loss is `L_sup + sum_i w_i * L_i` (or it overrides `compute_loss_terms` for
methods with another structure). Every term and its weight is logged per epoch into nnU-Net's log
(`loss_<name>`, `weight_<name>` in its logger, printed in the training log, plotted in `progress_terms.png` next to
nnU-Net's `progress.png`).

Checkpoints: nnU-Net's keys plus `semisam` (global iteration and whatever `extra_checkpoint_state` of a method
adds, e.g. EMA teacher weights), written atomically. `network_weights` always holds the student, which is what
validation and `nnUNetv2_predict` use. Folds are nnU-Net's splits over the labeled cases; unlabeled cases are
training-only in every fold.

Hooks changed: `get_dataloaders`, `train_step`, `on_train_epoch_end`, `on_epoch_end`, `on_train_end`,
`save_checkpoint`, `load_checkpoint`; everything else is nnU-Net's.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_semisam.data.unlabeled import UNLABELED_SUFFIX, list_preprocessed_unlabeled
from nnunet_semisam.data.views import unpack_views, weak_strong_pipeline
from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import atomic_path
from nnunet_semisam.plotting import plot_loss_terms

LossTerms = dict[str, tuple[float, torch.Tensor]]


def split_batch(output, n: int):
    """Split network output(s) (a tensor or nnU-Net's deep-supervision list) at batch index n."""
    if isinstance(output, (list, tuple)):
        return [o[:n] for o in output], [o[n:] for o in output]
    return output[:n], output[n:]


def full_resolution(output) -> torch.Tensor:
    """z^0 of a deep-supervision output list, or the tensor itself (METHODS.md §1.3)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def _finish_quietly(loader) -> None:
    """Stop a background augmenter's workers (batchgenerators prints while it shuts down)."""
    if isinstance(loader, NonDetMultiThreadedAugmenter):
        old_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
        try:
            loader._finish()
        finally:
            sys.stdout.close()
            sys.stdout = old_stdout


class SemiSupervisedTrainer(nnUNetTrainer):
    """Base class: labeled + unlabeled loaders, per-term loss logging, extra checkpoint state (module docstring)."""

    #: names of the terms `compute_loss_terms` returns; each is logged as loss_<name> / weight_<name>
    loss_terms: tuple[str, ...] = ("supervised",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_batch_size: int | None = None  # B_u; None -> the plans' batch size (METHODS.md §1.2)
        self.concat_forward = True  # labeled and unlabeled images in one forward pass (METHODS.md §1.2)
        self.save_every = 1  # checkpoint_latest after every epoch, so `--c` loses at most one epoch
        self.global_step = 0  # t_it: optimizer steps done so far
        self.grad_clip_norm = 12.0  # nnU-Net's gradient-norm clip, over `optimized_parameters()`
        self.dataloader_unlabeled = None
        self.unlabeled_folder = os.path.join(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier + UNLABELED_SUFFIX)
        for key in self._term_log_keys():
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def total_iterations(self) -> int:
        """T_it: optimizer steps in the whole run."""
        return self.num_epochs * self.num_iterations_per_epoch

    def _term_log_keys(self) -> list[str]:
        return [f"{kind}_{name}" for name in self.loss_terms for kind in ("loss", "weight")]

    # ------------------------------------------------------------------------------------------------ data
    def get_dataloaders(self):
        """nnU-Net's labeled loaders, plus the unlabeled weak/strong loader (`self.dataloader_unlabeled`)."""
        cases = self._check_unlabeled_folder()
        dl_tr, dl_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._build_unlabeled_loader(cases)
        return dl_tr, dl_val

    def restart_unlabeled_loader(self) -> None:
        """Drop the unlabeled batches already prepared by the worker processes (up to two queues of `num_cached`)
        and start a fresh loader, so that data written since (e.g. refreshed pseudo-labels) reaches the next batch."""
        _finish_quietly(self.dataloader_unlabeled)
        self.dataloader_unlabeled = self._build_unlabeled_loader(self.unlabeled_cases)

    @property
    def unlabeled_cases(self) -> list[str]:
        """Identifiers of the complete preprocessed unlabeled cases (`nnunet_semisam.data.unlabeled`)."""
        return list_preprocessed_unlabeled(self.unlabeled_folder)

    def _check_unlabeled_folder(self) -> list[str]:
        cases = self.unlabeled_cases
        if not cases:
            raise SemiSAMError(
                f"{self.__class__.__name__} needs unlabeled cases but {self.unlabeled_folder} has none: run "
                f"`nnunet-semisam preprocess-unlabeled -d {self.plans_manager.dataset_name} -c "
                f"{self.configuration_name} -p {self.plans_manager.plans_name}` (imagesUnlabeled/ must not be empty)")
        manifest = os.path.join(self.unlabeled_folder, "manifest.json")
        if os.path.isfile(manifest):
            from nnunet_semisam.data.unlabeled import _configuration_signature

            sig = json.load(open(manifest))["configuration_signature"]
            if sig != _configuration_signature(self.plans_manager.plans, self.configuration_name):
                raise SemiSAMError(f"{self.unlabeled_folder} was preprocessed with other plans: re-run "
                                   f"`nnunet-semisam preprocess-unlabeled ... --overwrite`")
        return cases

    @property
    def num_image_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    def unlabeled_dataset(self, cases: list[str]):
        """Dataset object over the preprocessed unlabeled cases (methods may wrap it to append soft targets)."""
        return nnUNetDatasetBlosc2(self.unlabeled_folder, cases)

    def _build_unlabeled_loader(self, cases: list[str]):
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d, use_mask_for_norm=None, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        transforms = weak_strong_pipeline(pipeline, self.num_image_channels)
        batch_size = self.unlabeled_batch_size or self.batch_size
        loader = nnUNetDataLoader(self.unlabeled_dataset(cases), batch_size, initial_patch_size, patch_size,
                                  self.label_manager, oversample_foreground_percent=0.0, transforms=transforms)
        loader.has_ignore = False  # uniform random crops; unlabeled cases carry no class locations
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen = SingleThreadedAugmenter(loader, None)
        else:
            gen = NonDetMultiThreadedAugmenter(loader, None, num_processes=n_proc, num_cached=max(6, n_proc // 2),
                                               seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)
        self.print_to_log_file(f"Unlabeled loader: {len(cases)} cases from {self.unlabeled_folder}, "
                               f"batch {len(cases) and batch_size} (labeled batch {self.batch_size})")
        return gen

    def next_unlabeled_batch(self) -> dict[str, torch.Tensor]:
        """Next unlabeled batch on the device: `weak`, `strong`, `extra` (B_u, ...) and `valid` (B_u, 1, ...)."""
        b = next(self.dataloader_unlabeled)
        views = unpack_views(b["data"], b["target"], self.num_image_channels)
        views = {k: v.to(self.device, non_blocking=True) for k, v in views.items()}
        views["keys"] = b["keys"]
        return views

    # ------------------------------------------------------------------------------------------------ losses
    def student_view(self, batch_u: dict) -> torch.Tensor:
        """The unlabeled input the student sees: nnU-Net's fully augmented (strong) view."""
        return batch_u["strong"]

    def compute_loss_terms(self, data: torch.Tensor, target, batch_u: dict) -> LossTerms:
        """Supervised nnU-Net loss on labeled data plus the method's unlabeled terms, from one forward pass."""
        x_u = self.student_view(batch_u)
        n = data.shape[0]
        if self.concat_forward:
            out_l, out_u = split_batch(self.network(torch.cat([data, x_u], 0)), n)
        else:
            out_l, out_u = self.network(data), self.network(x_u)
        terms: LossTerms = {"supervised": (1.0, self.loss(out_l, target))}
        terms.update(self.unlabeled_loss_terms(full_resolution(out_u), batch_u))
        return terms

    def unlabeled_loss_terms(self, student_logits_u: torch.Tensor, batch_u: dict) -> LossTerms:
        """The method's unsupervised terms `{name: (weight, value)}` on the unlabeled sub-batch."""
        raise NotImplementedError(f"{self.__class__.__name__} must implement unlabeled_loss_terms")

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer steps (the network's and any extra module's, e.g. FPKDM projectors): the
        set gradient clipping runs over, so that no stepped parameter escapes the clip."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step with `self.global_step` = index of that step (EMA updates etc.)."""

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        batch_u = self.next_unlabeled_batch()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.compute_loss_terms(data, target, batch_u)
            total = sum(w * v for w, v in terms.values())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.optimized_parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.optimized_parameters(), self.grad_clip_norm)
            self.optimizer.step()
        self.after_optimizer_step()
        self.global_step += 1

        out = {"loss": total.detach().cpu().numpy()}
        for name, (w, v) in terms.items():
            out[f"loss_{name}"] = float(v.detach())
            out[f"weight_{name}"] = float(w)
        return out

    # ------------------------------------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        parts = []
        for name in self.loss_terms:
            values = [o[f"loss_{name}"] for o in train_outputs if f"loss_{name}" in o]
            weights = [o[f"weight_{name}"] for o in train_outputs if f"weight_{name}" in o]
            loss, weight = (float(np.mean(values)), float(np.mean(weights))) if values else (float("nan"), 0.0)
            self.logger.log(f"loss_{name}", loss, self.current_epoch)
            self.logger.log(f"weight_{name}", weight, self.current_epoch)
            parts.append(f"{name} {loss:.4g} (w {weight:.3g})")
        self.print_to_log_file("loss terms: " + ", ".join(parts))

    def on_epoch_end(self):
        if self.local_rank == 0:
            plot_loss_terms(self.logger.local_logger.my_fantastic_logging, self.loss_terms,
                            os.path.join(self.output_folder, "progress_terms.png"))
        super().on_epoch_end()

    def on_train_end(self):
        super().on_train_end()
        _finish_quietly(self.dataloader_unlabeled)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        """State beyond nnU-Net's checkpoint keys; subclasses add theirs via super()."""
        return {"global_step": self.global_step}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.global_step = int(state["global_step"])

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the `semisam` extra state, written atomically (temp file + rename)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        with atomic_path(filename) as tmp:
            super().save_checkpoint(tmp)
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
            checkpoint["semisam"] = self.extra_checkpoint_state()
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, str):
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        else:
            checkpoint = filename_or_checkpoint
        super().load_checkpoint(filename_or_checkpoint)
        if "semisam" in checkpoint:
            self.load_extra_checkpoint_state(checkpoint["semisam"])
            self.print_to_log_file(f"Restored {self.__class__.__name__} state at t_it={self.global_step}")
