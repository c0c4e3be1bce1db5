"""Shared by the trainer benchmarks: warm-up and interleaved timing of nnU-Net training steps in one process."""
from __future__ import annotations

import multiprocessing
import os
import sys
import time


def ready_for_steps(trainer, warmup: int = 2):
    """`on_train_start` (loaders, teacher, ...), train mode and `warmup` untimed steps; returns the trainer."""
    trainer.on_train_start()
    trainer.network.train()
    for _ in range(warmup):
        trainer.train_step(next(trainer.dataloader_train))
    return trainer


def interleaved_step_times(trainers: dict, iters: int, block: int = 5,
                           clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per `train_step` of each trainer, in alternating blocks of `block` steps so that all of them see the
    same machine load; data loading is outside the timed region. `clock`: wall time by default; `time.thread_time`
    (the CPU time of the training thread) with 1 torch thread is a measure that other jobs on a shared machine do
    not inflate."""
    times = {k: [] for k in trainers}
    for _ in range(max(1, iters // block)):
        for name, t in trainers.items():
            for _ in range(block):
                batch = next(t.dataloader_train)
                t0 = clock()
                t.train_step(batch)
                times[name].append(clock() - t0)
    return times


def exit_now(code: int = 0) -> None:
    """Flush and leave at once, killing the loaders' worker processes first.

    nnU-Net's augmenter workers poll their queues and survive a hard `os._exit` of their parent (found as ~1.6 %
    CPU orphans, dozens after a few benchmark runs, skewing later timings), so they are killed explicitly.
    """
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
