"""Signals as launchers send them, and signals during start-up.

``timeout``, Slurm and Kubernetes signal a whole process group: the data-loader worker
processes get the SIGTERM too, and torchrun forwards its own SIGTERM to each rank's group
(``os.killpg``). A stop still ends with the one stop line, 128 + the signal, a resumable
mid-epoch ``last.pth.tar``, and a resume bitwise equal to the run that was never stopped.

The signal is sent from a deterministic point: a wrapper script adds a logging handler
that, when rank 0 logs a given training step, signals the group and waits until this
process has received the signal, so the stop lands on the next step however loaded the
machine is. Start-up signals are sent by an audit hook at the moment ``import torch``
begins (``sys.addaudithook``), before any of torch is loaded.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_ARGS, REPO, subprocess_env
from test_train_distributed import free_port, torchrun
from test_train_e2e import assert_same, load
from test_train_signals import ARGS, COMPARED, _resume_argv

# train.py as `python train.py ARGS` runs it, plus: when rank 0 logs a line starting with
# SIGNAL_AT, SIGNAL goes to a whole process group (this process's own; under torchrun, the
# launcher's), and the logging call returns once this process has received it. Each rank
# writes its exit status to STATUS_FILE.rank<N> when STATUS_FILE is set.
GROUP_SIGNALLING_TRAIN = r'''
import logging, os, signal, subprocess, sys, time
sys.path.insert(0, os.environ["REPO"])
from emakit.training import lifecycle

received = []
_handle = lifecycle.StopSignals._handle

def counting_handle(self, signum, frame):
    received.append(signum)
    return _handle(self, signum, frame)

lifecycle.StopSignals._handle = counting_handle


class SignalGroup(logging.Handler):
    fired = False

    def emit(self, record):
        at = os.environ.get("SIGNAL_AT")
        if self.fired or not at or not record.getMessage().startswith(at):
            return
        self.fired = True
        # The group of torchrun (the parent), or this process's own: either must lead its own
        # group (started with start_new_session), so that no process outside the test is hit.
        leader = os.getppid() if "RANK" in os.environ else os.getpid()
        assert os.getpgid(leader) == leader, "the signalled group must be the test's own"
        # Sent by another process, as `timeout` or Slurm would (not by the loader workers' parent).
        subprocess.run([sys.executable, "-I", "-c", "import os, sys; os.killpg(int(sys.argv[1]), int(sys.argv[2]))",
                        str(leader), str(int(getattr(signal, os.environ["SIGNAL"])))])
        deadline = time.monotonic() + 300
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)


if os.environ.get("RANK", "0") == "0":
    logging.getLogger("emakit").addHandler(SignalGroup())
import train
code = train.main(sys.argv[1:])
if os.environ.get("STATUS_FILE"):
    with open(os.environ["STATUS_FILE"] + ".rank" + os.environ.get("RANK", "0"), "w") as f:
        f.write(str(code))
sys.exit(code)
'''


def _wrapper(tmp_path: Path) -> Path:
    script = tmp_path / "group_signalling_train.py"
    script.write_text(GROUP_SIGNALLING_TRAIN)
    return script


def _signalled_group(tmp_path: Path, argv: list, signal_at: str, signum: int) -> subprocess.CompletedProcess:
    """train.py in a process group of its own, signalled as a whole when it logs ``signal_at``."""
    cmd = [sys.executable, str(_wrapper(tmp_path)), *map(str, argv)]
    return subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), SIGNAL_AT=signal_at, SIGNAL=signal.Signals(signum).name),
                          capture_output=True, text=True, timeout=600, start_new_session=True)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_and_resumes_bitwise(train_subprocess, tmp_path,
                                                                                    image_folder):
    # Every run a child process with the same environment (one compute thread): bitwise comparable.
    base = [image_folder, *ARGS, "--workers", "2", "--epochs", "2", "--output", tmp_path]
    proc = train_subprocess([*base, "--experiment", "straight"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = _signalled_group(tmp_path, [*base, "--experiment", "stopped"], "train 0 [4/12]", signal.SIGTERM)
    last = tmp_path / "stopped" / "last.pth.tar"
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "DataLoader worker" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"train\.py: stopped by SIGTERM at epoch 0, step 5/12: wrote the resumable checkpoint "
                        rf"{re.escape(str(last))}; resume with: python \S*train\.py .* --resume "
                        rf"{re.escape(str(last))}", message), message
    position = load(last)["train_position"]
    assert (load(last)["epoch"], position["epoch"], position["steps_done"]) == (-1, 0, 5)
    assert not list((tmp_path / "stopped").glob(".*.tmp"))

    proc = train_subprocess(_resume_argv(message), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(tmp_path / "straight" / "last.pth.tar"), load(last)
    for key in COMPARED:
        assert_same(a[key], b[key], key)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_to_the_process_group_reach_the_main_process_alone(tmp_path, image_folder, signum):
    """The workers ignore them: one "received" line (the main process's), its exit status."""
    proc = _signalled_group(tmp_path, [image_folder, *ARGS, "--workers", "2", "--epochs", "1", "--output", tmp_path,
                                       "--experiment", "run"], "train 0 [2/12]", signum)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert proc.stderr.count(f"{name} received") == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"train.py: stopped by {name} at epoch 0, step 3/12: ")
    assert load(tmp_path / "run" / "last.pth.tar")["train_position"]["steps_done"] == 3


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _ReportsSignals:
    """A dataset whose items say, in the loader worker that fetches them, its pid, whether
    SIGINT and SIGHUP are ignored there, and which stop signals are blocked."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, list[int], list[int]]:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return (os.getpid(), [int(signal.getsignal(s) == signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGHUP)],
                [int(s in blocked) for s in STOP_SIGNALS])


def _kill_from_another_process(pid: int, signum: int) -> None:
    subprocess.run([sys.executable, "-I", "-c", "import os, sys; os.kill(int(sys.argv[1]), int(sys.argv[2]))",
                    str(pid), str(int(signum))], check=True)


def test_a_loader_worker_ignores_stop_signals_from_others_and_ends_on_its_parents_sigterm():
    import multiprocessing

    from emakit.training.data import StopSafeLoader

    batches = iter(StopSafeLoader(_ReportsSignals(), batch_size=None, num_workers=1, persistent_workers=True))
    pid, ignored, blocked = next(batches)
    assert (ignored, blocked) == ([1, 1], [0, 1, 0])  # SIGTERM: blocked, taken by the worker's own thread
    for signum in STOP_SIGNALS:  # what a signal to the whole process group does to it
        _kill_from_another_process(pid, signum)
    assert next(batches)[0] == pid  # still serving
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # this process is untouched

    # Its parent's SIGTERM (the loader's or multiprocessing's terminate at exit) ends it at once.
    worker = next(p for p in multiprocessing.active_children() if p.pid == pid)
    os.kill(pid, signal.SIGTERM)
    worker.join(timeout=120)
    assert worker.exitcode == 0


def test_a_loader_kept_until_the_interpreter_exits_does_not_hold_up_the_exit():
    """multiprocessing's exit handler terminates (SIGTERM) and joins the daemonic workers of a
    loader that is still referenced: a worker that ignored SIGTERM outright would hang it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from emakit.training.data import StopSafeLoader; "
            "from test_signals_group import _ReportsSignals; "
            "batches = iter(StopSafeLoader(_ReportsSignals(), batch_size=None, num_workers=2, "
            "persistent_workers=True)); next(batches); print('served')")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "tests")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, "served\n"), proc.stderr[-3000:]


