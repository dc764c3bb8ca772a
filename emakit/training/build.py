"""Building the parts of a run from its settings (:mod:`.settings`), in timm's order: data ->
model -> device / channels_last -> DDP -> the averages from the bare module -> optimizer,
LR scheduler, AMP -> losses. One ``build_model`` serves train.py and validate.py. Every
check a user can fail raises ``UsageError`` before anything is written."""
from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from emakit import ModelEMA, MultiEMA
from emakit.ema import is_sharded
from emakit.posthoc import DTYPES

from . import UsageError, one_line
from .averages import Averages, PosthocTracker, auto_posthoc_every, posthoc_snapshot_cap
from .bn import has_batchnorm
from .data import (DataSplits, DeviceLoader, build_eval_loader, build_train_loader, build_transforms,
                   device_random_erasing, flip_labels)
from .distributed import DistInfo
from .engine import AmpSettings, NonfiniteGuard
from .settings import (DataSettings, EmaSettings, LossSettings, OptimSettings, Resolved, RunSettings,
                       ScheduleSettings)

__all__ = ["build_model", "check_model_name", "seed_all", "check_compile_backend", "load_data", "build_loaders",
           "wrap_ddp", "build_ema", "build_posthoc", "build_averages", "resolve_lr", "build_optimizer",
           "build_scheduler", "build_guard", "build_amp", "build_losses"]

_log = logging.getLogger(__name__)
_SCHEDULERS = "cosine, step, multistep, plateau, poly, tanh, none"  # named in --sched errors
_UNBOUNDED_POSTHOC_SNAPSHOTS = 50  # default snapshot steps with --posthoc-budget none


