"""Run folders are owned: a lock per folder, a fresh run never overwrites an earlier run, a
resumed timm run folder is never rewritten, a non-file where a run file goes is refused.

CLI behaviour runs through ``train.py`` in a subprocess; the folder rules themselves are
also checked directly on :func:`emakit.training.rundir.claim_run_folder` (no training)."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, subprocess_env
from emakit.training import UsageError
from emakit.training.rundir import LOCK_NAME, MARKER_NAME, RunLock, claim_run_folder, lock_holder, read_lock

TIMM_SUMMARY = "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n0,1.1,1.0,40.0,100.0,0.05\n"
TIMM_FLAGS = ("model", "batch_size", "grad_accum_steps", "opt", "lr", "layer_decay", "epochs", "model_ema",
              "model_ema_decay", "model_ema_warmup", "seed")  # flags timm's train.py has too
TIMM_ARGS_YAML = "model: test_resnet\nmodel_ema: true\nmodel_ema_decay: 0.9998\n"


def fast(data, out: Path, *extra, experiment: str = "run") -> list:
    return [data, *FAST_ARGS, "--output", out, "--experiment", experiment, *extra]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.is_dir())
            for p in sorted(folder.rglob("*"))}


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_stale_lock(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "proc_start": None,
                                                "started": "2026-01-01T00:00:00"}))


def assert_released(folder: Path) -> None:
    """The run's lock is let go: its file names nobody and another process takes it at once."""
    assert read_lock(str(folder)) is None and lock_holder(str(folder)) is None
    code = ("import sys; from emakit.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('taken')")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "taken", "")  # no takeover warning


@pytest.fixture(scope="module")
def first_run(image_folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, int]:
    """One finished 1-epoch run in ``out/run``, started over a stale lock of a dead process."""
    out = tmp_path_factory.mktemp("out")
    pid = dead_pid()
    write_stale_lock(out / "run", pid)
    proc = subprocess.run([sys.executable, "train.py", *map(str, fast(image_folder, out, "--epochs", "1"))],
                          cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    return out, proc, pid


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_log_line_and_released(first_run):
    out, proc, pid = first_run
    line = f"{out / 'run'}: took over the stale lock of pid {pid} on host {socket.gethostname()}"
    assert line in proc.stderr and line in (out / "run" / "train.log").read_text()
    assert_released(out / "run")
    assert json.loads((out / "run" / MARKER_NAME).read_text())["tool"] == "emakit"


def test_a_fresh_run_into_a_folder_holding_a_run_goes_to_a_suffixed_folder(first_run, image_folder,
                                                                           train_subprocess):
    out, _, _ = first_run
    before = snapshot(out / "run")
    proc = train_subprocess(fast(image_folder, out, "--epochs", "1"))
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out / "run") == before  # the first run's checkpoints are untouched
    assert (f"{out / 'run'} already holds a run (args.yaml, summary.csv, train.log, last.pth.tar): this run writes "
            f"to {out / 'run-1'} instead, so nothing of it is overwritten") in proc.stderr
    assert proc.stdout.strip().endswith(f"outputs in {out / 'run-1'}")
    assert torch.load(out / "run-1" / "last.pth.tar", weights_only=True)["epoch"] == 0
    assert_released(out / "run-1")


