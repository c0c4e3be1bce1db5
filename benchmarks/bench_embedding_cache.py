"""Embedding-cache effect (METHODS.md §2.7): prompt-only refresh vs a full teacher pass, per image.

Full pass = MedSAM reference preprocessing (order-3 resize to 1024²) + image encoder + box decoding (what a
pseudo-label refresh costs without the cache). Prompt-only refresh = cache lookup + prompt encoder + mask decoder
(what the closed loop of §4.5 pays after the first round). Prints both times and their ratio; the target for the
ViT-B geometry is <= 0.05. Random ViT-B weights are fine (speed does not depend on the values); `--checkpoint`
loads real ones.

    python benchmarks/bench_embedding_cache.py                    # ViT-B geometry, 1 image, CPU, 1 thread
    python benchmarks/bench_embedding_cache.py --device cuda --images 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_b", help="vit_b (MedSAM geometry) or semisam_tiny")
    ap.add_argument("--checkpoint", default=None, help="optional real weights")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--boxes", type=int, default=3, help="boxes per image")
    ap.add_argument("--repeats", type=int, default=3, help="prompt-only refreshes per image (median is used)")
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic uint8 test images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from nnunet_semisam.teachers.cache import EmbeddingCache
    from nnunet_semisam.teachers.medsam import MedSAMTeacher
    from nnunet_semisam.teachers.sam_models import MODEL_BUILDERS

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)
        if a.checkpoint:
            teacher = MedSAMTeacher.from_checkpoint(a.checkpoint, a.model_type, device=a.device, cache=cache)
        else:
            torch.manual_seed(0)
            teacher = MedSAMTeacher(MODEL_BUILDERS[a.model_type](), a.device, checkpoint_sha1="random",
                                    model_type=a.model_type, cache=cache)
        rng = np.random.default_rng(0)
        full, refresh = [], []
        for i in range(a.images):
            img = rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
            boxes = np.sort(rng.integers(0, a.size, (a.boxes, 2, 2)), axis=1).reshape(a.boxes, 4)[:, [0, 2, 1, 3]]
            t0 = time.perf_counter()
            emb = teacher.embed(img, case_id=f"case{i}", slice_idx=0)       # miss: preprocessing + encoder
            teacher.segment(emb, boxes, img.shape[:2])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            full.append(time.perf_counter() - t0)
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                emb = teacher.embed(img, case_id=f"case{i}", slice_idx=0)   # hit: no encoder
                teacher.segment(emb, boxes, img.shape[:2])
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            refresh.append(statistics.median(times))
        res = {"model_type": a.model_type, "device": a.device, "threads": a.threads, "images": a.images,
               "boxes_per_image": a.boxes, "full_pass_s": statistics.mean(full),
               "prompt_refresh_s": statistics.mean(refresh),
               "ratio": statistics.mean(refresh) / statistics.mean(full), "cache_hits": cache.hits}
    print(f"full teacher pass {res['full_pass_s']:.3f} s/image, prompt-only refresh {res['prompt_refresh_s']:.4f} "
          f"s/image, ratio {res['ratio']:.4f} (target <= 0.05)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
