"""Embed once, prompt many times: the cached, prefetching `embed` shared by the MedSAM and LiteMedSAM teachers.

Both teachers turn a uint8 image into an image embedding in two steps, a CPU preprocessing (MedSAM: skimage's
order-3 resize to 1024², METHODS.md §2.2 steps 1-3; LiteMedSAM: OpenCV's longest-side resize and padding to 256,
§2.8) and the image encoder. `CachedEmbedder` owns what is common: the embedding cache lookup keyed on (case, slice,
image bytes, checkpoint sha1) (§2.7), and the background `Prefetcher` that runs the preprocessing of upcoming images
in threads. A teacher class sets `preprocess` (a function of the uint8 image) and implements `encode_image`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import torch

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.cache import EmbeddingCache, cache_key, image_sha1
from nnunet_semisam.teachers.prefetch import Prefetcher


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate a teacher input: uint8, (H, W) or (H, W, C) with C in {1, 3, 4}, finite. Raises SemiSAMError."""
    image = np.asarray(image)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise SemiSAMError("teacher image contains NaN or inf values; fix the input case (rule U needs finite data)")
    if image.dtype != np.uint8:
        raise SemiSAMError(f"the MedSAM pipeline expects a uint8 image, got {image.dtype}; convert it with "
                           "nnunet_semisam.teachers.uint8_adapter.to_uint8 (METHODS.md §2.4)")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise SemiSAMError(f"teacher image must be (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    return image


def default_preprocess_workers() -> int:
    """Threads for `prefetch`: the CPU cores this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class CachedEmbedder:
    """Mixin: `embed`, `prefetch`, `close_prefetch` over a class's `preprocess` and `encode_image`.

    The using class sets `self.cache` (an `EmbeddingCache` or None), `self.checkpoint_sha1`, `self.device`,
    `self._prefetcher = None` in its constructor.
    """

    preprocess: Callable[[np.ndarray], np.ndarray]  # uint8 image -> float (S, S, 3) encoder input
    cache: EmbeddingCache | None
    checkpoint_sha1: str | None
    device: torch.device
    _prefetcher: Prefetcher | None

    def encode_image(self, tensor: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) float encoder input -> (1, C, h, w) float32 embedding."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, image: np.ndarray, case_id: str | None = None, slice_idx: int | None = None) -> torch.Tensor:
        """Image embedding (1, C, h, w) float32 of a uint8 (H, W) or (H, W, C) image.

        With a cache and a `case_id`, the encoder runs once per (case, slice, image bytes, checkpoint sha1) (§2.7).
        After `prefetch`, the preprocessed input computed in the background is used when it is there (the same
        function, so the same bits).
        """
        image = check_image(image)
        key = None
        sha = image_sha1(image) if (self.cache is not None and case_id is not None) or self._prefetcher else None
        if self.cache is not None and case_id is not None:
            key = cache_key(case_id, slice_idx, sha, self.checkpoint_sha1)
            hit = self.cache.get(key)
            if hit is not None:
                return hit.to(self.device)[None]
        ready = self._prefetcher.take(sha) if self._prefetcher is not None else None
        x = type(self).preprocess(image) if ready is None else ready
        emb = self.encode_image(torch.tensor(x).float().permute(2, 0, 1).unsqueeze(0).to(self.device))
        if key is not None:
            self.cache.put(key, emb[0])
        return emb

    def prefetch(self, images: Iterable[tuple[np.ndarray, str | None, int | None]], workers: int | None = None
                 ) -> None:
        """Start the preprocessing of upcoming `embed` calls in background threads (`Prefetcher`).

        images: (uint8 image, case_id, slice_idx) in the order `embed` will be called; those whose embedding is
        already cached are skipped. workers: threads (default `default_preprocess_workers()`), fixed by the first
        call until `close_prefetch()`. Embeddings are bit-identical to inline calls: threads change when the
        preprocessing runs, not what it computes (MedSAM's ~1 s skimage resize hides behind the encoder).
        """
        if self._prefetcher is None:
            self._prefetcher = Prefetcher(type(self).preprocess, workers or default_preprocess_workers())
        todo = []
        for image, case_id, slice_idx in images:
            image = check_image(image)
            sha = image_sha1(image)
            if self.cache is not None and case_id is not None and \
                    cache_key(case_id, slice_idx, sha, self.checkpoint_sha1) in self.cache:
                continue
            todo.append((sha, image))
        self._prefetcher.schedule(todo)

    def close_prefetch(self) -> None:
        """Stop the prefetch threads and drop results not taken (no-op without `prefetch`)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