def check_model_name(name: str) -> None:
    """``UsageError`` for a name timm does not know, with close matches and how to list names."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown model {name!r}: {hint}list the names with "
                         "python -c \"import timm; print(timm.list_models('*resnet*'))\"")


def build_model(name: str, num_classes: int, device: torch.device, *, drop_rate: float = 0.0,
                drop_path_rate: float | None = None, pretrained: bool = False, pretrained_path: str | None = None,
                channels_last: bool = False, in_chans: int | None = None, log: bool = True) -> nn.Module:
    """``timm.create_model`` moved to ``device`` (channels_last if asked), in train mode.

    ``pretrained``: start from the model's pretrained weights as timm does (its hub download
    and cache); ``pretrained_path``: from this local weights file instead (timm's
    ``pretrained_cfg_overlay`` ``file``). ``in_chans``: input channels when not 3 (a
    checkpoint's training args). An unknown name, a missing file or weights that cannot be
    fetched is a ``UsageError``. ``log``: log the parameter count (train.py).
    """
    import timm

    check_model_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if in_chans:
        kwargs["in_chans"] = in_chans
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise UsageError(f"--pretrained-path {pretrained_path}: no such file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(pretrained_path)})
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # the hub's and the loaders' errors have no common base
        if pretrained_path:
            raise UsageError(f"cannot load --pretrained-path {pretrained_path} into {name}: "
                             f"{one_line(e)[:300]}") from None
        if pretrained:
            raise UsageError(f"cannot get the pretrained weights of {name} ({type(e).__name__}: "
                             f"{one_line(e)[:200]}); check the network or the hub cache, or pass --pretrained-path "
                             "FILE") from None
        raise
    model.to(device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if log:
        source = f", weights from {pretrained_path}" if pretrained_path else (
            ", pretrained weights" if pretrained else "")
        _log.info("model %s: %.2fM parameters, %d classes%s", name,
                  sum(p.numel() for p in model.parameters()) / 1e6, num_classes, source)
    return model


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_compile_backend(backend: str | None) -> None:
    """``--torchcompile BACKEND`` must name a registered torch.compile backend."""
    if backend and backend not in torch.compiler.list_backends(exclude_tags=()):
        raise UsageError(f"--torchcompile {backend}: unknown backend; available: "
                         f"{', '.join(torch.compiler.list_backends())}")


# --------------------------------------------------------------------------- data
def load_data(data: DataSettings, seed: int) -> tuple[DataSplits, int]:
    """The train/val datasets and the number of classes (``--num-classes`` or those found);
    ``--label-noise`` flips training labels among the classes present (seeded)."""
    from .sources import build_splits  # --dataset: every source (folder, tar, torch/, hfds/, wds/, wids/, hfids/)

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    splits = build_splits(data, seed=seed, world_size=world)
    _log.info("data: %s", splits.description)
    num_classes = data.num_classes or len(splits.classes)
    if num_classes < len(splits.classes):
        raise UsageError(f"--num-classes {num_classes} is less than the {len(splits.classes)} classes in the data")
    if data.label_noise > 0:
        # Flip among the classes present, so a flipped label is always a real class.
        flipped = flip_labels(splits.train, data.label_noise, len(splits.classes), seed)
        _log.info("label noise: %d of %d training labels (%.0f%%) flipped to a random other class (seed %d); "
                  "validation labels are clean", len(flipped), len(splits.train), 100 * data.label_noise, seed)
    return splits, num_classes


def build_loaders(data: DataSettings, splits: DataSplits, data_config: dict[str, Any], dist: DistInfo, *,
                  seed: int) -> tuple[Any, Any]:
    """(train loader, eval loader) with the transforms set on the datasets; on CUDA (unless
    ``--no-prefetcher``) uint8 batches go through a :class:`DeviceLoader` that normalizes
    (and random-erases) on the device."""
    on_device = dist.device.type == "cuda" and data.prefetcher  # the GPU input path
    splits.train.transform, splits.val.transform = build_transforms(data_config, data.augment, uint8=on_device)
    from .sources import build_stream_loader, is_stream

    train_loader = (build_stream_loader if is_stream(splits.train) else build_train_loader)(
        splits.train, data.batch_size, dist, seed=seed, workers=data.workers, pin_memory=data.pin_memory or on_device)
    eval_loader = build_eval_loader(splits.val, data.eval_batch_size or data.batch_size, dist,
                                    workers=data.workers, pin_memory=data.pin_memory or on_device)
    if not on_device:
        return train_loader, eval_loader
    mean, std = data_config["mean"], data_config["std"]
    erasing = device_random_erasing(data.augment, dist.device)
    return (DeviceLoader(train_loader, dist.device, mean, std, random_erasing=erasing),
            DeviceLoader(eval_loader, dist.device, mean, std))


def wrap_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when several processes train, else ``model``."""
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None  # none on CPU (gloo)
    return DistributedDataParallel(model, device_ids=device_ids)


# --------------------------------------------------------------------------- averages
def build_ema(ema: EmaSettings, model: nn.Module, *, updates_per_epoch: int, global_batch_size: int,
              total_steps: int) -> ModelEMA | MultiEMA | None:
    """The EMA from the bare module, or None with ``--no-model-ema``; bad settings -> UsageError.

    One decay / half-life gives a ``ModelEMA``; several give one ``MultiEMA`` whose members
    share every other setting and are updated in one pass.

    The EMA equals timm's train.py for the same flags: timm passes the optimizer step count
    to ``ModelEmaV3.update(model, step=n)``, whose decay is 0 at the first step (after
    ``update_after_step``), so its first update copies the model; hence ``copy_first=True``
    here (``ModelEMA``'s library default blends instead; docs/CONTRACTS.md).
    """
    if not ema.enabled:
        return None
    shared: dict[str, Any] = dict(
        schedule=ema.schedule, update_every=ema.every, update_after_step=ema.after,
        copy_first=True,  # timm's train.py: ModelEmaV3.update(model, step=n) copies at n = 1
        device="cpu" if ema.force_cpu else None, dtype=ema.dtype, buffers=ema.buffers,
        steps_per_epoch=updates_per_epoch, global_batch_size=global_batch_size, total_steps=total_steps)
    try:
        if ema.decays is not None and len(ema.decays) > 1:
            return MultiEMA(model, decays=list(ema.decays), **shared)
        if ema.half_lives is not None and len(ema.half_lives) > 1:
            return MultiEMA(model, half_lives=list(ema.half_lives), **shared)
        return ModelEMA(model, decay=ema.decays[0] if ema.decays else None,
                        half_life=ema.half_lives[0] if ema.half_lives else None, **shared)
    except ValueError as e:
        raise UsageError(f"invalid EMA settings: {one_line(e)}") from None


def build_posthoc(ema: EmaSettings, model: nn.Module, dist: DistInfo, *, total_steps: int,
                  saved: dict[str, Any] | None, emas: ModelEMA | MultiEMA | None = None) -> PosthocTracker | None:
    """The post-hoc EMA tracker with ``--model-ema-posthoc``: rank 0's (None on the other
    ranks) for a plain or DDP model; every rank's for a sharded (``--fsdp``) one, which holds
    this rank's shards and joins the gathers of rank 0's snapshots (gathered snapshots,
    :class:`PosthocTracker`). The cap and the logs count the whole model's bytes.

    ``--posthoc-budget`` (with ``--posthoc-max-snapshots``) caps the snapshot steps
    (:func:`posthoc_snapshot_cap`). The snapshot interval is ``--posthoc-every``, else the
    resumed run's, else :func:`auto_posthoc_every` of the planned optimizer steps and the
    cap (50 snapshot steps when unbounded); the tracker widens it when the run does not fit.
    ``emas``: the run's EMA(s), put in the tracker's engine so one fused pass updates them and
    the profiles (the tracker then owns their updates: ``owns_ema``).
    """
    posthoc = ema.posthoc
    if posthoc is None or not (dist.is_main or is_sharded(model)):
        return None
    try:
        budget_bytes, cap = posthoc_snapshot_cap(model, posthoc.budget, n_profiles=len(posthoc.sigma_rels),
                                                 snapshot_dtype=posthoc.dtype, max_snapshots=posthoc.max_snapshots)
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    every = posthoc.every or int((saved or {}).get("snapshot_every") or 0) or \
        auto_posthoc_every(total_steps, cap or _UNBOUNDED_POSTHOC_SNAPSHOTS)
    try:
        return PosthocTracker(model, sigma_rels=posthoc.sigma_rels, every=every, snapshot_dtype=posthoc.dtype,
                              max_snapshots=cap, total_steps=total_steps, budget_bytes=budget_bytes,
                              device="cpu" if ema.force_cpu else None, ema=emas, dist=dist)
    except ValueError as e:
        raise UsageError(f"invalid post-hoc EMA settings: {one_line(e)}") from None


def build_averages(ema: EmaSettings, model: nn.Module, dist: DistInfo, resolved: Resolved, *,
                   saved_posthoc: dict[str, Any] | None = None, model_name: str = "the model") -> Averages:
    """Every average of the run (:class:`Averages`), built from the bare module, and the log
    lines that say what they are."""
    emas = build_ema(ema, model, updates_per_epoch=resolved.updates_per_epoch,
                     global_batch_size=resolved.global_batch_size, total_steps=resolved.total_steps)
    device = torch.device("cpu") if ema.force_cpu else dist.device
    averages = Averages(emas, build_posthoc(ema, model, dist, total_steps=resolved.total_steps,
                                            saved=saved_posthoc, emas=emas), device=device,
                        bn_recal=ema.bn_recal if emas is not None else 0)
    if emas is not None:
        _log.info("EMA: %s, schedule %s, every %d step(s), on %s%s", averages.describe(), ema.schedule, ema.every,
                  "cpu" if ema.force_cpu else "the model's device", f", dtype {ema.dtype}" if ema.dtype else "")
        _log_bn_recal(averages.bn_recal, model, model_name)
    return averages


def _log_bn_recal(num_batches: int, model: nn.Module, model_name: str) -> None:
    """Say what ``--model-ema-bn-recal`` does to the reported EMA metrics (or that it cannot)."""
    if num_batches <= 0:
        return
    if not has_batchnorm(model):
        _log.warning("--model-ema-bn-recal: %s has no BatchNorm layer, nothing to recalibrate", model_name)
        return
    _log.info("EMA BatchNorm recalibration: %d training batches per process before each EMA evaluation; the "
              "checkpoints' state_dict_ema* keep the averaged statistics, the evaluated ones are in ema_bn_recal",
              num_batches)


# --------------------------------------------------------------------------- optimization
def resolve_lr(optim: OptimSettings, batch_size: int, world_size: int) -> float:
    """``--lr``, or timm's rule: lr_base * (global batch / lr_base_size), sqrt-scaled for ada*/lamb."""
    if optim.lr:
        return float(optim.lr)
    global_batch = batch_size * world_size * optim.grad_accum_steps
    scale = optim.lr_base_scale or ("sqrt" if any(o in optim.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / optim.lr_base_size
    lr = optim.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)
    _log.info("lr %.4g = lr-base %.4g x (global batch %d / %d)%s", lr, optim.lr_base, global_batch,
              optim.lr_base_size, " ^0.5" if scale == "sqrt" else "")
    return lr


# torch optimizers with a fused kernel on CPU and CUDA; timm's names for them map to these classes.
_FUSABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def build_optimizer(optim: OptimSettings, model: nn.Module, lr: float, *, sharded: bool = False
                    ) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` (weight decay skips biases and norms, as in timm).

    With ``optim.fused`` (the default) an optimizer that is torch's SGD, Adam or AdamW uses
    torch's fused kernel: one pass over all parameters per step instead of a loop of
    elementwise ops (bench/vs_timm.py: the larger part of the per-step host time on CPU). Not
    for a ``sharded`` (FSDP2) model, and not where torch refuses it (a device without the
    kernel): those keep the loop.
    """
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"momentum": optim.momentum}
    if optim.eps is not None:
        kwargs["eps"] = optim.eps
    if optim.betas is not None:
        kwargs["betas"] = tuple(optim.betas)
    try:
        optimizer = create_optimizer_v2(model, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay,
                                        layer_decay=optim.layer_decay, **kwargs)
        if optim.fused and not sharded and type(optimizer) in _FUSABLE:
            try:
                optimizer = create_optimizer_v2(model, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay,
                                                layer_decay=optim.layer_decay, fused=True, **kwargs)
            except RuntimeError as e:  # e.g. parameters on a device without the fused kernel
                _log.info("optimizer: %s without its fused kernel (%s)", type(optimizer).__name__, one_line(e))
        return optimizer
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--opt {optim.opt}: {one_line(e) or 'unknown optimizer'}") from None


def build_scheduler(schedule: ScheduleSettings, optimizer: torch.optim.Optimizer, updates_per_epoch: int, *,
                    eval_metric: str = "top1") -> Any:
    """timm ``create_scheduler_v2``; stepped per epoch unless ``--sched-on-updates``.

    ``--sched none`` (or ``constant``) is a constant learning rate after ``--warmup-epochs``:
    timm's ``constant`` schedule, a step schedule whose decay rate is 1 (built as such, so
    it works with timm versions that lack the name). timm's own ``none`` returns no
    scheduler at all, which would also skip the warmup.
    """
    from timm.scheduler import create_scheduler_v2

    constant = schedule.name in ("none", "constant")
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="step" if constant else schedule.name, num_epochs=schedule.epochs,
            decay_epochs=schedule.decay_epochs, decay_milestones=list(schedule.decay_milestones),
            cooldown_epochs=schedule.cooldown_epochs, patience_epochs=schedule.patience_epochs,
            decay_rate=1.0 if constant else schedule.decay_rate, min_lr=schedule.min_lr,
            warmup_lr=schedule.warmup_lr, warmup_epochs=schedule.warmup_epochs,
            warmup_prefix=schedule.warmup_prefix, plateau_mode="min" if eval_metric == "loss" else "max",
            step_on_epochs=not schedule.on_updates, updates_per_epoch=updates_per_epoch,
        )
    except (AssertionError, ValueError) as e:
        why = one_line(e).rstrip(".")
        hint = f"; try {_SCHEDULERS}" if "unknown" in why.lower() else ""
        raise UsageError(f"--sched {schedule.name}: {why}{hint}") from None
    if scheduler is None:
        raise UsageError(f"--sched {schedule.name}: unknown scheduler; try {_SCHEDULERS}")
    return scheduler


def build_guard(run: RunSettings) -> NonfiniteGuard:
    """``--on-nonfinite`` / ``--max-nonfinite-skips`` (also from YAML); bad values -> UsageError."""
    try:
        return NonfiniteGuard(run.on_nonfinite, int(run.max_nonfinite_skips))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--on-nonfinite/--max-nonfinite-skips: {e}") from None


def build_amp(run: RunSettings, device: torch.device, *, sharded: bool = False) -> AmpSettings:
    """Autocast settings; a GradScaler only for float16 on CUDA, as timm's train.py (bfloat16
    needs none; on the CPU torch's fused SGD with a scaler turned the weights non-finite one
    step after a skipped step, and timm trains there without one). ``sharded`` (``--fsdp``):
    torch's ``ShardedGradScaler``, which agrees on a skipped step across ranks."""
    if not run.amp:
        return AmpSettings()
    dtype = DTYPES[run.amp_dtype]
    scaler = None
    if dtype == torch.float16 and device.type == "cuda":
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # its one-element found_inf / scale meet DTensor gradients, which warns on every step
            warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1", category=UserWarning)
            scaler = ShardedGradScaler(device.type)
        else:
            scaler = torch.amp.GradScaler(device.type)
    _log.info("AMP: autocast %s on %s%s", run.amp_dtype, device.type, " with a gradient scaler" if scaler else "")
    return AmpSettings(enabled=True, dtype=dtype, scaler=scaler)


def build_losses(loss: LossSettings, num_classes: int, device: torch.device) -> tuple[Callable, Callable, Any]:
    """(train loss, eval loss, timm Mixup or None), as timm's train.py picks them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if loss.mixup_enabled:
        mixup_fn = Mixup(mixup_alpha=loss.mixup, cutmix_alpha=loss.cutmix,
                         cutmix_minmax=list(loss.cutmix_minmax) if loss.cutmix_minmax else None,
                         prob=loss.mixup_prob, switch_prob=loss.mixup_switch_prob, mode=loss.mixup_mode,
                         label_smoothing=loss.smoothing, num_classes=num_classes)
        train_loss: nn.Module = SoftTargetCrossEntropy()
    elif loss.smoothing:
        train_loss = LabelSmoothingCrossEntropy(smoothing=loss.smoothing)
    else:
        train_loss = nn.CrossEntropyLoss()
    return train_loss.to(device), nn.CrossEntropyLoss().to(device), mixup_fn
