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
from dataclasses import dataclass
from typing import Any

from . import UsageError
from .build import seed_all
from .checkpoints import run_checkpoint_state, write_checked
from .data import ResumableSampler, epoch_seed, set_epoch
from .distributed import gather_objects
from .engine import EpochProgress, TrainingDiverged, TrainOptions, train_one_epoch
from .evaluation import epoch_metrics, evaluate_raw_and_emas, log_epoch
from .lifecycle import (LastGood, StopSignals, TrainingInterrupted, diverged, last_good_text, rng_state, set_rng_state,
                        signal_name, write_failed)
from .outputs import (FitResult, console_logs_above_progress_bars, describe_result, fit_result, report_posthoc,
                      summary_columns, write_summary)
from .plots import plot_summary_quietly
from .state import POSTHOC, TrainPosition
from .trainer import Trainer, agree

__all__ = ["RunState", "fit", "run_epoch"]

_log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What changes while the epochs run; :func:`fit` and its helpers alone change it (the
    :class:`Trainer` holds the parts, which never change)."""

    summary_rows: list[dict[str, Any]]  # rank 0: summary.csv's rows so far
    last_good: LastGood | None  # (path, "epoch 3") of the newest intact checkpoint
    position: TrainPosition | None = None  # a mid-epoch --resume's, until its epoch starts
    signals: StopSignals | None = None  # train.py's; None: Ctrl-C raises KeyboardInterrupt

    @classmethod
    def start(cls, tr: Trainer, signals: StopSignals | None = None) -> RunState:
        """The state a run starts in: fresh, or where its ``--resume`` checkpoint left it."""
        src = tr.resume
        last = (os.path.abspath(src.path), "the checkpoint this run resumed from") if src else None
        position = src.position if src and tr.settings.schedule.start_epoch is None else None  # --start-epoch: none
        return cls(list(tr.summary_rows), last, position, signals)

    def stop_signal(self) -> int | None:
        """The stop signal received by this process, if any."""
        return self.signals.received if self.signals is not None else None


# --------------------------------------------------------------------------- one epoch
def run_epoch(tr: Trainer, run: RunState, epoch: int) -> dict[str, Any]:
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
    resumed = _continue_stopped_epoch(tr, run, epoch)
    averages = tr.averages
    opts = TrainOptions(optim=s.optim, run=s.run, channels_last=s.model.channels_last,
                        progress=tr.dist.is_main and s.run.progress, amp=tr.amp)
    try:
        train = train_one_epoch(epoch, tr.model, tr.train_loader, tr.optimizer, tr.train_loss_fn,
                                device=tr.dist.device, opts=opts, dist=tr.dist, averages=averages,
                                lr_scheduler=tr.lr_scheduler, mixup_fn=tr.mixup_fn, guard=tr.guard, start=resumed,
                                stop_requested=lambda: run.stop_signal() is not None
                                or averages.write_error is not None)
    except TrainingDiverged as e:
        raise diverged(run.last_good, str(e)) from None
    if not agree(averages.write_error is None, tr.dist):  # every rank stops (rank 0 alone wrote, under DDP)
        raise write_failed(run.last_good, "a post-hoc EMA snapshot", averages.write_error)
    if train["stopped"]:
        _stop_mid_epoch(tr, run, epoch, train["progress"])
    if (epoch + 1) % s.run.val_interval and epoch + 1 != tr.resolved.epochs:  # timm's --val-interval
        tr.lr_scheduler.step(epoch + 1, None)
        if tr.dist.is_main:
            _log.info("epoch %d: trained; no validation or checkpoint (--val-interval %d)", epoch, s.run.val_interval)
        return {}
    raw, emas, bn_recal = evaluate_raw_and_emas(tr)
    metrics = epoch_metrics(tr, epoch, train, raw, emas)
    metric = metrics[f"eval_{s.run.eval_metric}"]  # what picks model_best
    tr.lr_scheduler.step(epoch + 1, metric)
    dcp = s.parallel.checkpoint_format == "dcp"
    state = run_checkpoint_state(tr, epoch, metric, metrics, bn_recal)

    def write() -> None:
        if dcp:
            tr.saver.save(state, epoch, metric)
        if tr.dist.is_main:
            run.summary_rows.append(metrics)
            write_summary(os.path.join(tr.output_dir, "summary.csv"), run.summary_rows,
                          summary_columns(tr.averages.count))
            if not dcp:
                tr.saver.save(state, epoch, metric, last_only_keys=(POSTHOC,))

    run.last_good = write_checked(tr, run.last_good, state, write, f"epoch {epoch}", f"after epoch {epoch}")
    if tr.dist.is_main:
        log_epoch(tr, epoch, metrics, time.perf_counter() - start, train["img_per_sec"])
    return metrics


# --------------------------------------------------------------------------- stopping
def _continue_stopped_epoch(tr: Trainer, run: RunState, epoch: int) -> EpochProgress | None:
    """For the epoch a mid-epoch checkpoint stopped in: make the sampler skip the batches
    already trained on and restore this rank's generator states; the progress to continue."""
    position, run.position = run.position, None
    if position is None or epoch != tr.start_epoch:
        return None
    rng, progress, ema_buffers = position.rank(tr.dist.rank)
    progress = EpochProgress.from_dict(progress)
    if not isinstance(tr.train_loader.sampler, ResumableSampler):
        raise UsageError("this training loader cannot start mid-epoch; resume from an epoch-end checkpoint")
    tr.train_loader.sampler.skip(progress.batches * tr.settings.data.batch_size)
    set_rng_state(rng, tr.dist.device)
    tr.averages.load_rank_buffers(ema_buffers)
    if tr.dist.is_main:
        _log.info("continuing epoch %d at step %d/%d (%d batches done)", epoch, progress.steps + progress.skipped,
                  tr.updates_per_epoch, progress.batches)
    return progress


