"""Benchmark presets: the seed papers' table layouts, and synthetic datasets that run on CPU.

A preset fixes the dataset, configuration, methods, label protocols, seeds and schedule; every command-line value
given next to `--preset` overrides the preset's. Paper presets name the dataset `nnunet-semisam convert` writes
(found by name in $nnUNet_raw, any id); synthetic presets generate their dataset (seeded) inside the output folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nnunet_semisam.errors import SemiSAMError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str | None  # dataset name in $nnUNet_raw (paper presets); None: synthetic
    configuration: str
    trainers: tuple[str, ...]
    fractions: tuple[float, ...] = ()
    labeled: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    schedule: str = "full"
    convert_hint: str = ""
    synthetic: dict = field(default_factory=dict)  # make_synthetic_dataset arguments ("params": SynthParams fields)


KD = ("MedSAMMambaKDTrainer",)
#: the baselines of METHODS.md §8, each compared with supervised nnU-Net (the runner adds nnUNetTrainer)
BASELINES = ("MeanTeacherTrainer", "UAMTTrainer", "CPSTrainer", "BCPTrainer", "URPCTrainer", "MCNetPlusTrainer",
             "CCTTrainer")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("synthetic-2d", "2D RGB lesions, 64x64, 40 training / 20 test images (CPU-sized, seeded)", None, "2d",
           ("MeanTeacherTrainer", "MedSAMMambaKDTrainer"), fractions=(0.1,), schedule="demo",
           synthetic=dict(kind="2d-rgb", num_labeled=40, num_test=20, shape=(64, 64), seed=0, dataset_id=881,
                          name="BenchSynth2D")),
    Preset("synthetic-3d", "3D MRI-like lesions, 24x48x48 volumes, 16 training / 6 test (CPU-sized, seeded)", None,
           "3d_fullres", ("MeanTeacherTrainer",), labeled=(4, 8), schedule="smoke",
           synthetic=dict(kind="3d", num_labeled=16, num_test=6, shape=(24, 48, 48), seed=0, dataset_id=882,
                          name="BenchSynth3D")),
    Preset("kvasir-kd", "seed 000 table 1: Kvasir-SEG at 10 % and 20 % labels", "KvasirSEG", "2d", KD,
           fractions=(0.1, 0.2), convert_hint="nnunet-semisam convert kvasir SOURCE -d ID"),
    Preset("ham10000-kd", "seed 000 table 2: HAM10000 / ISIC 2018 at 10 % and 20 % labels", "HAM10000", "2d", KD,
           fractions=(0.1, 0.2), convert_hint="nnunet-semisam convert ham10000 SOURCE -d ID"),
    Preset("msd-brain-kd", "seed 000 table 3: MSD brain tumour (2D slices) at 10 % and 20 % labeled patients",
           "BrainTumour2D", "2d", KD, fractions=(0.1, 0.2),
           convert_hint="nnunet-semisam convert msd-brats2d Task01_BrainTumour -d ID"),
    Preset("la-mn", "seed 004 table 1: left atrium (LA) with 4 / 8 / 16 labeled volumes", "LeftAtrium",
           "3d_fullres", ("MeanTeacherTrainer", "MNCoTrainer"), labeled=(4, 8, 16),
           convert_hint="nnunet-semisam convert la-h5 '2018LA_Seg_Training Set' -d ID"),
    # issue 16: every baseline of METHODS.md section 8 against supervised nnU-Net at the same 10 % labels, 3 seeds
    Preset("baselines-2d", "every baseline (METHODS.md §8) vs supervised at 10 % labels: 2D RGB lesions, 64x64, "
           "40 training / 20 test images (CPU-sized, seeded)", None, "2d", BASELINES, fractions=(0.1,),
           schedule="demo", synthetic=dict(kind="2d-rgb", num_labeled=40, num_test=20, shape=(64, 64), seed=0,
                                           dataset_id=883, name="BenchBaselines2D")),
    # lesion radii 15-35 % of the smallest physical side, no tiny lesions (3.3 % foreground): with the default
    # generator's small lesions (0.4 %) nnU-Net 3D at 100 % labels was still below 10 % after the 300 `_demo` steps
    Preset("baselines-3d", "every baseline (METHODS.md §8) vs supervised at 10 % labels: 3D MRI-like lesions, "
           "16x40x40 volumes, large lesions, 40 training / 10 test (CPU-sized, seeded)", None, "3d_fullres",
           BASELINES, fractions=(0.1,), schedule="demo",
           synthetic=dict(kind="3d", num_labeled=40, num_test=10, shape=(16, 40, 40), seed=0, dataset_id=887,
                          name="BenchBaselines3DLarge", params=dict(size=(0.15, 0.35), tiny_fraction=0.0))),
    Preset("synthetic-3d-semisam", "issue 17: Semi-SAM+ vs Mean Teacher 3D vs supervised nnU-Net 3D, 3D MRI-like "
           "lesions 24x48x48, 40 training / 8 test, 10 % labels (CPU-sized, seeded; the Semi-SAM+ log has the "
           "pseudo-labels' confident coverage per epoch)", None, "3d_fullres",
           ("MeanTeacherTrainer", "SemiSAMPlusTrainer"), fractions=(0.1,), schedule="demo",
           synthetic=dict(kind="3d", num_labeled=40, num_test=8, shape=(24, 48, 48), seed=0, dataset_id=885,
                          name="BenchSynth3DSemiSAM")),
    Preset("synthetic-3d-mn", "seed 004's LA protocol on synthetic 3D volumes: 4 and 8 labeled of 16, MNCoTrainer "
           "(TinyViT f) vs nnU-Net 3D vs Mean Teacher 3D, 3 seeds (CPU-hours; demo schedule)", None, "3d_fullres",
           ("MeanTeacherTrainer", "MNCoTrainer"), labeled=(4, 8), schedule="demo",
           synthetic=dict(kind="3d", num_labeled=16, num_test=6, shape=(24, 48, 48), seed=0, dataset_id=886,
                          name="BenchSynth3DMN")),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SemiSAMError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
