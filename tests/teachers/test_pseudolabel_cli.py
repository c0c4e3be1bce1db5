"""`nnunet-semisam pseudolabel` end to end on a tiny preprocessed synthetic dataset (METHODS.md §4.5, §5.4).

One module-scoped dataset (make_synthetic_dataset -> nnUNetv2_plan_and_preprocess -> preprocess-unlabeled) and a
small random SAM checkpoint (the teacher's quality is irrelevant here; its determinism is what is tested).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_group, make_preprocessed_dataset, run_cmd, start_in_own_group

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.data.pseudolabel_store import load_pseudolabel, load_pseudolabel_checked, stale_cases
from nnunet_semisam.teachers.pseudolabels import CaseSource, shard
from nnunet_semisam.teachers.sam_models import build_sam_custom, save_sam_checkpoint

DS = 917
SMALL = dict(encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=(1,),
             prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl")
    env = make_preprocessed_dataset(root / "nnunet", DS, num_labeled=3, num_unlabeled=4, num_test=0, shape=(32, 32),
                                    seed=7)
    torch.manual_seed(0)
    sam = build_sam_custom(**SMALL)
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "small.pth"
    save_sam_checkpoint(sam, ckpt, "test_small", arch=SMALL)
    masks = root / "masks"  # file prompts: a centred square on every case's preprocessed grid
    masks.mkdir()
    pp = Path(env["nnUNet_preprocessed"]) / f"Dataset{DS}_SynthRGB"
    for f in list((pp / "nnUNetPlans_2d").glob("*.b2nd")) + list((pp / "nnUNetPlans_2d_unlabeled").glob("*.b2nd")):
        if not f.name.endswith("_seg.b2nd"):
            m = np.zeros((1, 32, 32), bool)
            m[0, 8:20, 10:24] = True
            np.save(masks / f"{f.name[:-5]}.npy", m)
    return {"root": root, "env": env, "ckpt": str(ckpt), "masks": str(masks), "pp": pp}


def _cli(dataset, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d",
           "--checkpoint", dataset["ckpt"], "--device", "cpu", "--quiet", *extra]
    return run_cmd(cmd, dataset["env"], check=check)


def _outputs(folder: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(folder.glob("*.npz")):
        prob, conf = load_pseudolabel(folder, f.stem)
        out[f.stem] = (prob, conf, json.loads((folder / f"{f.stem}.json").read_text()))
    return out


def test_gt_boxes_labeled_cases(dataset):
    out = dataset["root"] / "gt"
    _cli(dataset, "--prompts", "gt-boxes", "--box-min-area", "1", "-o", str(out))
    res = _outputs(out)
    assert sorted(res) == ["synth_0000", "synth_0001", "synth_0002"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["params"]["prompt_source"] == "gt-boxes" and len(man["params"]["checkpoint_sha1"]) == 40
    assert man["params"]["teacher"] == "medsam" and sorted(man["cases"]) == sorted(res)
    for prob, conf, rec in res.values():
        assert prob.shape == conf.shape == (1, 1, 32, 32) and prob.dtype == np.float32 and conf.dtype == bool
        assert 0 <= prob.min() and prob.max() <= 1 and rec["shape"] == [1, 1, 32, 32]
    assert any(r[2]["available"] for r in res.values())


def test_kill_midway_then_resume_equals_clean_run(dataset):
    args = ("--prompts", "file", "--prompt-file", dataset["masks"], "--cases", "all", "--aug", "1")
    clean = dataset["root"] / "clean"
    _cli(dataset, *args, "-o", str(clean))
    ref = _outputs(clean)
    assert len(ref) == 7
    out = dataset["root"] / "killed"
    cmd = ["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d", "--checkpoint",
           dataset["ckpt"], "--device", "cpu", "--quiet", *args, "-o", str(out)]
    proc = start_in_own_group(cmd, dataset["env"])
    t0 = time.time()
    while proc.poll() is None and len(list(out.glob("*.json"))) < 3 and time.time() - t0 < 300:  # manifest + 2
        time.sleep(0.05)
    killed = proc.poll() is None
    kill_group(proc)
    n_before = len(list(out.glob("*.npz")))
    assert killed and 1 <= n_before < 7, "the run finished before it could be killed"
    for f in out.glob("*.npz"):          # whatever exists after the kill is complete and loadable
        load_pseudolabel(out, f.stem)
    r = _cli(dataset, *args, "-o", str(out))
    assert f"{7 - n_before} written" in r.stdout or f"{7 - n_before + 1} written" in r.stdout
    res = _outputs(out)
    assert sorted(res) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(res[k][0], ref[k][0])
        np.testing.assert_array_equal(res[k][1], ref[k][1])
        assert res[k][2] == ref[k][2]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp_")]


def test_preprocessing_threads_give_identical_pseudolabels(dataset):
    """--workers N runs MedSAM's skimage preprocessing of the next cases in threads: the same bits as inline."""
    args = ("--prompts", "file", "--prompt-file", dataset["masks"], "--cases", "all")
    res = {}
    for workers in (1, 3):
        out = dataset["root"] / f"workers{workers}"
        _cli(dataset, *args, "--workers", str(workers), "-o", str(out))
        res[workers] = _outputs(out)
    assert sorted(res[1]) == sorted(res[3]) and len(res[1]) == 7
    for k, (prob, conf, rec) in res[1].items():
        np.testing.assert_array_equal(res[3][k][0], prob)
        np.testing.assert_array_equal(res[3][k][1], conf)
        assert res[3][k][2] == rec and rec["available"]


