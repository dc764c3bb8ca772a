"""Run folders are owned: which folder a run writes to, its lock, and the ownership marker.

Rules (rank 0 applies them before anything is written; docs/CONTRACTS.md repeats them):

1. The wanted folder is ``<output>/<experiment>`` with ``--experiment``, else the resumed
   checkpoint's folder with ``--resume``, else timm's ``<output>/YYYYMMDD-HHMMSS-<model>-<px>``.
2. A run continues *in place* only when it resumes a checkpoint that lives in the wanted
   folder and that folder is ours (:func:`folder_is_ours`). Any other run never writes into
   a folder that already holds a run (any of :data:`RUN_ENTRIES`): it takes the first free
   ``<folder>-1``, ``<folder>-2``, ... as timm's ``get_outdir(inc=True)`` does, and logs it.
   So a fresh run never overwrites a previous run's checkpoints, and resuming a checkpoint
   from timm's (or any other tool's) folder never rewrites that folder's files.
3. A folder is ours when it holds the marker :data:`MARKER_NAME` (written by every run), or,
   for emakit folders written before the marker existed, when the resumed checkpoint was
   written by emakit's train.py (:func:`checkpoint_is_emakit`: ``ema`` metadata, or a
   ``model_ema_schedule`` arg, which timm's train.py has not) and the folder's
   ``summary.csv``, if any, has emakit's ``ema_eval_top1`` column (timm's has ``eval_*``
   columns only). The marker is then added.
4. A directory (or any non-regular file) where a run file goes (``args.yaml``,
   ``summary.csv``, ``train.log``, ``last.pth.tar``, ``model_best.pth.tar``) in the wanted
   folder is a ``UsageError``.
5. The folder a run writes to is locked by :data:`LOCK_NAME` (JSON: pid, host, process
   start time, start date), created exclusively and removed when the run ends. A lock of a
   live process is a ``UsageError`` (a second run into the same folder writes nothing); a
   lock left by a process of this host that is gone is taken over with a log line. With
   the default timestamped name a locked folder is simply taken and the next suffix used.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from emakit.checkpoint import write_text_atomic

from . import UsageError

__all__ = ["LOCK_NAME", "MARKER_NAME", "RUN_FILES", "RUN_ENTRIES", "RunLock", "LockInfo", "read_lock",
           "run_entries", "check_run_files", "folder_is_ours", "checkpoint_is_emakit", "claim_run_folder",
           "write_marker"]

_log = logging.getLogger(__name__)

LOCK_NAME = ".emakit.lock"
MARKER_NAME = ".emakit-run"
RUN_FILES = ("args.yaml", "summary.csv", "train.log", "last.pth.tar", "model_best.pth.tar")
RUN_ENTRIES = RUN_FILES + ("summary.png", "posthoc", MARKER_NAME)  # plus checkpoint-<N>.pth.tar
_MAX_SUFFIX = 10_000


# --------------------------------------------------------------------------- the lock
@dataclass(frozen=True)
class LockInfo:
    """Who holds a folder: from the lock file's JSON (``raw`` when it cannot be parsed)."""

    pid: int | None
    host: str | None
    proc_start: str | None = None
    started: str | None = None
    raw: str = ""

    def describe(self) -> str:
        if self.pid is None:
            return f"an unreadable lock ({self.raw[:60]!r})"
        return f"pid {self.pid} on host {self.host}" + (f", started {self.started}" if self.started else "")


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22):
    with the pid it names a process uniquely, so a reused pid is not mistaken for the holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(info: LockInfo) -> bool:
    """False only when the holder is provably gone: same host and no such process (or the
    pid now belongs to a process started at another time)."""
    if info.pid is None or info.host != socket.gethostname():
        return True
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if info.proc_start is not None:
        now = _process_start(info.pid)
        if now is not None and now != info.proc_start:
            return False
    return True