def _stop_mid_epoch(tr: Trainer, run: RunState, epoch: int, progress: EpochProgress) -> None:
    """Write a resumable mid-epoch ``last.pth.tar`` (every rank's generator states and
    progress, gathered on rank 0) and raise :class:`TrainingInterrupted`."""
    # under DDP each rank's EMA averaged its own BatchNorm statistics since the last evaluation
    buffers = tr.averages.rank_buffers() if tr.dist.distributed else None
    mine = TrainPosition.rank_entry(rng_state(tr.dist.device), progress.to_dict(), buffers)
    ranks = gather_objects((run.stop_signal(), mine), tr.dist)
    signum = next((s for s, _ in ranks if s is not None), signal.SIGTERM)
    step = progress.steps + progress.skipped
    label = f"epoch {epoch}, step {step}/{tr.updates_per_epoch}"
    state = run_checkpoint_state(tr, epoch - 1, None, {})
    if tr.dist.is_main:
        state.update(TrainPosition(
            epoch=epoch, steps_done=step, batches_done=progress.batches, steps_per_epoch=tr.updates_per_epoch,
            processes=tr.dist.world_size, batch_size=tr.settings.data.batch_size,
            grad_accum_steps=tr.settings.optim.grad_accum_steps, ranks=[r for _, r in ranks]).entry())
    run.last_good = write_checked(tr, run.last_good, state, lambda: tr.saver.save_last(state), f"{label} (mid-epoch)",
                                  f"at {label}")
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} at {label}: wrote the resumable checkpoint "
                              f"{run.last_good[0]}", run.last_good[0], 128 + int(signum), error=False)


def _stop_after_epoch(tr: Trainer, run: RunState, epoch: int) -> None:
    """After an epoch's checkpoint: stop (every rank) when a signal arrived on any rank."""
    signum = next((s for s in gather_objects(run.stop_signal(), tr.dist) if s is not None), None)
    if signum is None:
        return
    last = run.last_good[0] if run.last_good else None
    ended = run.last_good[1] if run.last_good else f"epoch {epoch}"  # older than epoch with --val-interval
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} after epoch {epoch}: the resumable checkpoint is "
                              f"{last} (end of {ended})", last, 128 + int(signum), error=False)


# --------------------------------------------------------------------------- the run
def fit(tr: Trainer, run: RunState | None = None) -> FitResult:
    """Run the epochs from ``tr.start_epoch`` (``run``: default :meth:`RunState.start`). A stop
    signal, a divergence or a failed write raises :class:`RunStopped` (see :func:`run_epoch`)."""
    run = run if run is not None else RunState.start(tr)
    epochs = tr.resolved.epochs
    if tr.dist.is_main and tr.start_epoch >= epochs:
        _log.warning("nothing to train: the checkpoint finished epoch %d of %d; raise --epochs to continue",
                     tr.start_epoch - 1, epochs)
    elif tr.dist.is_main:
        _log.info("training epochs %d-%d, %d optimizer steps per epoch", tr.start_epoch, epochs - 1,
                  tr.updates_per_epoch)
    deferred = run.signals.deferred() if run.signals is not None else contextlib.nullcontext()
    try:
        with deferred, console_logs_above_progress_bars(tr.dist.is_main and tr.settings.run.progress):
            for epoch in range(tr.start_epoch, epochs):
                run_epoch(tr, run, epoch)
                if epoch < epochs - 1:  # after the last epoch, training is done: finish normally
                    _stop_after_epoch(tr, run, epoch)
            _finish_run(tr, run)
    except KeyboardInterrupt:  # signals not taken over (train.main not in the main thread)
        last = run.last_good[0] if run.last_good else None
        raise TrainingInterrupted(f"interrupted; {last_good_text(run.last_good)}", last, 130, error=False) from None
    result = fit_result(tr.output_dir, epochs - tr.start_epoch, run.summary_rows, tr.averages.count,
                        tr.settings.run.eval_metric)
    if tr.dist.is_main:
        _log.info("%s", describe_result(result))
    return result


def _finish_run(tr: Trainer, run: RunState) -> None:
    """After the last epoch: the final post-hoc snapshot (rank 0 writes; under FSDP every rank
    takes part in its gather) and the plot (rank 0)."""
    posthoc = tr.averages.posthoc
    if posthoc is not None and (tr.dist.is_main or posthoc.sharded):
        try:
            if tr.dist.is_main:
                last = run.last_good[0] if run.last_good else tr.saver.last_path
                report_posthoc(posthoc, tr.settings.data.path, last)
            else:
                posthoc.finish()
        except OSError as e:
            raise write_failed(run.last_good, "the final post-hoc EMA snapshot", e) from None
    if tr.dist.is_main and run.summary_rows:
        plot_summary_quietly(tr.output_dir)
