"""The :class:`Trainer`: every part of a run, assembled from its settings by :func:`build_trainer`.

Build order is the one timm users expect: data -> the timm model -> device (channels_last if
asked) -> DDP when torchrun launched several processes -> the averages from the unwrapped
module -> optimizer, LR scheduler, AMP scaler -> resume. Every check a user can fail (data,
model name, EMA settings, resume file, output folder) runs before the output folder is
created, so a bad command leaves nothing behind. The loop itself is in :mod:`.fit`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.checkpoint import CheckpointSaver, nonfinite_names, remove_stale_temp_files

from . import UsageError
from .averages import Averages
from .build import (build_amp, build_averages, build_distillation, build_guard, build_loaders, build_losses,
                    build_optimizer, build_scheduler, build_train_model, check_compile_backend, compile_model,
                    convert_sync_bn, import_device_modules, load_data, resolve_lr, scheduled_epochs, seed_all,
                    train_data_config, wrap_ddp)
from .bn import has_batchnorm
from .data import DataSplits, DeviceLoader, ImageSavingLoader
from .dcp import DcpSaver
from .distributed import DistInfo, all_reduce_sum, gather_objects, init_distributed, shutdown_distributed
from .engine import AmpSettings, NonfiniteGuard
from .logs import LogSetup
from .outputs import choose_output_dir, log_posthoc_folder, prepare_output_dir, read_summary
from .fsdp import apply_fsdp, broadcast_buffers_before_forward
from .resume import ResumeSource, position_scheduler, read_resume, restore
from .rundir import RunLock
from .settings import Resolved, TrainSettings

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler

__all__ = ["Trainer", "build_trainer", "close_trainer", "agree"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainer:
    """Every part of a run, built by :func:`build_trainer` and never replaced; what changes
    while the epochs run is :class:`.fit.RunState`."""

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
    guard: NonfiniteGuard  # --on-nonfinite
    flags: Mapping[str, Any]  # args.yaml / the checkpoint's "args", resolved
    nonfinite_at_start: frozenset[str]  # model keys non-finite by design (masks)
    start_epoch: int
    resume: ResumeSource | None  # the --resume checkpoint (its entries released once loaded)
    output_dir: str | None = None  # rank 0
    saver: CheckpointSaver | DcpSaver | None = None  # rank 0's files, or every rank's --checkpoint-format dcp
    run_lock: RunLock | None = None  # rank 0: the run folder's lock, released by close_trainer
    summary_rows: tuple[dict[str, Any], ...] = ()  # rank 0: summary.csv's rows before start_epoch

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
    model_without_ddp = build_train_model(s.model, num_classes, dist.device)
    if s.data.augment.split_bn:  # timm's --split-bn: one BatchNorm per augmentation split (before EMA / DDP)
        from timm.layers import convert_splitbn_model

        model_without_ddp = convert_splitbn_model(model_without_ddp, max(s.data.augment.aug_splits, 2)).to(dist.device)
    data_config = train_data_config(model_without_ddp, s.data, s.model)
    model_without_ddp = convert_sync_bn(model_without_ddp, dist, s.parallel)
    train_loader, eval_loader = build_loaders(s.data, data, data_config, dist, seed=s.run.seed)
    model = shard_or_wrap(model_without_ddp, dist, s)
    updates_per_epoch = math.ceil(len(train_loader) / s.optim.grad_accum_steps)
    epochs = scheduled_epochs(s.schedule)  # timm's: with lr cycles, cooldown and a warmup prefix
    resolved = Resolved(num_classes=num_classes, lr=lr, updates_per_epoch=updates_per_epoch,
                        total_steps=updates_per_epoch * epochs, img_size=data_config["input_size"][-1],
                        global_batch_size=s.data.batch_size * dist.world_size * s.optim.grad_accum_steps,
                        epochs=epochs)
    averages = build_averages(s.ema, model_without_ddp, dist, resolved, model_name=s.model.name,
                              saved_posthoc=resume.posthoc_state if resume else None)
    optimizer = build_optimizer(s.optim, model_without_ddp, lr, sharded=s.parallel.fsdp)
    lr_scheduler = build_scheduler(s.schedule, optimizer, updates_per_epoch, eval_metric=s.run.eval_metric,
                                   seed=s.run.seed)
    amp = build_amp(s.run, dist.device, sharded=s.parallel.fsdp)
    start_epoch = 0 if resume is None else restore(resume, s, resolved, model=model_without_ddp, averages=averages,
                                                   optimizer=optimizer, amp=amp, lr_scheduler=lr_scheduler)
    if s.schedule.start_epoch is not None:  # timm's --start-epoch: overrides the resumed epoch, LR included
        start_epoch = s.schedule.start_epoch
        position_scheduler(lr_scheduler, start_epoch, updates_per_epoch, s.schedule.on_updates, None)
    model = compile_model(model, s.model)  # after DDP, as timm does
    train_loss_fn, eval_loss_fn, mixup_fn = build_losses(s.loss, num_classes, dist.device,
                                                         num_aug_splits=getattr(s.data.augment, "aug_splits", 0))
    train_loss_fn = build_distillation(s.loss.distill, model, model_without_ddp, train_loss_fn, dist.device,
                                       averages=averages, verbose=dist.is_main) or train_loss_fn
    return dict(resolved=resolved, data=data, model=model, model_without_ddp=model_without_ddp, averages=averages,
                optimizer=optimizer, lr_scheduler=lr_scheduler, amp=amp, train_loader=train_loader,
                eval_loader=eval_loader, train_loss_fn=train_loss_fn, eval_loss_fn=eval_loss_fn, mixup_fn=mixup_fn,
                start_epoch=start_epoch, resume=resume, guard=build_guard(s.run), flags=_resolved_flags(s, resolved),
                nonfinite_at_start=frozenset(nonfinite_names(list(model_without_ddp.state_dict().items()))))


def shard_or_wrap(model: nn.Module, dist: DistInfo, s: TrainSettings) -> nn.Module:
    """``--fsdp``: ``fully_shard`` the model's blocks and root in place and return it; else DDP
    when several processes run. With ``--amp --amp-dtype bfloat16`` the blocks gather and
    compute in bfloat16 (``MixedPrecisionPolicy``) unless the model has BatchNorm layers, whose
    float32 running statistics refuse bfloat16 weights: then autocast alone, as under DDP."""
    if not s.parallel.fsdp:
        return wrap_ddp(model, dist, broadcast_buffers=s.parallel.ddp_broadcast_buffers)
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


def _setup_output(s: TrainSettings, dist: DistInfo, parts: dict[str, Any], logs: LogSetup | None,
                  undo: contextlib.ExitStack) -> dict[str, Any]:
    """Rank 0 creates the folder, args.yaml, the log file and the checkpoint saver; every
    rank learns whether that worked, so a failure stops all of them. Returns the output parts
    of the :class:`Trainer`; ``undo`` releases the folder's lock if the build fails later."""
    run, start_epoch, resume, path, error, out = s.run, parts["start_epoch"], parts["resume"], None, None, {}
    if dist.is_main:
        try:
            path, out["run_lock"] = choose_output_dir(
                output=run.output, experiment=run.experiment, resume=run.resume, model_name=s.model.name,
                img_size=parts["resolved"].img_size, resumed_by_emakit=bool(resume and resume.by_emakit))
            undo.callback(out["run_lock"].release, remove_empty=True)
            parts["flags"] = {**parts["flags"], "experiment": os.path.basename(os.path.normpath(path))}
            prepare_output_dir(path, parts["flags"])
        except UsageError as e:
            error = e
    if not agree(error is None, dist):
        raise error or UsageError("stopping: rank 0 could not create the output folder")
    if s.parallel.checkpoint_format == "dcp":  # every rank writes the folders: the run folder on every rank (C)
        out["saver"] = DcpSaver(gather_objects(path, dist)[0], decreasing=run.eval_metric == "loss",
                                resumed=start_epoch > 0)
    if not dist.is_main:
        if logs is not None:
            logs.discard_early()
        return out
    out["output_dir"] = path
    if logs is not None:
        logs.add_file(os.path.join(path, "train.log"))
    for stale in remove_stale_temp_files(path) + remove_stale_temp_files(os.path.join(path, "posthoc")):
        _log.info("removed %s, a temp file left by an interrupted write", stale)
    if s.parallel.checkpoint_format != "dcp":
        out["saver"] = CheckpointSaver(path, max_history=run.checkpoint_hist, decreasing=run.eval_metric == "loss")
        if start_epoch > 0:
            out["saver"].restore(up_to_epoch=start_epoch - 1)
    if start_epoch > 0:
        out["summary_rows"] = tuple(read_summary(os.path.join(path, "summary.csv"), start_epoch))
    _log.info("output folder: %s", path)
    return out