def read_lock(folder: str) -> LockInfo | None:
    """The lock of ``folder``, or None when there is none."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None  # no folder (yet), or a file where it should be: creating it reports that
    except OSError as e:
        raise UsageError(f"cannot read the run lock {path}: {e.strerror or e}; remove it if no run uses "
                         f"{folder}") from None
    try:
        data = json.loads(raw)
        return LockInfo(pid=int(data["pid"]), host=str(data["host"]), proc_start=data.get("proc_start"),
                        started=data.get("started"), raw=raw)
    except (ValueError, KeyError, TypeError):
        return LockInfo(pid=None, host=None, raw=raw)


def _locked_error(folder: str, info: LockInfo) -> UsageError:
    return UsageError(f"{folder} is in use by another run ({info.describe()}); wait for it to end or pass another "
                      f"--experiment (if no run uses it, delete {os.path.join(folder, LOCK_NAME)})")


class RunLock:
    """An exclusive lock on a run folder (:data:`LOCK_NAME`), held until :meth:`release`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.pid = os.getpid()
        self.proc_start = _process_start(self.pid)
        self.held = False
        self.created_folder = False  # acquire() created the folder (release(remove_empty=True) removes it)

    def _content(self) -> str:
        return json.dumps({"pid": self.pid, "host": socket.gethostname(), "proc_start": self.proc_start,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise UsageError(f"cannot write to output folder {self.folder}: {e.strerror or e}; "
                             "pass --output PATH with a writable folder") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        self.held = True
        return True

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if needed). A live holder -> ``UsageError``;
        a dead holder of this host -> its lock is taken over, with a log line."""
        try:
            self.created_folder = not os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot write to output folder {self.folder}: {e.strerror or e}; "
                             "pass --output PATH with a writable folder") from None
        for _ in range(3):
            if self._try_create():
                return self
            info = read_lock(self.folder)
            if info is None:
                continue  # released in between
            if _alive(info):
                raise _locked_error(self.folder, info)
            # Move the stale lock aside first: of two runs taking it over, one rename wins.
            aside = f"{self.path}.stale.{self.pid}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            os.unlink(aside)
            _log.warning("%s: took over the stale lock of %s (that process is gone)", self.folder, info.describe())
        info = read_lock(self.folder)
        raise _locked_error(self.folder, info or LockInfo(pid=None, host=None, raw="(lock kept changing)"))

    def release(self, *, remove_empty: bool = False) -> None:
        """Remove the lock file if it is still ours; with ``remove_empty`` also the folder
        when :meth:`acquire` created it and nothing else was written (a run that failed)."""
        if not self.held:
            return
        self.held = False
        info = read_lock(self.folder) if os.path.isfile(self.path) else None
        if info is not None and info.pid == self.pid:
            try:
                os.unlink(self.path)
            except OSError as e:
                _log.warning("could not remove the run lock %s: %s", self.path, e.strerror or e)
        if remove_empty and self.created_folder:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass  # not empty: something was written, keep it


# --------------------------------------------------------------------------- folder contents
def run_entries(folder: str) -> list[str]:
    """Names of run files/folders present in ``folder`` (a lock alone is not a run)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []  # nothing there, or a file: creating the folder reports the latter
    except OSError as e:
        raise UsageError(f"cannot read output folder {folder}: {e.strerror or e}; pass --output PATH with a "
                         "readable, writable folder") from None
    found = [n for n in RUN_ENTRIES if n in names]
    found += sorted(n for n in names if n.startswith("checkpoint-") and n.endswith(".pth.tar"))
    return found


def check_run_files(folder: str) -> None:
    """A non-regular file where a run file goes (or a file where ``posthoc/`` goes) -> ``UsageError``."""
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            kind = "a directory" if os.path.isdir(path) else "not a regular file"
            raise UsageError(f"{path} is {kind}, but the run writes its {name} there; move it away or pass "
                             "another --experiment")
    posthoc = os.path.join(folder, "posthoc")
    if os.path.lexists(posthoc) and not os.path.isdir(posthoc):
        raise UsageError(f"{posthoc} is not a directory, but the run keeps its post-hoc EMA snapshots there; "
                         "move it away or pass another --experiment")


def checkpoint_is_emakit(ckpt: dict[str, Any]) -> bool:
    """Written by emakit's train.py: it has EMA metadata (``ema``, which timm does not write)
    or its ``args`` hold ``model_ema_schedule``, a flag timm's train.py does not have."""
    args = ckpt.get("args")
    return isinstance(ckpt.get("ema"), dict) or (isinstance(args, dict) and "model_ema_schedule" in args)


def _summary_is_ours(folder: str) -> bool | None:
    """True/False when ``summary.csv`` has/lacks emakit's ``ema_eval_top1`` column; None without one."""
    path = os.path.join(folder, "summary.csv")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return False
    return "ema_eval_top1" in header


def folder_is_ours(folder: str, resumed_by_emakit: bool) -> tuple[bool, str]:
    """(ours, why): the marker, or a pre-marker emakit folder (see the module docstring)."""
    if os.path.isfile(os.path.join(folder, MARKER_NAME)):
        return True, f"it holds emakit's {MARKER_NAME}"
    summary = _summary_is_ours(folder)
    if not resumed_by_emakit:
        return False, "its checkpoint was not written by emakit's train.py"
    if summary is False:
        return False, "its summary.csv does not have emakit's columns"
    return True, "an emakit run folder written before run markers existed"


def write_marker(folder: str) -> None:
    """Mark ``folder`` as an emakit run folder (kept if present)."""
    path = os.path.join(folder, MARKER_NAME)
    if os.path.isfile(path):
        return
    from emakit import __version__

    write_text_atomic(path, json.dumps({"tool": "emakit", "version": __version__,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


# --------------------------------------------------------------------------- the choice
def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def claim_run_folder(wanted: str, *, resume: str | None = None, resumed_by_emakit: bool = False,
                     named: bool = True) -> tuple[str, RunLock]:
    """Apply the rules of this module to ``wanted``; returns (folder, its held lock).

    ``resume``: the ``--resume`` path; ``resumed_by_emakit``: :func:`checkpoint_is_emakit`
    of it; ``named``: the user named the folder (``--experiment`` or ``--resume``) rather
    than the default timestamp, so a live lock on it is an error, not a reason to suffix.
    """
    wanted = os.path.normpath(wanted)
    check_run_files(wanted)
    if resume and _same_folder(os.path.dirname(os.path.abspath(resume)), wanted):
        ours, why = folder_is_ours(wanted, resumed_by_emakit)
        if ours:
            return wanted, RunLock(wanted).acquire()
        _log.warning("--resume %s: its folder %s is not an emakit run folder (%s); its files stay untouched",
                     resume, wanted, why)
    holder = read_lock(wanted)
    if holder is not None and named and _alive(holder):
        raise _locked_error(wanted, holder)
    candidate = wanted
    for n in range(1, _MAX_SUFFIX):
        found = run_entries(candidate)
        if not found:
            try:
                lock = RunLock(candidate).acquire()
            except UsageError:
                if named and candidate == wanted:
                    raise
                lock = None  # another run took it just now: try the next suffix
            if lock is not None:
                if not run_entries(candidate):
                    if candidate != wanted:
                        _log.warning("%s already holds a run (%s): this run writes to %s instead, so nothing "
                                     "of it is overwritten", wanted, ", ".join(run_entries(wanted)[:4]), candidate)
                    return candidate, lock
                lock.release(remove_empty=True)  # a run filled it between the look and the lock
        candidate = f"{wanted}-{n}"
    raise UsageError(f"{wanted}-1 ... -{_MAX_SUFFIX - 1} all hold runs; pass another --experiment")
