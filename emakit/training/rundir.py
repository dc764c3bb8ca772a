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
   written by emakit's train.py (:func:`.state.checkpoint_is_emakit`: ``ema`` metadata, or a
   ``model_ema_schedule`` arg, which timm's train.py has not) and the folder's
   ``summary.csv``, if any, has emakit's ``ema_eval_top1`` column (timm's has ``eval_*``
   columns only). The marker is then added.
4. A directory (or any non-regular file) where a run file goes (``args.yaml``,
   ``summary.csv``, ``train.log``, ``last.pth.tar``, ``model_best.pth.tar``) in the wanted
   folder is a ``UsageError``.
5. The folder a run writes to is locked by :data:`LOCK_NAME`: an OS lock (``flock``, through
   the ``filelock`` package) held while the run lives, and in the file the holder's JSON
   (pid, host, start date), cleared when the run ends. A held lock is a ``UsageError`` (a
   second run into the same folder writes nothing). The kernel drops the lock of a process
   that dies, so a lock file whose lock is free but that still names its holder was left by
   a run that was killed: it is taken over with a log line. One naming another host is
   refused (a network filesystem may not carry the lock between hosts), and so is one that
   cannot be read. With the default timestamped name a locked folder is simply skipped and
   the next suffix used. The lock file itself stays in the folder (``filelock``'s rule:
   removing a lock's path while another process may have it open lets two processes lock
   two different files); it is removed with the folder when a run that created the folder
   fails before writing anything.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from emakit.checkpoint import write_text_atomic

from . import UsageError

__all__ = ["LOCK_NAME", "MARKER_NAME", "RUN_FILES", "RUN_ENTRIES", "RunLock", "LockInfo", "read_lock", "lock_holder",
           "run_entries", "check_run_files", "folder_is_ours", "claim_run_folder", "write_marker", "folder_write_error"]

_log = logging.getLogger(__name__)

LOCK_NAME = ".emakit.lock"
MARKER_NAME = ".emakit-run"
RUN_FILES = ("args.yaml", "summary.csv", "train.log", "last.pth.tar", "model_best.pth.tar")
RUN_ENTRIES = RUN_FILES + ("summary.png", "posthoc", MARKER_NAME)  # plus checkpoint-<N>.pth.tar
_MAX_SUFFIX = 10_000


# --------------------------------------------------------------------------- the lock
@dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) a folder: from the lock file's JSON (``raw`` when it cannot be parsed)."""

    pid: int | None
    host: str | None
    started: str | None = None
    raw: str = ""

    def describe(self) -> str:
        if self.pid is None:
            return f"an unreadable lock ({self.raw[:60]!r})" if self.raw.strip() else "a run that did not record itself"
        return f"pid {self.pid} on host {self.host}" + (f", started {self.started}" if self.started else "")


