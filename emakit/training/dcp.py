"""Checkpoint folders in torch.distributed.checkpoint (DCP) format, for models too big to gather.

A folder holds the same top-level keys as a single-file checkpoint (``emakit.checkpoint``),
split by kind:

- the *sharded* keys, written by every rank in parallel through DCP (each rank its own
  shards; DCP reshards on load, so a folder written by N ranks loads on M ranks or in one
  process): ``state_dict`` (the model, :func:`emakit.training.fsdp.sharded_model_state`),
  ``optimizer`` (parameter-name keyed, :func:`emakit.training.fsdp.sharded_optimizer_state`)
  every ``state_dict_ema`` / ``state_dict_ema_<i>`` (``ema.state_dict_ema(full=False)``) and,
  under FSDP with ``--model-ema-posthoc``, ``posthoc_ema_profiles`` (the post-hoc profiles as
  ``{"0": DTensors, "1": ...}``; ``posthoc_ema`` keeps the plain values: step, sigma_rels,
  snapshot settings; :func:`join_posthoc_profiles` puts them back together);
- everything else (epoch, ``ema`` meta, scheduler, args, metrics, ``train_position``, ...),
  taken from rank 0, in one small ``emakit.pt`` inside the folder (``torch.save``, loadable with
  ``weights_only=True``).

Writes are atomic at the folder level: every rank writes into ``.<name>.dcp-tmp-<token>``
beside the folder; once DCP has finished (its ``.metadata`` is written after every rank's
data) rank 0 adds ``emakit.pt``, moves the previous folder aside to ``.<name>.dcp-old-<token>``,
renames the new one into place and deletes the old one. A rank killed at any instant leaves
the previous folder (or, between the two renames, its ``-old`` copy, which :func:`load_dcp`
and the next :func:`save_dcp` use) complete and loadable. A save that fails (a full disk: torch's
writer says ``unexpected pos``) deletes its temp folder and raises ``OSError(ENOSPC)`` on every rank.

Reads never run code from the folder and name the file that is damaged: ``.metadata`` is
unpickled with an allowlist of DCP's own metadata classes (DCP itself uses ``pickle.load``),
``emakit.pt`` and the pickled values in the shards (DCP loads them with ``weights_only=False``)
with ``weights_only=True``; every shard file named in ``.metadata`` must exist, lie inside the
folder and be long enough. A folder that fails any of this is a :class:`DamagedFolder`.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import logging
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist

from emakit.checkpoint import (CheckpointError, damage_reason, find_unplain, fsync_dir, is_disk_full, refused_global,
                               save_checkpoint)

from . import UsageError, one_line
from .fsdp import optimizer_state_to_ids
from .state import METRIC, OPTIMIZER, POSTHOC, POSTHOC_PROFILES, is_sharded_key

__all__ = ["DamagedFolder", "DcpSaver", "META_FILE", "DCP_LAST", "DCP_BEST", "join_posthoc_profiles",
           "link_dcp_folder", "is_dcp_folder", "save_dcp", "load_dcp", "read_dcp_meta",
           "dcp_folder_to_checkpoint", "resolve_dcp_folder", "names_dcp_folder"]

_log = logging.getLogger(__name__)

META_FILE = "emakit.pt"
DCP_LAST = "last.dcp"          # train.py --checkpoint-format dcp: the newest checkpoint folder
DCP_BEST = "model_best.dcp"    # the best epoch's (hard links to the files of that epoch's last.dcp)
_DCP_METADATA = ".metadata"


# --------------------------------------------------------------------------- damage
_DAMAGE_FIX = "pass another checkpoint (an earlier copy of the run) or restore the folder from a backup"


class DamagedFolder(UsageError):
    """A checkpoint folder that cannot be read: a file missing, truncated, corrupt, or refused
    because loading it would run code. One line naming the folder, the file and the fix."""

    def __init__(self, folder: str, name: str, what: str) -> None:
        super().__init__(f"checkpoint folder {folder} cannot be read: {name} {what}; {_DAMAGE_FIX}")
        self.folder, self.name = folder, name


class _FileDamage(Exception):
    """Raised inside DCP's read by our reader/planner (DCP wraps it, per rank, in its
    CheckpointException and may send it to other ranks: plain, picklable args)."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(name, what)
        self.name, self.what = name, what


