"""How a run ends early: signals, divergence, failed writes, and the command that resumes it.

Signals. SIGINT (Ctrl-C), SIGTERM (schedulers, ``timeout``, torchrun forwarding a Ctrl-C)
and SIGHUP (a closed terminal) are caught by :class:`StopSignals`, which ``train.py`` and
``validate.py`` install first thing in ``main`` (this module imports only the standard
library, so a signal while torch is being imported is caught too). Before training starts
they stop the process at once (:class:`SignalInterrupt`; the one line is
:func:`report_stop_before_training`). While training runs they only set a flag: the loop
stops at the next optimizer-step boundary that every rank agrees on, writes a resumable
``last.pth.tar`` (mid-epoch: the step, sampler position and every rank's random-number-generator
states) and exits with 128 + the signal number (130, 143, 129). Further signals while
stopping are logged and ignored, so a second Ctrl-C or torchrun's SIGTERM after the
terminal's SIGINT cannot tear the save; ``kill -9`` still stops at once and leaves the
previous checkpoint intact (writes are atomic).

A signal sent to the whole process group (``timeout``, Slurm, Kubernetes, and torchrun,
which signals each rank's group) also reaches the data-loader worker processes. From their
first instruction they ignore the three stop signals unless their own main process sends a
SIGTERM (its shutdown of them) (:func:`loader_workers_started`, :func:`ignore_stop_signals`):
the main process decides, and shuts its workers down as it exits. (PyTorch's own worker handler would otherwise end a worker on a SIGTERM that its parent
did not send, and the loader would fail the run with "DataLoader worker is killed by signal".)

Exit statuses of ``train.py``: 0 done, 2 bad input or a failed write (one line says which
checkpoint is intact), 3 diverged (``--on-nonfinite``), 128 + signal number when stopped
by a signal. The scripts end with ``sys.exit(main())`` and the interpreter's normal teardown.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

__all__ = ["StopSignals", "SignalInterrupt", "RunStopped", "TrainingInterrupted", "LastGood", "last_good_text",
           "diverged", "write_failed", "EXIT_DIVERGED", "EXIT_WRITE_FAILED", "signal_name",
           "rng_state", "set_rng_state", "resume_command", "report_stop_before_training", "interrupt_signal",
           "loader_workers_started", "ignore_stop_signals", "end_process"]

_log = logging.getLogger(__name__)

EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 2
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal before training started (raised from the handler, like Ctrl-C's
    KeyboardInterrupt); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class RunStopped(Exception):
    """The run ended before its last epoch. ``reason`` is one line, ``checkpoint`` the file
    to ``--resume`` from (None: nothing resumable was written), ``exit_status`` the
    process status, ``error`` whether the CLI prints it as an error, ``resume_hint`` the words
    before the resume command (what to change first, if anything)."""

    def __init__(self, reason: str, checkpoint: str | None, exit_status: int, *, error: bool = True,
                 resume_hint: str = "resume with") -> None:
        super().__init__(reason)
        self.reason, self.checkpoint, self.exit_status, self.error = reason, checkpoint, exit_status, error
        self.resume_hint = resume_hint


class TrainingInterrupted(RunStopped):
    """A stop signal ended training; ``checkpoint`` is the resumable file, if any."""


LastGood = tuple[str, str]  # (path, "epoch 3"): the newest intact checkpoint of a run


def last_good_text(last_good: LastGood | None) -> str:
    """``the last good checkpoint is PATH (epoch 3)``, or that none was written."""
    if last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {last_good[0]} ({last_good[1]})"


def diverged(last_good: LastGood | None, reason: str) -> RunStopped:
    """The :class:`RunStopped` of a divergence: exit 3, resume after lowering the lr."""
    hint = "" if last_good else "; lower --lr or add --clip-grad"
    return RunStopped(f"{reason}; {last_good_text(last_good)}{hint}", last_good[0] if last_good else None,
                      EXIT_DIVERGED, resume_hint="lower --lr or add --clip-grad in this command, then resume with")


def write_failed(last_good: LastGood | None, what: str, error: OSError | None) -> RunStopped:
    """The :class:`RunStopped` of a failed write (a full disk): exit 2, naming the file."""
    why = (error.strerror or str(error)) if error is not None else "failed on rank 0"
    where = f" ({error.filename})" if error is not None and error.filename else ""
    return RunStopped(f"could not write {what}{where}: {why}; {last_good_text(last_good)}",
                      last_good[0] if last_good else None, EXIT_WRITE_FAILED,
                      resume_hint="free space (or fix the folder), then resume with")


class StopSignals:
    """Catches SIGINT, SIGTERM and SIGHUP for the life of a run (see the module docstring).

    ``install()`` in the main thread (elsewhere it does nothing: Python delivers signals
    to the main thread only); ``restore()`` puts the previous handlers back. Inside
    :meth:`deferred` a signal only sets :attr:`received`; outside, the first one raises
    :class:`SignalInterrupt` and later ones are ignored (the process is already stopping).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        """Take over the stop signals (main thread only); returns self."""
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Give the signals back to the handlers found at :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.received is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """While inside, signals set the flag instead of raising (training polls it)."""
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        if not self._deferred:
            if first:  # a later one would interrupt the stop itself (its line, the clean-up)
                raise SignalInterrupt(signum)
            return
        if first:
            _log.warning("%s received: stopping at the next step boundary with a resumable checkpoint",
                         signal_name(signum))
        else:
            _log.warning("%s received: already stopping (after %s); waiting for the checkpoint to be written "
                         "(kill -9 stops at once; the last checkpoint stays intact)", signal_name(signum),
                         signal_name(self.received))


