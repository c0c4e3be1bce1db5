"""MedSAM first-pass pseudo-labelling with the reference preprocessing in threads vs inline (METHODS.md §2.2).

A first pseudo-label pass (or the first closed-loop refresh, §4.5) embeds every image: skimage's order-3 resize to
1024² (~1 s per image on a CPU core), then the encoder and the box decoder. `MedSAMTeacher.prefetch` runs the resize
of the next images in threads (scipy releases the GIL) while the main thread encodes and decodes; this benchmark
times the same images both ways in one run, checks that the probabilities are bit-identical, and prints the ratio.

    python benchmarks/bench_preprocess_threads.py                  # embedded teacher, 8 images of 64², all cores
    python benchmarks/bench_preprocess_threads.py --model-type vit_b --images 4
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="semisam_tiny", help="semisam_tiny (embedded teacher) or vit_b")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="side of the synthetic uint8 RGB images")
    ap.add_argument("--workers", type=int, default=None, help="prefetch threads (default: the CPU cores, <= 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from nnunet_semisam.teachers.embedding import default_preprocess_workers
    from nnunet_semisam.teachers.medsam import MedSAMTeacher
    from nnunet_semisam.teachers.sam_models import MODEL_BUILDERS, embedded_teacher_checkpoint

    if a.model_type == "semisam_tiny":
        teacher = MedSAMTeacher.from_checkpoint(embedded_teacher_checkpoint(), device="cpu")
    else:
        torch.manual_seed(0)
        teacher = MedSAMTeacher(MODEL_BUILDERS[a.model_type](), device="cpu", model_type=a.model_type)
    workers = a.workers or default_preprocess_workers()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (a.size, a.size, 3), dtype=np.uint8) for _ in range(a.images)]
    box = np.array([[a.size // 4, a.size // 4, 3 * a.size // 4, 3 * a.size // 4]])

    def run(prefetch: bool) -> tuple[float, list[np.ndarray]]:
        t0 = time.perf_counter()
        if prefetch:
            teacher.prefetch([(img, None, None) for img in images], workers)
        probs = [teacher.segment(teacher.embed(img), box, img.shape[:2]).numpy() for img in images]
        teacher.close_prefetch()
        return time.perf_counter() - t0, probs

    t_inline, p_inline = run(False)
    t_threads, p_threads = run(True)
    exact = all(np.array_equal(x, y) for x, y in zip(p_inline, p_threads))
    print(f"{a.images} images of {a.size}² RGB, teacher {a.model_type}, {torch.get_num_threads()} torch threads, "
          f"{workers} prefetch threads")
    print(f"inline preprocessing   {1000 * t_inline / a.images:8.1f} ms/image")
    print(f"prefetched ({workers} threads) {1000 * t_threads / a.images:8.1f} ms/image")
    print(f"speed-up {t_inline / t_threads:.2f}x; probabilities bit-identical: {exact}")
    return {"inline_s": t_inline, "threads_s": t_threads, "workers": workers, "exact": exact}


if __name__ == "__main__":
    main()
