"""MedSAM teacher: the exact reference inference of `MedSAM_Inference.py` plus feature taps (METHODS.md §2).

Embed once, prompt many times: `embed(image)` runs §2.2 steps 1-5 (3 channels, order-3 resize to 1024² with
anti-aliasing, uint8 truncation, joint min-max in float64, image encoder) and `segment(embedding, boxes, hw)` runs
steps 6-9 (box to 1024 space, prompt encoder, single-mask decoder, sigmoid, bilinear back to (H, W)). With the same
weights the result is bit-identical to the official script (tested in tests/teachers/test_medsam.py).

Also: point and mask prompts (SAM semantics, same scaling), an embedding cache (§2.7), ViT block taps and block
re-injection for FPKDM (§2.5, §4.1), and the fast GPU training-time path (§2.6, never for pseudo-labels).
Any `segment_anything` `Sam` works, including the embedded stand-in teacher (`semisam_tiny`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.cache import EmbeddingCache
from nnunet_semisam.teachers.embedding import CachedEmbedder, check_image
from nnunet_semisam.teachers.prefetch import Prefetcher
from nnunet_semisam.teachers.sam_models import TAP_BLOCKS, load_sam_checkpoint

SAM_SIZE = 1024  # MedSAM's fixed input side
LOW_RES = 256  # mask decoder output side / mask-prompt side


def medsam_preprocess(image: np.ndarray) -> np.ndarray:
    """§2.2 steps 1-3: uint8 (H, W[, C]) -> float64 (1024, 1024, 3) in [0, 1], exactly as `MedSAM_Inference.py`."""
    from skimage import transform

    img = check_image(image)
    if img.ndim == 2:
        img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    elif img.shape[-1] == 1:
        img_3c = np.repeat(img, 3, axis=-1)
    else:
        img_3c = img[:, :, :3]
    img_1024 = transform.resize(img_3c, (SAM_SIZE, SAM_SIZE), order=3, preserve_range=True,
                                anti_aliasing=True).astype(np.uint8)
    return (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic (align_corners=False) resize of ViT `pos_embed` (1, h, w, D) to `grid` (§2.5); identity if equal."""
    if tuple(pos_embed.shape[1:3]) == tuple(grid):
        return pos_embed
    pe = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1)


