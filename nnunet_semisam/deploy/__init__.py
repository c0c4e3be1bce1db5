"""Deployment of nnU-Net predictions (METHODS.md §5.8): export and interactive refinement.

- `dicom`: DICOM in and out: series discovery, a DICOM series -> SimpleITK image with its geometry (the input
  nnUNetv2_predict needs, `nnunet-semisam dicom-to-nifti`), and DICOM-SEG writing with highdicom.
- `export`: `nnunet-semisam export`: predictions -> NIfTI (nnU-Net's writer) or DICOM-SEG, each case checked to lie
  on its source's voxel grid.
- `refine`: `nnunet-semisam refine`: one slice (or a few) of a prediction re-segmented by LiteMedSAM (or MedSAM2)
  from a box or a click, replaced in the file atomically.
"""
