"""SlicingSAM3DPlanner's memory model and 3D patch / batch choice on small fingerprints (METHODS.md §5.1-5.2)."""
import pytest

from nnunet_semisam.planners.slicing_sam3d import size_patch_and_batch, slicing_sam3d_memory

GB = 1024 ** 3


def test_memory_grows_with_z_and_batch():
    a = slicing_sam3d_memory((32, 128, 128), 1)
    assert slicing_sam3d_memory((64, 128, 128), 1) > a and slicing_sam3d_memory((32, 128, 128), 2) > a
    # a smaller slice size (CPU) costs less
    assert slicing_sam3d_memory((32, 128, 128), 1, slice_size=64) < a


def test_small_fingerprint_keeps_the_median_patch():
    patch, batch = size_patch_and_batch([16, 32, 32], 256, 8 * GB, 2, n_voxels_dataset=6 * 16 * 32 * 32)
    assert patch == [16, 32, 32] and batch == 2  # 5 % of a tiny dataset: the minimum batch


def test_large_volume_shrinks_z_and_caps_in_plane():
    patch, batch = size_patch_and_batch([256, 600, 600], 256, 4 * GB, 2, n_voxels_dataset=1e10)
    assert patch[1:] == [512, 512]  # 2 S
    assert patch[0] < 256 and patch[0] % 8 == 0
    assert slicing_sam3d_memory(patch, 2) <= 4 * GB < slicing_sam3d_memory([patch[0] + 8, 512, 512], 2)
    assert batch == max(2, int(4 * GB // slicing_sam3d_memory(patch, 1)))


@pytest.mark.parametrize("gb", [16, 32, 64])
def test_batch_grows_with_memory(gb):
    _, batch = size_patch_and_batch([32, 128, 128], 256, gb * GB, 2, n_voxels_dataset=1e12)
    _, smaller = size_patch_and_batch([32, 128, 128], 256, gb / 2 * GB, 2, n_voxels_dataset=1e12)
    assert batch > smaller >= 2


def test_plan_command_on_tiny3d(tiny3d):
    """`nnunet-semisam plan -pl SlicingSAM3DPlanner` on the session 3D dataset (12x24x24 volumes)."""
    import json
    from pathlib import Path

    from conftest import run_cmd

    out = run_cmd(["nnunet-semisam", "plan", "-d", "991", "-pl", "SlicingSAM3DPlanner"], tiny3d).stdout
    assert "plans identifier: nnUNetPlans_SlicingSAM3D" in out
    plans = json.loads((Path(tiny3d["nnUNet_preprocessed"]) / "Dataset991_Synth3D" /
                        "nnUNetPlans_SlicingSAM3D.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [12, 24, 24] and cfg["batch_size"] == 2 and cfg["sam_slice_size"] == 256
