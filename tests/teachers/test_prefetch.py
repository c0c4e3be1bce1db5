"""`Prefetcher` (bounded background computation) and `MedSAMTeacher.prefetch` (exact embeddings, cache-aware)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from test_medsam import _image, small_sam

from nnunet_semisam.teachers import medsam as medsam_module
from nnunet_semisam.teachers.cache import EmbeddingCache
from nnunet_semisam.teachers.embedding import default_preprocess_workers
from nnunet_semisam.teachers.medsam import MedSAMTeacher
from nnunet_semisam.teachers.prefetch import Prefetcher


def test_results_order_and_window():
    live, peak, lock = [0], [0], threading.Lock()

    def slow_square(x):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02)
        with lock:
            live[0] -= 1
        return x * x

    with Prefetcher(slow_square, workers=2, window=3) as pf:
        pf.schedule((i, i) for i in range(10))
        assert pf.pending == 10 and len(pf._running) == 3  # only `window` submitted, the rest queued
        pf.schedule([(0, 0)])                               # a key scheduled twice runs once
        assert pf.pending == 10
        assert [pf.take(i) for i in range(10)] == [i * i for i in range(10)]
        assert pf.take(3) is None                           # already taken
        assert pf.take("never") is None
        assert peak[0] <= 2                                 # never more than `workers` at once
        assert pf.pending == 0


def test_queued_key_taken_early_is_dropped_and_errors_propagate():
    calls = []

    def fn(x):
        calls.append(x)
        if x == "bad":
            raise ValueError("bad item")
        return x

    pf = Prefetcher(fn, workers=1, window=1)
    pf.schedule([("a", "a"), ("b", "b"), ("bad", "bad")])
    assert pf.take("b") is None          # still queued: dropped, the caller computes it inline
    assert pf.take("a") == "a"
    with pytest.raises(ValueError, match="bad item"):
        pf.take("bad")
    pf.close()
    assert "b" not in calls
    with pytest.raises(ValueError):
        Prefetcher(fn, workers=0)


def test_teacher_prefetch_is_exact_and_skips_cached(tmp_path, monkeypatch):
    sam = small_sam()
    images = [_image(False), _image(True), _image(False, 40, 60)]
    plain = MedSAMTeacher(sam, checkpoint_sha1="abc")
    ref = [plain.embed(img) for img in images]

    runs = []
    real = medsam_module.medsam_preprocess
    monkeypatch.setattr(MedSAMTeacher, "preprocess", staticmethod(
        lambda im: runs.append(threading.current_thread().name) or real(im)))
    cache = EmbeddingCache(tmp_path / "cache")
    t = MedSAMTeacher(sam, checkpoint_sha1="abc", cache=cache)
    t.embed(images[0], case_id="c0", slice_idx=0)  # cached: prefetch must skip it
    runs.clear()
    t.prefetch([(img, f"c{i}", 0) for i, img in enumerate(images)], workers=2)
    out = [t.embed(img, case_id=f"c{i}", slice_idx=0) for i, img in enumerate(images)]
    t.close_prefetch()
    for a, b in zip(out, ref):
        assert torch.equal(a, b)                     # bit-identical to inline preprocessing
    assert len(runs) == 2 and all(n.startswith("semisam-prefetch") for n in runs)  # 2 misses, both in threads
    assert t._prefetcher is None
    assert 1 <= default_preprocess_workers() <= 8
