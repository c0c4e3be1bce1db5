"""SAM-architecture builders and checkpoint loading shared by MedSAM and the embedded stand-in teacher.

Model types: `vit_b`, `vit_l`, `vit_h` are `segment_anything`'s own builders (MedSAM is `vit_b`, METHODS.md §2.1);
`semisam_tiny` is the small SAM-architecture model of the embedded teacher (same 1024² input, patch 16, 64×64
embedding grid and the same `Sam` classes, only narrower/shallower). Our registry is a separate dict: importing this
module never modifies `segment_anything.sam_model_registry`.

Checkpoint formats accepted by `load_sam_checkpoint` (all through one code path):
- a plain `Sam` state dict (`medsam_vit_b.pth`, SAM's `sam_vit_b_01ec64.pth`);
- MedSAM training checkpoints `{"model": state_dict, "optimizer": ..., "epoch": ...}`;
- this package's format `{"format": CHECKPOINT_FORMAT, "model_type": str, "arch": dict, "state_dict": ...}`,
  which records its architecture so that `model_type` can be omitted.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.io import file_digest

CHECKPOINT_FORMAT = "nnunet_semisam.sam/1"

# the block indices whose outputs are the distillation taps T_1..T_4 (METHODS.md §2.5)
TAP_BLOCKS = {"vit_b": (2, 5, 8, 11), "vit_l": (5, 11, 17, 23), "vit_h": (7, 15, 23, 31), "semisam_tiny": (0, 1, 2, 3)}

# architecture of the embedded stand-in teacher (kept small enough to train on 2 CPU cores, see train_embedded.py)
# (all blocks use 14x14 window attention: a global block over 4096 tokens would cost more than the rest together;
# on a CPU the 4096-token sequences make even this width memory-bound, see train_embedded.py)
# prompt width 64 (32 random Fourier frequencies): at 32 the box corners are localised too coarsely to learn fast
TINY_ARCH = dict(encoder_embed_dim=24, encoder_depth=4, encoder_num_heads=1, encoder_global_attn_indexes=(),
                 prompt_embed_dim=64, decoder_mlp_dim=256, decoder_num_heads=2, iou_head_hidden_dim=64)


def build_sam_custom(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
    prompt_embed_dim: int = 256,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> nn.Module:
    """A `segment_anything.modeling.Sam` with SAM's fixed geometry (1024² input, patch 16, 64×64 grid, window 14).

    With the defaults and (768, 12, 12, (2, 5, 8, 11)) it is exactly `build_sam_vit_b`. Returned in `eval()` mode.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    image_size, patch = 1024, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth, embed_dim=encoder_embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder_num_heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(encoder_global_attn_indexes), window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim, image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=decoder_num_heads),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _segment_anything_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[name](checkpoint=None)
    return build


MODEL_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit_b": _segment_anything_builder("vit_b"),
    "vit_l": _segment_anything_builder("vit_l"),
    "vit_h": _segment_anything_builder("vit_h"),
    "semisam_tiny": partial(build_sam_custom, **TINY_ARCH),
}


def _detect_model_type(state_dict: dict[str, torch.Tensor]) -> str | None:
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    n_blocks = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, (dim, depth) in {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32),
                               "semisam_tiny": (TINY_ARCH["encoder_embed_dim"], TINY_ARCH["encoder_depth"])}.items():
        if w.shape[0] == dim and n_blocks == depth:
            return name
    return None


NOT_A_TEACHER = "not a SAM / MedSAM / LiteMedSAM checkpoint"
_NNUNET_KEYS = ("network_weights", "trainer_name", "init_args", "optimizer_state")


