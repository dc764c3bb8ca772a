"""Checkpoint files: atomic writes, safe reads, and the formats other trainers write.

A checkpoint is one dict of tensors and plain Python types, so it loads with
``torch.load(..., weights_only=True)``::

    epoch, arch, version, state_dict, state_dict_ema, ema, optimizer, scheduler,
    amp_scaler, args (plain dict), metric, metrics

The weight keys are timm's, so ``timm.models.load_checkpoint(model, path, use_ema=True)``
reads our files. Reading accepts timm's files (``args`` pickled as an
``argparse.Namespace``), SuperGradients' (``net`` / ``ema_net``), torchvision references'
(``model`` / ``model_ema`` with ``module.`` prefixes and ``n_averaged``), bare state dicts
and ``.safetensors`` files. Loading never runs code from the file: a pickle that needs any
global beyond torch's allowlist and ``argparse.Namespace`` is refused.

Every write goes to a temporary file in the target folder, is flushed and fsynced, and
then ``os.replace``-d over the target, so a crash at any instant leaves either the old
file or the new one, never a torn one.

Integrity: every file :func:`save_torch_file` writes (checkpoints, bare state dicts, post-hoc
snapshots) carries the SHA-256 of its bytes in the zip archive's comment (the end record
torch.save leaves empty), computed while torch writes, so torch.load and timm read the file
unchanged. A full read checks it first: bytes damaged after the write (a bit flip, a zeroed
block) are an error naming the file and the previous intact checkpoint beside it, not a run
that resumes from wrong numbers. Files without the comment (timm's, older ones) load unchecked.

Only torch, the standard library and :mod:`emakit.ema` (for a DTensor's local shard) are
imported here; safetensors is imported inside the functions that need it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch
from torch import nn

from .ema import local_shard

__all__ = ["atomic_write", "damage_reason", "refused_global", "ema_checkpoint_keys", "ema_indices", "find_nonfinite",
           "find_unplain", "nonfinite_names", "fsync_dir", "is_disk_full", "safe_torch_load", "remove_stale_temp_files",
           "write_text_atomic", "CheckpointError", "UnsafeCheckpointError", "DamagedCheckpointError", "CheckpointSaver",
           "describe_nonfinite", "previous_intact_checkpoint", "save_torch_file", "state_dict_mismatch",
           "verify_checksum", "check_state_dict_compat", "describe_format", "extract_state_dict", "load_checkpoint",
           "load_state_dict_strict", "save_checkpoint", "save_safetensors", "strip_prefixes"]

_log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Wrapper prefixes: DistributedDataParallel/DataParallel/AveragedModel add "module.",
# torch.compile adds "_orig_mod."; they nest in either order (compile(DDP) or DDP(compile)).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Where each known format keeps its weights, in the order we look. A value of None counts
# as absent (SuperGradients writes ema_net=None when EMA is off).
_RAW_KEYS = ("state_dict", "net", "model")  # ours/timm, SuperGradients, torchvision refs
_EMA_KEYS = ("state_dict_ema", "ema_net", "model_ema")  # same order
_EMA_EXTRA_KEY = "state_dict_ema_{}"  # extra EMAs (issue 5): state_dict_ema_1, ...

# Types that torch.load(weights_only=True) rebuilds without an allowlist (checked on torch
# 2.15; not re-checked on 2.4). Exact types, not isinstance: a
# str-Enum or a defaultdict pickles as its own class and would be refused on load.
_PLAIN_LEAVES = (int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)

_CHECKPOINT_EXT = ".pth.tar"


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that ``torch.load(weights_only=True)`` refused: it asks to import or run code
    (``code``: what, e.g. ``" (posix.system)"``, or ``""``). Nothing in it was run; the file is
    not (necessarily) damaged."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class DamagedCheckpointError(CheckpointError):
    """A file whose bytes are truncated, corrupt, not a checkpoint, or no longer match the
    checksum written with it."""


# --------------------------------------------------------------------------- writing
def fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Every temp file we create is ".<target name>.<8 hex digits>.tmp" in the target's folder;
# remove_stale_temp_files matches exactly this shape, so it never touches anyone else's files.
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


def _temp_name(path: str) -> str:
    """A fresh temp file name next to ``path`` (see ``_TEMP_RE``)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(folder: PathLike) -> list[str]:
    """Delete the temp files our atomic writes leave in ``folder`` when a process is killed
    mid-write (``.<name>.<8 hex>.tmp``); returns their paths. Call it only on a folder no
    other process is writing to (the run folder, after taking its lock). Other files, and
    temp files of other shapes, are left alone; a missing folder is not an error."""
    folder = os.fspath(folder)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(folder, name)
        if _TEMP_RE.match(name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


def _reserve_temp(path: str) -> str:
    """Create an empty, uniquely named temp file next to ``path`` and return its name.

    Created with mode 0o666 so the umask applies as it would to a plain ``open(path, "wb")``
    (``tempfile.mkstemp`` would leave a 0600 checkpoint behind)."""
    while True:
        tmp = _temp_name(path)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)``, fsync the result, then ``os.replace`` it onto ``path``.

    The one way emakit writes files (checkpoints, snapshots, results, plots): on any
    exception (KeyboardInterrupt included) the temp file is removed and whatever was at
    ``path`` before is untouched; missing parent folders are created. A failed write is an
    ``OSError`` naming ``path`` (not the temp file); torch.save's C++ writer reports a full
    disk as an opaque RuntimeError, which becomes ``OSError(ENOSPC)`` when the disk is
    indeed full at that moment."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _reserve_temp(path)
    try:
        write(tmp)
        # Reopen rather than fsync a handle the writer may have replaced (safetensors opens
        # the path itself); fsync needs a writable descriptor on Windows.
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        full = not isinstance(error, OSError) and (is_disk_full(error) or (
            isinstance(error, RuntimeError) and _disk_full(folder)))  # measured while the temp file still exists
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full:
            # Drop torch's frames: they hold the writer, whose open descriptor would keep the
            # deleted temp file's blocks in use on the full disk.
            _drop_tracebacks(error)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
        if isinstance(error, OSError) and error.errno is not None and error.filename in (tmp, None):
            raise OSError(error.errno, error.strerror, path) from error
        raise
    fsync_dir(folder)


