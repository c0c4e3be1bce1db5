"""Issue 14: stale or leaking data is detected (pseudo-label resume keys, split-labels on a preprocessed dataset)
and bad prompt files / teacher checkpoints give one-line errors.

One module-scoped tiny preprocessed dataset (3 labeled + 3 unlabeled 32x32 RGB cases) and a small random SAM
checkpoint (the teacher's quality is irrelevant here). Tests that change data work on private copies of the trees.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_preprocessed_dataset, run_cmd

from nnunet_semisam.errors import SemiSAMError
from nnunet_semisam.teachers.sam_models import build_sam_custom, save_sam_checkpoint

DS = 923
SMALL = dict(encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=1, encoder_global_attn_indexes=(1,),
             prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
LABELED = ["synth_0000", "synth_0001", "synth_0002"]
UNLABELED = ["synth_0003", "synth_0004", "synth_0005"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plchecks")
    env = make_preprocessed_dataset(root / "nnunet", DS, num_labeled=3, num_unlabeled=3, num_test=0, shape=(32, 32),
                                    seed=3)
    torch.manual_seed(0)
    sam = build_sam_custom(**SMALL)
    ckpt = root / "small.pth"
    save_sam_checkpoint(sam, ckpt, "test_small", arch=SMALL)
    return {"root": root, "env": env, "ckpt": str(ckpt)}


def _private(dataset, tmp_path: Path) -> tuple[dict, Path]:
    """Copies of the raw and preprocessed trees; returns (env, preprocessed dataset folder)."""
    env = dict(dataset["env"])
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        dst = tmp_path / k
        shutil.copytree(env[k], dst)
        env[k] = str(dst)
    (pp,) = Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DS}_*")
    return env, pp


def _pseudolabel(env, ckpt, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd(["nnunet-semisam", "pseudolabel", "-d", str(DS), "-c", "2d", "--checkpoint", ckpt,
                    "--device", "cpu", "--quiet", "--workers", "1", *extra], env, check=check)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _boxes(path: Path, table: dict) -> str:
    path.write_text(json.dumps(table))
    return str(path)


BOXES = {c: {"0": [[6, 6, 20, 22]]} for c in UNLABELED}


# ------------------------------------------------------------------------------------ item 5: resume keys

def test_resume_redoes_a_re_preprocessed_case_and_not_a_touched_one(dataset, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_semisam.data.pseudolabel_store import stale_cases
    from nnunet_semisam.teachers.pseudolabels import CaseSource

    env, pp = _private(dataset, tmp_path)
    args = ("--prompts", "file", "--prompt-file", _boxes(tmp_path / "boxes.json", BOXES))
    r = _pseudolabel(env, dataset["ckpt"], *args)
    assert "3 written, 0 already up to date" in r.stdout
    out = pp / "nnUNetPlans_2d_pseudolabels"
    rec = json.loads((out / "synth_0004.json").read_text())

    unl = pp / "nnUNetPlans_2d_unlabeled"
    data, seg, _, props = nnUNetDatasetBlosc2(str(unl)).load_case("synth_0004")
    data, seg = np.asarray(data[:]), np.asarray(seg[:])
    for suffix in (".b2nd", "_seg.b2nd"):  # the image changed and was re-preprocessed: same shape, new content
        os.remove(unl / f"synth_0004{suffix}")
    nnUNetDatasetBlosc2.save_case(-data, seg, props, str(unl / "synth_0004"))
    st = os.stat(unl / "synth_0005.b2nd")  # synth_0005 rewritten with the same content: only its mtime changes
    os.utime(unl / "synth_0005.b2nd", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cases = [CaseSource(c, str(unl), False) for c in UNLABELED]
    stale = stale_cases(out, cases)

    r = _pseudolabel(env, dataset["ckpt"], *args)
    assert "1 written, 2 already up to date" in r.stdout  # today: "0 written, 3 already up to date"
    assert stale == ["synth_0004"]
    assert len(rec["key"]) == 40 and len(rec["content_sha1"]) == 40 and rec["prompts_sha1"].startswith("boxes:")
    assert json.loads((out / "synth_0004.json").read_text())["content_sha1"] != rec["content_sha1"]
    assert stale_cases(out, cases) == []
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_expected"] == 3 and man["num_done"] == 3 and man["complete"] is True


def test_resume_redoes_a_case_whose_prompt_boxes_changed(dataset, tmp_path):
    env, pp = _private(dataset, tmp_path)
    boxes = tmp_path / "boxes.json"
    args = ("--prompts", "file", "--prompt-file", _boxes(boxes, BOXES))
    _pseudolabel(env, dataset["ckpt"], *args)
    _boxes(boxes, {**BOXES, "synth_0003": {"0": [[2, 3, 12, 14]]}})  # same file, one case's boxes changed
    r = _pseudolabel(env, dataset["ckpt"], *args)
    assert "1 written, 2 already up to date" in r.stdout
    r = _pseudolabel(env, dataset["ckpt"], *args)
    assert "0 written, 3 already up to date" in r.stdout


def test_manifest_records_expected_total_and_completion(dataset, tmp_path):
    env, pp = _private(dataset, tmp_path)
    args = ("--prompts", "gt-boxes", "--box-min-area", "1", "--num-parts", "2")
    _pseudolabel(env, dataset["ckpt"], *args, "--part-id", "0")
    man = json.loads((pp / "nnUNetPlans_2d_pseudolabels" / "manifest.json").read_text())
    assert (man["num_expected"], man["num_done"], man["complete"]) == (3, 2, False)
    _pseudolabel(env, dataset["ckpt"], *args, "--part-id", "1")
    man = json.loads((pp / "nnUNetPlans_2d_pseudolabels" / "manifest.json").read_text())
    assert (man["num_expected"], man["num_done"], man["complete"]) == (3, 3, True)


# ------------------------------------------------------------------------------------ poor messages

def test_box_on_a_missing_slice_fails_before_writing(dataset, tmp_path):
    out = tmp_path / "never"
    bad = _boxes(tmp_path / "bad.json", {**BOXES, "synth_0004": {"3": [[6, 6, 20, 22]]}})
    r = _pseudolabel(dataset["env"], dataset["ckpt"], "--prompts", "file", "--prompt-file", bad, "-o", str(out),
                     check=False)
    last = _last_line(r)
    assert r.returncode == 2 and last.startswith("error: --prompt-file ") and bad in last
    assert "synth_0004" in last and "slice 3" in last and "1 slice" in last
    outside = _boxes(tmp_path / "outside.json", {"synth_0005": {"0": [[6, 6, 40, 22]]}})
    r = _pseudolabel(dataset["env"], dataset["ckpt"], "--prompts", "file", "--prompt-file", outside, "-o",
                     str(out), check=False)
    assert r.returncode == 2 and "synth_0005" in _last_line(r) and "not inside" in _last_line(r)
    assert not out.exists()  # no manifest.json listing 0 cases left behind


def _foreign_checkpoints(tmp_path: Path) -> dict[str, Path]:
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    nnunet = tmp_path / "checkpoint_final.pth"  # what nnU-Net's save_checkpoint writes (numpy floats in logging)
    torch.save({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": torch.zeros(2, 1, 3, 3)},
                "optimizer_state": {}, "logging": {"ema_fg_dice": [np.float64(0.5)]}, "current_epoch": 1,
                "init_args": {"fold": 0}, "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1)}, nnunet)
    return {"random": rnd, "nnunet": nnunet}


def test_foreign_teacher_checkpoints_give_one_line(dataset, tmp_path):
    from nnunet_semisam.teachers.factory import load_teacher

    files = _foreign_checkpoints(tmp_path)
    for kind, path in files.items():
        with pytest.raises(SemiSAMError) as e:
            load_teacher(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: not a SAM / MedSAM / LiteMedSAM checkpoint (") and "\n" not in msg
        assert "Weights only" not in msg and (kind != "nnunet" or "nnU-Net" in msg)
    out = tmp_path / "never"
    for kind, path in files.items():
        r = _pseudolabel(dataset["env"], str(path), "--prompts", "gt-boxes", "-o", str(out), check=False)
        last = _last_line(r)
        assert r.returncode == 2 and last.startswith(f"error: {path}: not a SAM / MedSAM / LiteMedSAM checkpoint (")
        assert "Weights only" not in r.stderr and (kind != "nnunet" or "nnU-Net training checkpoint" in last)
    assert not out.exists()


# ------------------------------------------------------------------------------------ item 6: split-labels leak

def test_split_labels_on_a_preprocessed_dataset_refuses_or_cleans(dataset, tmp_path):
    env, pp = _private(dataset, tmp_path)
    (raw,) = Path(env["nnUNet_raw"]).glob(f"Dataset{DS}_*")
    splits = pp / "splits_final.json"
    splits.write_text(json.dumps([{"train": LABELED[:2], "val": LABELED[2:]}]))
    before = sorted(p.name for p in (raw / "imagesTr").iterdir())
    r = run_cmd(["nnunet-semisam", "split-labels", "-d", str(DS), "--num-labeled", "1", "--quiet"], env, check=False)
    last = _last_line(r)
    assert r.returncode == 2 and last.startswith(f"error: {pp} holds preprocessed data from before this split")
    assert "3 training cases" in last and "splits_final.json" in last and "--clean-preprocessed" in last
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == before  # nothing moved
    assert not (raw / "split_labels.json").exists()

    r = run_cmd(["nnunet-semisam", "split-labels", "-d", str(DS), "--num-labeled", "1", "--quiet",
                 "--clean-preprocessed"], env)
    plan = json.loads((raw / "split_labels.json").read_text())
    assert len(plan["unlabeled"]) == 2 and "removed" in r.stdout and not splits.exists()
    for moved in plan["unlabeled"]:
        assert not list(pp.glob(f"*/{moved}.*")) and not list(pp.glob(f"*/{moved}_seg.*")), moved
    (kept,) = plan["labeled"]
    assert (pp / "nnUNetPlans_2d" / f"{kept}.b2nd").is_file() and (pp / "gt_segmentations" / f"{kept}.png").is_file()
    assert len(list((pp / "nnUNetPlans_2d_unlabeled").glob("*_seg.b2nd"))) == 3  # the real unlabeled cases stay


def test_split_labels_refuses_ids_both_in_imagesTr_and_imagesUnlabeled(dataset, tmp_path):
    env, pp = _private(dataset, tmp_path)
    shutil.rmtree(pp)
    (raw,) = Path(env["nnUNet_raw"]).glob(f"Dataset{DS}_*")
    shutil.copy(raw / "imagesTr" / "synth_0001_0000.png", raw / "imagesUnlabeled" / "synth_0001_0000.png")
    r = run_cmd(["nnunet-semisam", "split-labels", "-d", str(DS), "--num-labeled", "1", "--quiet"], env, check=False)
    last = _last_line(r)
    assert r.returncode == 2 and last.startswith("error: 1 case identifier is both training cases") and \
        "synth_0001" in last and "imagesUnlabeled" in last
    assert not (raw / "split_labels.json").exists()


def test_check_disjoint_names_the_colliding_identifiers(tmp_path):
    from nnunet_semisam.data.disjoint import check_disjoint, check_splits_disjoint
    from nnunet_semisam.data.split_labels import check_disjoint as same

    assert same is check_disjoint
    check_disjoint(["a", "b"], ["c"], test_ids=["d"])
    with pytest.raises(SemiSAMError, match=r"^2 case identifiers are both labeled training cases \(imagesTr\) and "
                                           r"unlabeled cases \(imagesUnlabeled\): a, b; "):
        check_disjoint(["a", "b", "x"], ["b", "a", "c"])
    with pytest.raises(SemiSAMError, match=r"unlabeled cases \(imagesUnlabeled\) and test cases \(imagesTs\): c"):
        check_disjoint(["a"], ["c"], test_ids=["c"])
    check_disjoint(["a"], ["c"], test_ids=["c"], allow_unlabeled_test_overlap=True)  # transductive, explicit
    with pytest.raises(SemiSAMError, match="labeled training cases .* and test cases"):
        check_disjoint(["a"], ["c"], test_ids=["a"], allow_unlabeled_test_overlap=True)
    with pytest.raises(SemiSAMError, match=r"c0, c1, c2, c3, c4, \.\.\. \(7 in all\)"):
        check_disjoint([f"c{i}" for i in range(7)], [f"c{i}" for i in range(7)])
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a", "u1"], "val": ["b"]}]))
    check_splits_disjoint(splits, ["u2"])
    with pytest.raises(SemiSAMError, match=r"splits_final.json lists 1 of the unlabeled cases as train cases: u1"):
        check_splits_disjoint(splits, ["u1", "u2"])