def interrupt_signal(error: KeyboardInterrupt) -> int:
    """The signal behind a :class:`KeyboardInterrupt`: a :class:`SignalInterrupt`'s, else SIGINT."""
    return error.signum if isinstance(error, SignalInterrupt) else int(signal.SIGINT)


def report_stop_before_training(prog: str, error: KeyboardInterrupt,
                                 outcome: str = "before training started: no checkpoint was written") -> int:
    """Print ``<prog>: stopped by SIGTERM <outcome>`` on stderr (rank 0 alone under torchrun)
    for a stop signal or Ctrl-C that came before there was anything to save; returns the exit
    status, 128 + the signal number."""
    signum = interrupt_signal(error)
    if os.environ.get("RANK", "0") in ("0", ""):
        print(f"{prog}: stopped by {signal_name(signum)} {outcome}", file=sys.stderr, flush=True)
    return 128 + signum


@contextlib.contextmanager
def loader_workers_started() -> Iterator[None]:
    """Around the code that starts data-loader worker processes (``iter(loader)``): the stop
    signals are blocked in this thread meanwhile, so a forked worker starts with them blocked
    and cannot be ended by one before :func:`ignore_stop_signals` runs in it. A signal that
    arrives meanwhile is delivered when the block ends (or at once to another thread; Python
    runs its handler in the main thread either way)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data-loader worker's ``worker_init_fn``: a signal to the process group reaches the
    workers too, and the main process alone decides what it means.

    SIGINT and SIGHUP are ignored. SIGTERM stays blocked (from :func:`loader_workers_started`)
    and a thread takes it with ``sigwaitinfo``, which says who sent it: from the parent (the
    loader's or multiprocessing's shutdown, ``Process.terminate``) the worker ends at once, as
    PyTorch's own worker handler does; from anyone else it is dropped. (Ignoring SIGTERM
    outright would make the parent's ``terminate`` + ``join`` at exit wait forever.) Where
    ``sigwaitinfo`` does not exist (macOS), SIGTERM keeps PyTorch's handling.
    """
    others = tuple(s for s in _SIGNALS if s != signal.SIGTERM)
    for signum in others:
        signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "pthread_sigmask"):
        return
    signal.pthread_sigmask(signal.SIG_UNBLOCK, others)
    if not hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here inherit it
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="emakit-sigterm", daemon=True).start()


def _take_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what PyTorch's worker does on its parent's SIGTERM (nothing of ours to flush)


# --------------------------------------------------------------------------- RNG states
# numpy and torch are imported in the functions: the scripts import this module before torch
# (see the module docstring), and these run only once a run is built.
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA ``device``) generator states, as plain
    types and tensors so a checkpoint holding them loads with ``weights_only=True``."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state: dict[str, Any] = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- the resume command
def _without_resume(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            out.append(arg)
    return out


def resume_command(argv: Sequence[str], checkpoint: str) -> str:
    """The command that continues this run from ``checkpoint``: the same arguments with
    ``--resume`` replaced, under the same launcher (``torchrun`` with the same process
    count on one node; for several nodes, the user's own launch prefix)."""
    script = sys.argv[0] if os.path.basename(sys.argv[0] or "") == "train.py" else "train.py"
    args = shlex.join([*_without_resume(argv), "--resume", checkpoint])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"python {shlex.quote(script)} {args}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = "--standalone" if per_node == world else "<your multi-node flags>"
    return f"torchrun {nodes} --nproc_per_node={per_node} {shlex.quote(script)} {args}"


def end_process(status: int) -> NoReturn:
    """End a command with ``status``: ``sys.exit`` (the interpreter's normal teardown), except
    in a rank that torchrun started (``RANK`` and ``WORLD_SIZE`` set). There torch's gloo
    threads can abort the teardown after the process group is gone ("terminate called without
    an active exception", SIGABRT): seen in a loaded CI run, where a rank that had printed its
    one-line input error ended -6 instead of 2, and earlier in the FSDP test jobs. Such a rank
    flushes stdout, stderr and the log handlers and leaves with ``os._exit(status)``; its
    atexit handlers do not run (every file it writes is complete before this point). The
    temporary folders libraries made (``tempfile.TemporaryDirectory``, removed at the normal
    exit) are removed first: timm imports wandb when it is installed, and wandb makes two at
    import, which every rank would otherwise leave in the temp folder."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    for obj in gc.get_objects():
        if isinstance(obj, tempfile.TemporaryDirectory):
            with contextlib.suppress(Exception):
                obj.cleanup()
    os._exit(status)

