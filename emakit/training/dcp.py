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
- everything else (epoch, ``ema`` meta, scheduler, args, metrics, ...), taken from rank 0,
  plus each rank's own values (``rank_state``: generator states, progress) in rank order under
  ``ranks``, in one small ``emakit.pt`` inside the folder (``torch.save``, loadable with
  ``weights_only=True``).

Writes are atomic at the folder level: every rank writes into ``.<name>.dcp-tmp-<token>``
beside the folder; once DCP has finished (its ``.metadata`` is written after every rank's
data) rank 0 adds ``emakit.pt``, moves the previous folder aside to ``.<name>.dcp-old-<token>``,
renames the new one into place and deletes the old one. A rank killed at any instant leaves
the previous folder (or, between the two renames, its ``-old`` copy, which :func:`load_dcp`
and the next :func:`save_dcp` use) complete and loadable.
"""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .state import OPTIMIZER, POSTHOC, POSTHOC_PROFILES, is_sharded_key

__all__ = ["META_FILE", "DCP_LAST", "DCP_BEST", "join_posthoc_profiles", "link_dcp_folder",
           "is_dcp_folder", "save_dcp", "load_dcp", "read_dcp_meta",
           "dcp_folder_to_checkpoint", "resolve_dcp_folder", "names_dcp_folder", "load_dcp_training_state"]

META_FILE = "emakit.pt"
DCP_LAST = "last.dcp"          # train.py --checkpoint-format dcp: the newest checkpoint folder
DCP_BEST = "model_best.dcp"    # the best epoch's (hard links to the files of that epoch's last.dcp)
_DCP_METADATA = ".metadata"

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
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (as is without a process group)."""
    if not _distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that one process without a process group saves/loads alone:
    that is the intended use here (one-process runs, offline tools)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _distributed() else 0


def save_dcp(folder: str | os.PathLike[str], state: dict[str, Any], *, rank_state: Any = None) -> str:
    """Write ``state`` as a DCP checkpoint folder, atomically at the folder level. *Collective*:
    every rank calls it with its own sharded state (or one process without a process group).

    Args:
        folder: the checkpoint folder (e.g. ``<run>/last.dcp``); replaced only once the new
            one is complete.
        state: checkpoint keys as in a single-file checkpoint; the sharded keys (see
            :func:`is_sharded_key`) hold sharded state dicts, the others plain values (tensors
            allowed) of which rank 0's are written.
        rank_state: this rank's own values (generator states, progress): stored in rank order
            as ``ranks`` in ``emakit.pt``; picklable plain types and tensors.

    Returns the folder's path. Raises OSError on every rank when rank 0 could not write or
    finish the folder (a full disk, a value ``torch.load(weights_only=True)`` would refuse among
    the plain keys: checked before any shard is written); the previous folder is then intact.
    Temp folders of saves killed earlier are deleted by the next save.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save

    from ..checkpoint import CheckpointError, find_unplain, save_checkpoint

    folder = os.path.abspath(os.fspath(folder))
    rank = _rank()
    sharded = {k: v for k, v in state.items() if is_sharded_key(k)}
    ranks = _all_gather(rank_state)
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
            meta = {"format": "emakit-dcp", "version": 1, "world_size": len(ranks), "sharded_keys": sorted(sharded),
                    "plain": plain, "ranks": ranks}
            save_checkpoint(meta, os.path.join(_side_names(folder, "tmp") + token, META_FILE))
        except (OSError, CheckpointError) as e:
            error = f"{type(e).__name__}: {e}"
            shutil.rmtree(_side_names(folder, "tmp") + str(token), ignore_errors=True)
    token, error = _broadcast((token, error))
    if error is not None:
        raise OSError(f"could not write the checkpoint folder {folder} ({error}); the previous one is kept")
    tmp, old = _side_names(folder, "tmp") + token, _side_names(folder, "old") + token
    with _single_process_quiet():
        save(sharded, storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not _distributed())
    if rank == 0:  # DCP returns on every rank after its coordinator wrote .metadata: the folder is complete
        error = _put_in_place(tmp, folder, old)
    error = _broadcast(error)
    if error is not None:
        raise OSError(f"could not finish the checkpoint folder {folder} ({error}); the previous one is kept")
    return folder


def _put_in_place(tmp: str, folder: str, old: str) -> str | None:
    """Rank 0: the complete ``tmp`` folder becomes ``folder`` (the previous one moved to ``old``
    first, deleted last); the error text, or None."""
    from ..checkpoint import fsync_dir

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
    if _rank() == 0:
        token = secrets.token_hex(6)
        tmp, old = _side_names(folder, "tmp") + token, _side_names(folder, "old") + token
        try:
            _tidy(folder)
            shutil.copytree(os.fspath(src), tmp, copy_function=_link_or_copy)
            error = _put_in_place(tmp, folder, old)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    error = _broadcast(error)
    if error is not None:
        raise OSError(f"could not write the checkpoint folder {folder} ({error}); the previous one is kept")
    return folder


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_dcp_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``emakit.pt`` of a folder written by :func:`save_dcp` (``plain``, ``ranks``,
    ``world_size``, ``sharded_keys``); ``{}`` for a DCP folder another writer made."""
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        return {}
    return torch.load(path, map_location="cpu", weights_only=True)


