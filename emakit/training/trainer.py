"""The :class:`Trainer`: every part of a run, assembled from its settings by :func:`build_trainer`.

Build order is the one timm users expect: data -> the timm model -> device (channels_last if
asked) -> DDP when torchrun launched several processes -> the averages from the unwrapped
module -> optimizer, LR scheduler, AMP scaler -> resume. Every check a user can fail (data,
model name, EMA settings, resume file, output folder) runs before the output folder is
created, so a bad command leaves nothing behind. The loop itself is in :mod:`.fit`.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.checkpoint import CheckpointSaver, nonfinite_names, remove_stale_temp_files

from . import UsageError
from .averages import Averages
from .build import (build_amp, build_averages, build_guard, build_loaders, build_losses, build_model, build_optimizer,
                    build_scheduler, check_compile_backend, load_data, resolve_lr, seed_all, wrap_ddp)
from .bn import has_batchnorm
from .data import DataSplits, DeviceLoader, resolve_data_config_for
from .distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from .engine import AmpSettings, NonfiniteGuard
from .lifecycle import LastGood, StopSignals
from .logs import LogSetup
from .outputs import choose_output_dir, log_posthoc_folder, prepare_output_dir, read_summary, summary_columns
from .fsdp import apply_fsdp, broadcast_buffers_before_forward
from .resume import read_resume, restore
from .rundir import RunLock
from .settings import Resolved, TrainSettings

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler

__all__ = ["Trainer", "build_trainer", "close_trainer", "agree"]

_log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """Everything the loop needs, built by :func:`build_trainer`."""

    settings: TrainSettings
    resolved: Resolved
    dist: DistInfo
    data: DataSplits
    model: nn.Module              # what trains: possibly DDP-wrapped and/or compiled
    model_without_ddp: nn.Module  # the bare module: evaluated, saved, averaged
    averages: Averages            # the EMA(s), the post-hoc tracker, BN recalibration
    optimizer: torch.optim.Optimizer
    lr_scheduler: Scheduler  # timm's, from build_scheduler
    amp: AmpSettings
    train_loader: torch.utils.data.DataLoader | DeviceLoader
    eval_loader: torch.utils.data.DataLoader | DeviceLoader
    train_loss_fn: Callable
    eval_loss_fn: Callable
    mixup_fn: Any | None
    start_epoch: int = 0
    flags: Mapping[str, Any] = field(default_factory=dict)  # args.yaml / the checkpoint's "args", resolved
    output_dir: str | None = None
    saver: CheckpointSaver | None = None
    run_lock: RunLock | None = None      # rank 0: the run folder's lock, released by close_trainer
    resumed_by_emakit: bool = False      # the --resume checkpoint was written by emakit (rundir rules)
    summary_rows: list[dict[str, Any]] = field(default_factory=list)
    summary_columns: list[str] = field(default_factory=list)
    guard: NonfiniteGuard = field(default_factory=NonfiniteGuard)  # --on-nonfinite
    signals: StopSignals | None = None  # set by train.py; None: Ctrl-C raises KeyboardInterrupt
    resume_position: dict[str, Any] | None = None  # train_position of a mid-epoch --resume file
    last_good: LastGood | None = None  # (path, "epoch 3") of the newest intact checkpoint
    nonfinite_at_start: frozenset[str] = frozenset()  # model keys non-finite by design (masks)
    dcp_folder: str | None = None  # --checkpoint-format dcp: the run folder, known on every rank
    dcp_best: float | None = None  # --checkpoint-format dcp: the metric of model_best.dcp

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.resolved.updates_per_epoch


def agree(ok: bool, dist: DistInfo) -> bool:
    """True on every rank when ``ok`` holds on every rank (so all fail together, none hang)."""
    return all_reduce_sum([0.0 if ok else 1.0], dist)[0] == 0.0


def _resolved_flags(settings: TrainSettings, resolved: Resolved) -> dict[str, Any]:
    """The parsed flags with the values resolved during the build (timm's ``args`` layout)."""
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.flags.items()}
    flags.update(num_classes=resolved.num_classes, lr=resolved.lr)
    return flags


