"""Atomic file output: write to a temporary file in the target folder, then `os.replace`.

A reader never sees a half-written file: either the old content (or nothing) or the complete new one. Used for every
output the package writes (preprocessed cases, pseudo-labels, metrics, manifests, converted datasets).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it.

    `suffix` defaults to the target's own suffix(es), so writers that infer the format from the file ending
    (SimpleITK, nibabel, blosc2) keep working. The temporary name starts with '.tmp_' so that folder scans that
    look for `CASE.ext` never pick it up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + path.stem.split(".")[0] + "_", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes (`hashlib` algorithm name), read in chunks: checkpoint identities (sha1 in cache
    keys and manifests, sha256 for the pinned LiteMedSAM weights) and source-file keys."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def image_truncation(path: str | os.PathLike) -> str | None:
    """Why a NIfTI file is shorter than its header says (None if complete, or not NIfTI).

    SimpleITK zero-fills a truncated `.nii` / `.nii.gz` without a word, so readers that feed training check this
    first: `.nii` by file size against the header (instant), `.nii.gz` by decompressing as a stream (no array).
    """
    import gzip
    import zlib

    path = str(path)
    if not path.endswith((".nii", ".nii.gz")):
        return None
    import nibabel

    try:
        img = nibabel.load(path)
    except Exception as e:  # unreadable header: let the caller's reader report it, with this reason
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable header'}"
    header = img.header
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if path.endswith(".nii"):
        size = os.path.getsize(path)
    else:
        size = 0
        try:
            with gzip.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    size += len(block)
        except (EOFError, OSError, zlib.error) as e:
            return f"truncated or corrupt gzip stream ({type(e).__name__}: {e})"
    if size < expected:
        return f"truncated: {size} bytes (header and voxels), its header needs {expected}"
    return None