def test_a_process_started_while_workers_start_begins_with_the_stop_signals_blocked():
    """So a forked worker cannot die of a group signal before it ignores it."""
    from emakit.training.lifecycle import loader_workers_started

    read, write = os.pipe()
    with loader_workers_started():
        pid = os.fork()
        if pid == 0:  # the child: report its mask at birth
            os.write(write, repr(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child_blocked = eval(f.read())
    os.waitpid(pid, 0)
    assert {int(s) for s in STOP_SIGNALS} <= set(child_blocked)
    assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # restored here


# --------------------------------------------------------------------------- torchrun
def _torchrun(tmp_path: Path, image_folder: Path, experiment: str, *extra: str,
              signal_at: str = "") -> tuple[subprocess.CompletedProcess, list[int]]:
    status = tmp_path / f"status-{experiment}"
    cmd = [*torchrun(), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(_wrapper(tmp_path)),
           *map(str, [image_folder, *ARGS, "--device", "cpu", "--workers", "1", "--epochs", "2",
                      "--output", tmp_path / "out", "--experiment", experiment, *extra])]
    proc = subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), STATUS_FILE=str(status), SIGNAL_AT=signal_at,
                                                  SIGNAL="SIGTERM"),
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    codes = [int(p.read_text()) if (p := tmp_path / f"status-{experiment}.rank{r}").exists() else None
             for r in range(2)]
    return proc, codes