def load_dcp(folder: str | os.PathLike[str], state: dict[str, Any]) -> dict[str, Any]:
    """Fill the sharded templates in ``state`` in place from the folder, resharding to this
    world size (the folder may come from any number of ranks or one process). *Collective*.

    ``state`` maps sharded keys (see :func:`is_sharded_key`) to templates of the target form:
    ``fsdp.sharded_model_state(model)``, ``fsdp.sharded_optimizer_state(model, opt)``,
    ``ema.state_dict_ema(full=False)``; apply them afterwards with
    ``fsdp.load_full_model_state`` / ``fsdp.load_sharded_optimizer_state`` /
    ``ema.load_checkpoint_state``. A template key the folder lacks raises. Returns the folder's
    ``emakit.pt`` (``plain`` values and per-rank ``ranks``; ``{}`` for a foreign folder).
    """
    from torch.distributed.checkpoint import FileSystemReader, load

    path = resolve_dcp_folder(folder)
    if path is None:
        raise FileNotFoundError(f"{os.fspath(folder)} is not a complete torch.distributed.checkpoint folder")
    bad = [k for k in state if not is_sharded_key(k)]
    if bad:
        raise ValueError(f"load_dcp fills sharded keys only, not {bad}; plain values are in the returned meta")
    if state:
        with _single_process_quiet():
            load(state, storage_reader=FileSystemReader(path), no_dist=not _distributed())
    return read_dcp_meta(path)


def dcp_folder_to_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A DCP folder as the dict of a single-file checkpoint, offline (one process, no process
    group): whole CPU tensors under ``state_dict`` / ``state_dict_ema*``, ``optimizer`` in the
    standard integer-id layout, and the plain keys (epoch, ``ema`` meta, scheduler, ...) of
    ``emakit.pt``; for a folder written by ``save_dcp``, the per-rank values under
    ``dcp_ranks``. Uses torch's ``format_utils.dcp_to_torch_save`` (the whole checkpoint in
    memory)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .fsdp import optimizer_state_to_ids

    path = resolve_dcp_folder(folder)
    if path is None:
        raise FileNotFoundError(f"{os.fspath(folder)} is not a complete torch.distributed.checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="emakit-dcp-") as tmp:
        out = os.path.join(tmp, "checkpoint.pt")
        dcp_to_torch_save(path, out)
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
    opt = ckpt.get(OPTIMIZER)
    if isinstance(opt, dict) and opt.get("param_groups") and any(
            isinstance(n, str) for g in opt["param_groups"] for n in g["params"]):
        ckpt[OPTIMIZER] = optimizer_state_to_ids(opt)
    meta = read_dcp_meta(path)
    if meta:
        ckpt = {**meta.get("plain", {}), **ckpt, "dcp_ranks": meta.get("ranks", [])}
    return join_posthoc_profiles(ckpt)


def load_dcp_training_state(folder: str | os.PathLike[str], model: Any, optimizer: Any = None,
                            emas: Sequence[Any] = ()) -> dict[str, Any]:
    """Restore a folder written by :func:`save_dcp` (from ``fsdp.training_state(..., full=False)``
    plus plain keys) into a plain, DDP or sharded ``model``, its ``optimizer`` (None: skipped)
    and ``emas`` (ModelEMA members in checkpoint order), on any world size. *Collective*.
    Returns ``emakit.pt``'s dict: ``plain`` (epoch, scheduler, ``ema`` metas, ...) and
    ``ranks`` (every writing rank's ``rank_state``, in rank order)."""
    from emakit.checkpoint import ema_checkpoint_keys
    from .fsdp import load_full_model_state, load_sharded_optimizer_state, sharded_model_state, \
        sharded_optimizer_state

    state: dict[str, Any] = {"state_dict": sharded_model_state(model)}
    if optimizer is not None:
        state["optimizer"] = sharded_optimizer_state(model, optimizer)
    for i, ema in enumerate(emas):
        state[ema_checkpoint_keys(i)[0]] = ema.state_dict_ema(full=False)
    meta = load_dcp(folder, state)
    load_full_model_state(model, state["state_dict"])
    if optimizer is not None:
        load_sharded_optimizer_state(model, optimizer, state["optimizer"])
    plain = meta.get("plain", {})
    for i, ema in enumerate(emas):
        weights_key, meta_key = ema_checkpoint_keys(i)
        ema.load_checkpoint_state(state[weights_key], plain.get(meta_key))
    return meta
