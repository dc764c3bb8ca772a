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

Checkpoint keys beyond timm's: ``state_dict_ema_<i>`` / ``ema_<i>`` for EMA i >= 1,
``posthoc_ema`` (the power EMA state), ``ema_bn_recal`` (each EMA's recalibrated BatchNorm
buffers of that epoch), ``train_position`` (mid-epoch files).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from emakit.checkpoint import find_nonfinite

from . import UsageError
from .averages import POSTHOC_CHECKPOINT_KEY, recalibrated_bn
from .dcp import DCP_BEST, DCP_LAST, is_dcp_folder, link_dcp_folder, read_dcp_meta, save_dcp
from .fsdp import (broadcast_buffers, full_model_state, full_optimizer_state, reshard, sharded_model_state,
                   sharded_optimizer_state)
from .data import ResumableSampler, epoch_seed, set_epoch
from .build import seed_all
from .distributed import DistInfo, all_reduce_sum, distribute_bn
from .engine import EpochProgress, EvalTarget, TrainingDiverged, TrainOptions, evaluate_many, train_one_epoch
from .lifecycle import TrainingInterrupted, diverged, last_good_text, rng_state, set_rng_state, \
    signal_name, write_failed
from .outputs import (FitResult, console_logs_above_progress_bars, describe_result, fit_result, plot_summary_quietly,
                      preload_plotting, report_posthoc, write_summary)
from .resume import TRAIN_POSITION_KEY
from .trainer import Trainer

__all__ = ["fit", "run_epoch", "evaluate_raw_and_emas", "best_ema_index", "select_metric", "checkpoint_state",
           "sharded_checkpoint_state", "CHECKPOINT_VERSION"]

_log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 2  # timm writes version 2 with the same keys


# --------------------------------------------------------------------------- evaluation
def _ema_input_dtype(tr: Trainer) -> torch.dtype | None:
    """Feed a low-precision EMA (``--model-ema-dtype bfloat16``) inputs of its dtype when
    autocast is off, so its evaluation does not fail on a dtype mismatch."""
    members = tr.averages.members
    if not members or members[0].module is None:  # a sharded EMA runs swapped into the model, in its dtype
        return None
    param = next(iter(members[0].module.parameters()), None)
    if param is None or tr.amp.enabled or param.dtype == torch.float32:
        return None
    return param.dtype


def _ema_autocast(tr: Trainer) -> Callable[[], contextlib.AbstractContextManager] | None:
    """Autocast factory for forward passes of the EMA outside ``evaluate`` (BN recalibration):
    the AMP settings, or the EMA's own dtype for a low-precision EMA without AMP."""
    device = tr.averages.device
    if tr.amp.enabled:
        return lambda: tr.amp.autocast(device)
    dtype = _ema_input_dtype(tr)
    if dtype is None:
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def evaluate_raw_and_emas(tr: Trainer) -> tuple[dict[str, float], list[dict[str, float]],
                                                list[dict[str, torch.Tensor]]]:
    """Validate the raw weights and every EMA in one pass over the validation data (each
    batch decoded once, fed to all of them: ``evaluate_many``), BN buffers synced first.

    Returns (raw metrics, one metrics dict per EMA, the recalibrated BatchNorm buffers of
    each EMA: empty without ``--model-ema-bn-recal``). With recalibration every EMA is
    evaluated under statistics re-estimated for its own weights, and keeps its averaged
    statistics afterwards (see ``recalibrated_bn``).
    """
    if tr.averages.sharded or tr.settings.parallel.fsdp:
        return _evaluate_sharded(tr)
    run, channels_last = tr.settings.run, tr.settings.model.channels_last
    distribute_bn(tr.model_without_ddp, tr.dist, run.dist_bn)
    targets = [EvalTarget(tr.model_without_ddp, tr.dist.device)]
    input_dtype = _ema_input_dtype(tr)
    for average in tr.averages.targets():
        distribute_bn(average.module, tr.dist, run.dist_bn)
        targets.append(EvalTarget(average.module, tr.averages.device, input_dtype, f" ({average.name.upper()})"))
    with tr.averages.recalibrated(tr.train_loader, channels_last=channels_last, autocast=_ema_autocast(tr)) as recal:
        results = evaluate_many(targets, tr.eval_loader, tr.eval_loss_fn, amp=tr.amp, channels_last=channels_last,
                                dist=tr.dist, progress=tr.dist.is_main and run.progress)
    return results[0], results[1:], recal


