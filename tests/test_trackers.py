"""Trackers (emakit/training/trackers.py): TensorBoard event files whose scalars, read back with
tensorboard's own EventAccumulator, hold raw and every EMA's metrics for every epoch and the
train loss / lr per log interval; an offline wandb run folder; a missing package stops the run
before anything is written; a tracker that fails to start is a warning, never a lost run."""
from __future__ import annotations

import csv
import sys
import tempfile

import pytest

from conftest import FAST_ARGS

ARGS = [*FAST_ARGS, "--epochs", "2", "--log-interval", "1", "--model-ema-decay", "0.9,0.99"]


def test_epoch_scalars_name_raw_and_every_ema():
    from emakit.training.trackers import epoch_scalars

    row = {"epoch": 3, "train_loss": 1.0, "eval_top1": 60.0, "eval_top5": 95.0, "eval_loss": 0.6,  # timm's: the EMA
           "raw_eval_top1": 50.0, "raw_eval_top5": 90.0, "raw_eval_loss": 0.7,
           "ema_eval_top1": 60.0, "ema_eval_loss": 0.6, "ema1_eval_top1": 55.0, "ema_eval_top5": None, "lr": 0.1}
    assert epoch_scalars(row) == {"top1/raw": 50.0, "top5/raw": 90.0, "loss/raw": 0.7, "top1/ema": 60.0,
                                  "loss/ema": 0.6, "top1/ema1": 55.0}


@pytest.mark.parametrize("flag,package", [("--log-tensorboard", "tensorboard"), ("--log-wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_exit_2_nothing_written(run_train, tmp_path, monkeypatch, flag,
                                                                      package):
    monkeypatch.setitem(sys.modules, package, None)  # import -> ImportError
    code, _, err = run_train([tmp_path / "nodata", *ARGS, flag, "--output", tmp_path / "out"])
    assert code == 2
    assert err.strip().splitlines() == [f"train.py: error: {flag} needs the {package} package: pip install {package}"]
    assert not (tmp_path / "out").exists()


def _offline_wandb(monkeypatch, tmp_path) -> None:
    for key, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tmp = tmp_path / "tmp"  # wandb leaves tmp*wandb-artifacts / -media folders in the temp folder
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))


@pytest.mark.slow
def test_tensorboard_holds_raw_and_every_ema_per_epoch_and_wandb_runs_offline(run_train, image_folder, tmp_path,
                                                                              monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _offline_wandb(monkeypatch, tmp_path)
    code, _, err = run_train([image_folder, *ARGS, "--output", tmp_path, "--experiment", "run", "--log-tensorboard",
                              "--log-wandb", "--wandb-tags", "a", "b"])
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    with open(run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for metric in ("top1", "top5", "loss"):
        for name, column in (("raw", f"raw_eval_{metric}"), ("ema", f"ema_eval_{metric}"),
                             ("ema1", f"ema1_eval_{metric}")):
            assert f"{metric}/{name}" in tags, tags
            got = [(e.step, e.value) for e in events.Scalars(f"{metric}/{name}")]
            assert got == [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6)) for r in rows]
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 7)) and len(events.Scalars("train/lr")) == 6  # 3 steps/epoch, --log-interval 1
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    record = offline[0].read_bytes()  # the run's records: the flags (config) and the logged keys
    for needle in (b"test_resnet", b"top1/raw", b"top1/ema1", b"train/loss"):
        assert needle in record, needle


@pytest.mark.slow
def test_a_tracker_that_cannot_start_is_a_warning_and_the_run_completes(run_train, image_folder, tmp_path):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_train([image_folder, *ARGS, "--epochs", "1", "--output", tmp_path, "--experiment", "run",
                              "--log-tensorboard", blocker / "tb"])
    assert code == 0, err[-3000:]
    assert "TensorBoard did not start" in err and "the run goes on without it" in err
    assert (tmp_path / "run" / "last.pth.tar").exists()