def _drop_tracebacks(error: BaseException | None) -> None:
    """Clear the tracebacks of ``error`` and of the exceptions chained to it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__context__ or error.__cause__


# How writers that are not Python's say "disk full": torch's C++ zip writer ("unexpected pos"),
# safetensors' Rust writer ("os error 28"), and the strerror of ENOSPC / EDQUOT.
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b|unexpected pos")


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` or an exception chained to it (``__cause__``, ``__context__``, the
    per-rank failures of torch.distributed.checkpoint's ``CheckpointException``) says the disk
    is full: errno ENOSPC / EDQUOT, or the words torch's and safetensors' writers use."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
        elif _DISK_FULL_TEXT.search(str(e)):
            return True
        failures = getattr(e, "failures", None)
        failures = failures.values() if isinstance(failures, dict) else ()
        todo += [e.__cause__, e.__context__, *(f[0] if isinstance(f, tuple) else getattr(f, "exc", None)
                                               for f in failures)]
    return False


def _disk_full(folder: str, slack: int = 1 << 20) -> bool:
    """Less than ``slack`` bytes left for us on ``folder``'s filesystem (root may use the
    blocks reserved for it); False where that cannot be measured."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return False
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize < slack


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a crash never leaves half a file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    atomic_write(path, write)


def find_nonfinite(obj: Any, where: str = "state", skip_keys: frozenset[str] = frozenset()) -> list[str]:
    """Key paths (``state['state_dict']['fc.weight']``) of the floating-point tensors in a
    nested dict/list/tuple that hold a NaN or an infinity. ``skip_keys``: dict keys whose
    tensors are left out wherever they appear (buffers that are -inf by design, such as
    attention masks). A DTensor (FSDP) is checked on this rank's shard only (no communication).

    Cheap enough to run before every checkpoint write: the tensors are screened with one
    fused 2-norm per (device, dtype) group and one host sync (a norm is non-finite when an
    element is, or when huge finite values overflow it); only the tensors of a group whose
    screen fails are checked one by one, so the answer is exact."""
    found: list[tuple[str, torch.Tensor]] = []
    _collect_float_tensors(obj, where, skip_keys, found)
    return nonfinite_names(found)


