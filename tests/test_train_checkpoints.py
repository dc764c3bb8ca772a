"""What train.py writes per epoch: one checkpoint write whose copies are hard links, the
post-hoc EMA profiles only in last.pth.tar (the snapshots already hold them), and stale
temp files of a killed run removed at the next start in that folder (only ours)."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import FAST_ARGS

pytestmark = pytest.mark.slow


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_posthoc_profiles_stay_in_last_and_out_of_the_history_and_best_files(run_train, tmp_path, image_folder):
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "2", "--model-ema-posthoc", "--checkpoint-hist",
                              "2", "--output", tmp_path, "--experiment", "run"])
    assert code == 0, err
    run = tmp_path / "run"
    last = load(run / "last.pth.tar")
    assert last["posthoc_ema"]["step"] == 2 * 3  # 3 optimizer steps per epoch
    best_epoch = load(run / "model_best.pth.tar")["epoch"]
    for name in ("checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "model_best.pth.tar"):
        ckpt = load(run / name)
        assert "posthoc_ema" not in ckpt, name
        assert ckpt["state_dict_ema"].keys() == last["state_dict_ema"].keys()
    for key in ("state_dict", "state_dict_ema"):  # the same epoch-1 weights, without the profiles
        for k, v in last[key].items():
            assert torch.equal(v, load(run / "checkpoint-1.pth.tar")[key][k])
    inode = {n: os.stat(run / n).st_ino for n in os.listdir(run) if n.endswith(".pth.tar")}
    assert inode["model_best.pth.tar"] == inode[f"checkpoint-{best_epoch}.pth.tar"] != inode["last.pth.tar"]
    assert inode["checkpoint-0.pth.tar"] != inode["checkpoint-1.pth.tar"]


def test_without_posthoc_last_history_and_best_are_one_file(run_train, tmp_path, image_folder):
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "1", "--output", tmp_path, "--experiment", "run"])
    assert code == 0, err
    run = tmp_path / "run"
    stats = [os.stat(run / n) for n in ("last.pth.tar", "checkpoint-0.pth.tar", "model_best.pth.tar")]
    assert len({s.st_ino for s in stats}) == 1 and stats[0].st_nlink == 3


def test_stale_temp_files_of_ours_are_removed_at_the_next_start_and_others_are_kept(run_train, tmp_path,
                                                                                    image_folder):
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "1", "--output", tmp_path, "--experiment", "run"])
    assert code == 0, err
    run = tmp_path / "run"
    stale = [run / ".last.pth.tar.0123abcd.tmp", run / ".summary.csv.89abcdef.tmp"]
    (run / "posthoc").mkdir()
    stale.append(run / "posthoc" / ".posthoc-000000003-s0.050000.pt.fedcba98.tmp")
    kept = [run / "notes.tmp", run / ".mine.tmp", run / "keep.txt"]
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "2", "--resume", run / "last.pth.tar"])
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    for path in stale:
        assert f"removed {path}, a temp file left by an interrupted write" in err