def _evaluate_sharded(tr: Trainer) -> tuple[dict[str, float], list[dict[str, float]],
                                            list[dict[str, torch.Tensor]]]:
    """:func:`evaluate_raw_and_emas` under FSDP: the raw weights, then each EMA swapped into the
    sharded model (its shards exchanged with the model's, no full copy), one pass each; BN
    buffers synced and (``--model-ema-bn-recal``) recalibrated on the swapped model."""
    run, channels_last, model = tr.settings.run, tr.settings.model.channels_last, tr.model_without_ddp
    kwargs = dict(amp=tr.amp, channels_last=channels_last, dist=tr.dist, progress=tr.dist.is_main and run.progress)
    distribute_bn(model, tr.dist, run.dist_bn)
    raw = evaluate_many([EvalTarget(model, tr.dist.device)], tr.eval_loader, tr.eval_loss_fn, **kwargs)[0]
    reshard(model)  # with --no-fsdp-reshard-after-forward the evaluation left the weights gathered
    emas, recal = [], []
    for member, average in zip(tr.averages.members, tr.averages.targets()):
        with member.swapped_into(model) as swapped, contextlib.ExitStack() as stack:
            distribute_bn(swapped, tr.dist, run.dist_bn)  # the EMA's own buffers, as the DDP path does
            if tr.averages.bn_recal > 0:
                recal.append(stack.enter_context(recalibrated_bn(
                    swapped, tr.train_loader, tr.averages.bn_recal, tr.dist.device, channels_last=channels_last,
                    autocast=_ema_autocast(tr))))
            emas += evaluate_many([EvalTarget(swapped, tr.dist.device, None, f" ({average.name.upper()})")],
                                  tr.eval_loader, tr.eval_loss_fn, **kwargs)
    return raw, emas, recal


def best_ema_index(emas: list[dict[str, float]], eval_metric: str) -> int | None:
    """Index of the best EMA by ``eval_metric`` (lowest loss, else highest); ties -> the first."""
    if not emas:
        return None
    sign = 1.0 if eval_metric == "loss" else -1.0
    return min(range(len(emas)), key=lambda i: (sign * emas[i][eval_metric], i))


def select_metric(raw: dict[str, float], emas: list[dict[str, float]], eval_metric: str, select: str) -> float:
    """The value that picks ``model_best``: the raw weights' without EMA, else the first
    EMA's (``--model-ema-select first``) or the best EMA's (``best``)."""
    if not emas:
        return raw[eval_metric]
    index = best_ema_index(emas, eval_metric) if select == "best" else 0
    return emas[index][eval_metric]


