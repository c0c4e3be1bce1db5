"""Natural-image 2D lesion datasets of [KD] (METHODS.md §4, §10.1): Kvasir-SEG and HAM10000 / ISIC 2018 Task 1.

Output follows nnU-Net's natural-image convention (NaturalImage2DIO): `CASE_0000.png` holds the RGB image (3 input
channels, normalised with `RGBTo01Normalization`, METHODS.md §4) and `CASE.png` the binary lesion mask (0/1, uint8).
`--resize S` reproduces [KD]'s S x S inputs (256): PIL bilinear for images, nearest for masks, aspect not kept.
Split: seeded 80/20 over images ([KD]: Kvasir 800/200; HAM10000 4 800/1 200 of 6 000 chosen with `--max-cases`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_semisam.data.converters.common import (CaseRecord, ConvertOptions, Converter, Unit, case_complete,
                                                   case_paths, require_dir, require_file, resize_2d, safe_case_id,
                                                   visible_files, write_png)
from nnunet_semisam.errors import SemiSAMError

MASK_THRESHOLD = 128  # masks are stored as 0/255 (Kvasir: JPEG, so ~0/~255); foreground = grey value >= 128


def load_rgb_and_mask(image_file: str, mask_file: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB image `(H, W, 3)` uint8 and binary mask `(H, W)` uint8 in {0, 1} (grey >= `MASK_THRESHOLD`)."""
    from PIL import Image

    with Image.open(image_file) as im:
        rgb = np.asarray(im.convert("RGB"))
    with Image.open(mask_file) as m:
        grey = np.asarray(m.convert("L"))
    if grey.shape != rgb.shape[:2]:
        raise SemiSAMError(f"mask {mask_file} is {grey.shape[1]}x{grey.shape[0]} but image {image_file} is "
                           f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)")
    return rgb, (grey >= MASK_THRESHOLD).astype(np.uint8)


def convert_natural_case(unit: Unit, subset: str, dataset_dir: str, params: dict) -> list[CaseRecord]:
    """Write one RGB image + mask as `images<subset>/<uid>_0000.png`, `labels<subset>/<uid>.png` (skip if done)."""
    images, label = case_paths(Path(dataset_dir), subset, unit.uid, 1, ".png")
    if not case_complete(images, label):
        rgb, mask = load_rgb_and_mask(unit.files["image"], unit.files["label"])
        if params["resize"]:
            rgb = resize_2d(rgb, params["resize"], nearest=False)
            mask = resize_2d(mask, params["resize"], nearest=True)
        write_png(rgb, images[0])
        write_png(mask, label)
    return [CaseRecord(unit.uid, subset, unit.uid)]


class _Natural2DConverter(Converter):
    is_2d = True
    file_ending = ".png"
    lesion_name = "lesion"

    def worker(self):
        return convert_natural_case

    def dataset_json(self, units: Sequence[Unit], opts: ConvertOptions) -> dict:
        return {
            "channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},  # R, G, B of CASE_0000.png
            "labels": {"background": 0, self.lesion_name: 1},
            "file_ending": ".png",
            "overwrite_image_reader_writer": "NaturalImage2DIO",
            "dataset_name": self.default_name,
            "description": self.description + (f"; resized to {opts.resize}x{opts.resize}" if opts.resize else ""),
            "reference": self.reference,
            "license": self.license,
            "converted_by": "nnunet-semisam convert " + self.key,
        }