class MedSAMTeacher(CachedEmbedder):
    """Frozen MedSAM (or any SAM) with MedSAM's official preprocessing and box/point/mask inference.

    Args:
        sam: a `segment_anything.modeling.Sam` (put in eval mode, gradients off).
        device: where it runs (default: the model's device).
        checkpoint_sha1: identity of the weights, used in cache keys and pseudo-label manifests.
        model_type: registry name (`vit_b` for MedSAM), decides the default feature taps.
        cache: optional `EmbeddingCache` used by `embed` when a `case_id` is given (reference path only).
        amp_dtype: None (default, exact fp32 reference) or torch.bfloat16 / torch.float16 autocast on CUDA.
    """

    def __init__(self, sam: nn.Module, device: str | torch.device | None = None, checkpoint_sha1: str | None = None,
                 model_type: str | None = None, cache: EmbeddingCache | None = None,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(sam.parameters()).device
        self.sam = sam.to(self.device).eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)
        self.checkpoint_sha1 = checkpoint_sha1
        self.model_type = model_type
        self.cache = cache
        self.amp_dtype = amp_dtype
        enc = self.sam.image_encoder
        self.tap_blocks: tuple[int, ...] = TAP_BLOCKS.get(model_type or "", tuple(
            i for i, b in enumerate(enc.blocks) if b.window_size == 0) or (len(enc.blocks) - 1,))
        self._prefetcher: Prefetcher | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, model_type: str | None = None,
                        device: str | torch.device = "cpu", cache: EmbeddingCache | None = None,
                        amp_dtype: torch.dtype | None = None) -> "MedSAMTeacher":
        """Load a MedSAM/SAM checkpoint (or the embedded teacher's) with `segment_anything` and wrap it.

        `model_type` None: detected (see `sam_models.load_sam_checkpoint`). Raises SemiSAMError for a missing file or
        weights of another architecture.
        """
        sam, model_type, sha1 = load_sam_checkpoint(path, model_type, device)
        return cls(sam, device, checkpoint_sha1=sha1, model_type=model_type, cache=cache, amp_dtype=amp_dtype)

    # ------------------------------------------------------------------------------------------------------------
    # reference path (§2.2)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """(C, 64, 64) of one image embedding (C = 256 for MedSAM)."""
        c = self.sam.prompt_encoder.embed_dim
        return (c, *self.sam.prompt_encoder.image_embedding_size)

    preprocess = staticmethod(medsam_preprocess)  # §2.2 steps 1-3; `embed` (CachedEmbedder) adds 4-5

    def encode_image(self, tensor: torch.Tensor) -> torch.Tensor:
        """§2.2 steps 4-5: the ViT image encoder on the (1, 3, 1024, 1024) input -> (1, C, 64, 64) float32."""
        with self._autocast():
            return self.sam.image_encoder(tensor).float()

    def segment(self, embedding: torch.Tensor, boxes_xyxy: np.ndarray | Sequence | None,
                original_hw: tuple[int, int], points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, mask_prompt: np.ndarray | torch.Tensor | None = None,
                batched: bool = False) -> torch.Tensor:
        """Probabilities (N, H, W) float32 for N prompts on one embedding (§2.2 steps 6-9).

        boxes_xyxy: (N, 4) `[x_min, y_min, x_max, y_max]` in original pixels, or None. points: (N, P, 2) `(x, y)` in
        original pixels with point_labels (N, P) (1 = positive, 0 = negative), or None. mask_prompt: (N, H, W)
        binary masks in original pixels, nearest-resized to 256² and given to SAM as float {0, 1} (the SemiSAM
        convention, METHODS.md §5.4), or (N, 1, 256, 256) low-res logits used as they are. Prompts of the same index
        are combined. `batched=False` (default) decodes one prompt per call, which is bit-identical to the official
        script; `batched=True` decodes all N at once (fast mode, not guaranteed bit-exact).
        No gradient. Output on the teacher's device.
        """
        H, W = int(original_hw[0]), int(original_hw[1])
        emb = embedding.to(self.device, torch.float32)
        if emb.ndim == 3:
            emb = emb[None]
        box_t = pts_t = lab_t = mask_t = None
        n = None
        if boxes_xyxy is not None:
            box_np = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
            box_1024 = box_np / np.array([W, H, W, H]) * SAM_SIZE
            box_t = torch.as_tensor(box_1024, dtype=torch.float, device=self.device)[:, None, :]  # (N, 1, 4)
            n = len(box_t)
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            pts = pts[None] if pts.ndim == 2 else pts  # (P, 2) = one prompt of P points
            if pts.ndim != 3 or pts.shape[-1] != 2:
                raise SemiSAMError(f"segment: points must be (N, P, 2) as (x, y), got {pts.shape}")
            labels = np.asarray(point_labels if point_labels is not None else np.ones(pts.shape[:2]), np.int64)
            labels = labels.reshape(pts.shape[:2])
            pts_t = torch.as_tensor(pts / np.array([W, H]) * SAM_SIZE, dtype=torch.float, device=self.device)
            lab_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
            if n is not None and len(pts_t) != n:
                raise SemiSAMError(f"segment: {n} boxes but {len(pts_t)} point sets; give one point set per box")
            n = len(pts_t)
        if mask_prompt is not None:
            mask_t = self._mask_prompt(mask_prompt)
            if n is not None and len(mask_t) != n:
                raise SemiSAMError(f"segment: {n} box/point prompts but {len(mask_t)} mask prompts")
            n = len(mask_t)
        if n is None:
            raise SemiSAMError("segment: give at least one prompt (boxes, points or mask_prompt)")
        if n == 0:
            return torch.zeros((0, H, W), device=self.device)
        groups = [slice(0, n)] if batched else [slice(i, i + 1) for i in range(n)]
        out = []
        for g in groups:
            out.append(self._decode(emb, None if box_t is None else box_t[g],
                                    None if pts_t is None else (pts_t[g], lab_t[g]),
                                    None if mask_t is None else mask_t[g], (H, W)))
        return torch.cat(out, 0)

    def _mask_prompt(self, mask_prompt: np.ndarray | torch.Tensor) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(mask_prompt) if not isinstance(mask_prompt, torch.Tensor) else mask_prompt)
        m = m.to(self.device)
        if m.ndim == 4 and tuple(m.shape[1:]) == (1, LOW_RES, LOW_RES):
            return m.float()
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise SemiSAMError(f"mask_prompt must be (N, H, W) or (N, 1, 256, 256), got {tuple(m.shape)}")
        return F.interpolate((m > 0).float()[:, None], size=(LOW_RES, LOW_RES), mode="nearest")

    def _decode(self, emb: torch.Tensor, boxes: torch.Tensor | None,
                points: tuple[torch.Tensor, torch.Tensor] | None, masks: torch.Tensor | None,
                hw: tuple[int, int]) -> torch.Tensor:
        pe, md = self.sam.prompt_encoder, self.sam.mask_decoder
        with self._autocast():
            sparse, dense = pe(points=points, boxes=boxes, masks=masks)
            low_res_logits, _ = md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                   dense_prompt_embeddings=dense, multimask_output=False)
        low_res_pred = torch.sigmoid(low_res_logits.float())  # (n, 1, 256, 256)
        prob = F.interpolate(low_res_pred, size=hw, mode="bilinear", align_corners=False)
        return prob[:, 0]

    def predict(self, image: np.ndarray, boxes_xyxy: np.ndarray | None = None, points: np.ndarray | None = None,
                point_labels: np.ndarray | None = None, case_id: str | None = None,
                slice_idx: int | None = None, batched: bool = False) -> torch.Tensor:
        """`embed` + `segment` on one uint8 image; returns (N, H, W) probabilities."""
        emb = self.embed(image, case_id=case_id, slice_idx=slice_idx)
        return self.segment(emb, boxes_xyxy, image.shape[:2], points=points, point_labels=point_labels,
                            batched=batched)

    # ------------------------------------------------------------------------------------------------------------
    # feature taps and re-injection (§2.5, §4.1)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + (interpolated) absolute position: (B, 3, S, S) -> tokens (B, S/16, S/16, D)."""
        enc = self.sam.image_encoder
        t = enc.patch_embed(x)
        if enc.pos_embed is not None:
            t = t + interpolate_pos_embed(enc.pos_embed, tuple(t.shape[1:3]))
        return t

    def forward_blocks(self, tokens: torch.Tensor, start: int = 0, blocks: Sequence[int] | None = None,
                       stop: int | None = None) -> list[torch.Tensor]:
        """Run encoder blocks `start..stop-1` on `tokens` (B, h, w, D) (the input of block `start`).

        Returns the outputs of the blocks in `blocks` (default: the taps) that lie in that range, in order. Used
        for FPKDM re-injection: `forward_blocks(perturbed_T1, start=tap_blocks[0] + 1)`. Gradient flows if enabled
        by the caller (the teacher's parameters themselves are frozen).
        """
        blocks = tuple(self.tap_blocks if blocks is None else blocks)
        enc_blocks = self.sam.image_encoder.blocks
        stop = len(enc_blocks) if stop is None else stop
        taps: list[torch.Tensor] = []
        x = tokens
        for i in range(start, stop):
            x = enc_blocks[i](x)
            if i in blocks:
                taps.append(x)
        return taps

    def block_features(self, x: torch.Tensor, blocks: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Outputs of ViT blocks `blocks` (default: the taps, (2, 5, 8, 11) for ViT-B), each (B, S/16, S/16, D).

        x: (B, 3, S, S) already normalized as the encoder expects (reference: `medsam_preprocess`; training:
        `fast_preprocess`). Blocks after the last tap are not run. No autocast here; wrap the call if wanted.
        """
        blocks = tuple(self.tap_blocks if blocks is None else blocks)
        return self.forward_blocks(self.patch_tokens(x), 0, blocks, stop=max(blocks) + 1)

    def neck(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder neck on the last block's output (B, h, w, D) -> (B, C, h, w)."""
        return self.sam.image_encoder.neck(tokens.permute(0, 3, 1, 2))

    # ------------------------------------------------------------------------------------------------------------
    # fast training-time path (§2.6): not bit-exact, never used for pseudo-labels

    @staticmethod
    def fast_preprocess(x: torch.Tensor, channels: Sequence[int] | None = None, size: int = SAM_SIZE) -> torch.Tensor:
        """Student batch (B, C, H, W) -> (B, 3, size, size): select `channels` (3 for RGB, or 1 replicated),
        min-max to [0, 1] per image jointly over channels (denominator clipped at 1e-8), bilinear resize
        (align_corners=False). Runs on the input's device; differentiable but normally used under no_grad.
        """
        if channels is not None:
            x = x[:, list(channels)]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise SemiSAMError(f"fast_preprocess: need 1 or 3 teacher channels, got {x.shape[1]}")
        x = x.float()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x

    # ------------------------------------------------------------------------------------------------------------
    # the FPKDM feature interface shared with LiteMedSAMTeacher (METHODS.md §4.1)

    native_size = SAM_SIZE  # the side the teacher segments at (its pseudo-label scale)

    @property
    def tap_stride(self) -> int:
        """Input pixels per token side of the first tap's grid (the ViT's patch side, 16)."""
        return int(self.sam.image_encoder.patch_embed.proj.kernel_size[0])

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Width of each tap T_1..T_4 (the ViT width D for every block tap)."""
        return (int(self.sam.image_encoder.patch_embed.proj.out_channels),) * len(self.tap_blocks)

    def feature_input(self, x: torch.Tensor, channels: Sequence[int] | None, size: int) -> torch.Tensor:
        """The §2.6 fast-path input (B, 3, size, size) of a student batch: `fast_preprocess`."""
        return self.fast_preprocess(x.to(self.device), channels, size)

    def _feature_autocast(self) -> contextlib.AbstractContextManager:
        """bf16 on CUDA for the training-time features (§2.6); the same context for every feature call."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def first_tap(self, xin: torch.Tensor) -> torch.Tensor:
        """T_1 (B, h, w, D) float32: patch tokens through the blocks up to the first tap (§2.5)."""
        with self._feature_autocast():
            t1 = self.forward_blocks(self.patch_tokens(xin), 0, self.tap_blocks[:1], stop=self.tap_blocks[0] + 1)[0]
        return t1.float()

    @torch.no_grad()
    def later_taps(self, t1: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """[T_2..T_4] (B, h, w, D) float32 from T_1 (clean or perturbed): the blocks after the first tap (§4.1).

        FPKDM calls this for the clean and for the perturbed T_1, so both responses go through one path and one
        precision (a zero perturbation gives a zero teacher response, METHODS.md §4.1). `count`: only the first
        `count` of these taps, running the blocks up to the last of them.
        """
        taps = self.tap_blocks[: None if count is None else count + 1]
        with self._feature_autocast():
            out = self.forward_blocks(t1.to(self.device), start=taps[0] + 1, blocks=taps[1:], stop=taps[-1] + 1)
        return [o.float() for o in out]

    @torch.no_grad()
    def fast_features(self, x: torch.Tensor, channels: Sequence[int] | None = None,
                      blocks: Sequence[int] | None = None, size: int = SAM_SIZE,
                      amp_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        """Fast path taps: `fast_preprocess` then `block_features` under no_grad and autocast (CUDA only)."""
        xin = self.fast_preprocess(x.to(self.device), channels, size)
        ctx = torch.autocast("cuda", dtype=amp_dtype) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.block_features(xin, blocks)

