"""Image-embedding cache for the MedSAM reference path (METHODS.md §2.7).

Key `(case_id, slice_idx, sha1(uint8 image bytes + shape), checkpoint sha1)`, value the encoder output
`(C, 64, 64)` (C = 256 for MedSAM). Stored as float32 by default, which is exact; `dtype=torch.float16` halves the size
and is **not** exact. Entries live in memory (LRU over `max_items`) and, when `folder` is given, on disk as one `.pt`
file each (atomic writes, LRU eviction by access time once the folder exceeds `max_bytes`).
Only valid for un-augmented images: callers must not put embeddings of augmented images here.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from nnunet_semisam.io import atomic_path


def image_sha1(image: np.ndarray) -> str:
    """SHA-1 of an image's bytes, with its dtype and shape mixed in (two images collide only if identical)."""
    a = np.ascontiguousarray(image)
    h = hashlib.sha1(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def cache_key(case_id: str | None, slice_idx: int | None, img_sha1: str, ckpt_sha1: str | None) -> str:
    """Flat hex key of the §2.7 tuple (used as the file name)."""
    return hashlib.sha1(repr((case_id, slice_idx, img_sha1, ckpt_sha1)).encode()).hexdigest()


class EmbeddingCache:
    """Memory + optional disk LRU of image embeddings. `get` returns float32 tensors on CPU (or None)."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = 8 << 30, max_items: int = 256,
                 dtype: torch.dtype = torch.float32) -> None:
        self.folder = None if folder is None else Path(folder)
        self.max_bytes = int(max_bytes)
        self.max_items = int(max_items)
        self.dtype = dtype
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            self._mem.move_to_end(key)
            self.hits += 1
            return self._mem[key].float()
        if self.folder is not None:
            f = self._file(key)
            if f.is_file():
                try:
                    t = torch.load(f, map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - a damaged entry is a miss
                    t = None
                if t is not None:
                    os.utime(f)  # LRU: last access
                    self._remember(key, t)
                    self.hits += 1
                    return t.float()
        self.misses += 1
        return None

    def put(self, key: str, emb: torch.Tensor) -> None:
        t = emb.detach().to("cpu", self.dtype).contiguous()
        self._remember(key, t)
        if self.folder is not None:
            f = self._file(key)
            with atomic_path(f) as tmp:
                torch.save(t, tmp)
            self._evict_disk()

    def _remember(self, key: str, t: torch.Tensor) -> None:
        self._mem[key] = t
        self._mem.move_to_end(key)
        while len(self._mem) > self.max_items:
            self._mem.popitem(last=False)

    def _evict_disk(self) -> None:
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.folder.glob("*/*.pt")]
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files, key=lambda t: t[0]):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size

    def __contains__(self, key: str) -> bool:
        """Whether `get(key)` would hit (no load, no counter change)."""
        return key in self._mem or (self.folder is not None and self._file(key).is_file())

    def __len__(self) -> int:
        return len(self._mem) if self.folder is None else sum(1 for _ in self.folder.glob("*/*.pt"))
