"""`nnunet-semisam dicom-to-nifti` and `nnunet-semisam export` (METHODS.md §5.8).

DICOM series -> nnU-Net input -> stock prediction -> DICOM-SEG:

    nnunet-semisam dicom-to-nifti /data/dicom imagesTs
    nnUNetv2_predict -i imagesTs -o pred -d 501 -c 3d_fullres -f 0 -tr MeanTeacherTrainer
    nnunet-semisam export -i pred -s /data/dicom -o seg --format dicom-seg -tr MeanTeacherTrainer
"""
from __future__ import annotations

import argparse


def run_dicom_to_nifti(args: argparse.Namespace) -> int:
    from nnunet_semisam.deploy.dicom import dicom_to_nifti

    written = dicom_to_nifti(args.dicom, args.output, case_id=args.case_id, channel=args.channel,
                             progress=not args.quiet)
    print(f"{len(written)} case(s) written to {args.output}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from nnunet_semisam.deploy.export import export_predictions

    records = export_predictions(args.i, args.s, args.o, fmt=args.format, trainer=args.tr,
                                 algorithm_name=args.algorithm_name, labels=args.labels,
                                 file_ending=args.file_ending, series_number=args.series_number,
                                 progress=not args.quiet)
    for r in records:
        print(f"{r['case']}: {r['output']}" + ("" if r["frames"] is None else f" ({r['frames']} frames)"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "dicom-to-nifti", help="DICOM series -> nnU-Net input images (<case>_0000.nii.gz), geometry kept",
        description="Read every DICOM series under DICOM_DIR with SimpleITK's series reader (one series per case "
                    "folder; DICOM_DIR itself when it is one series) and write OUT/<case>_0000.nii.gz with the "
                    "DICOM geometry and modality values (HU for CT), ready for nnUNetv2_predict -i OUT. Irregular "
                    "slice spacing, gantry tilt and mixed orientations are refused.")
    d.add_argument("dicom", metavar="DICOM_DIR", help="a DICOM series folder, or a folder of case folders")
    d.add_argument("output", metavar="OUT", help="output folder (e.g. imagesTs)")
    d.add_argument("--case-id", default=None, help="case name when DICOM_DIR is one series (default: its name)")
    d.add_argument("--channel", type=int, default=0, help="channel index of the file names (default 0: _0000)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=run_dicom_to_nifti)

    p = sub.add_parser(
        "export", help="export predictions as NIfTI (source geometry) or DICOM-SEG (DICOM sources)",
        description="Write each prediction on its source's geometry: --format nifti through nnU-Net's writer, "
                    "--format dicom-seg as a BINARY DICOM-SEG (highdicom, pip install 'nnunet-semisam[dicom]') "
                    "with one segment per foreground class, the algorithm nnunet_semisam/<trainer>, empty frames "
                    "omitted. DICOM-SEG is only written for DICOM-series sources.")
    p.add_argument("-i", required=True, metavar="PRED", help="prediction file or folder (nnUNetv2_predict -o)")
    p.add_argument("-s", required=True, metavar="SOURCE",
                   help="source image file, folder of source images (CASE_0000.nii.gz) or DICOM folder (one series "
                        "per case folder, as for dicom-to-nifti)")
    p.add_argument("-o", required=True, metavar="OUT", help="output folder (CASE.nii.gz or CASE.dcm)")
    p.add_argument("--format", choices=("nifti", "dicom-seg"), default="nifti", help="output format (default nifti)")
    p.add_argument("-tr", default=None, metavar="TRAINER",
                   help="trainer that made the predictions (DICOM-SEG algorithm name nnunet_semisam/TRAINER)")
    p.add_argument("--algorithm-name", default=None, help="DICOM-SEG algorithm name instead of nnunet_semisam/TRAINER")
    p.add_argument("--labels", default=None, metavar="dataset.json",
                   help="class names for the segments (default: dataset.json next to the predictions)")
    p.add_argument("--file-ending", default=None,
                   help="prediction file ending (default: dataset.json's file_ending, else .nii.gz)")
    p.add_argument("--series-number", type=int, default=None, help="SeriesNumber of the DICOM-SEG (default 300)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_export)
