"""LiteMedSAM teacher costs on this machine: encoder per input side, and a pseudo-label refresh with/without cache.

Measured side by side in one run (fixed seeds, `--threads` torch threads, the real bundled weights):
1. the TinyViT encoder in ms per image for a batch of `--batch` at 256² (the reference pseudo-label path,
   `model.image_encoder`) and at the CPU feature sides (default 128² and 64², `encoder_for(size)`): the full encoder
   with its neck (`encode_features`) and the FPKDM taps alone (`first_tap` + `later_taps`, no neck); one warm-up
   call per side, then the median of `--iters` calls;
2. a pseudo-label refresh, seconds per image: `embed` + `segment` of `--boxes` boxes without a cache, and with a
   warm `EmbeddingCache` in a temporary folder (the closed-loop refresh after the first round, METHODS.md §2.7).

    python benchmarks/bench_litemedsam.py                  # CPU, 2 threads, batch 4, sides 256/128/64 (~2 min)
    python benchmarks/bench_litemedsam.py --iters 5 --sizes 256 192 128 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch


def _timed(fn: Callable[[], object], iters: int, sync: bool) -> float:
    """Median seconds of `iters` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3, help="timed calls per measurement (median; after a warm-up)")
    ap.add_argument("--batch", type=int, default=4, help="images per encoder call")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 128, 64], help="encoder input sides")
    ap.add_argument("--images", type=int, default=3, help="images of the pseudo-label refresh")
    ap.add_argument("--boxes", type=int, default=3, help="boxes per refresh image")
    ap.add_argument("--image-size", type=int, nargs=2, default=[192, 160], help="H W of the refresh images")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sync = a.device.startswith("cuda")

    from nnunet_semisam.teachers.cache import EmbeddingCache
    from nnunet_semisam.teachers.litemedsam import LiteMedSAMTeacher

    teacher = LiteMedSAMTeacher.from_package(device=a.device)
    res: dict = {"device": a.device, "threads": a.threads, "batch": a.batch, "iters": a.iters, "encoder": {}}

    # 1. encoder per input side
    rows = []
    for size in a.sizes:
        x = torch.rand(a.batch, 3, size, size, device=a.device)
        teacher.encoder_for(size)  # build it before the timing (other sides than 256)
        if size == teacher.native_size:
            def full():
                with torch.no_grad():
                    return teacher.model.image_encoder(x)
        else:
            def full():
                return teacher.encode_features(x)
        t_full = _timed(full, a.iters, sync)
        t_taps = _timed(lambda: teacher.later_taps(teacher.first_tap(x)), a.iters, sync)
        ms_full, ms_taps = 1000 * t_full / a.batch, 1000 * t_taps / a.batch
        res["encoder"][size] = {"encoder_ms_per_image": ms_full, "taps_ms_per_image": ms_taps}
        rows.append((size, ms_full, ms_taps))

    # 2. pseudo-label refresh without / with a warm embedding cache
    rng = np.random.default_rng(0)
    H, W = a.image_size
    images = [rng.integers(0, 256, (H, W), dtype=np.uint8) for _ in range(a.images)]
    boxes = []
    for _ in images:
        lo = rng.integers(0, [W // 2, H // 2], (a.boxes, 2))
        hi = lo + rng.integers(8, [W // 2, H // 2], (a.boxes, 2))
        boxes.append(np.concatenate([lo, hi], 1))

    def refresh(t: LiteMedSAMTeacher, use_ids: bool) -> float:
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, (img, b) in enumerate(zip(images, boxes)):
            emb = t.embed(img, case_id=f"case{i}" if use_ids else None, slice_idx=0 if use_ids else None)
            t.segment(emb, b, img.shape)
        if sync:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / len(images)

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)
        cached = LiteMedSAMTeacher(teacher.model, teacher.device, checkpoint_sha1=teacher.checkpoint_sha1,
                                   cache=cache)
        s_none = refresh(teacher, False)
        s_cold = refresh(cached, True)  # first round: misses, embeddings written to the folder
        s_warm = statistics.median(refresh(cached, True) for _ in range(max(1, a.iters)))
        res["refresh"] = {"no_cache_s_per_image": s_none, "cold_cache_s_per_image": s_cold,
                          "warm_cache_s_per_image": s_warm, "ratio_warm_vs_none": s_warm / s_none,
                          "cache_hits": cache.hits}

    print(f"LiteMedSAM (bundled weights), {a.device}, {a.threads} torch threads, batch {a.batch}, "
          f"median of {a.iters} after 1 warm-up")
    print(f"{'input side':>10} | {'encoder ms/image':>16} | {'taps ms/image':>13} | path")
    for size, ms_full, ms_taps in rows:
        path = "reference (model.image_encoder)" if size == teacher.native_size else "encoder_for(size)"
        print(f"{size:>10} | {ms_full:>16.1f} | {ms_taps:>13.1f} | {path}")
    r = res["refresh"]
    print(f"pseudo-label refresh ({a.images} images {H}x{W}, {a.boxes} boxes each): "
          f"no cache {r['no_cache_s_per_image']:.3f} s/image, cold cache {r['cold_cache_s_per_image']:.3f} s/image, "
          f"warm cache {r['warm_cache_s_per_image']:.4f} s/image (ratio {r['ratio_warm_vs_none']:.4f})")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
