"""`nnunet-semisam demo` end to end with smoke schedules and tiny images (the README's main command, scaled down to
the baseline and the flagship trainer; Mean Teacher has its own end-to-end test)."""
from pathlib import Path

from conftest import run_cmd


def test_demo_small(tmp_path, env):
    out = tmp_path / "demo"
    cmd = ["nnunet-semisam", "demo", "-o", str(out), "--num-train", "16", "--num-test", "3", "--size", "32",
           "-tr", "nnUNetTrainer_smoke", "MedSAMMambaKDTrainer_smoke", "--quiet"]
    proc = run_cmd(cmd, env, timeout=1200)
    table = (out / "comparison.md").read_text()
    assert "| nnUNetTrainer_smoke |" in table and "| MedSAMMambaKDTrainer_smoke |" in table
    assert (out / "overlays.png").stat().st_size > 1000
    assert "[5/5]" in proc.stdout
    # resumable: a second run skips training and finishes quickly with the same table
    again = run_cmd(cmd, env, timeout=600)
    assert "nnUNetv2_train" not in again.stdout and (out / "comparison.md").read_text() == table
    assert not list(Path(out).rglob(".tmp_*"))
