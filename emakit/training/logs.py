"""Logging of the command-line tools: the console (rank 0 at INFO, other ranks WARNING) and,
once the run folder exists, its ``train.log`` with every record logged before it.

``train.py``, ``validate.py`` and ``python -m emakit`` call :func:`configure_logging` first
and ``.close()`` at the end, so in-process calls do not pile up handlers.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

__all__ = ["LogSetup", "configure_logging"]


class _LogFile(logging.FileHandler):
    """``train.log``: a failed write (a full disk) is reported once on stderr, then the file
    is given up, instead of a traceback for every later record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({getattr(error, 'strerror', None) or error}); "
                             "logging to the console only\n")

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)


class LogSetup:
    """Console (and later file) handlers on the ``emakit`` logger, removable at the end so
    in-process calls of ``train.main`` do not pile up handlers. Records logged before the
    run folder exists are buffered and written to the log file once it is opened."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("emakit")
        self.handlers: list[logging.Handler] = []
        self.old_level = self.logger.level
        # The records logged before a log file exists: never flushed by level, only by add_file.
        # Until then the target is a NullHandler, so a tool that never opens a file (validate.py)
        # keeps at most 10,000 records: a full buffer is dropped, not grown.
        self.early = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1,
                                                    target=logging.NullHandler())
        self.add(self.early, logging.INFO, "%(message)s")

    def add(self, handler: logging.Handler, level: int, fmt: str) -> None:
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
        self.logger.addHandler(handler)
        self.handlers.append(handler)
        self.logger.setLevel(logging.INFO)

    def add_file(self, path: str) -> None:
        """Log to ``path`` from now on, starting with the records buffered so far."""
        # backslashreplace: a non-UTF-8 file name in a message must not break the log file
        handler = _LogFile(path, encoding="utf-8", errors="backslashreplace")
        self.add(handler, logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.early.setTarget(handler)
        self.early.flush()
        self._drop(self.early)

    def discard_early(self) -> None:
        """No log file on this process (ranks other than 0): stop keeping records."""
        self._drop(self.early)

    def _drop(self, handler: logging.Handler) -> None:
        if handler in self.handlers:
            self.logger.removeHandler(handler)
            self.handlers.remove(handler)
            handler.close()

    def close(self) -> None:
        for h in list(self.handlers):
            self._drop(h)
        self.logger.setLevel(self.old_level)


def configure_logging() -> LogSetup:
    """Log INFO to stderr (rank 0; WARNING on other ranks). Call ``.close()`` at the end."""
    setup = LogSetup()
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank {rank}] "
    setup.add(logging.StreamHandler(sys.stderr), level, f"%(asctime)s {prefix}%(message)s")
    return setup


# --------------------------------------------------------------------------- building blocks
