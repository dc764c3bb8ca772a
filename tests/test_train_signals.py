"""Stop signals: SIGTERM / SIGINT / SIGHUP end a run at a step boundary with a resumable
mid-epoch ``last.pth.tar``, one line naming it and the exact resume command, and exit
128 + the signal number; resuming gives bitwise the weights, EMA, optimizer and metrics of
the run that was never stopped (one process with 0 or 1 loader workers, and torchrun x2; CPU,
fixed seed).

The signal is sent from a deterministic point: a logging handler installed by the test
(in-process runs, or a wrapper script under torchrun) fires it when the run logs a given
training step, so it lands in the middle of an epoch however loaded the machine is."""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env
from test_train_distributed import free_port, torchrun
from test_train_e2e import assert_same, load

pytestmark = pytest.mark.slow

# 24 training images, batch 2: 12 optimizer steps per epoch; a log line for every step.
ARGS = [*FAST_ARGS, "-b", "2", "--log-interval", "1", "--warmup-epochs", "0", "--lr", "0.05"]
COMPARED = ("state_dict", "state_dict_ema", "ema", "optimizer", "metrics", "epoch")


class _SignalAt(logging.Handler):
    """Sends ``signum`` to ``pid`` when a log record starts with ``prefix``."""

    def __init__(self, prefix: str, signum: int, pid: int) -> None:
        super().__init__()
        self.prefix, self.signum, self.pid, self.fired = prefix, signum, pid, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired and record.getMessage().startswith(self.prefix):
            self.fired = True
            os.kill(self.pid, self.signum)


def _run_signalled(run_train, argv: list, prefix: str, signum: int) -> tuple[int, str]:
    handler = _SignalAt(prefix, signum, os.getpid())
    logging.getLogger("emakit").addHandler(handler)
    try:
        code, _, err = run_train(argv)
    finally:
        logging.getLogger("emakit").removeHandler(handler)
    assert handler.fired, err[-2000:]
    return code, err


def _resume_argv(message: str) -> list[str]:
    """The arguments of the command the stop message prints (after 'train.py')."""
    command = message.split("resume with: ", 1)[1]
    words = shlex.split(command)
    return words[words.index("train.py") + 1:] if "train.py" in words else \
        words[next(i for i, w in enumerate(words) if w.endswith("train.py")) + 1:]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run_bitwise(run_train, tmp_path, image_folder,
                                                                            workers):
    # With loader workers too: every sample's augmentation is seeded from (seed, epoch, index).
    base = [image_folder, *ARGS, "--workers", workers, "--epochs", "2", "--output", tmp_path]
    code, _, err = run_train([*base, "--experiment", "straight"])
    assert code == 0, err

    code, err = _run_signalled(run_train, [*base, "--experiment", "stopped"], "train 0 [4/12]", signal.SIGTERM)
    last = tmp_path / "stopped" / "last.pth.tar"
    assert code == 143, err[-2000:]
    message = err.strip().splitlines()[-1]
    # The handler runs right after the step-4 log line; the stop flag is polled before step 5.
    assert re.fullmatch(rf"train\.py: stopped by SIGTERM at epoch 0, step 5/12: wrote the resumable checkpoint "
                        rf"{re.escape(str(last))}; resume with: python \S*train\.py .* --resume "
                        rf"{re.escape(str(last))}", message), message
    ckpt = load(last)
    position = ckpt["train_position"]
    assert ckpt["epoch"] == -1 and position["epoch"] == 0 and position["steps_done"] == 5
    assert position["batches_done"] == 5 and position["processes"] == 1
    assert not list((tmp_path / "stopped").glob(".*.tmp"))
    assert not (tmp_path / "stopped" / "checkpoint-0.pth.tar").exists()  # mid-epoch: not a kept epoch

    argv = _resume_argv(message)
    assert argv[-2:] == ["--resume", str(last)] and "--experiment" in argv
    code, _, err = run_train(argv)
    assert code == 0, err
    assert "continuing epoch 0 at step 5/12" in err
    a, b = load(tmp_path / "straight" / "last.pth.tar"), load(last)
    for key in COMPARED:
        assert_same(a[key], b[key], key)
    assert "train_position" not in b
    first = load(tmp_path / "straight" / "checkpoint-0.pth.tar")
    assert_same(first["state_dict_ema"], load(tmp_path / "stopped" / "checkpoint-0.pth.tar")["state_dict_ema"])


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGHUP, 129)], ids=["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_stop_with_their_exit_status(run_train, tmp_path, image_folder, signum, status):
    code, err = _run_signalled(run_train, [image_folder, *ARGS, "--epochs", "1", "--output", tmp_path,
                                           "--experiment", "run"], "train 0 [2/12]", signum)
    assert code == status, err[-2000:]
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1].startswith(f"train.py: stopped by {name} at epoch 0, step 3/12: ")
    assert load(tmp_path / "run" / "last.pth.tar")["train_position"]["steps_done"] == 3


