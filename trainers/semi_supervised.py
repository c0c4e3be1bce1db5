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

Start-up checks (`preflight`): everything a run needs that can be checked is checked at the very beginning of
`on_train_start`, before nnU-Net builds its network or starts a data-augmentation worker, and fails with one
`SemiSAMError` line: the trainer is not the abstract base, nnU-Net's labeled preprocessed folder exists, the unlabeled
folder is complete, made with these plans and disjoint from the labeled and split cases
(`nnunet_semisam.data.unlabeled.check_preprocessed_unlabeled`); methods add theirs (`preflight_checks`, e.g. the KD
teacher checkpoint). Every trainer installs `nnunet_semisam.errors.install_one_line_errors`, so a `SemiSAMError`
escaping `nnUNetv2_train` prints as its last stderr line `error: <message>` (exit status 1) instead of a traceback;
`nnUNet_semisam_traceback=1` restores the traceback.

Hooks changed: `get_dataloaders`, `on_train_start`, `train_step`, `on_train_epoch_end`, `on_epoch_end`,
`on_train_end`, `perform_actual_validation` (start and end lines in the log), `save_checkpoint`, `load_checkpoint`;
everything else is nnU-Net's.
"""
from __future__ import annotations

import os
import sys
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_semisam.data.unlabeled import (ALLOW_SUBSET_ENV, UNLABELED_SUFFIX, check_preprocessed_unlabeled,
                                           list_preprocessed_unlabeled)
from nnunet_semisam.data.views import unpack_views, weak_strong_pipeline
from nnunet_semisam.distributed import (DistributedTrainerMixin, all_gather_objects, all_reduce_gradients,
                                        broadcast_module, per_rank_share, rank, rank_seeds, shared_random_seed,
                                        world_size)
from nnunet_semisam.errors import SemiSAMError, install_one_line_errors
from nnunet_semisam.io import atomic_path
from nnunet_semisam.plotting import plot_loss_terms
from nnunet_semisam.trainers.short_schedules import final_validation_skipped

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


#: concrete trainers named when the abstract base is asked for
CONCRETE_TRAINERS = ("MeanTeacherTrainer", "MedSAMMambaKDTrainer", "UAMTTrainer", "CPSTrainer", "BCPTrainer",
                     "URPCTrainer", "MCNetPlusTrainer", "CCTTrainer", "SemiSAMPlusTrainer", "VerSemiTrainer",
                     "MNCoTrainer")


class SemiSupervisedTrainer(DistributedTrainerMixin, nnUNetTrainer):
    """Base class: labeled + unlabeled loaders, per-term loss logging, extra checkpoint state (module docstring)."""

    #: names of the terms `compute_loss_terms` returns; each is logged as loss_<name> / weight_<name>
    loss_terms: tuple[str, ...] = ("supervised",)
    #: DDP: methods keep heads / branches that a phase does not train (nnU-Net's decoders build every DS head)
    ddp_find_unused_parameters = True
    #: torch.compile of the network (nnU-Net's default on CUDA): None keeps nnU-Net's choice; False turns it off with
    #: `compile_off_reason` in the log (methods that call into the network's internals or hook its modules)
    compile_network: bool | None = None
    compile_off_reason = ""
    #: unlabeled crops: the loader class and its `oversample_foreground_percent` (uniform crops by default; M&N biases
    #: them towards the foreground of g's pseudo-masks, `nnunet_semisam.data.pseudo_mask_crops`)
    unlabeled_loader_class = nnUNetDataLoader
    unlabeled_foreground_percent = 0.0
    #: a method's string settings and their allowed values, checked by `preflight_checks` ({attribute: choices})
    SETTINGS: dict[str, tuple[str, ...]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        install_one_line_errors(self.stop_background_workers)
        self.refuse_abstract()
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unlabeled_batch_size: int | None = None  # B_u; None -> the plans' batch size (METHODS.md §1.2)
        self.concat_forward = True  # labeled and unlabeled images in one forward pass (METHODS.md §1.2)
        self.save_every = 1  # checkpoint_latest after every epoch, so `--c` loses at most one epoch
        self.global_step = 0  # t_it: optimizer steps done so far
        self.grad_clip_norm = 12.0  # nnU-Net's gradient-norm clip, over `optimized_parameters()`
        self.dataloader_unlabeled = None
        self.unlabeled_folder = os.path.join(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier + UNLABELED_SUFFIX)
        self.unlabeled_manifest: dict | None = None  # manifest.json of the unlabeled folder (after `preflight`)
        self._checked_unlabeled_cases: list[str] | None = None
        self._preflight_done = False
        for key in self._term_log_keys():
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ------------------------------------------------------------------------------------------------ schedule
    @property
    def total_iterations(self) -> int:
        """T_it: optimizer steps in the whole run."""
        return self.num_epochs * self.num_iterations_per_epoch

    def _term_log_keys(self) -> list[str]:
        return [f"{kind}_{name}" for name in self.loss_terms for kind in ("loss", "weight")]

    # ------------------------------------------------------------------------------------------------ start-up checks
    @classmethod
    def refuse_abstract(cls) -> None:
        """One-line error for a class that defines no unlabeled loss (neither `unlabeled_loss_terms` nor
        `compute_loss_terms` overridden), i.e. `-tr SemiSupervisedTrainer`: it would crash at its first step."""
        if (cls.unlabeled_loss_terms is SemiSupervisedTrainer.unlabeled_loss_terms
                and cls.compute_loss_terms is SemiSupervisedTrainer.compute_loss_terms):
            raise SemiSAMError(
                f"{cls.__name__} is the abstract base of this plugin's semi-supervised trainers and has no unlabeled "
                f"loss: train a concrete one, e.g. -tr {' or -tr '.join(CONCRETE_TRAINERS)} (or their _smoke / "
                "_demo variants)")

    @property
    def dataset_id(self) -> str:
        """The dataset's id as the commands take it (`990` for `Dataset990_SynthRGB`)."""
        name = self.plans_manager.dataset_name
        return str(int(name[7:10])) if name.startswith("Dataset") and name[7:10].isdigit() else name

    @property
    def preprocess_unlabeled_command(self) -> str:
        """The command that (re)makes this run's unlabeled folder, quoted in error messages."""
        return (f"nnunet-semisam preprocess-unlabeled -d {self.dataset_id} -c {self.configuration_name} "
                f"-p {self.plans_manager.plans_name}")

    def preflight(self) -> None:
        """Run `preflight_checks` once. Called first thing in `on_train_start` (before nnU-Net initialises the
        network, unpacks data or starts data-augmentation workers), and by `get_dataloaders`."""
        if not self._preflight_done:
            self.preflight_checks()
            self._preflight_done = True

    def preflight_checks(self) -> None:
        """Everything this trainer needs that can be checked before training starts; one-line `SemiSAMError`s.

        Base: every attribute named in `SETTINGS` holds one of its allowed values, and the labeled and unlabeled
        preprocessed folders (`_check_unlabeled_folder`). Subclasses add their own checks (teacher checkpoints) and
        call `super().preflight_checks()` first.
        """
        self.refuse_abstract()
        for attr, allowed in self.SETTINGS.items():
            if getattr(self, attr) not in allowed:
                raise SemiSAMError(f"{self.__class__.__name__}.{attr} = {getattr(self, attr)!r}: expected one of "
                                   f"{', '.join(map(str, allowed))}")
        self._checked_unlabeled_cases = self._check_unlabeled_folder()

    def labeled_case_ids(self) -> list[str]:
        """Identifiers of nnU-Net's labeled preprocessed folder; one-line error when it is missing or empty."""
        folder = self.preprocessed_dataset_folder
        fix = (f"run nnUNetv2_plan_and_preprocess -d {self.dataset_id} -c {self.configuration_name} (plans "
               f"{self.plans_manager.plans_name})")
        if not folder or not os.path.isdir(folder):
            raise SemiSAMError(f"{folder} (nnU-Net's preprocessed labeled cases) does not exist: {fix}")
        try:
            dataset_class = self.dataset_class or infer_dataset_class(folder)
        except (AssertionError, KeyError):
            raise SemiSAMError(f"{folder} holds no nnU-Net preprocessed cases (or a mix of formats): {fix}") from None
        ids = sorted(dataset_class.get_identifiers(folder))
        if not ids:
            raise SemiSAMError(f"{folder} holds no preprocessed labeled case: {fix}")
        return ids

    def _check_unlabeled_folder(self) -> list[str]:
        """The unlabeled cases to train on, after the checks of `check_preprocessed_unlabeled`: the folder holds
        cases, has a manifest made with these plans and configuration, is complete (unless
        `$nnUNet_semisam_allow_unlabeled_subset=1`, which is logged), and no unlabeled case is a labeled preprocessed
        case or a train/val case of `splits_final.json` (label leak). A transductive pool (unlabeled = test images,
        `preprocess-unlabeled --transductive`) is stated in the log. Messages quote the `preprocess-unlabeled`
        command of this dataset, configuration and plans."""
        command = self.preprocess_unlabeled_command
        labeled = self.labeled_case_ids()
        allow_subset = os.environ.get(ALLOW_SUBSET_ENV) == "1"
        cases, manifest = check_preprocessed_unlabeled(
            self.unlabeled_folder, self.plans_manager.plans, self.configuration_name, labeled,
            splits_file=os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json"),
            allow_subset=allow_subset, command=command, needed_by=self.__class__.__name__)
        self.unlabeled_manifest = manifest
        if allow_subset:
            if manifest.get("complete"):
                self.print_to_log_file(f"{ALLOW_SUBSET_ENV}=1 is set; the unlabeled folder is complete anyway "
                                       f"({len(cases)} cases)")
            else:
                self.print_to_log_file(f"{ALLOW_SUBSET_ENV}=1: training on the {len(cases)} of "
                                       f"{manifest.get('num_expected', '?')} unlabeled cases present (the folder is "
                                       f"incomplete; `{command}` completes it)")
        if manifest.get("transductive"):
            self.print_to_log_file("unlabeled pool is transductive by choice (preprocess-unlabeled --transductive): "
                                   "it overlaps the test images (imagesTs)")
        return cases

    def stop_background_workers(self) -> None:
        """Stop every data-augmentation loader of this trainer quietly (called before an error line is printed)."""
        old_stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
        try:
            for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None),
                           self.__dict__.get("dataloader_unlabeled")):
                try:
                    if isinstance(loader, NonDetMultiThreadedAugmenter):
                        _finish_quietly(loader)
                    elif hasattr(loader, "_finish"):
                        old_stdout, sys.stdout = sys.stdout, sys.stderr
                        try:
                            loader._finish()
                        finally:
                            sys.stdout = old_stdout
                except Exception:  # noqa: BLE001 - best effort
                    pass
        finally:
            sys.stderr.close()
            sys.stderr = old_stderr

    def on_train_start(self):
        """`preflight` first, then nnU-Net's start (initialisation, data loaders and their workers); under DDP the
        method's extra modules are then made identical on every rank (`synchronise_extra_modules`)."""
        self.preflight()
        super().on_train_start()
        self.synchronise_extra_modules()

    def _do_i_compile(self) -> bool:
        """nnU-Net's choice (torch.compile on CUDA unless `nnUNet_compile` says otherwise), unless the method sets
        `compile_network = False` (one log line with the reason)."""
        default = super()._do_i_compile()
        if default and self.compile_network is False:
            self.print_to_log_file(f"torch.compile is off for {self.__class__.__name__}: {self.compile_off_reason}")
            return False
        return default

    # ------------------------------------------------------------------------------------------------ DDP
    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """The method's modules besides `self.network` (EMA teachers, projectors, second networks, heads): every
        `nn.Module` attribute of the trainer except the network and the loss."""
        skip = {id(self.network), id(getattr(self, "loss", None))}
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.nn.Module) and id(v) not in skip}

    def synchronise_extra_modules(self) -> None:
        """DDP: broadcast every extra module from rank 0 (their random initialisations differ per rank; DDP
        already did this for the network and for modules wrapped with `wrap_ddp`). A no-op in one process."""
        if not self.is_ddp:
            return
        modules = self.extra_modules()
        for module in modules.values():
            if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
                broadcast_module(module)
        self.print_to_log_file(f"DDP: {len(modules)} extra module(s) synchronised from rank 0 "
                               f"({', '.join(sorted(modules)) or 'none'})")

    def _ddp_synchronised_parameters(self) -> set[int]:
        """ids of the parameters whose gradients DDP itself averages (the network and `wrap_ddp`-ed modules)."""
        wrapped = [self.network] + [m for m in self.extra_modules().values()
                                    if isinstance(m, torch.nn.parallel.DistributedDataParallel)]
        return {id(p) for m in wrapped for p in m.parameters()}

    def synchronise_gradients(self) -> None:
        """DDP: average over ranks the gradients of every stepped parameter that DDP does not (projectors, heads,
        extra networks), so that every rank takes the same optimizer step. A no-op in one process."""
        if not self.is_ddp:
            return
        synced = self._ddp_synchronised_parameters()
        all_reduce_gradients([p for _, params in self.optimizers_and_parameters() for p in params
                              if id(p) not in synced])

    # ------------------------------------------------------------------------------------------------ data
    def get_dataloaders(self):
        """nnU-Net's labeled loaders, plus the unlabeled weak/strong loader (`self.dataloader_unlabeled`)."""
        self.preflight()
        dl_tr, dl_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._build_unlabeled_loader(self.unlabeled_cases)
        return dl_tr, dl_val

    def restart_unlabeled_loader(self) -> None:
        """Drop the unlabeled batches already prepared by the worker processes (up to two queues of `num_cached`)
        and start a fresh loader, so that data written since (e.g. refreshed pseudo-labels) reaches the next batch."""
        _finish_quietly(self.dataloader_unlabeled)
        self.dataloader_unlabeled = self._build_unlabeled_loader(self.unlabeled_cases)

    @property
    def unlabeled_cases(self) -> list[str]:
        """Identifiers of the unlabeled cases this run trains on: those `preflight` checked, else the complete
        preprocessed cases of the folder (`nnunet_semisam.data.unlabeled`)."""
        if self._checked_unlabeled_cases is not None:
            return list(self._checked_unlabeled_cases)
        return list_preprocessed_unlabeled(self.unlabeled_folder)

    @property
    def num_image_channels(self) -> int:
        return len(self.dataset_json["channel_names"])

    def unlabeled_dataset(self, cases: list[str]):
        """Dataset object over the preprocessed unlabeled cases (methods may wrap it to append soft targets)."""
        return nnUNetDatasetBlosc2(self.unlabeled_folder, cases)

    def unlabeled_transforms(self):
        """nnU-Net's training pipeline split into weak / strong views (`nnunet_semisam.data.views`), with the
        configuration's `use_mask_for_norm` so that unlabeled images are zeroed outside nnU-Net's nonzero mask after
        the intensity augmentation exactly like the labeled ones (both views)."""
        rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pipeline = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        return weak_strong_pipeline(pipeline, self.num_image_channels)

    def _build_unlabeled_loader(self, cases: list[str]):
        patch_size = self.configuration_manager.patch_size
        _, _, initial_patch_size, _ = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.unlabeled_transforms()
        batch_size = self.unlabeled_batch_size_per_rank
        loader = self.unlabeled_loader_class(self.unlabeled_dataset(cases), batch_size, initial_patch_size, patch_size,
                                             self.label_manager,
                                             oversample_foreground_percent=self.unlabeled_foreground_percent,
                                             transforms=transforms)
        loader.has_ignore = False  # uniform random crops; unlabeled cases carry no class locations
        n_proc = get_allowed_n_proc_DA()
        base_seed = shared_random_seed()
        seeds = rank_seeds(base_seed, max(1, n_proc))
        if n_proc == 0:
            if self.is_ddp:  # single-process loading draws from numpy's global stream: one per rank
                np.random.seed(seeds[0])
            gen = SingleThreadedAugmenter(loader, None)
        else:
            gen = NonDetMultiThreadedAugmenter(loader, None, num_processes=n_proc, num_cached=max(6, n_proc // 2),
                                               seeds=seeds, pin_memory=self.device.type == "cuda", wait_time=0.002)
        ddp = f", rank {rank()} of {world_size()}" if self.is_ddp else ""
        self.print_to_log_file(f"Unlabeled loader: {len(cases)} cases from {self.unlabeled_folder}, "
                               f"batch {len(cases) and batch_size} (labeled batch {self.batch_size}{ddp}), "
                               f"worker seeds from base seed {base_seed}")
        return gen

    @property
    def unlabeled_batch_size_per_rank(self) -> int:
        """B_u of this process: `unlabeled_batch_size` (global; default the plans' batch size, METHODS.md §1.2)
        split over the DDP ranks like nnU-Net splits the labeled batch."""
        if self.unlabeled_batch_size is None:
            return self.batch_size  # nnU-Net's labeled batch, already this rank's share
        return per_rank_share(self.unlabeled_batch_size)

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

    def optimizers_and_parameters(self) -> list[tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]]:
        """(optimizer, parameters it steps) pairs: each is zeroed, clipped to `grad_clip_norm` on its own and
        stepped after the one backward pass of `train_step`. One pair by default; CPS has one per network."""
        return [(self.optimizer, self.optimized_parameters())]

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step with `self.global_step` = index of that step (EMA updates etc.)."""

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        batch_u = self.next_unlabeled_batch()

        pairs = self.optimizers_and_parameters()
        for optimizer, _ in pairs:
            optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            terms = self.compute_loss_terms(data, target, batch_u)
            total = sum(w * v for w, v in terms.values())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.synchronise_gradients()
            for optimizer, params in pairs:
                self.grad_scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            self.synchronise_gradients()
            for optimizer, params in pairs:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
                optimizer.step()
        self.after_optimizer_step()
        self.global_step += 1

        out = {"loss": total.detach().cpu().numpy()}
        for name in self.loss_terms:  # a term a method did not compute this step (e.g. another phase's): NaN
            out[f"loss_{name}"], out[f"weight_{name}"] = float("nan"), float("nan")
        for name, (w, v) in terms.items():
            out[f"loss_{name}"] = float(v.detach())
            out[f"weight_{name}"] = float(w)
        return out

    # ------------------------------------------------------------------------------------------------ logging
    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        parts = []
        if self.is_ddp:  # every rank's steps (nnU-Net gathers its total loss the same way)
            train_outputs = [o for outputs in all_gather_objects(
                [{k: v for k, v in o.items() if k.startswith(("loss_", "weight_"))} for o in train_outputs])
                for o in outputs]
        for name in self.loss_terms:
            # steps that computed the term (phased methods leave NaN in the others)
            done = [o for o in train_outputs if f"weight_{name}" in o and not np.isnan(o[f"weight_{name}"])]
            values = [o[f"loss_{name}"] for o in done]
            weights = [o[f"weight_{name}"] for o in done]
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

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, with a start line (number of validation cases) and an end line (elapsed
        time) in the training log: it runs silently for minutes on large folds otherwise. Skipped in `_smoke` runs
        (`short_schedules.final_validation_skipped`)."""
        if final_validation_skipped(self):
            return
        _, val_keys = self.do_split()
        self.print_to_log_file(f"final validation: predicting {len(val_keys)} validation cases of fold {self.fold} "
                               f"(sliding window with mirroring, then metrics)")
        start = time()
        super().perform_actual_validation(save_probabilities)
        self.print_to_log_file(f"final validation done: {len(val_keys)} cases in {time() - start:.1f} s")

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
