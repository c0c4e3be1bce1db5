"""Background computation of upcoming inputs with a bounded window (used for MedSAM's reference preprocessing).

MedSAM's exact preprocessing (§2.2 steps 1-3: skimage's order-3 resize to 1024², METHODS.md) costs ~1 s per image on
a CPU core, while the encoder of the embedded teacher takes ~30 ms (and MedSAM's ViT-B ~50-100 ms on a GPU), so a
pseudo-label pass is bound by it. skimage/scipy release the GIL, so threads run it in parallel: `Prefetcher`
computes `fn(item)` for the items scheduled next in `workers` threads, at most `window` results ahead of the consumer
(each MedSAM input is 25 MB of float64), and `take(key)` hands one over. The result of `fn` is the same as an inline
call: threads change when it is computed, not what.
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable


class Prefetcher:
    """`fn(item)` for scheduled (key, item) pairs in background threads, consumed by `take(key)`.

    Args:
        fn: the function to run (thread-safe; e.g. `medsam_preprocess`).
        workers: threads (>= 1).
        window: most results computed or running ahead of the consumer (default 2 x workers).
    Items are started in the order they were scheduled, as slots free up; a key scheduled twice runs once.
    `take(key)` returns the result (waiting for it if it runs, re-raising its exception), or None for a key that
    was never scheduled or was already taken; a key that is still queued is dropped from the queue and None
    returned (the caller computes it inline, nothing runs twice). `close()` stops the threads; also a context manager.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int, window: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.window = max(1, int(window if window is not None else 2 * workers))
        self._pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="semisam-prefetch")
        self._queued: OrderedDict[Hashable, Any] = OrderedDict()
        self._running: dict[Hashable, Future] = {}

    def schedule(self, items: Iterable[tuple[Hashable, Any]]) -> None:
        for key, item in items:
            if key not in self._running and key not in self._queued:
                self._queued[key] = item
        self._fill()

    def _fill(self) -> None:
        while self._queued and len(self._running) < self.window:
            key, item = self._queued.popitem(last=False)
            self._running[key] = self._pool.submit(self.fn, item)

    def take(self, key: Hashable) -> Any | None:
        fut = self._running.pop(key, None)
        if fut is None:
            self._queued.pop(key, None)
            return None
        try:
            return fut.result()
        finally:
            self._fill()

    @property
    def pending(self) -> int:
        """Items scheduled and not taken yet (queued or running/finished)."""
        return len(self._queued) + len(self._running)

    def close(self) -> None:
        self._queued.clear()
        for fut in self._running.values():
            fut.cancel()
        self._running.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