def test_a_burst_of_signals_from_outside_stops_once_with_an_intact_checkpoint(tmp_path, image_folder):
    """SIGINT then SIGTERM (what a Ctrl-C under torchrun delivers), sent by another process:
    the first decides the exit status, the second is only logged; nothing is torn."""
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, [image_folder, *ARGS, "--epochs", "50",
                                                              "--output", tmp_path, "--experiment", "run"])]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "train 0 [2/12]" in line:
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    last = tmp_path / "run" / "last.pth.tar"
    message = err.strip().splitlines()[-1]
    assert message.startswith("train.py: stopped by SIGINT at epoch 0, step ") and f"--resume {last}" in message
    assert "SIGTERM received: already stopping (after SIGINT)" in err
    steps = int(re.search(r"step (\d+)/12", message).group(1))
    assert load(last)["train_position"]["steps_done"] == steps  # loads with weights_only: intact
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_sigterm_before_training_starts_exits_143_and_says_nothing_was_written(tmp_path, image_folder):
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, [image_folder, *ARGS, "--epochs", "1",
                                                              "--output", tmp_path, "--experiment", "run"])]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.split(" ", 1)[-1].startswith("data: "):  # logged while building, before the model
                proc.send_signal(signal.SIGTERM)
                break
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        "train.py: stopped by SIGTERM before training started: no checkpoint was written"
    assert not (tmp_path / "run").exists()


# Under torchrun: rank 0 signals the torchrun agent (its parent) when it logs a given step;
# the agent forwards SIGTERM to both workers, as it does for its own SIGTERM or a Ctrl-C.
# Each rank writes its exit status to STATUS_FILE.rank<N>.
SIGNALLING_TRAIN = r'''
import logging, os, signal, sys
sys.path.insert(0, os.environ["REPO"])
import train

class SignalAgent(logging.Handler):
    fired = False
    def emit(self, record):
        at = os.environ.get("SIGNAL_AT")
        if at and not self.fired and record.getMessage().startswith(at):
            self.fired = True
            os.kill(os.getppid(), signal.SIGTERM)

if os.environ.get("RANK") == "0":
    logging.getLogger("emakit").addHandler(SignalAgent())
code = train.main(sys.argv[1:])
with open(os.environ["STATUS_FILE"] + ".rank" + os.environ["RANK"], "w") as f:
    f.write(str(code))
sys.exit(code)
'''


def _torchrun(tmp_path: Path, image_folder: Path, experiment: str, *extra: str, signal_at: str = "") -> tuple:
    script = tmp_path / "signalling_train.py"
    script.write_text(SIGNALLING_TRAIN)
    status = tmp_path / f"status-{experiment}"
    cmd = [*torchrun(), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script),
           *map(str, [image_folder, *ARGS, "--device", "cpu", "--epochs", "2", "--output", tmp_path / "out",
                      "--experiment", experiment, *extra])]
    proc = subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), STATUS_FILE=str(status), SIGNAL_AT=signal_at),
                          capture_output=True, text=True, timeout=400)
    codes = [int((tmp_path / f"status-{experiment}.rank{r}").read_text()) for r in range(2)]
    return proc, codes


