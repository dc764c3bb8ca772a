"""What a run writes at the end of an epoch or when it stops: the checkpoint state (gathered to
rank 0 in the one-process layout, or sharded for ``--checkpoint-format dcp``), the DCP
folders ``last.dcp`` / ``model_best.dcp``, and the checked write (nothing non-finite is ever
written; every rank learns whether the write worked).

Checkpoint keys beyond timm's: ``state_dict_ema_<i>`` / ``ema_<i>`` for EMA i >= 1,
``posthoc_ema`` (the power EMA state), ``ema_bn_recal`` (each EMA's recalibrated BatchNorm
buffers of that epoch), ``train_position`` (mid-epoch files).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from emakit.checkpoint import find_nonfinite

from .dcp import DCP_BEST, DCP_LAST, DamagedFolder, is_dcp_folder, link_dcp_folder, read_dcp_meta, save_dcp
from .distributed import all_reduce_sum, gather_objects
from .fsdp import broadcast_buffers
from .lifecycle import diverged, write_failed
from .state import METRIC, model_entries, run_entries
from .trainer import Trainer

__all__ = ["checkpoint_state", "sharded_checkpoint_state", "dcp_enabled", "save_dcp_checkpoint",
           "write_checked"]

_log = logging.getLogger(__name__)


def checkpoint_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any],
                     bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any] | None:
    """The single-file checkpoint dict (docs/DESIGN.md section 3): tensors and plain types only;
    timm's keys plus every average's entries (:meth:`Averages.checkpoint_state`), laid out by
    :mod:`.state`. Call it on every rank: under FSDP the model, optimizer and EMA(s) are gathered
    to whole CPU tensors (*collective*) in the layout a one-process run writes. Rank 0 gets the
    dict, others None."""
    if not tr.settings.parallel.fsdp and not tr.dist.is_main:
        return None
    parts = model_entries(tr.model_without_ddp, tr.optimizer)
    averages = tr.averages.checkpoint_state(bn_recal)
    if not tr.dist.is_main:
        return None
    return {**_run_entries(tr, epoch, metric, metrics), **parts, **averages}


def _run_entries(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
    return run_entries(epoch=epoch, arch=tr.settings.model.name, scheduler=tr.lr_scheduler, scaler=tr.amp.scaler,
                       flags=tr.flags, metric=metric, metrics=metrics)


def sharded_checkpoint_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any],
                             bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """The same keys for ``--checkpoint-format dcp`` on every rank (*collective*): model,
    optimizer (parameter-name keyed) and EMA weights in sharded form (DTensors over this
    rank's shards under FSDP, whole tensors under DDP / one process), for :func:`save_dcp`."""
    # DCP writes one rank's copy of a replicated tensor, not necessarily rank 0's: mid-epoch the
    # BatchNorm statistics differ by rank, and rank 0's are the run's (the file format's, and
    # the ones the next training forward takes, as DDP's broadcast_buffers does).
    broadcast_buffers(tr.model_without_ddp)
    return {**_run_entries(tr, epoch, metric, metrics), **model_entries(tr.model_without_ddp, tr.optimizer, full=False),
            **tr.averages.checkpoint_state(bn_recal, full=False)}


def dcp_enabled(tr: Trainer) -> bool:
    return tr.settings.parallel.checkpoint_format == "dcp"


def _dcp_run_folder(tr: Trainer) -> str:
    """The run folder on every rank (only rank 0 created it; *collective* on the first call),
    and the best metric so far from a resumed run's ``model_best.dcp``."""
    if tr.dcp_folder is None:
        tr.dcp_folder = gather_objects(tr.output_dir, tr.dist)[0]
        best = os.path.join(tr.dcp_folder, DCP_BEST)
        if tr.start_epoch > 0 and is_dcp_folder(best):
            try:
                tr.dcp_best = read_dcp_meta(best).get("plain", {}).get(METRIC)
            except DamagedFolder as e:  # no best so far: the next epoch's folder replaces it
                _log.warning("%s is damaged (%s cannot be read): the next epoch's checkpoint replaces it",
                             e.folder, e.name)
    return tr.dcp_folder


def save_dcp_checkpoint(tr: Trainer, state: dict[str, Any], epoch: int | None, metric: float | None,
                         rank_state: Any = None) -> str:
    """``last.dcp`` (every rank writes its shards), and ``model_best.dcp`` (hard links to the
    same files) when ``metric`` beats the best so far; *collective*. Returns ``last.dcp``."""
    folder = _dcp_run_folder(tr)
    last = save_dcp(os.path.join(folder, DCP_LAST), state, rank_state=rank_state)
    if epoch is None or metric is None:
        return last
    best = tr.dcp_best
    better = best is None or (metric < best if tr.settings.run.eval_metric == "loss" else metric > best)
    if better:
        tr.dcp_best = metric
        link_dcp_folder(last, os.path.join(folder, DCP_BEST))
    return last


def write_checked(tr: Trainer, state: dict[str, Any] | None, write: Callable[[], None], label: str,
                   when: str, *, every_rank: bool = False) -> None:
    """Rank 0: refuse a state with non-finite tensors, else ``write()``; then every rank
    learns the outcome, so a divergence or a failed write stops all of them together.
    ``every_rank`` (a DCP folder, a collective write): each rank checks its own shards, all
    agree that the state is finite, then every rank calls ``write()``."""
    bad, error = [], None
    if every_rank:
        bad = find_nonfinite(state, skip_keys=tr.nonfinite_at_start)
        if not all_reduce_sum([float(bool(bad))], tr.dist)[0]:
            try:
                write()
            except OSError as e:
                error = e
    elif tr.dist.is_main:
        bad = find_nonfinite(state, skip_keys=tr.nonfinite_at_start)
        if not bad:
            try:
                write()
            except OSError as e:
                error = e
    nonfinite, failed = all_reduce_sum([float(bool(bad)), float(error is not None)], tr.dist)
    if nonfinite:
        shown = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        raise diverged(tr.last_good, f"training diverged {when}: non-finite values in "
                                     f"{shown or 'the weights (rank 0)'}; nothing was saved")
    if failed:
        raise write_failed(tr.last_good, f"the outputs of {label}", error)
    # Only rank 0 writes and reports; the other ranks just know that a checkpoint exists.
    if every_rank:
        tr.last_good = (os.path.join(tr.dcp_folder or "", DCP_LAST), label)
    else:
        tr.last_good = (tr.saver.last_path if tr.dist.is_main else "last.pth.tar (rank 0)", label)
