"""The Semi-SAM+ 3D benchmark preset (issue 17): plan only (dry run); the full run is CPU-hours."""
from nnunet_semisam.benchmark.presets import get_preset
from nnunet_semisam.benchmark import BenchmarkOptions, run_benchmark


def test_semisam_preset_dry_run(tmp_path, capsys):
    p = get_preset("synthetic-3d-semisam")
    assert p.configuration == "3d_fullres" and p.fractions == (0.1,) and p.seeds == (0, 1, 2)
    assert run_benchmark(BenchmarkOptions(out=str(tmp_path / "o"), preset="synthetic-3d-semisam", dry_run=True)) == 0
    text = capsys.readouterr().out
    for trainer in ("MeanTeacherTrainer_demo", "SemiSAMPlusTrainer_demo"):
        assert text.count(trainer) == 3, trainer  # one run per seed
    assert text.count("nnUNetTrainer_demo") == 4  # per seed + the full-label reference
    assert not (tmp_path / "o").exists()