def _epoch_metrics(tr: Trainer, epoch: int, train: dict[str, float], raw: dict[str, float],
                   emas: list[dict[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "train_loss": train["loss"], "eval_loss": raw["loss"],
                           "eval_top1": raw["top1"], "eval_top5": raw["top5"], "lr": train["lr"],
                           "eval_samples": raw["samples"], "train_samples": train["samples"],
                           "optimizer_steps": train["optimizer_steps"], "ema_updates": train["ema_updates"],
                           "skipped_steps": train["skipped_steps"]}
    names = [t.name for t in tr.averages.targets()]
    for key in ("loss", "top1", "top5", "samples"):
        row[f"ema_eval_{key}"] = emas[0][key] if emas else None
    for name, metrics in zip(names[1:], emas[1:]):
        for key in ("loss", "top1", "top5", "samples"):
            row[f"{name}_eval_{key}"] = metrics[key]
    if len(emas) > 1:
        row["ema_best"] = tr.averages.targets()[best_ema_index(emas, tr.settings.run.eval_metric)].selector
    return row


def _log_epoch(tr: Trainer, epoch: int, m: dict[str, Any], seconds: float, img_per_sec: float) -> None:
    names = [t.name for t in tr.averages.targets()]
    ema = "" if m["ema_eval_top1"] is None else (
        f" | EMA top1 {m['ema_eval_top1']:.2f} top5 {m['ema_eval_top5']:.2f} loss {m['ema_eval_loss']:.4f}")
    for name in names[1:]:
        ema += f" | {name.upper()} top1 {m[f'{name}_eval_top1']:.2f}"
    if len(names) > 1:
        ema += f" | best of {len(names)} EMAs: {m['ema_best']}"
    _log.info("epoch %d/%d: train loss %.4f | raw top1 %.2f top5 %.2f loss %.4f%s | lr %.4g | %.1fs, %.0f img/s",
              epoch, tr.settings.run.epochs - 1, m["train_loss"], m["eval_top1"], m["eval_top5"], m["eval_loss"],
              ema, m["lr"], seconds, img_per_sec)


# --------------------------------------------------------------------------- checkpoints
def checkpoint_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any],
                     bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any] | None:
    """The single-file checkpoint dict (DESIGN.md section 3): tensors and plain types only;
    timm's keys plus every average's entries (:meth:`Averages.checkpoint_state`). Call it on
    every rank: under FSDP the model, optimizer and EMA(s) are gathered to whole CPU tensors
    (*collective*) in the layout a one-process run writes. Rank 0 gets the dict, others None."""
    sharded = tr.settings.parallel.fsdp
    if not sharded and not tr.dist.is_main:
        return None
    if sharded:
        weights = full_model_state(tr.model_without_ddp)
        optimizer = full_optimizer_state(tr.model_without_ddp, tr.optimizer)
    else:
        weights, optimizer = tr.model_without_ddp.state_dict(), tr.optimizer.state_dict()
    averages = tr.averages.checkpoint_state(bn_recal)
    if not tr.dist.is_main:
        return None
    state = _plain_state(tr, epoch, metric, metrics)
    state.update(state_dict=weights, optimizer=optimizer, **averages)
    return state


def _plain_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"epoch": epoch, "arch": tr.settings.model.name, "version": CHECKPOINT_VERSION,
            "scheduler": tr.lr_scheduler.state_dict(),
            "amp_scaler": tr.amp.scaler.state_dict() if tr.amp.scaler is not None else None,
            "args": dict(tr.flags), "metric": metric, "metrics": dict(metrics)}


