"""A write that fails mid-run (a full disk) ends the run with exit 2 and one line naming the
intact checkpoint and the command that resumes from it; no half-written file is left, and
the checkpoint named loads. Two ways to fill the disk: ``torch.save`` made to fail with
ENOSPC in-process (always runs), and a real 7 MiB tmpfs as the run folder (root only)."""
from __future__ import annotations

import errno
import re
import subprocess
import sys

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env

pytestmark = pytest.mark.slow


def _check_outcome(message: str, run, epoch: int | None = None) -> int:
    last = run / "last.pth.tar"
    match = re.fullmatch(rf"train\.py: error: could not write the outputs of epoch (\d+) \((\S+)\): No space left on "
                         rf"device; the last good checkpoint is {re.escape(str(last))} \(epoch (\d+)\); free space "
                         rf"\(or fix the folder\), then resume with: python \S*train\.py .* --resume "
                         rf"{re.escape(str(last))}", message)
    assert match, message
    failed, good = int(match.group(1)), int(match.group(3))
    assert failed == good + 1 and (epoch is None or good == epoch)
    assert match.group(2).startswith(str(run))
    assert torch.load(last, weights_only=True)["epoch"] == good  # intact, and the epoch it says
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))
    return good


def test_enospc_while_saving_an_epoch_exits_2_naming_the_intact_checkpoint(run_train, tmp_path, image_folder,
                                                                          monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # epoch 1's last.pth.tar: write part of it, then the disk is full
            with open(f, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, out, err = run_train([image_folder, *FAST_ARGS, "--epochs", "3", "--output", tmp_path, "--experiment", "run"])
    assert code == 2 and out == ""
    _check_outcome(err.strip().splitlines()[-1], tmp_path / "run", epoch=0)


def test_a_real_full_disk_exits_2_naming_the_intact_checkpoint(tmp_path, image_folder):
    disk = tmp_path / "disk"
    disk.mkdir()
    # 7 MiB: the first checkpoint (about 4.6 MB, its copies hard links) fits, a second one does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(image_folder), *FAST_ARGS, "--epochs", "5",
                               "--output", str(disk), "--experiment", "run"],
                              cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stdout == ""
        _check_outcome(proc.stderr.strip().splitlines()[-1], disk / "run")
        assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)
