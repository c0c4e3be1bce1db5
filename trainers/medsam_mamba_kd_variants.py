"""Variants of MedSAMMambaKDTrainer in nnU-Net's convention: each sets attributes after `super().__init__` and
changes one thing (ablations of [KD] Tables 5-6, METHODS.md §4.7; interpretation switches; short schedules).

`nnUNetv2_train ... -tr <name>` finds them through `nnUNet_extTrainer` like the main trainer.
"""
import torch

from nnunet_semisam.trainers.medsam_mamba_kd import MedSAMMambaKDTrainer
from nnunet_semisam.trainers.short_schedules import BENCH, DEMO, SMOKE, apply_schedule


class MedSAMMambaKDTrainer_boxOnly(MedSAMMambaKDTrainer):
    """Paper-literal: labeled annotations used only as boxes, no mask loss (METHODS.md §4.4)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_gt_supervision = False


class MedSAMMambaKDTrainer_noFPKDM(MedSAMMambaKDTrainer):
    """Table 5: no perturbation-response distillation (and no teacher features at all)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fpkdm = False


class MedSAMMambaKDTrainer_noFBVM(MedSAMMambaKDTrainer):
    """Table 5: no foreground/background variance-mean loss."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fbvm = False


class MedSAMMambaKDTrainer_SAM(MedSAMMambaKDTrainer):
    """Table 5 "w/o MedSAM": the original SAM ViT-B from $SEMISAM_SAM_CHECKPOINT as teacher."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_weights = "sam"


class MedSAMMambaKDTrainer_teacherNative(MedSAMMambaKDTrainer):
    """FPKDM teacher features at the teacher's native side on every device
    (LiteMedSAM 256, MedSAM 1024; METHODS.md §2.8)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_input_size = "native"


class MedSAMMambaKDTrainer_teacherPatch(MedSAMMambaKDTrainer):
    """FPKDM teacher features at the student's patch side on every device (the `"patch"` setting of
    `teachers.feature_side`, METHODS.md §2.8)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_input_size = "patch"


class MedSAMMambaKDTrainer_fbvmValidNone(MedSAMMambaKDTrainer):
    """FBVM over every pixel (no valid mask, METHODS.md §4.7)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.fbvm_valid_mask = "none"


class MedSAMMambaKDTrainer_fbvmValidNonmin(MedSAMMambaKDTrainer):
    """FBVM valid mask = pixels above the image minimum
    (the rule that misses 0-padding of z-scored data, METHODS.md §4.2)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.fbvm_valid_mask = "nonmin"


class MedSAMMambaKDTrainer_polarityPos(MedSAMMambaKDTrainer):
    """FBVM with the paper's implicit assumption that lesions are brighter (s_c = +1, METHODS.md §4.7)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.fbvm_polarity = "+1"


class MedSAMMambaKDTrainer_polarityAbs(MedSAMMambaKDTrainer):
    """FBVM mean term on |mu_F - mu_B| (METHODS.md §4.7)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.fbvm_polarity = "abs"