def sharded_checkpoint_state(tr: Trainer, epoch: int, metric: float | None, metrics: dict[str, Any],
                             bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """The same keys for ``--checkpoint-format dcp`` on every rank (*collective*): model,
    optimizer (parameter-name keyed) and EMA weights in sharded form (DTensors over this
    rank's shards under FSDP, whole tensors under DDP / one process), for :func:`save_dcp`."""
    # DCP writes one rank's copy of a replicated tensor, not necessarily rank 0's: mid-epoch the
    # BatchNorm statistics differ by rank, and rank 0's are the run's (the file format's, and
    # the ones the next training forward takes, as DDP's broadcast_buffers does).
    broadcast_buffers(tr.model_without_ddp)
    state = _plain_state(tr, epoch, metric, metrics)
    state.update(state_dict=sharded_model_state(tr.model_without_ddp),
                 optimizer=sharded_optimizer_state(tr.model_without_ddp, tr.optimizer),
                 **tr.averages.checkpoint_state(bn_recal, full=False))
    return state


def _dcp_enabled(tr: Trainer) -> bool:
    return tr.settings.parallel.checkpoint_format == "dcp"


def _dcp_run_folder(tr: Trainer) -> str:
    """The run folder on every rank (only rank 0 created it; *collective* on the first call),
    and the best metric so far from a resumed run's ``model_best.dcp``."""
    if tr.dcp_folder is None:
        tr.dcp_folder = _gather(tr.output_dir, tr.dist)[0]
        best = os.path.join(tr.dcp_folder, DCP_BEST)
        if tr.start_epoch > 0 and is_dcp_folder(best):
            tr.dcp_best = read_dcp_meta(best).get("plain", {}).get("metric")
    return tr.dcp_folder


def _save_dcp_checkpoint(tr: Trainer, state: dict[str, Any], epoch: int | None, metric: float | None,
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


def _write_checked(tr: Trainer, state: dict[str, Any] | None, write: Callable[[], None], label: str,
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


# --------------------------------------------------------------------------- one epoch
def _train_options(tr: Trainer) -> TrainOptions:
    s = tr.settings
    return TrainOptions(grad_accum_steps=s.optim.grad_accum_steps, clip_grad=s.optim.clip_grad,
                        clip_mode=s.optim.clip_mode, channels_last=s.model.channels_last,
                        log_interval=s.run.log_interval, progress=tr.dist.is_main and s.run.progress, amp=tr.amp)


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
    if averages.write_error is not None:
        raise write_failed(tr.last_good, "a post-hoc EMA snapshot", averages.write_error)
    if train["stopped"]:
        _stop_mid_epoch(tr, epoch, train["progress"])
    raw, emas, bn_recal = evaluate_raw_and_emas(tr)
    if tr.dist.is_main and epoch == s.run.epochs - 1:
        preload_plotting()  # overlaps matplotlib's import with the last checkpoint write
    metrics = _epoch_metrics(tr, epoch, train, raw, emas)
    metric = select_metric(raw, emas, s.run.eval_metric, s.ema.select)
    tr.lr_scheduler.step(epoch + 1, metric)
    dcp = _dcp_enabled(tr)
    state = (sharded_checkpoint_state if dcp else checkpoint_state)(tr, epoch, metric, metrics, bn_recal)

    def write() -> None:
        if dcp:
            _save_dcp_checkpoint(tr, state, epoch, metric)
            if not tr.dist.is_main:
                return
        tr.summary_rows.append(metrics)
        write_summary(os.path.join(tr.output_dir, "summary.csv"), tr.summary_rows, tr.summary_columns)
        if not dcp:
            tr.saver.save(state, epoch, metric, last_only_keys=(POSTHOC_CHECKPOINT_KEY,))

    _write_checked(tr, state, write, f"epoch {epoch}", f"after epoch {epoch}", every_rank=dcp)
    if tr.dist.is_main:
        _log_epoch(tr, epoch, metrics, time.perf_counter() - start, train["img_per_sec"])
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


def _gather(obj: Any, dist: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group)."""
    if not dist.distributed:
        return [obj]
    import torch.distributed as torch_dist

    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def _stop_mid_epoch(tr: Trainer, epoch: int, progress: EpochProgress) -> None:
    """Write a resumable mid-epoch ``last.pth.tar`` (every rank's generator states and
    progress, gathered on rank 0) and raise :class:`TrainingInterrupted`."""
    mine: dict[str, Any] = {"rng": rng_state(tr.dist.device), "progress": progress.to_dict(),
                            "signal": _stop_signal(tr)}
    if tr.dist.distributed:  # each rank's EMA averaged its own BatchNorm statistics since the last evaluation
        mine["ema_buffers"] = tr.averages.rank_buffers()
    ranks = _gather(mine, tr.dist)
    signum = next((r["signal"] for r in ranks if r["signal"] is not None), signal.SIGTERM)
    step = progress.steps + progress.skipped
    label = f"epoch {epoch}, step {step}/{tr.updates_per_epoch}"
    dcp = _dcp_enabled(tr)
    state = (sharded_checkpoint_state if dcp else checkpoint_state)(tr, epoch - 1, None, {})
    if tr.dist.is_main:
        state[TRAIN_POSITION_KEY] = {
            "epoch": epoch, "steps_done": step, "batches_done": progress.batches,
            "steps_per_epoch": tr.updates_per_epoch, "processes": tr.dist.world_size,
            "batch_size": tr.settings.data.batch_size, "grad_accum_steps": tr.settings.optim.grad_accum_steps,
            "ranks": [{k: v for k, v in r.items() if k != "signal"} for r in ranks]}
    write = (lambda: _save_dcp_checkpoint(tr, state, None, None)) if dcp else (lambda: tr.saver.save_last(state))
    _write_checked(tr, state, write, f"{label} (mid-epoch)", f"at {label}", every_rank=dcp)
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} at {label}: wrote the resumable checkpoint "
                              f"{tr.last_good[0]}", tr.last_good[0], 128 + int(signum), error=False)


def _stop_after_epoch(tr: Trainer, epoch: int) -> None:
    """After an epoch's checkpoint: stop (every rank) when a signal arrived on any rank."""
    signals = [_stop_signal(tr)] if not tr.dist.distributed else _gather(_stop_signal(tr), tr.dist)
    signum = next((s for s in signals if s is not None), None)
    if signum is None:
        return
    last = tr.last_good[0] if tr.last_good else None
    raise TrainingInterrupted(f"stopped by {signal_name(signum)} after epoch {epoch}: the resumable checkpoint is "
                              f"{last} (end of epoch {epoch})", last, 128 + int(signum), error=False)


# --------------------------------------------------------------------------- the run
def fit(tr: Trainer) -> FitResult:
    """Run the epochs from ``tr.start_epoch``. A stop signal, a divergence or a failed write
    raises :class:`RunStopped` (see :func:`run_epoch`)."""
    run = tr.settings.run
    if tr.dist.is_main and tr.start_epoch >= run.epochs:
        _log.warning("nothing to train: the checkpoint finished epoch %d of %d; raise --epochs to continue",
                     tr.start_epoch - 1, run.epochs)
    elif tr.dist.is_main:
        _log.info("training epochs %d-%d, %d optimizer steps per epoch", tr.start_epoch, run.epochs - 1,
                  tr.updates_per_epoch)
    deferred = tr.signals.deferred() if tr.signals is not None else contextlib.nullcontext()
    try:
        with deferred, console_logs_above_progress_bars(tr.dist.is_main and run.progress):
            for epoch in range(tr.start_epoch, run.epochs):
                run_epoch(tr, epoch)
                if epoch < run.epochs - 1:  # after the last epoch, training is done: finish normally
                    _stop_after_epoch(tr, epoch)
            _finish_run(tr)
    except KeyboardInterrupt:  # signals not taken over (train.main not in the main thread)
        last = tr.last_good[0] if tr.last_good else None
        raise TrainingInterrupted(f"interrupted; {last_good_text(tr.last_good)}", last, 130, error=False) from None
    result = fit_result(tr.output_dir, run.epochs - tr.start_epoch, tr.summary_rows, tr.averages.count,
                        run.eval_metric)
    if tr.dist.is_main:
        _log.info("%s", describe_result(result))
    return result


def _finish_run(tr: Trainer) -> None:
    """After the last epoch: the final post-hoc snapshot and the plot (rank 0)."""
    if not tr.dist.is_main:
        return
    if tr.averages.posthoc is not None:
        try:
            report_posthoc(tr.averages.posthoc, tr.settings.data.path, tr.saver.last_path)
        except OSError as e:
            raise write_failed(tr.last_good, "the final post-hoc EMA snapshot", e) from None
    if tr.summary_rows:
        plot_summary_quietly(tr.output_dir)

