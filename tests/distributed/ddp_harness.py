"""Run trainers for one short epoch in every rank of a torch.distributed job and report what each rank saw.

Launched by the DDP tests as
    python -m torch.distributed.run --nproc-per-node 2 ddp_harness.py DATASET CONFIG OUT.json TRAINER [TRAINER ...]
(gloo on CPU; nnU-Net folders from the environment). For each trainer, in the same process group, every rank builds
the trainer as `nnunet-semisam train` does (`nnunet_semisam.launch.build_trainer`), runs nnU-Net's start, one epoch of
`--steps` training steps and its validation steps and nnU-Net's epoch end (rank 0 writes checkpoint_latest), and,
for trainers with a closed-loop pseudo-label refresh, one refresh. Rank 0 writes per trainer: the digests of the
network and of every extra module on each rank, the unlabeled case ids each rank drew, how many files each rank
saved with torch.save, and the digest of the refreshed pseudo-label store as each rank reads it. A trainer that
fails records its error; the next one still runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import traceback

import torch
import torch.distributed as dist

from nnunet_semisam.distributed import all_gather_objects, process_group_timeout, rank, state_digest


def store_digest(trainer) -> str | None:
    """sha1 over the closed-loop store's unlabeled maps as this rank reads them (None without a closed loop)."""
    import hashlib

    from nnunet_semisam.data.pseudolabel_store import load_pseudolabel

    targets = getattr(trainer, "targets", None)
    if targets is None:
        return None
    h = hashlib.sha1()
    for case in sorted(trainer.unlabeled_cases):
        prob, conf = load_pseudolabel(targets.unlabeled_folder, case)
        h.update(case.encode() + prob.tobytes() + conf.tobytes())
    return h.hexdigest()


def run_one(name: str, args: argparse.Namespace) -> dict:
    from nnunet_semisam.launch import build_trainer

    saves: list[str] = []
    real_save = torch.save

    def counting_save(obj, f, *a, **k):
        saves.append(str(f))
        return real_save(obj, f, *a, **k)

    trainer = build_trainer(args.dataset, args.configuration, 0, name, "nnUNetPlans", False, torch.device("cpu"))
    trainer.num_iterations_per_epoch = args.steps
    drawn: list[list[str]] = []
    next_unlabeled = trainer.next_unlabeled_batch

    def recording_next():
        batch = next_unlabeled()
        drawn.append([str(k) for k in batch["keys"]])
        return batch

    trainer.next_unlabeled_batch = recording_next
    torch.save = counting_save
    try:
        trainer.on_train_start()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(args.steps)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val = [trainer.validation_step(next(trainer.dataloader_val))
                   for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(val)
        trainer.on_epoch_end()
        refreshed = hasattr(trainer, "refresh_pseudolabels")
        if refreshed:
            trainer.refresh_pseudolabels()
        result = {
            "network": state_digest(trainer.network),
            "modules": {k: state_digest(m) for k, m in sorted(trainer.extra_modules().items())},
            "global_step": trainer.global_step,
            "unlabeled_keys": drawn,
            "saves": saves,
            "store": store_digest(trainer) if refreshed else None,
            "refresh_rounds": getattr(trainer, "pl_round", None),
            "batch_size": trainer.batch_size,
            "output_folder": trainer.output_folder,
            "loss_finite": all(bool(torch.isfinite(torch.as_tensor(o["loss"]))) for o in outputs),
        }
    finally:
        torch.save = real_save
        trainer.stop_background_workers()
        trainer.__dict__.pop("next_unlabeled_batch", None)  # the wrapper closes over the trainer: a reference cycle
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("configuration")
    p.add_argument("out")
    p.add_argument("trainers", nargs="+")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", timeout=process_group_timeout())
    report = {}
    for name in args.trainers:
        try:
            mine = {"ok": True, **run_one(name, args)}
        except Exception:  # noqa: BLE001 - recorded, the next trainer runs
            mine = {"ok": False, "error": traceback.format_exc()[-3000:]}
        report[name] = all_gather_objects(mine)
        # free this trainer (its DDP reducer, loaders, gloo work) now, on every rank at the same point, rather than
        # whenever the cyclic collector runs inside the next trainer's construction: one CI run saw a rank abort
        # ("terminate called without an active exception") while the second trainer was being built
        gc.collect()
        dist.barrier()
    if rank() == 0:
        with open(args.out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