# DCP's .metadata: instances of its own metadata dataclasses, torch sizes, dtypes and layouts.
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "PureWindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle`` restricted to what DCP's ``.metadata`` holds (checked on torch 2.14)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or module in ("torch", "torch.distributed.checkpoint.metadata"):
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if (module, name) in _METADATA_GLOBALS or isinstance(found, torch.dtype) or (
                    module != "torch" and isinstance(found, type)):
                return found
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _refusal(error: BaseException) -> str:
    """What a refused or failed read of one file says: unsafe (it would import code) or damaged."""
    text = str(error)
    refused = text[len("refused global "):] if text.startswith("refused global ") else (
        refused_global(error) if isinstance(error, pickle.UnpicklingError) else None)
    if refused is not None:
        return f"was refused as unsafe (loading it would run code{f': {refused}' if refused else ''})"
    return f"is truncated or corrupt ({damage_reason(error)})"


def _read_metadata(folder: str) -> Any:
    """DCP's ``.metadata`` of ``folder``, unpickled with :class:`_MetadataUnpickler`, and every
    shard file it names checked: inside the folder, present, long enough. ``DamagedFolder``."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(os.path.join(folder, _DCP_METADATA), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise DamagedFolder(folder, _DCP_METADATA, f"cannot be read ({e.strerror or e})") from None
    except Exception as e:  # unpickling garbage raises anything from EOFError to TypeError
        raise DamagedFolder(folder, _DCP_METADATA, _refusal(e)) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise DamagedFolder(folder, _DCP_METADATA, "is not DCP metadata")
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise DamagedFolder(folder, _DCP_METADATA, f"names a file outside the folder ({name!r})")
        try:
            ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
        except (AttributeError, TypeError, ValueError):
            raise DamagedFolder(folder, _DCP_METADATA, "is not DCP metadata") from None
    for name, end in sorted(ends.items()):
        try:
            size = os.stat(os.path.join(folder, name)).st_size
        except FileNotFoundError:
            raise DamagedFolder(folder, name, "is missing") from None
        except OSError as e:
            raise DamagedFolder(folder, name, f"cannot be read ({e.strerror or e})") from None
        if size < end:
            raise DamagedFolder(folder, name, f"is truncated ({size} bytes, at least {end} expected)")
    return metadata


def _checked_reader(folder: str, metadata: Any) -> Any:
    """A ``FileSystemReader`` for ``folder`` that serves ``metadata`` (read safely) and reports a
    shard value it cannot read as :class:`_FileDamage` naming the file."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        current = "a shard file"

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # DCP's per-rank fallback: our folders have one .metadata
                raise FileNotFoundError(f"{folder} has no per-rank metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

        def _slice_file(self, file: Any, sinfo: Any) -> Any:  # per value read: remember its file
            self.current = sinfo.relative_path
            return super()._slice_file(file, sinfo)

        def read_data(self, plan: Any, planner: Any) -> Any:
            try:
                return super().read_data(plan, planner)
            except _FileDamage:
                raise
            except Exception as e:
                raise _FileDamage(self.current, _refusal(e)) from None

    return Reader(folder)


def _safe_planner(base: type) -> Any:
    """A DCP load planner (``base``'s subclass) that unpickles the shards' non-tensor values
    with ``weights_only=True`` first (DCP's own ``load_bytes`` uses ``weights_only=False``)."""

    class Planner(base):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            data = value.getvalue()
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:
                info = self.metadata.storage_data.get(read_item.storage_index)
                raise _FileDamage(getattr(info, "relative_path", "a shard file"), _refusal(e)) from None
            super().load_bytes(read_item, io.BytesIO(data))

    return Planner()


def _dcp_failure(error: BaseException) -> BaseException | None:
    """The first rank's exception inside DCP's ``CheckpointException`` (or ``error`` itself)."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return error
    first = failures[min(failures)]
    return first[0] if isinstance(first, tuple) else getattr(first, "exc", first)


def _load_checked(folder: str, state: dict[str, Any], planner: Any, *, alone: bool = False) -> None:
    """DCP ``load`` of ``state`` from ``folder`` through the safe reader and ``planner``:
    ``DamagedFolder`` naming the file for damage, a ``RuntimeError`` (one line) for a folder
    that does not fit ``state``. *Collective* under a process group, unless ``alone`` (this
    process reads the whole folder by itself, e.g. rank 0 converting it offline)."""
    from torch.distributed.checkpoint import load

    metadata = _read_metadata(folder)
    try:
        with _single_process_quiet():
            load(state, storage_reader=_checked_reader(folder, metadata), planner=planner,
                 no_dist=alone or not _distributed())
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        inner = _dcp_failure(e)
        if isinstance(inner, _FileDamage):
            raise DamagedFolder(folder, inner.name, inner.what) from None
        if isinstance(inner, OSError) and inner.filename:  # a shard gone since _read_metadata
            raise DamagedFolder(folder, os.path.basename(os.fspath(inner.filename)),
                                f"cannot be read ({inner.strerror or inner})") from None
        if isinstance(e, Exception):
            raise
        raise RuntimeError(one_line(f"{type(inner).__name__}: {inner}")) from None



def join_posthoc_profiles(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``ckpt`` (in place) in the single-file layout of the post-hoc state: the profiles read
    from a folder's ``posthoc_ema_profiles`` go back under ``posthoc_ema["profiles"]`` (a list,
    profile order). The key is dropped; an empty one (nothing read) changes nothing else."""
    profiles = ckpt.pop(POSTHOC_PROFILES, None)
    state = ckpt.get(POSTHOC)
    if profiles and isinstance(state, dict):
        ckpt[POSTHOC] = {**state, "profiles": [profiles[str(k)] for k in range(len(profiles))]}
    return ckpt


def is_dcp_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a complete DCP checkpoint folder (it has DCP's ``.metadata``,
    written last), ours or any other torch.distributed.checkpoint writer's."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, _DCP_METADATA))


def _side_names(folder: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.dcp-{kind}-")


def resolve_dcp_folder(folder: str | os.PathLike[str]) -> str | None:
    """The complete folder to read for ``folder``: itself, or when a save was killed between
    its two renames the complete previous copy beside it; None when neither exists."""
    folder = os.fspath(folder)
    if is_dcp_folder(folder):
        return folder
    if os.path.exists(folder):
        return None
    old = sorted(p for p in glob.glob(_side_names(folder, "old") + "*") if is_dcp_folder(p))
    return old[-1] if old else None


def names_dcp_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is read as a checkpoint folder: a directory, or a DCP folder that a
    save killed between its two renames left beside ``path`` (:func:`resolve_dcp_folder`)."""
    return os.path.isdir(path) or resolve_dcp_folder(path) is not None


def _tidy(folder: str) -> None:
    """Rank 0 before a save: put back a complete previous folder left aside by a save killed
    between its renames, and delete unfinished temp folders of killed saves."""
    if not os.path.exists(folder):
        previous = resolve_dcp_folder(folder)
        if previous is not None and previous != folder:
            os.rename(previous, folder)
    for stale in glob.glob(_side_names(folder, "tmp") + "*") + glob.glob(_side_names(folder, "old") + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (as is without a process group)."""
    box = [obj]
    if _distributed():
        torch_dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that one process without a process group saves/loads alone:
    that is the intended use here (one-process runs, offline tools)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp(folder: str | os.PathLike[str], state: dict[str, Any]) -> str:
    """Write ``state`` as a DCP checkpoint folder, atomically at the folder level. *Collective*:
    every rank calls it with its own sharded state (or one process without a process group).

    Args:
        folder: the checkpoint folder (e.g. ``<run>/last.dcp``); replaced only once the new
            one is complete.
        state: checkpoint keys as in a single-file checkpoint; the sharded keys (see
            :func:`is_sharded_key`) hold sharded state dicts, the others plain values (tensors
            allowed) of which rank 0's are written (a rank's own values, e.g. its generator
            states, are gathered into a plain value first: ``train_position``).

    Returns the folder's path. Raises OSError on every rank when rank 0 could not write or
    finish the folder (a full disk, a value ``torch.load(weights_only=True)`` would refuse among
    the plain keys: checked before any shard is written); the previous folder is then intact.
    Temp folders of saves killed earlier are deleted by the next save.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save

    folder = os.path.abspath(os.fspath(folder))
    rank = torch_dist.get_rank() if _distributed() else 0
    sharded = {k: v for k, v in state.items() if is_sharded_key(k)}
    token, error = None, None
    if rank == 0:  # the small file first: a value torch.load(weights_only=True) refuses fails before any shard
        try:
            token = secrets.token_hex(6)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            _tidy(folder)
            plain = {k: v for k, v in state.items() if not is_sharded_key(k)}
            found = find_unplain(plain, "state")
            if found is not None:
                raise CheckpointError(f"{found[0]} is a {type(found[1]).__module__}.{type(found[1]).__qualname__}, "
                                      "which torch.load(weights_only=True) refuses; convert it to tensors or plain "
                                      "types (int, float, bool, str, list, tuple, dict) before saving")
            world = torch_dist.get_world_size() if _distributed() else 1
            meta = {"format": "emakit-dcp", "version": 1, "world_size": world, "sharded_keys": sorted(sharded),
                    "plain": plain}
            save_checkpoint(meta, os.path.join(_side_names(folder, "tmp") + token, META_FILE))
        except (OSError, CheckpointError) as e:
            error = _write_error(e)
            shutil.rmtree(_side_names(folder, "tmp") + str(token), ignore_errors=True)
    token, error = _broadcast((token, error))
    if error is not None:
        raise _folder_error(folder, error)
    tmp, old = _side_names(folder, "tmp") + token, _side_names(folder, "old") + token
    try:
        with _single_process_quiet():
            save(sharded, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not _distributed())
    except BaseException as e:  # DCP's CheckpointException is a BaseException; every rank gets it
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not (is_disk_full(e) or _chained_os_error(e)):
            raise  # not a failed write (a rank died, ...): the next save deletes the temp folder
        if rank == 0:  # every rank's writes ended before DCP raised (its results are gathered first)
            shutil.rmtree(tmp, ignore_errors=True)
        raise _folder_error(folder, _write_error(e)) from None
    if rank == 0:  # DCP returns on every rank after its coordinator wrote .metadata: the folder is complete
        error = _put_in_place(tmp, folder, old)
    error = _broadcast(error)
    if error is not None:
        raise _folder_error(folder, error, "finish")
    return folder


def _chained_os_error(error: BaseException) -> OSError | None:
    """The first ``OSError`` in ``error``'s chain (DCP's per-rank failures included), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error
        inner = _dcp_failure(error)
        error = inner if inner is not error else (error.__cause__ or error.__context__)
    return None


def _write_error(error: BaseException) -> tuple[int | None, str]:
    """(errno, text) of a failed write, picklable for the other ranks: ENOSPC for a full disk
    however the writer said it (:func:`emakit.checkpoint.is_disk_full`)."""
    if is_disk_full(error):
        return errno.ENOSPC, os.strerror(errno.ENOSPC)
    found = _chained_os_error(error)
    if found is not None and found.errno is not None:
        return found.errno, found.strerror or str(found)
    return None, one_line(f"{type(error).__name__}: {error}")


def _folder_error(folder: str, error: tuple[int | None, str] | str, verb: str = "write") -> OSError:
    """The ``OSError`` every rank raises for a folder that could not be written (``filename``:
    the folder, so ``lifecycle.write_failed`` names it)."""
    if isinstance(error, tuple) and error[0] is not None:
        return OSError(error[0], error[1], folder)
    text = error[1] if isinstance(error, tuple) else error
    return OSError(f"could not {verb} the checkpoint folder {folder} ({text}); the previous one is kept")


def _put_in_place(tmp: str, folder: str, old: str) -> str | None:
    """Rank 0: the complete ``tmp`` folder becomes ``folder`` (the previous one moved to ``old``
    first, deleted last); the error text, or None."""
    try:
        fsync_dir(tmp)
        replaced = os.path.exists(folder)
        if replaced:
            os.rename(folder, old)
        os.rename(tmp, folder)
        fsync_dir(os.path.dirname(folder))
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if not os.path.exists(folder) and os.path.exists(old):
            with contextlib.suppress(OSError):
                os.rename(old, folder)
        return f"{type(e).__name__}: {e}"
    return None


def link_dcp_folder(src: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str:
    """Make ``folder`` a copy of the complete DCP folder ``src`` made of hard links to its files
    (a copy where links are refused), replacing ``folder`` atomically like :func:`save_dcp`.
    *Collective* (rank 0 works, every rank learns the outcome); raises OSError on every rank."""
    folder, error = os.path.abspath(os.fspath(folder)), None
    if not _distributed() or torch_dist.get_rank() == 0:
        token = secrets.token_hex(6)
        tmp, old = _side_names(folder, "tmp") + token, _side_names(folder, "old") + token
        try:
            _tidy(folder)
            shutil.copytree(os.fspath(src), tmp, copy_function=_link_or_copy)
            error = _put_in_place(tmp, folder, old)
        except OSError as e:
            error = _write_error(e)
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    error = _broadcast(error)
    if error is not None:
        raise _folder_error(folder, error)
    return folder


class DcpSaver:
    """``--checkpoint-format dcp``'s counterpart of :class:`emakit.checkpoint.CheckpointSaver`,
    on every rank: ``last.dcp`` (every rank writes its shards) and ``model_best.dcp`` (hard
    links to the same files) when the metric beats the best so far. Saves are *collective*;
    ``resumed``: the best so far is the metric of the run folder's ``model_best.dcp``."""

    def __init__(self, folder: str, *, decreasing: bool, resumed: bool = False) -> None:
        self.folder, self.decreasing, self.best = folder, decreasing, None
        self.last_path = os.path.join(folder, DCP_LAST)
        best = os.path.join(folder, DCP_BEST)
        if resumed and is_dcp_folder(best):
            try:
                self.best = read_dcp_meta(best).get("plain", {}).get(METRIC)
            except DamagedFolder as e:  # no best so far: the next epoch's folder replaces it
                _log.warning("%s is damaged (%s cannot be read): the next epoch's checkpoint replaces it",
                             e.folder, e.name)

    def save_last(self, state: dict[str, Any]) -> str:
        """Write ``last.dcp`` alone (a mid-epoch stop)."""
        return save_dcp(self.last_path, state)

    def save(self, state: dict[str, Any], epoch: int, metric: float | None) -> str:
        """Write ``last.dcp``, then link ``model_best.dcp`` to it when ``metric`` is the best."""
        last = self.save_last(state)
        best = self.best
        if metric is not None and (best is None or (metric < best if self.decreasing else metric > best)):
            self.best = metric
            link_dcp_folder(last, os.path.join(self.folder, DCP_BEST))
        return last


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_dcp_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``emakit.pt`` of a folder written by :func:`save_dcp` (``plain``, ``world_size``,
    ``sharded_keys``); ``{}`` for a DCP folder another writer made.
    :class:`DamagedFolder` when it, or DCP's ``.metadata`` (read and checked too, with the
    sizes of the shard files it names), is truncated, corrupt, missing or asks to run code."""
    if os.path.isfile(os.path.join(os.fspath(folder), _DCP_METADATA)):
        _read_metadata(os.fspath(folder))
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise DamagedFolder(os.fspath(folder), META_FILE, f"cannot be read ({e.strerror or e})") from None
    except Exception as e:
        raise DamagedFolder(os.fspath(folder), META_FILE, _refusal(e)) from None
    if not isinstance(meta, dict):
        raise DamagedFolder(os.fspath(folder), META_FILE, f"holds a {type(meta).__name__}, not emakit's folder data")
    return meta


def load_dcp(folder: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
    """Fill the sharded templates in ``state`` in place from the folder, resharding to this
    world size (the folder may come from any number of ranks or one process). *Collective*.

    ``state`` maps sharded keys (see :func:`is_sharded_key`) to templates of the target form:
    ``fsdp.sharded_model_state(model)``, ``fsdp.sharded_optimizer_state(model, opt)``,
    ``ema.state_dict_ema(full=False)``; apply them afterwards with
    ``fsdp.load_full_model_state`` / ``fsdp.load_sharded_optimizer_state`` /
    ``ema.load_checkpoint_state``. A template key the folder lacks, or one of another shape,
    raises ``RuntimeError``; a damaged folder :class:`DamagedFolder` (every rank). Returns the
    folder's ``emakit.pt`` (``plain`` values, ``world_size``; ``{}`` for a foreign folder).
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    path = resolve_dcp_folder(folder)
    if path is None:
        raise FileNotFoundError(f"{os.fspath(folder)} is not a complete torch.distributed.checkpoint folder")
    bad = [k for k in state if not is_sharded_key(k)]
    if bad:
        raise ValueError(f"load_dcp fills sharded keys only, not {bad}; plain values are in the returned meta")
    meta = read_dcp_meta(path)
    if state:
        _load_checked(path, state, _safe_planner(DefaultLoadPlanner))
    return meta


def dcp_folder_to_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A DCP folder as the dict of a single-file checkpoint, offline (one process, no process
    group): whole CPU tensors under ``state_dict`` / ``state_dict_ema*``, ``optimizer`` in the
    standard integer-id layout, and the plain keys (epoch, ``ema`` meta, scheduler, ...) of
    ``emakit.pt``. The whole checkpoint is read into memory (as torch's
    ``format_utils.dcp_to_torch_save`` does, without its temporary file). A damaged folder
    is a :class:`DamagedFolder`."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner


    path = resolve_dcp_folder(folder)
    if path is None:
        raise FileNotFoundError(f"{os.fspath(folder)} is not a complete torch.distributed.checkpoint folder")
    meta = read_dcp_meta(path)
    planner = _safe_planner(_EmptyStateDictLoadPlanner)
    _load_checked(path, {}, planner, alone=True)  # offline: no collective, whatever process group exists
    ckpt = dict(planner.original_state_dict)  # the planner builds the state from .metadata
    opt = ckpt.get(OPTIMIZER)
    if isinstance(opt, dict) and opt.get("param_groups") and any(
            isinstance(n, str) for g in opt["param_groups"] for n in g["params"]):
        ckpt[OPTIMIZER] = optimizer_state_to_ids(opt)
    if meta:
        ckpt = {**meta.get("plain", {}), **ckpt}
    return join_posthoc_profiles(ckpt)
