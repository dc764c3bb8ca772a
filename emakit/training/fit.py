"""The epoch loop behind ``train.py``: train -> evaluate raw and every EMA -> summary -> checkpoints.

Each epoch trains (:func:`engine.train_one_epoch`, the averages updated after every optimizer
step), evaluates the raw weights and every EMA in one pass over the validation data (each
EMA's BatchNorm statistics recalibrated first with ``--model-ema-bn-recal``), appends a row
to ``summary.csv`` and saves ``last.pth.tar`` atomically (plus ``model_best.pth.tar`` and
the best ``--checkpoint-hist`` epochs, hard-linked). All random state at the start of an
epoch is a pure function of (seed, epoch, rank), so ``--resume`` continues bit-exactly on
the CPU. A stop signal writes a mid-epoch ``last.pth.tar`` (``train_position``: the step,
every rank's generator states and progress) that resumes bit-exactly too; a non-finite
loss, gradient or checkpoint state ends the run (``--on-nonfinite``) and is never written
(:mod:`.lifecycle`). At the end rank 0 plots ``summary.png`` and, with
``--model-ema-posthoc``, reports the snapshot folder and the ``validate.py`` command that
sweeps EMA lengths over it.

The evaluation is in :mod:`.evaluation`, what is written in :mod:`.checkpoints`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

from . import UsageError
from .build import seed_all
from .checkpoints import checkpoint_state, dcp_enabled, save_dcp_checkpoint, sharded_checkpoint_state, write_checked
from .data import ResumableSampler, epoch_seed, set_epoch
from .distributed import gather_objects
from .engine import EpochProgress, TrainingDiverged, TrainOptions, train_one_epoch
from .evaluation import epoch_metrics, evaluate_raw_and_emas, log_epoch, select_metric
from .lifecycle import TrainingInterrupted, diverged, last_good_text, rng_state, set_rng_state, signal_name, \
    write_failed
from .outputs import (FitResult, console_logs_above_progress_bars, describe_result, fit_result, report_posthoc,
                      write_summary)
from .plots import plot_summary_quietly
from .state import POSTHOC, TRAIN_POSITION
from .trainer import Trainer, agree

__all__ = ["fit", "run_epoch"]

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one epoch
def _train_options(tr: Trainer) -> TrainOptions:
    s = tr.settings
    return TrainOptions(optim=s.optim, run=s.run, channels_last=s.model.channels_last,
                        progress=tr.dist.is_main and s.run.progress, amp=tr.amp)


def run_epoch(tr: Trainer, epoch: int) -> dict[str, Any]:
    """Train, validate raw and every EMA, step the LR schedule, write summary and checkpoints.

    Ends the run with a :class:`RunStopped` when a stop signal arrives during training (after
    writing a mid-epoch ``last.pth.tar``), when the loss, gradients or weights turn
    non-finite (``--on-nonfinite``; nothing non-finite is ever written), or when a write
    fails (a full disk); every rank raises it together.
    """
    s, start = tr.settings, time.perf_counter()
    seed_all(epoch_seed(s.run.seed, epoch, tr.dist.rank))
    set_epoch(tr.train_loader, epoch, s.run.seed, tr.dist.rank)
    if tr.mixup_fn is not None and s.loss.mixup_off_epoch and epoch >= s.loss.mixup_off_epoch:
        tr.mixup_fn.mixup_enabled = False
    resumed = _continue_stopped_epoch(tr, epoch)
    averages = tr.averages
    try:
        train = train_one_epoch(epoch, tr.model, tr.train_loader, tr.optimizer, tr.train_loss_fn,
                                device=tr.dist.device, opts=_train_options(tr), dist=tr.dist, averages=averages,
                                lr_scheduler=tr.lr_scheduler, mixup_fn=tr.mixup_fn, guard=tr.guard, start=resumed,
                                stop_requested=lambda: _stop_signal(tr) is not None
                                or averages.write_error is not None)
    except TrainingDiverged as e:
        raise diverged(tr.last_good, str(e)) from None
    if not agree(averages.write_error is None, tr.dist):  # every rank stops (rank 0 alone wrote, under DDP)
        raise write_failed(tr.last_good, "a post-hoc EMA snapshot", averages.write_error)
    if train["stopped"]:
        _stop_mid_epoch(tr, epoch, train["progress"])
    if (epoch + 1) % s.run.val_interval and epoch + 1 != tr.resolved.epochs:  # timm's --val-interval
        tr.lr_scheduler.step(epoch + 1, None)
        if tr.dist.is_main:
            _log.info("epoch %d: trained; no validation or checkpoint (--val-interval %d)", epoch, s.run.val_interval)
        return {}
    raw, emas, bn_recal = evaluate_raw_and_emas(tr)
    metrics = epoch_metrics(tr, epoch, train, raw, emas)
    metric = select_metric(raw, emas, s.run.eval_metric, s.ema.select)
    tr.lr_scheduler.step(epoch + 1, metric)
    dcp = dcp_enabled(tr)
    state = (sharded_checkpoint_state if dcp else checkpoint_state)(tr, epoch, metric, metrics, bn_recal)

    def write() -> None:
        if dcp:
            save_dcp_checkpoint(tr, state, epoch, metric)
            if not tr.dist.is_main:
                return
        tr.summary_rows.append(metrics)
        write_summary(os.path.join(tr.output_dir, "summary.csv"), tr.summary_rows, tr.summary_columns)
        if not dcp:
            tr.saver.save(state, epoch, metric, last_only_keys=(POSTHOC,))

    write_checked(tr, state, write, f"epoch {epoch}", f"after epoch {epoch}", every_rank=dcp)
    if tr.dist.is_main:
        log_epoch(tr, epoch, metrics, time.perf_counter() - start, train["img_per_sec"])
    return metrics


# --------------------------------------------------------------------------- stopping
def _stop_signal(tr: Trainer) -> int | None:
    return tr.signals.received if tr.signals is not None else None


def _continue_stopped_epoch(tr: Trainer, epoch: int) -> EpochProgress | None:
    """For the epoch a mid-epoch checkpoint stopped in: make the sampler skip the batches
    already trained on and restore this rank's generator states; the progress to continue."""
    position, tr.resume_position = tr.resume_position, None
    if position is None or epoch != tr.start_epoch:
        return None
    mine = position["ranks"][tr.dist.rank]
    progress = EpochProgress.from_dict(mine["progress"])
    if not isinstance(tr.train_loader.sampler, ResumableSampler):
        raise UsageError("this training loader cannot start mid-epoch; resume from an epoch-end checkpoint")
    tr.train_loader.sampler.skip(progress.batches * tr.settings.data.batch_size)
    set_rng_state(mine["rng"], tr.dist.device)
    tr.averages.load_rank_buffers(mine.get("ema_buffers") or [])
    if tr.dist.is_main:
        _log.info("continuing epoch %d at step %d/%d (%d batches done)", epoch, progress.steps + progress.skipped,
                  tr.updates_per_epoch, progress.batches)
    return progress