class KvasirConverter(_Natural2DConverter):
    """Kvasir-SEG: `Kvasir-SEG/images/<id>.jpg` with `Kvasir-SEG/masks/<id>.jpg` (JPEG masks, ~0/255).

    SOURCE_DIR is the `Kvasir-SEG` folder (or its parent). Images are 332x487 to 1920x1072; `--resize 256` gives
    the [KD] inputs. 1 000 images, seeded 80/20 split (800/200).
    """

    key = "kvasir"
    default_name = "KvasirSEG"
    lesion_name = "polyp"
    description = "Kvasir-SEG gastrointestinal polyp segmentation (1 000 images)"
    reference = "Jha et al., Kvasir-SEG: A Segmented Polyp Dataset, MMM 2020"
    license = "research and educational use (see the Kvasir-SEG terms)"

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        root = (source / "Kvasir-SEG" if (source / "Kvasir-SEG").is_dir() and not (source / "images").is_dir()
                else source)
        img_dir = require_dir(root / "images", "Kvasir-SEG images/*.jpg")
        mask_dir = require_dir(root / "masks", "Kvasir-SEG masks/*.jpg")
        files = visible_files(img_dir, (".jpg", ".jpeg", ".png"))
        if not files:
            raise SemiSAMError(f"source layout mismatch: no .jpg image in {img_dir}")
        units = []
        for f in files:
            mask = require_file(mask_dir / f.name, f"mask of {f.name}")
            units.append(Unit(safe_case_id(f.stem), {"image": str(f), "label": str(mask)}))
        return units


ISIC_INPUT = "ISIC2018_Task1-2_Training_Input"
ISIC_GT = "ISIC2018_Task1_Training_GroundTruth"
HAM_MASKS = "HAM10000_segmentations_lesion_tschandl"


class HAM10000Converter(_Natural2DConverter):
    """HAM10000 skin lesions with binary lesion masks, in one of two documented layouts.

    - ISIC 2018 Task 1: `ISIC2018_Task1-2_Training_Input/ISIC_XXXXXXX.jpg` and
      `ISIC2018_Task1_Training_GroundTruth/ISIC_XXXXXXX_segmentation.png` (2 594 images, 0/255 masks).
    - HAM10000 with Tschandl's masks (Harvard Dataverse / Kaggle): `HAM10000_images_part_1/ISIC_XXXXXXX.jpg`,
      `HAM10000_images_part_2/...` (any folder named `HAM10000_images*`, any case) and
      `HAM10000_segmentations_lesion_tschandl/ISIC_XXXXXXX_segmentation.png` (10 015 images).
      [KD] picks 6 000 of them: `--max-cases 6000` draws a seeded subset before the 80/20 split (4 800/1 200).
    The layout is recognised by the mask folder; without either, the ISIC 2018 input folder is reported missing.
    """

    key = "ham10000"
    default_name = "HAM10000"
    description = "HAM10000 / ISIC 2018 Task 1 dermoscopic skin lesion segmentation"
    reference = "Tschandl et al., Sci Data 5:180161 (2018); Codella et al., ISIC 2018 (arXiv:1902.03368)"
    license = "CC BY-NC 4.0 (ISIC 2018) / CC BY-NC-SA 4.0 (HAM10000)"

    def scan(self, source: Path, opts: ConvertOptions) -> list[Unit]:
        if (source / HAM_MASKS).is_dir():
            mask_dir = source / HAM_MASKS
            img_dirs = sorted(p for p in source.iterdir()
                              if p.is_dir() and p.name.lower().startswith("ham10000_images"))
            if not img_dirs:
                raise SemiSAMError(f"source layout mismatch: missing folder {source / 'HAM10000_images_part_1'} "
                                   f"(HAM10000 images next to {HAM_MASKS})")
        else:
            img_dirs = [require_dir(source / ISIC_INPUT, "ISIC 2018 Task 1 training images")]
            mask_dir = require_dir(source / ISIC_GT, "ISIC 2018 Task 1 ground truth")
        units = []
        for d in img_dirs:
            for f in visible_files(d, (".jpg", ".jpeg", ".png")):
                mask = require_file(mask_dir / f"{f.stem}_segmentation.png", f"mask of {f.name}")
                units.append(Unit(safe_case_id(f.stem), {"image": str(f), "label": str(mask)}))
        if not units:
            raise SemiSAMError(f"source layout mismatch: no ISIC_XXXXXXX.jpg image in {img_dirs[0]}")
        return units
