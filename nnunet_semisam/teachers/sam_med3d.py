"""SAM-Med3D (and "Tiny SAM-Med3D") as the 3D promptable teacher of Algorithm 2 (METHODS.md §5.4).

The architecture is the field's own, from uni-medical's `medim` package (`pip install 'nnunet-semisam[sam-med3d]'`):
`medim.create_model("SAM-Med3D", pretrained=False, **config)` builds SAM-Med3D `vit_b_ori` (or a smaller config)
without touching the network; the weights come from a local checkpoint only (the official `sam_med3d_turbo.pth`
keeps them under `model_state_dict`; a bare state dict works too) and are loaded **strictly** (medim's own loader
uses `strict=False`, which would silently keep random weights for misnamed keys).

Interface (`PromptableTeacher`, numpy, spatial (Z, Y, X)):
- `encode(image)`: channel 0 of (C, Z, Y, X) (or (Z, Y, X)) z-scored over the voxels above its minimum (SAM-Med3D's
  convention), trilinear (align_corners=False) to the model's cube S^3 (128 for vit_b_ori), image encoder.
- `decode(E, mask=M)`: M nearest-resized to the mask-prompt grid (4 x the embedding grid, 32^3 for S = 128), as float
  {0, 1}. `decode(E, points=P)`: (k, 3) index coordinates (z, y, x) of the input volume, mapped to the S^3 cube by
  voxel centres ((p + 0.5) S / n - 0.5), all positive, no mask input.
- Output: the single-mask low-res logits, trilinear (align_corners=False) to (Z, Y, X), then sigmoid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_semisam.errors import SemiSAMError


def build_sam_med3d(**config) -> torch.nn.Module:
    """An untrained SAM-Med3D from medim (`config`: medim's keyword arguments, e.g. encoder_depth, image_size)."""
    try:
        import medim
    except ImportError:
        raise SemiSAMError("the SAM-Med3D teacher needs the medim package: pip install 'nnunet-semisam[sam-med3d]'") \
            from None
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # medim prints "creating model ..."
        return medim.create_model("SAM-Med3D", pretrained=False, **config)


class SAMMed3DTeacher:
    """The §5.4 interface over a medim SAM-Med3D model (module docstring)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.size = int(self.model.image_encoder.img_size)
        self.mask_grid = tuple(4 * int(s) for s in self.model.prompt_encoder.image_embedding_size)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        **config) -> "SAMMed3DTeacher":
        """Load a local checkpoint strictly into medim's SAM-Med3D built with `config`; one-line errors."""
        p = Path(path)
        if not p.is_file():
            raise SemiSAMError(f"SAM-Med3D checkpoint {p} does not exist")
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file
            raise SemiSAMError(f"SAM-Med3D checkpoint {p} is not a readable torch file ({type(e).__name__})") from None
        if isinstance(state, dict) and "model_state_dict" in state:
            state = state["model_state_dict"]
        if not isinstance(state, dict):
            raise SemiSAMError(f"SAM-Med3D checkpoint {p} holds no state dict")
        model = build_sam_med3d(**config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = " ".join(ln.strip() for ln in str(e).splitlines()[:2])[:300]
            raise SemiSAMError(f"SAM-Med3D checkpoint {p} does not fit the model configuration {config}: {first}") \
                from None
        return cls(model, device)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> dict:
        img = np.asarray(image, np.float32)
        vol = img if img.ndim == 3 else img[0]
        fg = vol > vol.min()
        mean, std = (vol[fg].mean(), vol[fg].std()) if fg.any() else (vol.mean(), vol.std())
        x = torch.from_numpy((vol - mean) / max(float(std), 1e-8))[None, None].to(self.device)
        x = F.interpolate(x, size=(self.size,) * 3, mode="trilinear", align_corners=False)
        return {"emb": self.model.image_encoder(x), "shape": vol.shape}

    @torch.no_grad()
    def decode(self, embedding: dict, points: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
        shape = embedding["shape"]
        pe = self.model.prompt_encoder
        if mask is not None:
            m = torch.from_numpy(np.asarray(mask, np.float32))[None, None].to(self.device)
            m = F.interpolate(m, size=self.mask_grid, mode="nearest")
            sparse, dense = pe(points=None, boxes=None, masks=m)
        elif points is not None:
            p = np.asarray(points, np.float64).reshape(-1, 3)
            scale = np.array([self.size / n for n in shape])
            coords = torch.from_numpy(((p + 0.5) * scale - 0.5).astype(np.float32))[None].to(self.device)
            labels = torch.ones((1, len(p)), dtype=torch.int64, device=self.device)
            sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        else:
            raise ValueError("decode needs a mask or point prompt")
        low, _ = self.model.mask_decoder(image_embeddings=embedding["emb"], image_pe=pe.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
        up = F.interpolate(low.float(), size=tuple(shape), mode="trilinear", align_corners=False)
        return torch.sigmoid(up)[0, 0].cpu().numpy().astype(np.float32)