def _stop_mid_epoch(tr: Trainer, epoch: int, progress: EpochProgress) -> None:
    """Write a resumable mid-epoch ``last.pth.tar`` (every rank's generator states and
    progress, gathered on rank 0) and raise :class:`TrainingInterrupted`."""
    mine: dict[str, Any] = {"rng": rng_state(tr.dist.device), "progress": progress.to_dict(),
                            "signal": _stop_signal(tr)}
    if tr.dist.distributed:  # each rank's EMA averaged its own BatchNorm statistics since the last evaluation
        mine["ema_buffers"] = tr.averages.rank_buffers()
    ranks = gather_objects(mine, tr.dist)
    signum = next((r["signal"] for r in ranks if r["signal"] is not None), signal.SIGTERM)
    step = progress.steps + progress.skipped
    label = f"epoch {epoch}, step {step}/{tr.updates_per_epoch}"
    dcp = dcp_enabled(tr)
    state = (sharded_checkpoint_state if dcp else checkpoint_state)(tr, epoch - 1, None, {})
    if tr.dist.is_main:
        state[TRAIN_POSITION] = {
            "epoch": epoch, "steps_done": step, "batches_done": progress.batches,
            "steps_per_epoch": tr.updates_per_epoch, "processes": tr.dist.world_size,
            "batch_size": tr.settings.data.batch_size, "grad_accum_steps": tr.settings.optim.grad_accum_steps,
            "ranks": [{k: v for k, v in r.items() if k != "signal"} for r in ranks]}
    write = (lambda: save_dcp_checkpoint(tr, state, None, None)) if dcp else (lambda: tr.saver.save_last(state))
    write_checked(tr, state, write, f"{label} (mid-epoch)", f"at {label}", every_rank=dcp)
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} at {label}: wrote the resumable checkpoint "
                              f"{tr.last_good[0]}", tr.last_good[0], 128 + int(signum), error=False)


