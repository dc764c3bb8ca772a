"""What a run writes at the end of an epoch or when it stops: the checkpoint state (gathered to
rank 0 in the one-process layout, or sharded for ``--checkpoint-format dcp``) and the checked
write (nothing non-finite is ever written; every rank learns whether the write worked).

Checkpoint keys beyond timm's: ``state_dict_ema_<i>`` / ``ema_<i>`` for EMA i >= 1,
``posthoc_ema`` (the power EMA state), ``ema_bn_recal`` (each EMA's recalibrated BatchNorm
buffers of that epoch), ``train_position`` (mid-epoch files); the layout is :mod:`.state`'s.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from emakit.checkpoint import find_nonfinite
from emakit.ema import is_sharded

from .averages import Averages
from .distributed import all_reduce_sum
from .fsdp import broadcast_buffers
from .lifecycle import LastGood, diverged, write_failed
from .state import model_entries, run_entries
from .trainer import Trainer

__all__ = ["checkpoint_state", "run_checkpoint_state", "write_checked"]


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, averages: Averages, plain: dict[str, Any],
                     *, sharded: bool, is_main: bool, bn_recal: list[dict[str, torch.Tensor]] | None = None
                     ) -> dict[str, Any] | None:
    """A checkpoint dict (docs/DESIGN.md section 3): ``plain`` (:func:`.state.run_entries`),
    the model's and optimizer's entries and every average's (:meth:`Averages.checkpoint_state`).

    Not ``sharded``: the single-file dict, tensors and plain types only, in the layout a
    one-process run writes; call it on every rank: a sharded (FSDP) model, its optimizer and
    EMA(s) are gathered to whole CPU tensors (*collective*). Rank 0 gets the dict, others None.
    ``sharded`` (``--checkpoint-format dcp``, every rank, *collective*): the same keys with
    the model, optimizer (parameter-name keyed) and EMA weights as DTensors over this rank's
    shards under FSDP (whole tensors under DDP / one process), for :func:`.dcp.save_dcp`."""
    if sharded:
        # DCP writes one rank's copy of a replicated tensor, not necessarily rank 0's: mid-epoch the
        # BatchNorm statistics differ by rank, and rank 0's are the run's (the file format's, and
        # the ones the next training forward takes, as DDP's broadcast_buffers does).
        broadcast_buffers(model)
    elif not is_main and not is_sharded(model):
        return None
    state = {**plain, **model_entries(model, optimizer, full=not sharded),
             **averages.checkpoint_state(bn_recal, full=not sharded)}
    return state if sharded or is_main else None


def run_checkpoint_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any],
                         bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any] | None:
    """:func:`checkpoint_state` of the run after ``epoch`` (-1 inside epoch 0), in its
    ``--checkpoint-format``."""
    plain = run_entries(epoch=epoch, arch=tr.settings.model.name, scheduler=tr.lr_scheduler, scaler=tr.amp.scaler,
                        flags=tr.flags, metric=metric, metrics=metrics)
    return checkpoint_state(tr.model_without_ddp, tr.optimizer, tr.averages, plain, bn_recal=bn_recal,
                            sharded=tr.settings.parallel.checkpoint_format == "dcp", is_main=tr.dist.is_main)


def write_checked(tr: Trainer, last_good: LastGood | None, state: dict[str, Any] | None, write: Callable[[], None],
                  label: str, when: str) -> LastGood:
    """Rank 0: refuse a state with non-finite tensors, else ``write()``; then every rank
    learns the outcome, so a divergence or a failed write stops all of them together (naming
    ``last_good``). ``--checkpoint-format dcp`` (a collective write): each rank checks its own
    shards, all agree that the state is finite, then every rank calls ``write()``. Returns the
    new last good checkpoint: (path, ``label``)."""
    bad, error = [], None
    every_rank = tr.settings.parallel.checkpoint_format == "dcp"
    if every_rank or tr.dist.is_main:
        bad = find_nonfinite(state, skip_keys=tr.nonfinite_at_start)
        if not (all_reduce_sum([float(bool(bad))], tr.dist)[0] if every_rank else bad):
            try:
                write()
            except OSError as e:
                error = e
    nonfinite, failed = all_reduce_sum([float(bool(bad)), float(error is not None)], tr.dist)
    if nonfinite:
        shown = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        raise diverged(last_good, f"training diverged {when}: non-finite values in "
                                  f"{shown or 'the weights (rank 0)'}; nothing was saved")
    if failed:
        raise write_failed(last_good, f"the outputs of {label}", error)
    # Only rank 0 writes single files and reports; the other ranks just know that a checkpoint exists.
    return (tr.saver.last_path if tr.saver is not None else "last.pth.tar (rank 0)", label)