def nonfinite_names(named: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point (or complex) tensors in ``named`` that hold a NaN or an
    infinity, in their order: one fused 2-norm screen per (device, dtype) group and one host
    sync, then an exact check of the tensors of a group whose screen fails (huge finite
    values can overflow a norm). Integer tensors are never flagged; a DTensor (FSDP) is
    checked on this rank's shard (no communication)."""
    named = [(name, local_shard(t)) for name, t in named]  # a DTensor: this rank's shard
    named = [(name, t) for name, t in named if (t.is_floating_point() or t.is_complex()) and t.numel()]
    groups: dict[tuple[torch.device, torch.dtype | None], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        key = (tensor.device, tensor.dtype) if not tensor.is_complex() else (tensor.device, None)
        groups.setdefault(key, []).append((name, tensor))
    failed = [members for (_, dtype), members in groups.items()  # complex: checked one by one
              if dtype is None or not bool(torch.isfinite(torch.stack(torch._foreach_norm(
                  [t for _, t in members], 2.0))).all())]
    bad = {name for members in failed for name, tensor in members if not bool(torch.isfinite(tensor).all())}
    return [name for name, _ in named if name in bad]


def describe_nonfinite(obj: Any, where: str = "", skip_keys: frozenset[str] = frozenset()) -> str | None:
    """None when every floating-point tensor in ``obj`` (a state dict or a nested checkpoint
    dict) is finite; else ``"fc.weight holds NaN (and 2 more tensors)"`` naming the first bad
    tensor by its key path (``where`` prefixes it; ``""``: a state dict's own key). One
    :func:`find_nonfinite` pass (a fused norm screen per dtype group; on a resnet50
    checkpoint with EMA and optimizer state, 307 MB, it takes 14 ms, 3% of its torch.load)."""
    found: list[tuple[str, torch.Tensor]] = []
    _collect_float_tensors(obj, where, skip_keys, found)
    bad = nonfinite_names(found)
    if not bad:
        return None
    first = next(t for name, t in found if name == bad[0])
    kind = "NaN" if bool(torch.isnan(local_shard(first)).any()) else "an infinity"
    name = re.sub(r"^\['([^']*)'\]", r"\1", bad[0])  # ['state_dict']['fc.weight'] -> state_dict['fc.weight']
    more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return f"{name} holds {kind}{more}"


def _collect_float_tensors(obj: Any, where: str, skip_keys: frozenset[str],
                           out: list[tuple[str, torch.Tensor]]) -> None:
    """Append (key path, tensor) for every tensor in ``obj`` (:func:`nonfinite_names` keeps
    the non-empty floating and complex ones, a DTensor's local shard)."""
    if isinstance(obj, torch.Tensor):
        out.append((where, obj))
    elif isinstance(obj, (Mapping, list, tuple)):
        for key, value in (obj.items() if isinstance(obj, Mapping) else enumerate(obj)):
            if not (isinstance(obj, Mapping) and key in skip_keys):
                _collect_float_tensors(value, f"{where}[{key!r}]", skip_keys, out)


def find_unplain(obj: Any, where: str) -> tuple[str, Any] | None:
    """Return (key path, object) of the first value that weights_only loading would refuse."""
    kind = type(obj)
    if kind in _PLAIN_TENSORS or kind in _PLAIN_LEAVES:
        return None
    if kind not in _PLAIN_CONTAINERS:
        return where, obj
    for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        if isinstance(obj, dict) and type(key) not in _PLAIN_LEAVES:
            return f"{where} (key {key!r})", key
        if (found := find_unplain(value, f"{where}[{key!r}]")) is not None:
            return found
    return None


# --------------------------------------------------------------------------- integrity
# torch.save writes a zip archive whose end record (22 bytes, "PK\x05\x06") has an empty
# comment; ours holds "emakit-sha256:<64 hex>", the SHA-256 of the bytes torch wrote (comment
# length 0). Zip readers (torch.load, with or without mmap, and so timm) ignore the comment.
# Measured on a resnet50 checkpoint with EMA and SGD momentum (307 MB, one core): sha256 1.8
# GB/s (0.17 s; blake2b 0.9 GB/s, md5 0.8 GB/s), hashed from the page cache after torch.save
# (which keeps writing to a path, so its full-disk errors and the tests' patches stay as they
# were) and once before a full load, against 0.2-0.9 s for torch.save / torch.load of that file
# from the page cache and the fsync of every write; metadata reads (mmap) skip it.
_CHECKSUM_TAG = b"emakit-sha256:"
_CHECKSUM_LEN = len(_CHECKSUM_TAG) + 64
_EOCD_SIG, _EOCD_SIZE = b"PK\x05\x06", 22
_HASH_CHUNK = 1 << 20


def _file_sha256(path: str, length: int) -> "hashlib._Hash | None":
    """SHA-256 of the first ``length`` bytes of ``path`` (None if the file is shorter); read
    into one reused buffer (no per-chunk bytes objects; both the read and the hash release the GIL)."""
    h, view = hashlib.sha256(), memoryview(bytearray(_HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while length > 0:
            n = f.readinto(view[:min(_HASH_CHUNK, length)])
            if not n:
                return None
            h.update(view[:n])
            length -= n
    return h


def _append_checksum(path: str) -> None:
    """Put the SHA-256 of ``path``'s bytes in its zip comment; nothing is added when the file
    does not end in an empty-comment zip end record (not a torch.save zip)."""
    size = os.path.getsize(path)
    if size < _EOCD_SIZE:
        return
    with open(path, "rb") as f:
        f.seek(size - _EOCD_SIZE)
        end = f.read(_EOCD_SIZE)
    if end[:4] != _EOCD_SIG or end[-2:] != b"\0\0":
        return
    comment = _CHECKSUM_TAG + _file_sha256(path, size).hexdigest().encode()  # type: ignore[union-attr]
    with open(path, "r+b") as f:
        f.seek(size - 2)
        f.write(struct.pack("<H", len(comment)) + comment)


def save_torch_file(obj: Any, path: PathLike, *, through_handle: bool = False) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`), then the checksum that
    :func:`verify_checksum` checks on a full load. ``through_handle``: torch.save to an open
    file rather than a path (the post-hoc snapshot layout). No check of ``obj``'s types (see
    :func:`save_checkpoint`)."""

    def write(tmp: str) -> None:
        if through_handle:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        else:
            torch.save(obj, tmp)
        _append_checksum(tmp)

    atomic_write(path, write)


def _stored_checksum(path: str) -> tuple[int, str] | None:
    """(bytes covered, hex digest) of a file written by :func:`save_torch_file`; None for a
    file without our checksum. A file cut inside the checksum comment gives a digest that
    matches nothing, so it reads as damaged."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - _EOCD_SIZE - _CHECKSUM_LEN))
            tail = f.read()
    except OSError:
        return None
    at = tail.rfind(_EOCD_SIG)
    if at < 0 or len(tail) < at + _EOCD_SIZE:
        return None
    end, comment = tail[at:at + _EOCD_SIZE], tail[at + _EOCD_SIZE:]
    if end[-2:] != struct.pack("<H", _CHECKSUM_LEN) or not comment.startswith(_CHECKSUM_TAG[:len(comment)]):
        return None
    if len(comment) != _CHECKSUM_LEN:
        return size, "cut short"
    return size - _CHECKSUM_LEN - 2, comment[len(_CHECKSUM_TAG):].decode("ascii", "replace")


def verify_checksum(path: PathLike) -> bool | None:
    """True when ``path``'s bytes match the checksum written with them, False when they do
    not (damaged after the write), None when the file has no checksum (not ours, or older)."""
    path = os.fspath(path)
    stored = _stored_checksum(path)
    if stored is None:
        return None
    covered, digest = stored
    h = _file_sha256(path, covered)
    if h is None:
        return False
    h.update(b"\0\0")  # the comment length torch wrote
    return h.hexdigest() == digest


_NUMBERED_RE = re.compile(r"^checkpoint-(\d+)" + re.escape(_CHECKPOINT_EXT) + "$")


def previous_intact_checkpoint(path: PathLike, limit: int = 3) -> str | None:
    """The newest checkpoint beside ``path`` whose checksum holds: ``checkpoint-<N>.pth.tar``
    (older than ``path`` when it is one itself), then ``model_best.pth.tar``; never ``path``
    nor a hard link to it. At most ``limit`` files with a checksum are hashed; None if none."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    own = _NUMBERED_RE.match(os.path.basename(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    numbered = sorted(((int(m.group(1)), n) for n in names if (m := _NUMBERED_RE.match(n))), reverse=True)
    candidates = [n for epoch, n in numbered if own is None or epoch < int(own.group(1))]
    candidates += ["model_best" + _CHECKPOINT_EXT] if "model_best" + _CHECKPOINT_EXT in names else []
    for name in candidates:
        candidate = os.path.join(folder, name)
        try:
            if os.path.samefile(candidate, path):
                continue
        except OSError:
            continue
        verdict = verify_checksum(candidate)
        if verdict is None:
            continue
        if verdict:
            return candidate
        limit -= 1
        if limit <= 0:
            break
    return None


def _checksum_error(path: str) -> DamagedCheckpointError:
    previous = previous_intact_checkpoint(path) if path.endswith(_CHECKPOINT_EXT) else None
    fix = (f"the previous intact checkpoint is {previous}: use that one" if previous
           else "re-copy it or pick another checkpoint")
    return DamagedCheckpointError(f"cannot read {path}: the file is truncated or corrupt (its bytes no longer "
                                  f"match the SHA-256 checksum written with it); {fix}")


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` with ``torch.save``, atomically.

    ``state`` may hold only tensors and plain Python types (int, float, bool, str, bytes,
    None, list, tuple, dict, torch.Size/dtype/device), so that ``torch.load(path,
    weights_only=True)`` reads it back; anything else (an ``argparse.Namespace``, a
    ``pathlib.Path``, a numpy scalar, a module) raises :class:`CheckpointError` naming its
    key path before anything is written. Missing parent folders are created.
    """
    if type(state) not in (dict, OrderedDict):
        raise CheckpointError(f"cannot save a {type(state).__name__} as a checkpoint; pass a dict")
    if (found := find_unplain(state, "state")) is not None:
        where, obj = found
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise CheckpointError(f"cannot save checkpoint {os.fspath(path)}: {where} is a {kind}, which "
                              "torch.load(weights_only=True) refuses; convert it to tensors or plain types (int, "
                              "float, bool, str, list, tuple, dict) before saving")
    save_torch_file(state, path)


def _as_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """safetensors metadata must be str -> str; non-str values are stored as JSON."""
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise CheckpointError(f"safetensors metadata keys must be str, got {key!r}; convert it with str()")
        try:
            out[key] = value if isinstance(value, str) else json.dumps(value)
        except TypeError:
            raise CheckpointError(f"safetensors metadata {key!r} is a {type(value).__name__}; pass a str or a "
                                  "JSON-serialisable value") from None
    return None if metadata is None else out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write a state dict as a ``.safetensors`` file, atomically.

    Every tensor is copied to its own contiguous CPU storage first: safetensors refuses
    tensors that share memory (tied weights, views) and non-contiguous ones. ``metadata``
    values that are not str are stored as JSON text.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("writing .safetensors needs the safetensors package; pip install safetensors") from None
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"safetensors holds only str -> tensor entries, but {key!r} is a "
                                  f"{type(value).__name__}; drop it or store it in metadata")
        # clone() gives each tensor its own storage sized to the tensor, so views of a
        # larger buffer and tied weights are written (and read back) independently.
        tensors[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    meta = _as_metadata(metadata)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# --------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _namespace_allowed() -> Iterator[None]:
    """Let weights_only unpickling rebuild ``argparse.Namespace`` (timm/torchvision ``args``).

    torch >= 2.5 scopes the allowlist to a context manager; torch 2.4 only has the
    process-wide ``add_safe_globals``, so there the allowance outlives the call. A
    Namespace only receives attributes from the pickle, it runs no code of its own.
    """
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals([argparse.Namespace]):
            yield
    else:
        if hasattr(serialization, "add_safe_globals"):
            serialization.add_safe_globals([argparse.Namespace])
        yield


# How torch words a refused global, across versions: 2.4-2.15 say "GLOBAL mod.name",
# older ones "Unsupported class mod.name" or "unrecognized function `name`".
_REFUSED_RES = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"Unsupported class ([\w.]+)"),
                re.compile(r"unrecognized function `?([\w.]+)"))


# Opcodes that only build objects from importable names (INST, OBJ, the copyreg extension
# registry); the weights_only unpickler has none of them, so meeting one means a pickle that
# wants code, not damaged bytes.
_CODE_OPCODES = {ord("i"): "INST", ord("o"): "OBJ", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4"}


def refused_global(error: BaseException) -> str | None:
    """The global a weights_only load refused, or "" if the refusal names none; None if the
    error is not about code at all (then the file is damaged or not a checkpoint)."""
    text = str(error)
    for pattern in _REFUSED_RES:
        if match := pattern.search(text):
            return match.group(1)
    if "Can only build" in text or "Can only create new object" in text:  # BUILD / NEWOBJ outside the allowlist
        return ""
    if (match := re.search(r"Unsupported operand (\d+)", text)) and int(match.group(1)) in _CODE_OPCODES:
        return f"pickle opcode {_CODE_OPCODES[int(match.group(1))]}"
    return None


def _is_damage(error: BaseException) -> bool:
    """Errors torch.load raises for a truncated, corrupt or non-torch file (checked on 2.15)."""
    # torch's weights_only unpickler is pure Python: garbage bytes surface as whatever
    # lookup or stack operation they break (KeyError for an unknown opcode, IndexError for
    # popping an empty stack, ...).
    if isinstance(error, (EOFError, pickle.UnpicklingError, LookupError, ValueError, TypeError,
                          AttributeError, struct.error, OverflowError)):
        return True
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
        return True  # seek past the end of a truncated zip
    if isinstance(error, RuntimeError):
        # The zip reader and the legacy loader report bad bytes as RuntimeError ("failed
        # finding central directory", "Invalid magic number", "Expected hasRecord(...)");
        # the RuntimeErrors that are not about the bytes concern map_location or mmap.
        return not re.search(r"device|CUDA|mmap", str(error))
    return False


def damage_reason(error: BaseException) -> str:
    """A few words on what torch tripped over; its own messages run to paragraphs."""
    if isinstance(error, EOFError):
        return "the data ends early"
    if isinstance(error, (LookupError, struct.error)):
        return "unrecognised data"
    text = str(error)
    if match := re.search(r"Unsupported operand \d+|[Ii]nvalid load key[^\n]*|PytorchStreamReader[^.]*|"
                          r"Invalid magic number", text):
        return match.group(0).strip()
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first[:120]


class _Verifier(threading.Thread):
    """:func:`verify_checksum` of one file in a background thread, so a full load hashes the
    file while torch.load reads it (on a resnet50 checkpoint the hash costs about what the
    load does; side by side the load takes about as long as before on a machine with a spare core)."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True, name="emakit-checksum")
        self.path, self.verdict = path, None
        self.start()

    def run(self) -> None:
        """Hash the file."""
        with contextlib.suppress(OSError):  # unreadable: torch.load reports it
            self.verdict = verify_checksum(self.path)

    def damaged(self) -> bool:
        """Wait for the hash; True when the file does not match its checksum."""
        self.join()
        return self.verdict is False


def safe_torch_load(path: str, map_location: Any, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with Namespace allowed and errors made readable: a
    pickle that weights_only refused (it asks to import or run code) is an
    :class:`UnsafeCheckpointError`, a file whose bytes are damaged (truncated, corrupt, not a
    torch file, or not matching the checksum written with it) a :class:`DamagedCheckpointError`.
    A full read (not ``mmap``, which reads metadata only) checks the checksum, alongside the load."""
    verifier = None if mmap or not os.path.isfile(path) else _Verifier(path)
    try:
        with _namespace_allowed():
            loaded = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:
        if verifier is not None and verifier.damaged():  # the checksum says why, whatever torch tripped over
            raise _checksum_error(path) from None
        refused = refused_global(error) if isinstance(error, pickle.UnpicklingError) else None
        if refused is not None:
            what = f" ({refused})" if refused else ""
            raise UnsafeCheckpointError(f"refusing to load {path}: it is unsafe, it asks to import or run "
                                        f"code{what}, which torch.load(weights_only=True) refused, so nothing in it "
                                        "was run; load only files from trusted sources, or re-save the weights from "
                                        "trusted code with tensors and plain types only", what) from None
        if _is_damage(error):
            raise DamagedCheckpointError(f"cannot read {path}: the file is truncated, corrupt or not a torch "
                                         f"checkpoint ({damage_reason(error)}); re-copy it or pick another "
                                         "checkpoint") from None
        raise
    if verifier is not None and verifier.damaged():
        raise _checksum_error(path)
    return loaded


def _load_safetensors(path: str, map_location: Any) -> dict[str, Any]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading {path} needs the safetensors package; pip install safetensors") from None
    try:
        state_dict = load_file(path, device=str(map_location) if map_location is not None else "cpu")
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header
        if not type(error).__name__.startswith("Safetensor"):
            raise
        raise CheckpointError(f"cannot read {path}: the file is truncated or not a safetensors file ({error}); "
                              "re-copy it or pick another checkpoint") from None
    return {"state_dict": state_dict, "format": "safetensors", "metadata": metadata}


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint file into a dict, without ever running code from it.

    ``.safetensors`` files come back as ``{"state_dict": tensors, "format": "safetensors",
    "metadata": {str: str}}``. Pickled files are loaded with ``weights_only=True``;
    ``argparse.Namespace`` is the one extra type allowed, and an ``args`` Namespace is
    returned as a plain dict. A bare state dict comes back as it is (see
    :func:`extract_state_dict`). Raises :class:`CheckpointError` for a missing, truncated
    or corrupt file and for a pickle that wants to import or run code.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass a file such as {path}/last.pth.tar")
    if path.lower().endswith(".safetensors"):
        return _load_safetensors(path, map_location)
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a dict of weights; save a state dict or a "
                              "checkpoint dict")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt = {**ckpt, "args": vars(ckpt["args"]).copy()}
    return ckpt


# --------------------------------------------------------------------------- state dicts
def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop leading ``module.`` / ``_orig_mod.`` wrapper prefixes, repeated, in any order.

    Raises :class:`CheckpointError` if two keys become the same after stripping.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        clean = key
        while clean.startswith(_WRAPPER_PREFIXES):
            clean = clean[clean.index(".") + 1:]
        if clean in out:
            raise CheckpointError(f"state dict has both {key!r} and another key that is {clean!r} without its "
                                  "wrapper prefix; the file mixes wrapped and unwrapped weights, re-save it from the "
                                  "bare model")
        out[clean] = value
    return out


def _is_bare_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _drop_averaged_model_counter(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """torch.optim.swa_utils.AveragedModel (torchvision's ExponentialMovingAverage) stores the
    model under ``module.`` plus its own ``n_averaged`` counter, which is not a model weight."""
    if "n_averaged" in state_dict and all(k.startswith("module.") for k in state_dict if k != "n_averaged"):
        return {k: v for k, v in state_dict.items() if k != "n_averaged"}
    return state_dict


def _key_list(keys: Any, limit: int = 12) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


_WEIGHTS_RE = re.compile(r"^(raw|ema)(?::(\d+))?$")


def _parse_weights(weights: str) -> int | None:
    """None for raw weights, N for EMA number N (0 = the main EMA)."""
    match = _WEIGHTS_RE.match(str(weights))
    if match is None or (match.group(1) == "raw" and match.group(2) is not None):
        raise CheckpointError(f"unknown weights {weights!r}; use 'raw', 'ema', or 'ema:N' (N = 0, 1, ...)")
    return None if match.group(1) == "raw" else int(match.group(2) or 0)


def ema_checkpoint_keys(index: int) -> tuple[str, str]:
    """(weights key, meta key) of EMA ``index`` in our checkpoints: timm's ``state_dict_ema`` /
    ``ema`` for the first, ``state_dict_ema_<i>`` / ``ema_<i>`` for EMA i >= 1 (what
    :func:`extract_state_dict` calls ``"ema:i"``). The one place these names are spelled."""
    return ("state_dict_ema", "ema") if index == 0 else (_EMA_EXTRA_KEY.format(index), f"ema_{index}")


def ema_indices(ckpt: Mapping[str, Any]) -> list[int]:
    """Indices of the EMAs a checkpoint holds weights for (0 for ``state_dict_ema``, i for
    ``state_dict_ema_<i>``), ascending."""
    prefix = _EMA_EXTRA_KEY.format("")
    extra = sorted(int(k[len(prefix):]) for k in ckpt if isinstance(k, str) and k.startswith(prefix)
                   and k[len(prefix):].isdigit() and int(k[len(prefix):]) > 0)
    return ([0] if _present(ckpt, ema_checkpoint_keys(0)[0]) else []) + extra


def _present(ckpt: Mapping[str, Any], key: str) -> bool:
    return ckpt.get(key) is not None


def extract_state_dict(ckpt: Mapping[str, Any], weights: str = "raw", source: str | None = None) -> dict[str, Any]:
    """Pick one set of model weights out of a loaded checkpoint and strip wrapper prefixes.

    ``weights``: ``"raw"`` (the trained weights), ``"ema"`` / ``"ema:0"`` (the main EMA) or
    ``"ema:N"`` (extra EMA N, ``state_dict_ema_N``). Knows ours/timm's (``state_dict``,
    ``state_dict_ema``), SuperGradients' (``net``, ``ema_net``), torchvision references'
    (``model``, ``model_ema``; its ``n_averaged`` counter is dropped) and bare state dicts,
    whose tensors count as the raw weights. Asking for EMA weights a file does not have is
    a :class:`CheckpointError` listing its keys, never a silent fallback. ``source`` (a
    file name) only improves error messages.
    """
    ema_index = _parse_weights(weights)
    name = source or "the checkpoint"
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{name} holds a {type(ckpt).__name__}, not a dict of weights")

    if _is_bare_state_dict(ckpt):
        # Every value is a tensor: the file is the weights themselves (a parameter that
        # happens to be called "model" must not be mistaken for a format key).
        key = None
        if ema_index is not None:
            raise CheckpointError(f"{name} is a bare state dict with no EMA weights (keys: {_key_list(ckpt)}); "
                                  "evaluate its weights with --weights raw")
    elif ema_index is None:
        key = next((k for k in _RAW_KEYS if _present(ckpt, k)), None)
        if key is None:
            has_ema = any(_present(ckpt, k) for k in _EMA_KEYS) or bool(ema_indices(ckpt))
            hint = "; it has EMA weights, use --weights ema" if has_ema else ""
            raise CheckpointError(f"{name} has no model weights (looked for {', '.join(_RAW_KEYS)}; top-level keys: "
                                  f"{_key_list(ckpt)}){hint}")
    else:
        candidates = _EMA_KEYS if ema_index == 0 else (ema_checkpoint_keys(ema_index)[0],)
        key = next((k for k in candidates if _present(ckpt, k)), None)
        if key is None:
            raise CheckpointError(f"{name} has no EMA weights for {weights!r} (looked for {', '.join(candidates)}; "
                                  f"top-level keys: {_key_list(ckpt)}); evaluate the raw weights with --weights raw")

    state_dict = ckpt if key is None else ckpt[key]
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{name}[{key!r}] is a {type(state_dict).__name__}, not a state dict; re-save it with "
                              "model.state_dict()")
    return strip_prefixes(_drop_averaged_model_counter(state_dict))


def describe_format(ckpt: Mapping[str, Any]) -> str:
    """Name the format a loaded checkpoint is in: "emakit", "timm", "supergradients",
    "torchvision", "bare state_dict", "safetensors", or "unknown"."""
    if not isinstance(ckpt, Mapping):
        return "unknown"
    if ckpt.get("format") == "safetensors":
        return "safetensors"
    for raw, ema, name in zip(_RAW_KEYS, _EMA_KEYS, ("timm", "supergradients", "torchvision")):
        if _present(ckpt, raw) or _present(ckpt, ema):
            # Our files carry the EMA's own counter/config next to timm's weight keys.
            return "emakit" if name == "timm" and isinstance(ckpt.get("ema"), Mapping) else name
    return "bare state_dict" if _is_bare_state_dict(ckpt) else "unknown"


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, Any], max_listed: int = 5) -> str | None:
    """None when ``state_dict`` has exactly ``model``'s keys and shapes, else what differs:
    ``"1 shape mismatches: fc.weight (checkpoint [10, 512] vs model [5, 512])"`` (the first
    missing, unexpected and mismatched keys). ``model`` may live on the meta device."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {list(v.shape)} vs model {list(expected[k].shape)})"
                  for k, v in state_dict.items() if k in expected and isinstance(v, torch.Tensor)
                  and isinstance(expected[k], torch.Tensor) and v.shape != expected[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label}: {_key_list(keys, max_listed)}")
    return "; ".join(problems) or None


def check_state_dict_compat(model: nn.Module, state_dict: Mapping[str, Any], max_listed: int = 5) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``model``'s keys and
    shapes; the message names the first missing, unexpected and mismatched keys.

    ``model`` is the bare module (unwrap DDP / compile first); ``state_dict`` is unprefixed.
    """
    if problems := state_dict_mismatch(model, state_dict, max_listed):
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {problems}; check --model and "
                              "--num-classes")


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a readable error on mismatch."""
    check_state_dict_compat(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- saver
def _replace_with_link(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` atomically (:func:`atomic_write`): a hard link (no bytes
    copied) under the temp name, or a full copy where the filesystem has no hard links (some
    network/FAT filesystems). Safe because every write we do replaces a file with a new inode,
    never rewrites one in place, so linked names never change under each other."""

    def link(tmp: str) -> None:
        os.remove(tmp)  # the empty file atomic_write reserved: the link takes its name
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            shutil.copyfile(src, tmp)

    atomic_write(dst, link)


class _HistoryEntry(NamedTuple):
    epoch: int
    metric: float | None


def _as_metric(metric: Any) -> float | None:
    """A float for ranking, or None. NaN (a diverged eval) cannot be ranked: kept by recency."""
    if metric is None:
        return None
    value = float(metric)
    if math.isnan(value):
        _log.warning("metric is NaN; this checkpoint is kept by recency only and cannot become the best")
        return None
    return value


class CheckpointSaver:
    """Keeps ``last.pth.tar``, ``model_best.pth.tar`` and the best ``max_history``
    ``checkpoint-<epoch>.pth.tar`` files in ``output_dir``, like timm's CheckpointSaver.

    Ranked checkpoints (a metric given) are kept best first, ties going to the earlier
    epoch; unranked ones (metric None or NaN) follow, newest first, so with no metric the
    history is the last ``max_history`` epochs. ``decreasing=True`` when lower is better
    (a loss). ``max_history=0`` keeps no numbered files, only ``last`` and ``model_best``.

    A new saver starts with an empty history and leaves files already in the folder alone,
    except that saving epoch N replaces (or, if not kept, removes) an old
    ``checkpoint-N.pth.tar``. Call :meth:`restore` after resuming into the same folder so
    ranking, pruning and the best metric carry on from the files on disk.
    """

    def __init__(self, output_dir: PathLike, *, max_history: int = 10, decreasing: bool = False) -> None:
        if max_history < 0:
            raise CheckpointError(f"max_history={max_history} must be >= 0 (--checkpoint-hist)")
        self.output_dir = os.fspath(output_dir)
        self.max_history = int(max_history)
        self.decreasing = bool(decreasing)
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self._history: list[_HistoryEntry] = []  # best first, unranked last
        os.makedirs(self.output_dir, exist_ok=True)

    # -- paths
    @property
    def last_path(self) -> str:
        """Path of ``last.pth.tar`` (written on every save)."""
        return os.path.join(self.output_dir, "last" + _CHECKPOINT_EXT)

    @property
    def best_path(self) -> str:
        """Path of ``model_best.pth.tar``."""
        return os.path.join(self.output_dir, "model_best" + _CHECKPOINT_EXT)

    def history_path(self, epoch: int) -> str:
        """Path of the numbered checkpoint for ``epoch``."""
        return os.path.join(self.output_dir, f"checkpoint-{epoch}{_CHECKPOINT_EXT}")

    @property
    def history(self) -> list[tuple[int, float | None]]:
        """Kept numbered checkpoints as (epoch, metric), best first, unranked last."""
        return list(self._history)

    # -- ranking
    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _rank_key(self, entry: _HistoryEntry) -> tuple:
        if entry.metric is None:
            return (1, -entry.epoch)
        return (0, entry.metric if self.decreasing else -entry.metric, entry.epoch)

    def _prune(self, candidates: list[_HistoryEntry]) -> tuple[list[_HistoryEntry], list[_HistoryEntry]]:
        ranked = sorted(candidates, key=self._rank_key)
        return ranked[: self.max_history], ranked[self.max_history:]

    def _remove(self, epoch: int) -> None:
        try:
            os.remove(self.history_path(epoch))
        except FileNotFoundError:
            pass
        except OSError as error:  # a stuck file must not stop training
            _log.error("could not delete %s: %s", self.history_path(epoch), error)

    # -- saving
    def save(self, state: Mapping[str, Any], epoch: int, metric: float | None, *,
             last_only_keys: tuple[str, ...] = ()) -> tuple[float | None, int | None]:
        """Write ``state`` as ``last.pth.tar``; copy it as ``checkpoint-<epoch>.pth.tar`` if it
        ranks among the best ``max_history`` (pruning the one it displaces) and as
        ``model_best.pth.tar`` if ``metric`` beats the best so far. Returns (best_metric, best_epoch).

        The file gets ``epoch`` and ``metric`` set to these arguments (the values it is
        ranked by), so :meth:`restore` can read them back. ``last_only_keys``: entries that
        only ``last.pth.tar`` keeps (state a resume needs but a kept epoch does not, such as
        the post-hoc EMA profiles); when ``state`` has any, the numbered and best copies are
        one second write without them. Copies are hard links where the filesystem allows
        (no bytes written twice), else full copies; every name is replaced atomically.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise CheckpointError(f"epoch={epoch} must be >= 0")
        value = _as_metric(metric)
        stored = {**state, "epoch": epoch, "metric": None if metric is None else float(metric)}
        save_checkpoint(stored, self.last_path)

        # A resumed run may reach an epoch it already saved once: the new file replaces it.
        candidates = [e for e in self._history if e.epoch != epoch] + [_HistoryEntry(epoch, value)]
        kept, dropped = self._prune(candidates)
        is_best = value is not None and (self.best_metric is None or self._better(value, self.best_metric))
        in_history = any(e.epoch == epoch for e in kept)
        if not in_history:
            self._remove(epoch)  # a stale file for this epoch must not pass for this run's
        copies = ([self.history_path(epoch)] if in_history else []) + ([self.best_path] if is_best else [])
        source = self.last_path
        if copies and any(k in stored for k in last_only_keys):
            source = copies.pop(0)
            save_checkpoint({k: v for k, v in stored.items() if k not in last_only_keys}, source)
        for path in copies:
            _replace_with_link(source, path)
        for entry in dropped:
            if entry.epoch != epoch:
                self._remove(entry.epoch)
        self._history = kept
        _log.info("checkpoint history (epoch, metric): %s", self.history)
        if is_best:
            self.best_metric, self.best_epoch = value, epoch
        return self.best_metric, self.best_epoch

    def save_last(self, state: Mapping[str, Any]) -> str:
        """Write ``state`` as ``last.pth.tar`` only (a mid-epoch checkpoint: it is neither
        ranked nor kept in the history); returns its path. ``state`` is written as given."""
        save_checkpoint(dict(state), self.last_path)
        return self.last_path

    # -- resuming
    def _read_meta(self, path: str) -> tuple[int | None, float | None] | None:
        """(epoch, metric) stored in a checkpoint, reading only its pickle (tensors are
        memory-mapped, never read); None if the file cannot be read."""
        try:
            ckpt = safe_torch_load(path, "cpu", mmap=True)
        except (CheckpointError, RuntimeError, OSError) as error:
            _log.warning("ignoring %s while restoring checkpoint history: %s", path, error)
            return None
        if not isinstance(ckpt, dict):
            return None
        epoch = ckpt.get("epoch")
        return (int(epoch) if isinstance(epoch, int) else None), _as_metric(ckpt.get("metric"))

    def restore(self, up_to_epoch: int | None = None) -> tuple[float | None, int | None]:
        """Rebuild history and best metric from the files in ``output_dir`` (call on resume).

        Files for epochs after ``up_to_epoch`` (the epoch being resumed from) are left out:
        they belong to a run that was abandoned; a later :meth:`save` of the same epoch
        replaces or removes them. The best comes from ``model_best.pth.tar`` when it is
        from an epoch <= ``up_to_epoch``, else from the best numbered checkpoint (which
        is then re-linked as ``model_best.pth.tar``). Returns (best_metric, best_epoch).
        """
        entries = []
        for name in sorted(os.listdir(self.output_dir)):
            match = _NUMBERED_RE.match(name)
            if not match:
                continue
            epoch = int(match.group(1))
            if up_to_epoch is not None and epoch > up_to_epoch:
                continue
            if (meta := self._read_meta(os.path.join(self.output_dir, name))) is not None:
                entries.append(_HistoryEntry(epoch, meta[1]))
        kept, dropped = self._prune(entries)
        for entry in dropped:  # --checkpoint-hist may be smaller than in the earlier run
            self._remove(entry.epoch)
        self._history = kept

        self.best_metric = self.best_epoch = None
        best_meta = self._read_meta(self.best_path) if os.path.exists(self.best_path) else None
        if best_meta is not None and None not in best_meta and (up_to_epoch is None or best_meta[0] <= up_to_epoch):
            self.best_epoch, self.best_metric = best_meta
        top = self._history[0] if self._history and self._history[0].metric is not None else None
        if top is not None and (self.best_metric is None or self._better(top.metric, self.best_metric)):
            self.best_metric, self.best_epoch = top.metric, top.epoch
            _replace_with_link(self.history_path(top.epoch), self.best_path)
        _log.info("restored %d checkpoints from %s, best metric %s (epoch %s)", len(self._history), self.output_dir,
                  self.best_metric, self.best_epoch)
        return self.best_metric, self.best_epoch