def _stop_after_epoch(tr: Trainer, epoch: int) -> None:
    """After an epoch's checkpoint: stop (every rank) when a signal arrived on any rank."""
    signals = gather_objects(_stop_signal(tr), tr.dist)
    signum = next((s for s in signals if s is not None), None)
    if signum is None:
        return
    last = tr.last_good[0] if tr.last_good else None
    ended = tr.last_good[1] if tr.last_good else f"epoch {epoch}"  # older than epoch with --val-interval
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} after epoch {epoch}: the resumable checkpoint is "
                              f"{last} (end of {ended})", last, 128 + int(signum), error=False)


# --------------------------------------------------------------------------- the run
def fit(tr: Trainer) -> FitResult:
    """Run the epochs from ``tr.start_epoch``. A stop signal, a divergence or a failed write
    raises :class:`RunStopped` (see :func:`run_epoch`)."""
    run, epochs = tr.settings.run, tr.resolved.epochs
    if tr.dist.is_main and tr.start_epoch >= epochs:
        _log.warning("nothing to train: the checkpoint finished epoch %d of %d; raise --epochs to continue",
                     tr.start_epoch - 1, epochs)
    elif tr.dist.is_main:
        _log.info("training epochs %d-%d, %d optimizer steps per epoch", tr.start_epoch, epochs - 1,
                  tr.updates_per_epoch)
    deferred = tr.signals.deferred() if tr.signals is not None else contextlib.nullcontext()
    try:
        with deferred, console_logs_above_progress_bars(tr.dist.is_main and run.progress):
            for epoch in range(tr.start_epoch, epochs):
                run_epoch(tr, epoch)
                if epoch < epochs - 1:  # after the last epoch, training is done: finish normally
                    _stop_after_epoch(tr, epoch)
            _finish_run(tr)
    except KeyboardInterrupt:  # signals not taken over (train.main not in the main thread)
        last = tr.last_good[0] if tr.last_good else None
        raise TrainingInterrupted(f"interrupted; {last_good_text(tr.last_good)}", last, 130, error=False) from None
    result = fit_result(tr.output_dir, epochs - tr.start_epoch, tr.summary_rows, tr.averages.count,
                        run.eval_metric)
    if tr.dist.is_main:
        _log.info("%s", describe_result(result))
    return result


def _finish_run(tr: Trainer) -> None:
    """After the last epoch: the final post-hoc snapshot (rank 0 writes; under FSDP every rank
    takes part in its gather) and the plot (rank 0)."""
    posthoc = tr.averages.posthoc
    if posthoc is not None and (tr.dist.is_main or posthoc.sharded):
        try:
            if tr.dist.is_main:
                last = tr.last_good[0] if tr.last_good else tr.saver.last_path  # last.dcp in the dcp format
                report_posthoc(posthoc, tr.settings.data.path, last)
            else:
                posthoc.finish()
        except OSError as e:
            raise write_failed(tr.last_good, "the final post-hoc EMA snapshot", e) from None
    if not tr.dist.is_main:
        return
    if tr.summary_rows:
        plot_summary_quietly(tr.output_dir)