@pytest.mark.slow
def test_torchrun_sigterm_to_its_process_group_with_loader_workers_stops_and_resumes_bitwise(tmp_path, image_folder):
    proc, codes = _torchrun(tmp_path, image_folder, "straight")
    assert codes == [0, 0] and proc.returncode == 0, proc.stderr[-3000:]

    proc, codes = _torchrun(tmp_path, image_folder, "stopped", signal_at="train 0 [2/6]")
    assert codes == [143, 143], proc.stderr[-3000:]
    assert "DataLoader worker" not in proc.stderr
    last = tmp_path / "out" / "stopped" / "last.pth.tar"
    messages = [line for line in proc.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(messages) == 1, proc.stderr[-3000:]  # rank 0 alone reports
    assert re.fullmatch(rf"train\.py: stopped by SIGTERM at epoch 0, step 3/6: wrote the resumable checkpoint "
                        rf"{re.escape(str(last))}; resume with: torchrun --standalone --nproc_per_node=2 .* "
                        rf"--resume {re.escape(str(last))}", messages[0]), messages[0]
    position = load(last)["train_position"]
    assert position["steps_done"] == 3 and position["processes"] == 2
    # torchrun, signalled itself, ends with its own SignalException traceback and status 1 after the
    # ranks have stopped (README, "When things go wrong"): our line comes first.
    assert proc.returncode == 1 and "SignalException" in proc.stderr
    assert proc.stderr.index(messages[0]) < proc.stderr.index("Traceback")

    proc, codes = _torchrun(tmp_path, image_folder, "stopped", "--resume", str(last))
    assert codes == [0, 0] and proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(tmp_path / "out" / "straight" / "last.pth.tar"), load(last)
    for key in COMPARED:
        assert_same(a[key], b[key], key)


# --------------------------------------------------------------------------- start-up
# Sends SIGNAL to this process when the import of MODULE begins, then runs the script as
# `python SCRIPT ARGS` would.
EARLY_SIGNAL = r'''
import os, runpy, signal, sys
signum, module = getattr(signal, sys.argv[1]), sys.argv[2]
fired = []

def hook(event, args):
    if event == "import" and args[0] == module and not fired:
        fired.append(module)
        os.kill(os.getpid(), signum)

sys.addaudithook(hook)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("script, outcome", [("train.py", "before training started: no checkpoint was written"),
                                             ("validate.py", "before the results were reported")])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_while_torch_is_imported_stops_with_the_one_line(tmp_path, image_folder, script, outcome, signum):
    argv = [image_folder, *FAST_ARGS, "--output", tmp_path / "out"] if script == "train.py" else \
        [image_folder, "--model", "test_resnet", "--checkpoint", tmp_path / "none.pth.tar"]
    proc = subprocess.run([sys.executable, "-c", EARLY_SIGNAL, signal.Signals(signum).name, "torch",
                           str(REPO / script), *map(str, argv)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"{script}: stopped by {name} {outcome}"]
    assert not (tmp_path / "out").exists()