def _build_parts(s: TrainSettings, dist: DistInfo) -> dict[str, Any]:
    data, num_classes = load_data(s.data, s.run.seed)
    resume = read_resume(s, dist.world_size)  # checked before anything is built or written
    lr = resolve_lr(s.optim, s.data.batch_size, dist.world_size)
    seed_all(s.run.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    check_compile_backend(s.model.compile_backend)
    model_without_ddp = build_model(s.model.name, num_classes, dist.device, drop_rate=s.model.drop_rate,
                                    drop_path_rate=s.model.drop_path_rate, channels_last=s.model.channels_last,
                                    pretrained=s.model.pretrained, pretrained_path=s.model.weights_file)
    if s.data.augment.split_bn:  # timm's --split-bn: one BatchNorm per augmentation split (before EMA / DDP)
        from timm.layers import convert_splitbn_model

        model_without_ddp = convert_splitbn_model(model_without_ddp, max(s.data.augment.aug_splits, 2)).to(dist.device)
    data_config = resolve_data_config_for(model_without_ddp, img_size=s.data.img_size, crop_pct=s.data.crop_pct,
                                          mean=s.data.mean, std=s.data.std, interpolation=s.data.interpolation)
    train_loader, eval_loader = build_loaders(s.data, data, data_config, dist, seed=s.run.seed)
    model = shard_or_wrap(model_without_ddp, dist, s)
    updates_per_epoch = math.ceil(len(train_loader) / s.optim.grad_accum_steps)
    resolved = Resolved(num_classes=num_classes, lr=lr, updates_per_epoch=updates_per_epoch,
                        total_steps=updates_per_epoch * s.schedule.epochs, img_size=data_config["input_size"][-1],
                        global_batch_size=s.data.batch_size * dist.world_size * s.optim.grad_accum_steps)
    averages = build_averages(s.ema, model_without_ddp, dist, resolved, model_name=s.model.name,
                              saved_posthoc=resume.posthoc_state if resume else None)
    optimizer = build_optimizer(s.optim, model_without_ddp, lr, sharded=s.parallel.fsdp)
    lr_scheduler = build_scheduler(s.schedule, optimizer, updates_per_epoch, eval_metric=s.run.eval_metric)
    amp = build_amp(s.run, dist.device, sharded=s.parallel.fsdp)
    start_epoch = 0 if resume is None else restore(resume, s, resolved, model=model_without_ddp, averages=averages,
                                                   optimizer=optimizer, amp=amp, lr_scheduler=lr_scheduler)
    if s.model.compile_backend:
        model = torch.compile(model, backend=s.model.compile_backend)  # after DDP, as timm does
    train_loss_fn, eval_loss_fn, mixup_fn = build_losses(s.loss, num_classes, dist.device)
    return dict(resolved=resolved, data=data, model=model, model_without_ddp=model_without_ddp, averages=averages,
                optimizer=optimizer, lr_scheduler=lr_scheduler, amp=amp, train_loader=train_loader,
                eval_loader=eval_loader, train_loss_fn=train_loss_fn, eval_loss_fn=eval_loss_fn, mixup_fn=mixup_fn,
                start_epoch=start_epoch, resumed_by_emakit=bool(resume and resume.by_emakit),
                resume_position=resume.position if resume else None, guard=build_guard(s.run),
                flags=_resolved_flags(s, resolved),
                last_good=(os.path.abspath(resume.path), "the checkpoint this run resumed from") if resume else None,
                nonfinite_at_start=frozenset(nonfinite_names(list(model_without_ddp.state_dict().items()))))


def shard_or_wrap(model: nn.Module, dist: DistInfo, s: TrainSettings) -> nn.Module:
    """``--fsdp``: ``fully_shard`` the model's blocks and root in place and return it; else DDP
    when several processes run. With ``--amp --amp-dtype bfloat16`` the blocks gather and
    compute in bfloat16 (``MixedPrecisionPolicy``) unless the model has BatchNorm layers, whose
    float32 running statistics refuse bfloat16 weights: then autocast alone, as under DDP."""
    if not s.parallel.fsdp:
        return wrap_ddp(model, dist)
    bf16 = s.run.amp and s.run.amp_dtype == "bfloat16"
    mp_dtype = torch.bfloat16 if bf16 and not has_batchnorm(model) else None
    blocks = apply_fsdp(model, mp_dtype=mp_dtype, reshard_after_forward=s.parallel.reshard_after_forward)
    if dist.distributed:  # BatchNorm statistics follow rank 0's, as DDP's broadcast_buffers does
        broadcast_buffers_before_forward(model)
    shown = ", ".join(blocks[:4]) + (f", ... {blocks[-1]}" if len(blocks) > 4 else "")
    _log.info("FSDP2 over %d process(es): fully_shard on %d blocks (%s) then the root; reshard after forward %s%s",
              dist.world_size, len(blocks), shown or "none", s.parallel.reshard_after_forward,
              ", compute in bfloat16" if mp_dtype is not None else "")
    return model


def _setup_output(tr: Trainer, logs: LogSetup | None) -> None:
    """Rank 0 creates the folder, args.yaml, the log file and the checkpoint saver; every
    rank learns whether that worked, so a failure stops all of them."""
    run, error = tr.settings.run, None
    if tr.dist.is_main:
        try:
            path, tr.run_lock = choose_output_dir(output=run.output, experiment=run.experiment, resume=run.resume,
                                                  model_name=tr.settings.model.name, img_size=tr.resolved.img_size,
                                                  resumed_by_emakit=tr.resumed_by_emakit)
            tr.flags = MappingProxyType({**tr.flags, "experiment": os.path.basename(os.path.normpath(path))})
            prepare_output_dir(path, tr.flags)
        except UsageError as e:
            error = e
    if not agree(error is None, tr.dist):
        raise error or UsageError("stopping: rank 0 could not create the output folder")
    if not tr.dist.is_main:
        if logs is not None:
            logs.discard_early()
        return
    tr.output_dir = path
    if logs is not None:
        logs.add_file(os.path.join(path, "train.log"))
    for stale in remove_stale_temp_files(path) + remove_stale_temp_files(os.path.join(path, "posthoc")):
        _log.info("removed %s, a temp file left by an interrupted write", stale)
    tr.saver = CheckpointSaver(path, max_history=run.checkpoint_hist, decreasing=run.eval_metric == "loss")
    if tr.start_epoch > 0:
        tr.saver.restore(up_to_epoch=tr.start_epoch - 1)
        tr.summary_rows = read_summary(os.path.join(path, "summary.csv"), tr.start_epoch)
    _log.info("output folder: %s", path)


def _open_posthoc_folder(tr: Trainer) -> None:
    """``--model-ema-posthoc``: rank 0 binds and plans the snapshot folder; every rank learns
    whether that worked, and a sharded tracker's ranks take rank 0's planned interval."""
    if tr.settings.ema.posthoc is None:
        return
    posthoc, error = tr.averages.posthoc, None
    if tr.dist.is_main and posthoc is not None:
        try:
            log_posthoc_folder(posthoc, os.path.join(tr.output_dir, "posthoc"))
        except UsageError as e:
            error = e
    if not agree(error is None, tr.dist):
        raise error or UsageError("stopping: rank 0 could not open the post-hoc snapshot folder")
    if posthoc is not None:
        posthoc.sync_interval()


def build_trainer(settings: TrainSettings, logs: LogSetup | None = None) -> Trainer:
    """Build everything in the user's expected order; raises ``UsageError`` for bad input
    before the output folder exists. Call :func:`close_trainer` when done."""
    dist = init_distributed(settings.run.device, always_group=settings.parallel.fsdp)
    try:
        parts = _build_parts(settings, dist)
        tr = Trainer(settings=settings, dist=dist, summary_columns=summary_columns(parts["averages"].count), **parts)
        tr.flags = MappingProxyType(dict(tr.flags))
        try:
            _setup_output(tr, logs)
            _open_posthoc_folder(tr)
            if settings.data.augment.save_images and tr.dist.is_main:  # timm's --save-images (parity-v)
                from .data import ImageSavingLoader

                tr.train_loader = ImageSavingLoader(tr.train_loader, tr.output_dir, settings.run.log_interval)
        except BaseException:
            if tr.run_lock is not None:
                tr.run_lock.release(remove_empty=True)
            raise
        return tr
    except BaseException:
        shutdown_distributed(dist)
        raise


def close_trainer(tr: Trainer, *, synchronize: bool = False) -> None:
    """Release the run folder's lock and tear down the process group (if any);
    ``synchronize`` on clean exits (see :func:`shutdown_distributed`)."""
    if tr.run_lock is not None:
        tr.run_lock.release()
    shutdown_distributed(tr.dist, synchronize=synchronize)