def test_shards_cover_each_case_once(dataset):
    args = ("--prompts", "file", "--prompt-file", dataset["masks"], "--cases", "all")
    seen: list[str] = []
    for part in range(3):
        out = dataset["root"] / f"shard{part}"
        _cli(dataset, *args, "--num-parts", "3", "--part-id", str(part), "-o", str(out))
        seen += [f.stem for f in out.glob("*.npz")]
    assert sorted(seen) == [f"synth_{i:04d}" for i in range(7)]  # each exactly once
    assert shard(list(range(10)), 3, 1) == [1, 4, 7]
    with pytest.raises(SemiSAMError):
        shard([1], 2, 2)


def test_concurrent_shards_merge_into_one_complete_folder(dataset, tmp_path):
    """Two shards (`--shard 0/2`, `--shard 1/2`) started at the same time into one folder, as two GPUs or nodes
    would run them, then `pseudolabel-merge`: every case once, the same maps as one unsharded run, a complete
    manifest; a folder with a case missing is reported (exit 1) with the missing case named."""
    args = ["--prompts", "file", "--prompt-file", dataset["masks"], "--cases", "all"]
    out, single = tmp_path / "sharded", tmp_path / "single"
    base = ["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d", "--checkpoint", dataset["ckpt"],
            "--device", "cpu", "--quiet", *args, "-o", str(out)]
    procs = [subprocess.Popen(base + ["--shard", f"{i}/2"], env=dataset["env"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    assert all(p.wait(timeout=600) == 0 for p in procs), [p.stderr.read()[-2000:] for p in procs]
    r = run_cmd(["nnunet-semisam", "pseudolabel-merge", "-o", str(out)], dataset["env"])
    assert "7/7 cases done" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert (man["num_expected"], man["num_done"], man["complete"]) == (7, 7, True) and len(man["cases"]) == 7
    _cli(dataset, *args, "-o", str(single))
    sharded, whole = _outputs(out), _outputs(single)
    assert sorted(sharded) == sorted(whole) == [f"synth_{i:04d}" for i in range(7)]
    for case, (prob, conf, _) in whole.items():
        np.testing.assert_array_equal(sharded[case][0], prob)
        np.testing.assert_array_equal(sharded[case][1], conf)
    for suffix in (".npz", ".json"):
        (out / f"synth_0003{suffix}").unlink()
    r = run_cmd(["nnunet-semisam", "pseudolabel-merge", "-o", str(out)], dataset["env"], check=False)
    assert r.returncode == 1 and "6/7 cases done; missing: synth_0003" in r.stdout
    r = _cli(dataset, *args, "--shard", "2/2", "-o", str(out), check=False)
    assert r.returncode == 2 and "--shard '2/2'" in r.stderr.strip().splitlines()[-1]


def test_changed_preprocessed_shape_is_detected_and_redone(dataset, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    pp = tmp_path / "pp"
    shutil.copytree(dataset["pp"].parent, pp)      # private copy of the preprocessed tree
    env = dict(dataset["env"], nnUNet_preprocessed=str(pp))
    ds_pp = pp / dataset["pp"].name
    out = ds_pp / "nnUNetPlans_2d_pseudolabels"
    base = ["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d", "--checkpoint",
            dataset["ckpt"], "--device", "cpu", "--quiet", "--prompts", "gt-boxes"]
    run_cmd(base, env)
    folder = ds_pp / "nnUNetPlans_2d"
    data, seg, _, props = nnUNetDatasetBlosc2(str(folder)).load_case("synth_0001")
    data, seg = np.asarray(data[:])[..., :30], np.asarray(seg[:])[..., :30]
    for suffix in (".b2nd", "_seg.b2nd"):
        os.remove(folder / f"synth_0001{suffix}")
    nnUNetDatasetBlosc2.save_case(data, seg, props, str(folder / "synth_0001"))
    cases = [CaseSource(c, str(folder), True) for c in ("synth_0000", "synth_0001", "synth_0002")]
    assert stale_cases(out, cases) == ["synth_0001"]
    with pytest.raises(SemiSAMError, match="shape"):
        load_pseudolabel_checked(out, "synth_0001", data.shape)
    r = run_cmd(base, env)
    assert "1 written, 2 already up to date" in r.stdout
    assert load_pseudolabel_checked(out, "synth_0001", data.shape)[0].shape == (1, 1, 32, 30)


def test_bad_inputs_fail_before_writing(dataset, tmp_path):
    out = tmp_path / "never"
    r = _cli(dataset, "--prompts", "gt-boxes", "-o", str(out), "--checkpoint", str(tmp_path / "missing.pth"),
             check=False)
    assert r.returncode == 2 and "not found" in r.stderr
    wrong = tmp_path / "wrong.pth"
    torch.save(build_sam_custom(**SMALL).state_dict(), wrong)  # plain state dict, not a vit_b
    r = _cli(dataset, "--prompts", "gt-boxes", "-o", str(out), "--checkpoint", str(wrong), "--model-type", "vit_b",
             check=False)
    assert r.returncode == 2 and "wrong architecture" in r.stderr
    r = _cli(dataset, "--prompts", "gt-boxes", "--cases", "unlabeled", "-o", str(out), check=False)
    assert r.returncode == 2 and "labels" in r.stderr
    r = _cli(dataset, "--prompts", "file", "-o", str(out), check=False)
    assert r.returncode == 2 and "--prompt-file" in r.stderr
    r = _cli(dataset, "--prompts", "gt-boxes", "--num-parts", "2", "--part-id", "2", "-o", str(out), check=False)
    assert r.returncode == 2 and "part" in r.stderr
    assert not out.exists()


def test_medsam2_teacher_through_the_cli(dataset):
    pytest.importorskip("sam2", reason="optional extra nnunet-semisam[medsam2]")
    import yaml
    from omegaconf import OmegaConf

    import sam2
    from nnunet_semisam.teachers.medsam2 import MedSAM2Teacher

    from test_medsam2 import TINY  # noqa: E402 - the tiny SAM2.1 overrides

    cfg = OmegaConf.load(Path(sam2.__file__).parent / "configs/sam2.1/sam2.1_hiera_t.yaml")
    for o in TINY:
        k, v = o.lstrip("+").split("=", 1)
        OmegaConf.update(cfg, k, yaml.safe_load(v), force_add=True)
    cfg_file = dataset["root"] / "tiny_sam2.yaml"
    cfg_file.write_text("# @package _global_\n" + OmegaConf.to_yaml(cfg))
    torch.manual_seed(0)
    t = MedSAM2Teacher.from_checkpoint(None, config=str(cfg_file), image_size=64)
    ckpt = dataset["root"] / "tiny_sam2.pt"
    torch.save({"model": t.predictor.state_dict()}, ckpt)
    out = dataset["root"] / "m2"
    env = dict(dataset["env"], TQDM_DISABLE="1")
    run_cmd(["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d", "--teacher", "medsam2", "--checkpoint",
             str(ckpt), "--medsam2-config", str(cfg_file), "--medsam2-image-size", "64", "--device", "cpu",
             "--quiet", "--prompts", "gt-boxes", "-o", str(out)], env)
    res = _outputs(out)
    assert len(res) == 3 and all(r[0].shape == (1, 1, 32, 32) for r in res.values())
    man = json.loads((out / "manifest.json").read_text())
    assert man["params"]["teacher"] == "medsam2" and man["params"]["medsam2_image_size"] == 64
    r = _cli(dataset, "--teacher", "medsam2", "--prompts", "gt-boxes", "-o", str(out), check=False)
    assert r.returncode == 2  # --checkpoint given by _cli is a SAM1 file: wrong architecture, one-line error