class MedSAMMambaKDTrainer_paperOptim(MedSAMMambaKDTrainer):
    """The paper's optimiser (METHODS.md §4.6): lr 1e-3, cosine annealing to 1e-5 per epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.lr_schedule = "cosine"


class MedSAMMambaKDTrainer_init10(MedSAMMambaKDTrainer):
    """Table 6: 10 labeled-only warm-up epochs before the joint stage (METHODS.md §4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_epochs = 10


class MedSAMMambaKDTrainer_init20(MedSAMMambaKDTrainer):
    """Table 6: 20 labeled-only warm-up epochs before the joint stage (METHODS.md §4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_epochs = 20


class MedSAMMambaKDTrainer_init30(MedSAMMambaKDTrainer):
    """Table 6: 30 labeled-only warm-up epochs before the joint stage (METHODS.md §4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_epochs = 30


class MedSAMMambaKDTrainer_init40(MedSAMMambaKDTrainer):
    """Table 6: 40 labeled-only warm-up epochs before the joint stage (METHODS.md §4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_epochs = 40


class MedSAMMambaKDTrainer_boxRefine(MedSAMMambaKDTrainer):
    """Closed loop with box refinement: student box sides that cut the teacher's mask grow, 3 rounds (§4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_box_refine = 3


class MedSAMMambaKDTrainer_fuseStudent(MedSAMMambaKDTrainer):
    """Closed loop with fused unlabeled targets: max(teacher map, student foreground probability) (§4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_fusion = True


class MedSAMMambaKDTrainer_boxMargin(MedSAMMambaKDTrainer):
    """Closed loop with the student's boxes widened by 2 px per side before the teacher sees them (§4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_box_margin = 2


class MedSAMMambaKDTrainer_calibrated(MedSAMMambaKDTrainer):
    """Teacher maps recalibrated at the threshold t* that best reproduces the labeled masks from their GT boxes
    (`teachers.calibration`, §4.5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_threshold = "calibrate"


class MedSAMMambaKDTrainer_calibratedFuseKDOnly(MedSAMMambaKDTrainer):
    """The calibrated, fused closed loop with L_KD alone (§4.5): teacher maps recalibrated at t*, unlabeled targets
    fused with the student's probability, no L_RD and no L_FBVM."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_threshold = "calibrate"
        self.student_fusion = True
        self.use_fpkdm = False
        self.use_fbvm = False


# ---------------------------------------------------------------------------------------------------- short runs

class MedSAMMambaKDTrainer_smoke(MedSAMMambaKDTrainer):
    """Tests: `nnUNetTrainer_smoke`'s schedule (2 epochs x 10 iterations), one closed-loop refresh at epoch 1."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, SMOKE)
        self.pl_start = 1
        self.pl_every = 1


class MedSAMMambaKDTrainer_calibrated_smoke(MedSAMMambaKDTrainer_smoke):
    """Tests: the calibrated teacher maps (§4.5) on the smoke schedule (killed and resumed in the e2e test)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_threshold = "calibrate"


class MedSAMMambaKDTrainer_boxOnly_smoke(MedSAMMambaKDTrainer_smoke):
    """The box-only setting on the smoke schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_gt_supervision = False


class MedSAMMambaKDTrainer_demo(MedSAMMambaKDTrainer):
    """`nnunet-semisam demo`: `nnUNetTrainer_demo`'s schedule, refreshes at epochs 4 and 8."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, DEMO)
        self.pl_start = 4
        self.pl_every = 4


class MedSAMMambaKDTrainer_boxOnly_demo(MedSAMMambaKDTrainer_demo):
    """The box-only setting (METHODS.md §4.4) on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_gt_supervision = False


class MedSAMMambaKDTrainer_noFPKDM_demo(MedSAMMambaKDTrainer_demo):
    """The no-FPKDM ablation on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fpkdm = False


class MedSAMMambaKDTrainer_noFBVM_demo(MedSAMMambaKDTrainer_demo):
    """The no-FBVM ablation on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fbvm = False


class MedSAMMambaKDTrainer_teacherNative_demo(MedSAMMambaKDTrainer_demo):
    """Native-side teacher features on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_input_size = "native"


class MedSAMMambaKDTrainer_paperOptim_demo(MedSAMMambaKDTrainer_demo):
    """The paper's optimiser on the demo schedule (benchmark)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.lr_schedule = "cosine"


class MedSAMMambaKDTrainer_bench(MedSAMMambaKDTrainer):
    """The accuracy benchmark: `nnUNetTrainer_bench`'s schedule (40 x 25 iterations), refreshes every 8 epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, BENCH)
        self.pl_start = 8
        self.pl_every = 8


class MedSAMMambaKDTrainer_boxOnly_bench(MedSAMMambaKDTrainer_bench):
    """The box-only setting (METHODS.md §4.4) on the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_gt_supervision = False


class MedSAMMambaKDTrainer_noFPKDM_bench(MedSAMMambaKDTrainer_bench):
    """The no-FPKDM ablation on the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fpkdm = False


class MedSAMMambaKDTrainer_noFBVM_bench(MedSAMMambaKDTrainer_bench):
    """The no-FBVM ablation on the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_fbvm = False


class MedSAMMambaKDTrainer_boxRefine_demo(MedSAMMambaKDTrainer_demo):
    """Box refinement (§4.5) on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_box_refine = 3


class MedSAMMambaKDTrainer_boxRefine_bench(MedSAMMambaKDTrainer_bench):
    """Box refinement (§4.5) on the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_box_refine = 3


class MedSAMMambaKDTrainer_fuseStudent_demo(MedSAMMambaKDTrainer_demo):
    """Fused unlabeled targets (§4.5) on the demo schedule (benchmarks/bench_medsam_mamba_kd.py)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_fusion = True


class MedSAMMambaKDTrainer_fuseStudent_bench(MedSAMMambaKDTrainer_bench):
    """Fused unlabeled targets (§4.5) on the benchmark schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_fusion = True


class MedSAMMambaKDTrainer_calibrated_demo(MedSAMMambaKDTrainer_demo):
    """Calibrated teacher maps (§4.5) on the demo schedule (benchmark)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.teacher_threshold = "calibrate"


class MedSAMMambaKDTrainer_calibratedFuse_demo(MedSAMMambaKDTrainer_calibrated_demo):
    """Calibrated teacher maps fused with the student's probability (§4.5) on the demo schedule (benchmark)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_fusion = True


class MedSAMMambaKDTrainer_calibratedFuseKDOnly_demo(MedSAMMambaKDTrainer_demo,
                                                    MedSAMMambaKDTrainer_calibratedFuseKDOnly):
    """`_calibratedFuseKDOnly` (§4.5) on the demo schedule: what [KD]'s two auxiliary losses cost on top of the
    calibrated, fused closed loop (README demo table). Each parent's `__init__` sets its own attributes."""


class MedSAMMambaKDTrainer_boxMargin_demo(MedSAMMambaKDTrainer_demo):
    """Student boxes widened by 2 px per side (§4.5) on the demo schedule."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.student_box_margin = 2


class MedSAMMambaKDTrainer_calibratedFuseKDOnly_bench(MedSAMMambaKDTrainer_bench,
                                                     MedSAMMambaKDTrainer_calibratedFuseKDOnly):
    """`_calibratedFuseKDOnly` (§4.5) on the benchmark schedule: the demo's best KD loop at the accuracy benchmark's
    length. Each parent's `__init__` sets its own attributes (schedule; calibration, fusion and L_KD alone)."""
