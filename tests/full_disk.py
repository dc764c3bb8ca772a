"""Run an emakit CLI with a full disk simulated in-process (tests/test_damage_and_disk.py).

    python tests/full_disk.py MODE SCRIPT|-m MODULE [ARGS...]

MODE ``files``: every atomic write of a file (emakit's temp files ``.<name>.<8 hex>.tmp``) has
its data written, then ``fsync`` fails with ENOSPC, as on a disk that is full when the data
is flushed; whatever the writer (torch.save, safetensors, PNG, text), the real atomic-write
path runs. MODE ``dcp:N`` (``dcp:N:R``: on rank R only): the N-th ``torch.distributed.checkpoint``
save of the process finds the disk full while writing its shards: part of an item is written,
then the RuntimeError torch's own zip writer raises on a full disk (``unexpected pos``).

The process exits with the CLI's status (its ``sys.exit``).
"""
from __future__ import annotations

import errno
import os
import re
import runpy
import sys

_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # emakit.checkpoint's temp file names


def _full_files() -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        try:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            name = ""
        if _TEMP.match(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    os.fsync = fsync


def _full_at_dcp_save(n: int, rank: str | None) -> None:
    from torch.distributed.checkpoint import filesystem

    if rank is not None and os.environ.get("RANK", "0") != rank:
        return

    real_write_data, real_write_item, saves = filesystem.FileSystemWriter.write_data, filesystem._write_item, []

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        saves.append(self.path)
        return real_write_data(self, plan, planner)

    def write_item(transforms, stream, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(saves) >= n:
            stream.write(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_write_item(transforms, stream, *args, **kwargs)

    filesystem.FileSystemWriter.write_data = write_data
    filesystem._write_item = write_item


def main() -> None:
    """Install the MODE's failure, then run the CLI as ``__main__`` with the rest of argv."""
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "files":
        _full_files()
    else:
        _, n, *rank = mode.split(":")
        _full_at_dcp_save(int(n), rank[0] if rank else None)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