def read_lock(folder: str) -> LockInfo | None:
    """The holder recorded in the lock file of ``folder``, or None when there is no lock file
    or it names nobody (a released lock). Whether the lock is held is :func:`lock_holder`'s."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None  # no folder (yet), or a file where it should be: creating it reports that
    except OSError as e:
        raise UsageError(f"cannot read the run lock {path}: {e.strerror or e}; remove it if no run uses "
                         f"{folder}") from None
    if not raw.strip():
        return None  # an empty file: no holder recorded
    try:
        data = json.loads(raw)
        return LockInfo(pid=int(data["pid"]), host=str(data["host"]), started=data.get("started"), raw=raw)
    except (ValueError, KeyError, TypeError):
        return LockInfo(pid=None, host=None, raw=raw)


def _locked_error(folder: str, info: LockInfo | None) -> UsageError:
    who = info.describe() if info is not None else "a run that did not record itself"
    return UsageError(f"{folder} is in use by another run ({who}); wait for it to end or pass another "
                      f"--experiment (if no run uses it, delete {os.path.join(folder, LOCK_NAME)})")


def folder_write_error(folder: str, error: OSError) -> UsageError:
    """The one line of a run folder that cannot be written (a full disk, a read-only folder)."""
    return UsageError(f"cannot write to output folder {folder}: {error.strerror or error}; "
                      "pass --output PATH with a writable folder")


def _refused_leftover(info: LockInfo | None) -> bool:
    """A free lock whose file still names a holder that cannot be known gone: another host's
    (its lock may not reach this host), or unreadable text."""
    return info is not None and (info.pid is None or info.host != socket.gethostname())


def lock_holder(folder: str) -> LockInfo | None:
    """Who keeps ``folder`` from being locked now (without creating anything): the holder of
    a held lock, or a left-over lock that is refused (see the module docstring); None when
    a run could take it."""
    from filelock import FileLock, Timeout  # here, not at import (see RunLock._take)

    path = os.path.join(folder, LOCK_NAME)
    if not os.path.isfile(path):
        return None
    info = read_lock(folder)
    probe = FileLock(path, timeout=0, thread_local=False)
    try:
        probe.acquire()
    except Timeout:
        return info or LockInfo(pid=None, host=None)
    except OSError:
        return info  # cannot open it (a read-only folder): judge by what it says
    probe.release()
    return info if _refused_leftover(info) else None


class RunLock:
    """An exclusive lock on a run folder (:data:`LOCK_NAME`), held until :meth:`release`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.pid = os.getpid()
        self.held = False
        self.created_folder = False  # acquire() created the folder (release(remove_empty=True) removes it)
        self.created_file = False  # acquire() created the lock file (likewise)
        self._lock = None  # the filelock.FileLock while held

    def acquire(self) -> RunLock:
        """Take the lock (creating the folder if needed). A held lock, another host's or an
        unreadable one -> ``UsageError``; one left by a run that died -> taken over, with a
        log line. A failed write (a full disk) -> ``UsageError``, and nothing is left."""
        lock = self._take()
        try:
            left = read_lock(self.folder)  # what a run that died while holding it wrote
            if _refused_leftover(left):
                raise _locked_error(self.folder, left)
        except UsageError:
            lock.release()
            raise
        self._lock, self.held = lock, True
        try:
            self._record(json.dumps({"pid": self.pid, "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        except OSError as e:
            self.release(remove_empty=True)
            raise folder_write_error(self.folder, e) from None
        if left is not None:
            _log.warning("%s: took over the stale lock of %s (that process is gone)", self.folder, left.describe())
        return self

    def _take(self):
        """The OS lock on :attr:`path` (a held ``filelock.FileLock``), creating the folder and
        the file as needed; a lock held by another process -> ``UsageError``."""
        from filelock import FileLock, Timeout  # here, not at import: ~0.1 s that --help need not pay

        try:
            self.created_folder = not os.path.isdir(self.folder)
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise folder_write_error(self.folder, e) from None
        self.created_file = not os.path.lexists(self.path)
        lock = FileLock(self.path, timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise _locked_error(self.folder, read_lock(self.folder)) from None
        except OSError as e:
            self._abandon()
            raise folder_write_error(self.folder, e) from None
        return lock

    def _record(self, text: str) -> None:
        """Write ``text`` into the held lock file, durably (in place: the locked file is this inode)."""
        with open(self.path, "r+", encoding="utf-8") as f:
            f.truncate(0)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _abandon(self) -> None:
        """Remove what :meth:`acquire` created: the lock file (safe while it is held, or
        never taken: ``filelock`` re-checks that a file it locked is still linked) and the
        folder, if nothing else is in it."""
        try:
            if self.created_file:
                os.unlink(self.path)
            if self.created_folder:
                os.rmdir(self.folder)
        except OSError:
            pass  # something else is there: keep it

    def release(self, *, remove_empty: bool = False) -> None:
        """Clear the holder from the lock file and let the lock go; with ``remove_empty`` also
        remove the folder when :meth:`acquire` created it and nothing else was written (a
        run that failed)."""
        if not self.held:
            return
        self.held = False
        try:
            self._record("")
        except OSError as e:
            _log.warning("could not clear the run lock %s: %s", self.path, e.strerror or e)
        if remove_empty:
            self._abandon()  # while still locked: no other run is using the file we remove
        self._lock.release()
        self._lock = None


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
    numbered = sorted(n for n in names if n.startswith("checkpoint-") and n.endswith(".pth.tar"))
    return [n for n in RUN_ENTRIES if n in names] + numbered


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
    if not resumed_by_emakit:
        return False, "its checkpoint was not written by emakit's train.py"
    if _summary_is_ours(folder) is False:
        return False, "its summary.csv does not have emakit's columns"
    return True, "an emakit run folder written before run markers existed"


def write_marker(folder: str) -> bool:
    """Mark ``folder`` as an emakit run folder (kept if present); True when it was written now."""
    path = os.path.join(folder, MARKER_NAME)
    if os.path.isfile(path):
        return False
    from emakit import __version__

    write_text_atomic(path, json.dumps({"tool": "emakit", "version": __version__,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return True


# --------------------------------------------------------------------------- the choice
def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def claim_run_folder(wanted: str, *, resume: str | None = None, resumed_by_emakit: bool = False,
                     named: bool = True) -> tuple[str, RunLock]:
    """Apply the rules of this module to ``wanted``; returns (folder, its held lock).

    ``resume``: the ``--resume`` path; ``resumed_by_emakit``: :func:`.state.checkpoint_is_emakit`
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
    if (holder := lock_holder(wanted) if named else None) is not None:
        raise _locked_error(wanted, holder)
    candidate = wanted
    for n in range(1, _MAX_SUFFIX):
        if not run_entries(candidate):
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
