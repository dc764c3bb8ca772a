"""Checksums of the files we write (issue 19, cause 6).

Every torch file emakit writes (checkpoints, exports, post-hoc snapshots) carries the SHA-256
of its bytes in the zip archive's comment. torch.load and timm read it unchanged; a full read
checks it, so a checkpoint whose bytes were damaged after the write (here: 4 KiB zeroed
inside an optimizer buffer, which torch.load itself never notices) is refused with one line
naming the file and the previous intact checkpoint, instead of resuming with exit 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env
from emakit.checkpoint import (CheckpointSaver, DamagedCheckpointError, load_checkpoint, previous_intact_checkpoint,
                               save_checkpoint, verify_checksum)

timm = pytest.importorskip("timm")


def _zero_inside(path: Path, tensor: torch.Tensor, size: int = 4096) -> None:
    """Overwrite ``size`` bytes of ``tensor``'s record in ``path`` with zeros, in place."""
    data = path.read_bytes()
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0 and data.find(tensor.numpy().tobytes()[:64], at + 1) < 0  # found once
    assert tensor.numel() * tensor.element_size() >= size
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(size))


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10).state_dict()


def test_our_files_carry_a_checksum_that_timm_and_torch_ignore(tmp_path):
    state = _model_state(0)
    path = tmp_path / "last.pth.tar"
    save_checkpoint({"epoch": 1, "state_dict": state, "state_dict_ema": state}, path)
    assert verify_checksum(path) is True
    model = timm.create_model("test_resnet", num_classes=10)
    timm.models.load_checkpoint(model, str(path), use_ema=True)  # timm's reader, unchanged
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert torch.load(path, weights_only=True, mmap=True)["epoch"] == 1
    assert load_checkpoint(path)["epoch"] == 1


def test_a_file_without_checksum_loads_unchecked(tmp_path):
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": _model_state(0)}, path)  # what timm (or an older emakit) writes
    assert verify_checksum(path) is None
    assert "state_dict" in load_checkpoint(path)


def test_zeroed_bytes_are_refused_naming_the_previous_intact_checkpoint(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=3)
    for epoch in range(3):
        saver.save({"state_dict": _model_state(epoch)}, epoch, float(epoch))
    last = tmp_path / "last.pth.tar"
    assert os.path.samefile(last, tmp_path / "checkpoint-2.pth.tar")  # a hard link: damaged with it
    _zero_inside(last, _model_state(2)["fc.weight"], size=1024)
    with pytest.raises(DamagedCheckpointError) as info:
        load_checkpoint(last)
    message = str(info.value)
    assert str(last) in message and "checksum" in message
    assert f"the previous intact checkpoint is {tmp_path / 'checkpoint-1.pth.tar'}" in message
    assert previous_intact_checkpoint(tmp_path / "checkpoint-1.pth.tar") == str(tmp_path / "checkpoint-0.pth.tar")


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_with_zeroed_optimizer_bytes(image_folder, tmp_path):
    base = [sys.executable, str(REPO / "train.py"), str(image_folder), *FAST_ARGS, "--output", str(tmp_path),
            "--experiment", "run", "--momentum", "0.9"]
    proc = subprocess.run([*base, "--epochs", "3"], cwd=str(REPO), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    last = run / "last.pth.tar"
    ckpt = torch.load(last, weights_only=True)
    biggest = max((s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values()), key=torch.Tensor.numel)
    _zero_inside(last, biggest)
    assert torch.load(last, weights_only=True)["epoch"] == 2  # torch alone loads it without a word
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    proc = subprocess.run([*base, "--epochs", "4", "--resume", str(last)], cwd=str(REPO), env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 1, proc.stderr
    assert str(last) in lines[0] and "checksum" in lines[0]
    previous = previous_intact_checkpoint(last)
    assert previous is not None and Path(previous).name.startswith("checkpoint-")
    assert f"the previous intact checkpoint is {previous}" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing written

    proc = subprocess.run([sys.executable, str(REPO / "validate.py"), str(image_folder), "--checkpoint", str(last)],
                          cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "checksum" in proc.stderr and str(last) in proc.stderr


def test_a_damaged_training_checkpoint_is_still_never_an_output_target(tmp_path):
    """Output flags (``-o``, ``--results-file``, ``--export-ema``) never replace a training
    checkpoint; one whose bytes no longer match its checksum is still one (its keys are read
    memory-mapped, without the full read that would refuse it)."""
    from emakit.training.kinds import is_training_checkpoint

    state = _model_state(0)
    path = tmp_path / "last.pth.tar"
    save_checkpoint({"epoch": 1, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    _zero_inside(path, state["conv1.weight"] if "conv1.weight" in state else next(
        v for v in state.values() if v.numel() * v.element_size() >= 4096))
    with pytest.raises(DamagedCheckpointError):
        load_checkpoint(path)
    assert is_training_checkpoint(str(path))