def test_a_second_run_into_a_folder_in_use_exits_2_with_one_line_and_writes_nothing(tmp_path, image_folder,
                                                                                     train_subprocess):
    """Two runs of the same command at once: the second one is refused while the first trains."""
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "train.py", *map(str, fast(image_folder, tmp_path, "--epochs", "1000"))],
                             cwd=str(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    folder = tmp_path / "run"
    try:
        deadline = time.monotonic() + 240
        while not (folder / "args.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (folder / "args.yaml").exists() and first.poll() is None
        holder = read_lock(str(folder))
        assert holder.pid == first.pid
        written = {name: (folder / name).stat().st_mtime_ns for name in ("args.yaml", MARKER_NAME, LOCK_NAME)}
        proc = train_subprocess(fast(image_folder, tmp_path, "--epochs", "1"))
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {folder} is in use by another run (pid {first.pid} on host {socket.gethostname()}, "
        f"started {holder.started}); wait for it to end or pass another --experiment (if no run uses it, delete "
        f"{folder / LOCK_NAME})")
    assert proc.stderr.count("error:") == 1 and "output folder:" not in proc.stderr
    assert {name: (folder / name).stat().st_mtime_ns for name in written} == written  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no run-1


def test_a_lock_held_by_a_live_process_is_refused_and_released_by_its_holder(tmp_path):
    folder = tmp_path / "run"
    lock = RunLock(str(folder)).acquire()  # held by this (live) pytest process
    with pytest.raises(UsageError, match=f"is in use by another run \\(pid {os.getpid()} on host"):
        claim_run_folder(str(folder))
    lock.release()
    assert_released(folder)
    path, again = claim_run_folder(str(folder))
    again.release()
    assert path == str(folder)


@pytest.mark.parametrize("name", ["last.pth.tar", "summary.csv", "train.log"])
def test_a_directory_where_a_run_file_goes_exits_2_before_training(tmp_path, image_folder, run_train, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    before = snapshot(tmp_path)
    code, _, err = run_train(fast(image_folder, tmp_path, "--epochs", "1"))
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"train.py: error: {tmp_path / 'run' / name} is a directory, but the run writes its {name} there; move it "
        "away or pass another --experiment")
    assert "epoch 0/0" not in err and snapshot(tmp_path) == before


def test_resuming_a_timm_checkpoint_leaves_timms_folder_untouched_and_writes_a_new_one(first_run, tmp_path,
                                                                                      image_folder,
                                                                                      train_subprocess):
    out, _, _ = first_run
    ours = torch.load(out / "run" / "last.pth.tar", weights_only=True)
    timm_run = tmp_path / "timm_run"
    timm_run.mkdir()
    # What timm's train.py leaves: summary.csv with eval_* columns (the EMA's metrics when --model-ema),
    # args.yaml, and a checkpoint with Namespace args, no `ema` metadata, module.-prefixed weights (DDP).
    (timm_run / "summary.csv").write_text(TIMM_SUMMARY)
    (timm_run / "args.yaml").write_text(TIMM_ARGS_YAML)
    torch.save({"epoch": 0, "arch": "test_resnet", "version": 2, "metric": 40.0,
                "state_dict": {f"module.{k}": v for k, v in ours["state_dict"].items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ours["state_dict_ema"].items()},
                "optimizer": ours["optimizer"], "args": argparse.Namespace(**{k: ours["args"][k] for k in TIMM_FLAGS})},
               timm_run / "last.pth.tar")
    before = snapshot(timm_run)
    proc = train_subprocess([image_folder, *FAST_ARGS, "--epochs", "2", "--resume", timm_run / "last.pth.tar"])
    assert proc.returncode == 0, proc.stderr
    assert snapshot(timm_run) == before
    assert (timm_run / "summary.csv").read_text() == TIMM_SUMMARY
    assert (f"--resume {timm_run / 'last.pth.tar'}: its folder {timm_run} is not an emakit run folder (its "
            "checkpoint was not written by emakit's train.py); its files stay untouched") \
        in proc.stderr
    new = tmp_path / "timm_run-1"
    assert proc.stdout.strip().endswith(f"outputs in {new}")
    ckpt = torch.load(new / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["ema"]["num_updates"] == 2 * 3  # timm's step count continued
    assert "set to 3 = (epoch 0 + 1) x 3 optimizer steps per epoch" in proc.stderr
    assert (new / "summary.csv").read_text().splitlines()[0].startswith("epoch,train_loss,eval_loss,eval_top1")
    assert (new / MARKER_NAME).exists()


# ----------------------------------------------------------------------------------- the rules, directly
def test_resume_continues_in_place_in_a_marked_or_pre_marker_emakit_folder(tmp_path):
    marked, legacy = tmp_path / "marked", tmp_path / "legacy"
    for folder in (marked, legacy):
        folder.mkdir()
        (folder / "last.pth.tar").write_bytes(b"x")
        (folder / "summary.csv").write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,ema_eval_loss,"
                                            "ema_eval_top1,ema_eval_top5,lr\n")
    (marked / MARKER_NAME).write_text("{}")
    for folder, by_emakit in ((marked, False), (legacy, True)):
        path, lock = claim_run_folder(str(folder), resume=str(folder / "last.pth.tar"), resumed_by_emakit=by_emakit)
        assert path == str(folder) and read_lock(path).pid == os.getpid()
        lock.release()


def test_a_pre_marker_folder_with_timms_summary_is_not_ours(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "last.pth.tar").write_bytes(b"x")
    (folder / "summary.csv").write_text(TIMM_SUMMARY)
    path, lock = claim_run_folder(str(folder), resume=str(folder / "last.pth.tar"), resumed_by_emakit=True)
    lock.release()
    assert path == f"{folder}-1"


def test_suffixes_skip_every_folder_that_holds_a_run(tmp_path):
    for name in ("run", "run-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"checkpoint-{len(name)}.pth.tar").write_bytes(b"x")
    (tmp_path / "run-2").mkdir()  # empty: free
    path, lock = claim_run_folder(str(tmp_path / "run"))
    lock.release()
    assert path == str(tmp_path / "run-2")


def test_the_default_timestamped_folder_moves_on_when_locked_but_a_named_one_refuses(tmp_path):
    held = RunLock(str(tmp_path / "stamp")).acquire()
    try:
        path, lock = claim_run_folder(str(tmp_path / "stamp"), named=False)
        lock.release()
        assert path == str(tmp_path / "stamp-1")
        with pytest.raises(UsageError, match="is in use by another run"):
            claim_run_folder(str(tmp_path / "stamp"), named=True)
    finally:
        held.release()


# ----------------------------------------------------------------------------------- the lock itself
def test_the_lock_of_a_killed_process_is_free_and_taken_over_with_its_holder_named(tmp_path, caplog):
    """kill -9 leaves the lock file naming its holder, but the kernel has dropped the OS lock:
    the next run takes it over and says whose it was; while the holder lived it was refused."""
    folder = tmp_path / "run"
    code = ("import os, signal, sys; from emakit.training.rundir import RunLock; "
            "held = RunLock(sys.argv[1]).acquire(); print(os.getpid(), flush=True); sys.stdin.readline(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        pid = int(holder.stdout.readline())
        with pytest.raises(UsageError, match=f"is in use by another run \\(pid {pid} on host"):
            claim_run_folder(str(folder))
    finally:
        holder.stdin.close()  # the holder reads EOF and kills itself (SIGKILL: no release)
        holder.wait(timeout=60)
    assert holder.returncode == -9 and read_lock(str(folder)).pid == pid  # left behind, naming it
    with caplog.at_level(logging.WARNING, logger="emakit"):
        path, lock = claim_run_folder(str(folder))
    try:
        assert path == str(folder) and read_lock(path).pid == os.getpid()
        assert f"{folder}: took over the stale lock of pid {pid} on host {socket.gethostname()}" in caplog.text
    finally:
        lock.release()


@pytest.mark.parametrize("text, shown", [
    (json.dumps({"pid": 4242, "host": "another-host.example", "started": "2026-01-01T00:00:00"}),
     "pid 4242 on host another-host.example, started 2026-01-01T00:00:00"),
    ("garbage", "an unreadable lock ('garbage')"),
])
def test_a_free_lock_naming_another_host_or_unreadable_is_refused_not_taken_over(tmp_path, text, shown):
    """A run on another host may hold a lock this host cannot see (a network filesystem need
    not carry it): such a lock is refused, as an unreadable one; the timestamped default name
    moves on to the next suffix; nothing of the lock file is changed."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(text)
    with pytest.raises(UsageError) as error:
        claim_run_folder(str(folder))
    assert str(error.value) == (f"{folder} is in use by another run ({shown}); wait for it to end or pass another "
                                f"--experiment (if no run uses it, delete {folder / LOCK_NAME})")
    with pytest.raises(UsageError, match="is in use by another run"):
        RunLock(str(folder)).acquire()
    path, lock = claim_run_folder(str(folder), named=False)
    lock.release()
    assert path == f"{folder}-1" and (folder / LOCK_NAME).read_text() == text


@pytest.mark.parametrize("failing, precreated", [(LOCK_NAME, False), (MARKER_NAME, False), ("args.yaml", False),
                                                 ("args.yaml", True)])
def test_a_full_disk_while_claiming_the_run_folder_exits_2_and_leaves_nothing(tmp_path, image_folder, run_train,
                                                                              monkeypatch, failing, precreated):
    """ENOSPC when the lock's holder, the marker or args.yaml is written: exit 2 with one line
    naming the folder and the fix, and the folder as it was (gone when the run created it)."""
    folder = tmp_path / "out" / "run"
    if precreated:
        folder.mkdir(parents=True)
    real_fsync = os.fsync

    def fsync(fd):  # what a full disk reports when the data reaches it
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name == failing or (name.startswith(f".{failing}.") and name.endswith(".tmp")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, out, err = run_train(fast(image_folder, tmp_path / "out", "--epochs", "1"))
    assert (code, out) == (2, ""), err
    assert err.strip().splitlines()[-1] == (f"train.py: error: cannot write to output folder {folder}: No space left "
                                            "on device; pass --output PATH with a writable folder")
    assert "Traceback" not in err
    if precreated:
        assert list(folder.iterdir()) == []
    else:
        assert not folder.exists() and list((tmp_path / "out").iterdir()) == []