def test_torchrun_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run_bitwise(tmp_path, image_folder):
    proc, codes = _torchrun(tmp_path, image_folder, "straight")
    assert codes == [0, 0], proc.stderr[-3000:]

    proc, codes = _torchrun(tmp_path, image_folder, "stopped", signal_at="train 0 [2/6]")
    assert codes == [143, 143], proc.stderr[-3000:]
    last = tmp_path / "out" / "stopped" / "last.pth.tar"
    messages = [line for line in proc.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(messages) == 1, proc.stderr[-3000:]  # rank 0 alone reports
    match = re.fullmatch(rf"train\.py: stopped by SIGTERM at epoch 0, step (\d)/6: wrote the resumable checkpoint "
                         rf"{re.escape(str(last))}; resume with: torchrun --standalone --nproc_per_node=2 .* "
                         rf"--resume {re.escape(str(last))}", messages[0])
    assert match, messages[0]
    position = load(last)["train_position"]
    assert position["steps_done"] == int(match.group(1)) and 3 <= position["steps_done"] < 6
    assert position["processes"] == 2 and len(position["ranks"]) == 2

    proc, codes = _torchrun(tmp_path, image_folder, "stopped", "--resume", str(last))
    assert codes == [0, 0], proc.stderr[-3000:]
    a, b = load(tmp_path / "out" / "straight" / "last.pth.tar"), load(last)
    for key in COMPARED:
        assert_same(a[key], b[key], key)


def test_a_mid_epoch_checkpoint_refuses_another_batch_size_and_names_the_way_out(run_train, tmp_path,
                                                                               image_folder):
    code, err = _run_signalled(run_train, [image_folder, *ARGS, "--epochs", "2", "--output", tmp_path,
                                           "--experiment", "run"], "train 1 [2/12]", signal.SIGTERM)
    assert code == 143, err[-2000:]
    last = tmp_path / "run" / "last.pth.tar"
    code, _, err = run_train([image_folder, *ARGS, "-b", "4", "--epochs", "2", "--resume", last])
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"train.py: error: --resume {last} stopped in the middle of epoch 1; continuing it needs "
                           "the same processes, batch_size, grad_accum_steps (batch_size 2 -> 4): use those, or "
                           "resume from checkpoint-0.pth.tar (the end of the epoch before)")


def test_ctrl_c_just_after_a_checkpoint_landed_names_that_checkpoint(run_train, tmp_path, image_folder):
    # "epoch 0/1: ..." is logged right after epoch 0's checkpoint was written.
    code, err = _run_signalled(run_train, [image_folder, *ARGS, "--epochs", "2", "--output", tmp_path,
                                           "--experiment", "run"], "epoch 0/1:", signal.SIGINT)
    last = tmp_path / "run" / "last.pth.tar"
    assert code == 130, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"train.py: stopped by SIGINT after epoch 0: the resumable checkpoint is {last} "
                              f"(end of epoch 0); resume with: python ")
    assert "no checkpoint was written" not in err
    ckpt = load(last)
    assert ckpt["epoch"] == 0 and "train_position" not in ckpt


def test_a_signal_after_the_last_epoch_lets_the_finished_run_report_success(run_train, tmp_path, image_folder):
    code, err = _run_signalled(run_train, [image_folder, *ARGS, "--epochs", "1", "--output", tmp_path,
                                           "--experiment", "run"], "epoch 0/0:", signal.SIGTERM)
    assert code == 0, err[-2000:]
    assert "SIGTERM received" in err and "best raw top1" in err


def test_a_malformed_train_position_is_refused_in_one_line(run_train, tmp_path, image_folder):
    code, err = _run_signalled(run_train, [image_folder, *ARGS, "--epochs", "1", "--output", tmp_path,
                                           "--experiment", "run"], "train 0 [2/12]", signal.SIGTERM)
    assert code == 143, err[-2000:]
    last = tmp_path / "run" / "last.pth.tar"
    ckpt = load(last)
    ckpt["train_position"]["ranks"][0]["progress"]["surprise"] = 1
    bad = tmp_path / "bad.pth.tar"
    torch.save(ckpt, bad)
    code, _, err = run_train([image_folder, *ARGS, "--epochs", "1", "--resume", bad])
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"train.py: error: --resume {bad}: its train_position entry is malformed; "
                                            "resume from an epoch-end checkpoint (checkpoint-<epoch>.pth.tar) instead")