def _pickle_names(path: Path, limit: int = 16 << 20) -> tuple[set[str], set[str]] | None:
    """(strings, globals) named in a torch file's pickle, read with `pickletools` (nothing is executed), or None
    when the file is no readable torch zip archive / legacy pickle."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if pkl is None:
                    return None
                data = z.read(pkl)[:limit]
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return None
    strings: set[str] = set()
    globs: set[str] = set()
    last: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.add(arg)
                last = (last + [arg])[-2:]
            elif op.name == "GLOBAL" and isinstance(arg, str):
                globs.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(last) == 2:
                globs.add(".".join(last))
    except Exception:  # noqa: BLE001 - a broken pickle stream: whatever was seen so far
        if not strings and not globs:
            return None
    return strings, globs


def describe_foreign(obj: Any) -> str:
    """What a loaded checkpoint object holds, for an error message (nnU-Net checkpoints named as such)."""
    if isinstance(obj, dict) and any(k in obj for k in _NNUNET_KEYS[:2]):
        return "it is an nnU-Net training checkpoint ('network_weights', 'trainer_name'), not teacher weights"
    if isinstance(obj, dict):
        keys = sorted(str(k) for k in obj)[:4]
        return f"it holds a dict with keys {keys}, expected SAM/MedSAM ('image_encoder.blocks.*') or LiteMedSAM " \
               "('image_encoder.layers.*') parameter tensors"
    return f"it holds a {type(obj).__name__}, expected a state dict of parameter tensors"


def unreadable_reason(path: str | os.PathLike, exc: BaseException) -> str:
    """Why `torch.load(path, weights_only=True)` failed, in one short phrase (torch's own advice text left out)."""
    import zipfile

    path = Path(path)
    head = path.read_bytes()[:4] if path.is_file() else b""
    if path.stat().st_size == 0:
        return "cannot read it: the file is empty"
    names = _pickle_names(path)
    if names is not None:
        strings, globs = names
        if any(k in strings for k in _NNUNET_KEYS[:2]):
            return "cannot read it as teacher weights: it is an nnU-Net training checkpoint ('network_weights', " \
                   "'trainer_name')"
        foreign = sorted(g for g in globs if not g.startswith(("torch.", "collections.OrderedDict")))
        if foreign:
            return f"cannot read it as a state dict of tensors: it pickles Python objects such as {foreign[0]}"
    if head.startswith(b"PK"):
        return "cannot read it: a truncated or corrupted torch archive" + (
            "" if zipfile.is_zipfile(path) else " (no zip directory)")
    if head[:1] == b"\x80":
        return "cannot read it: a truncated or corrupted pickle"
    return f"cannot read it: not a torch file ({type(exc).__name__})"


def read_checkpoint_object(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a one-line SemiSAMError `<path>: not a SAM / MedSAM /
    LiteMedSAM checkpoint (<why>)` for random bytes, a truncated file, an nnU-Net checkpoint, pickled objects."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a user error about this file
        raise SemiSAMError(f"{path}: {NOT_A_TEACHER} ({unreadable_reason(path, e)})") from None


def load_sam_checkpoint(path: str | os.PathLike, model_type: str | None = None,
                        device: str | torch.device = "cpu") -> tuple[nn.Module, str, str]:
    """Build the SAM of `model_type` and load the checkpoint at `path` into it (strict), in `eval()` mode.

    `model_type=None` takes it from the checkpoint's own record (this package's format) or detects it from the
    state dict's encoder width and depth. Returns (sam on `device`, model_type, sha1 of the checkpoint file).
    Raises SemiSAMError for a missing/unreadable file, an unknown model type, or weights of another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise SemiSAMError(f"SAM/MedSAM checkpoint not found: {path} (give a local file, e.g. medsam_vit_b.pth; "
                           "nothing is downloaded)")
    obj: Any = read_checkpoint_object(path)
    arch = None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state_dict, model_type = obj["state_dict"], model_type or obj["model_type"]
        arch = obj.get("arch")
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state_dict = obj["model"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        raise SemiSAMError(f"{path}: {NOT_A_TEACHER} ({describe_foreign(obj)})")
    if model_type is None:
        model_type = _detect_model_type(state_dict)
        if model_type is None:
            raise SemiSAMError(f"cannot detect the SAM architecture of {path}; pass model_type "
                               f"(one of {sorted(MODEL_BUILDERS)})")
    if model_type in MODEL_BUILDERS:
        sam = MODEL_BUILDERS[model_type]()
    elif arch is not None:
        sam = build_sam_custom(**arch)
    else:
        raise SemiSAMError(f"unknown model_type {model_type!r}; known: {sorted(MODEL_BUILDERS)}")
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][:2]
        raise SemiSAMError(f"checkpoint {path} does not fit model_type {model_type!r} (wrong architecture): "
                           f"{' '.join(first)[:300]}")
    return sam.to(device).eval(), model_type, file_digest(path, "sha1")


def save_sam_checkpoint(sam: nn.Module, path: str | os.PathLike, model_type: str,
                        arch: dict | None = None, extra: dict | None = None) -> None:
    """Save `sam` in this package's self-describing format (atomic write). `arch` = `build_sam_custom` kwargs."""
    from nnunet_semisam.io import atomic_path

    obj = {"format": CHECKPOINT_FORMAT, "model_type": model_type,
           "arch": None if arch is None else {k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()},
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}}
    obj.update(extra or {})
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def embedded_teacher_checkpoint() -> str:
    """Installed path of the embedded stand-in teacher (`semisam_tiny`, trained on synthetic data; see README)."""
    path = Path(__file__).resolve().parent.parent / "assets" / "semisam_tiny_teacher.pth"
    if not path.is_file():
        raise SemiSAMError(f"embedded teacher checkpoint missing: {path} (reinstall the package, or train it with "
                           "`python -m nnunet_semisam.teachers.train_embedded`)")
    return str(path)