def _open_posthoc_folder(s: TrainSettings, dist: DistInfo, averages: Averages, output_dir: str | None) -> None:
    """``--model-ema-posthoc``: rank 0 binds and plans the snapshot folder; every rank learns
    whether that worked, and a sharded tracker's ranks take rank 0's planned interval."""
    if s.ema.posthoc is None:
        return
    posthoc, error = averages.posthoc, None
    if dist.is_main and posthoc is not None:
        try:
            log_posthoc_folder(posthoc, os.path.join(output_dir, "posthoc"))
        except UsageError as e:
            error = e
    if not agree(error is None, dist):
        raise error or UsageError("stopping: rank 0 could not open the post-hoc snapshot folder")
    if posthoc is not None:
        posthoc.sync_interval()


def build_trainer(settings: TrainSettings, logs: LogSetup | None = None) -> Trainer:
    """Build everything in the user's expected order; raises ``UsageError`` for bad input
    before the output folder exists. Call :func:`close_trainer` when done."""
    import_device_modules(settings.run.device_modules)  # before the device is chosen, as timm
    dist = init_distributed(settings.run.device, always_group=settings.parallel.fsdp)
    with contextlib.ExitStack() as undo:  # on a failure: release the run folder's lock, end the process group
        undo.callback(shutdown_distributed, dist)
        parts = _build_parts(settings, dist)
        output = _setup_output(settings, dist, parts, logs, undo)
        _open_posthoc_folder(settings, dist, parts["averages"], output.get("output_dir"))
        if settings.data.augment.save_images and dist.is_main:  # timm's --save-images
            parts["train_loader"] = ImageSavingLoader(parts["train_loader"], output["output_dir"],
                                                      settings.run.log_interval)
        parts["flags"] = MappingProxyType(dict(parts["flags"]))
        undo.pop_all()
        return Trainer(settings=settings, dist=dist, **parts, **output)


def close_trainer(tr: Trainer, *, synchronize: bool = False) -> None:
    """Release the run folder's lock and tear down the process group (if any);
    ``synchronize`` on clean exits (see :func:`shutdown_distributed`)."""
    if tr.run_lock is not None:
        tr.run_lock.release()
    shutdown_distributed(tr.dist, synchronize=synchronize)
