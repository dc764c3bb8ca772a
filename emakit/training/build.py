"""Building the parts of a run from its settings (:mod:`.settings`), in timm's order: data ->
model -> device / channels_last -> DDP -> the averages from the bare module -> optimizer,
LR scheduler, AMP -> losses. One ``build_model`` serves train.py and validate.py. Every
check a user can fail raises ``UsageError`` before anything is written."""
from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
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
                   device_random_erasing, flip_labels, image_mode)
from .distributed import DistInfo
from .engine import AmpSettings, NonfiniteGuard
from .sources import build_stream_loader, is_stream
from .settings import (DataSettings, DistillSettings, EmaSettings, LossSettings, ModelSettings, OptimSettings,
                       ParallelSettings, Resolved, RunSettings, ScheduleSettings)

__all__ = ["build_model", "build_train_model", "model_factory_kwargs", "import_device_modules", "train_data_config",
           "convert_sync_bn", "scheduled_epochs", "build_distillation", "compile_model", "check_model_name", "seed_all",
           "check_compile_backend", "load_data", "build_loaders", "wrap_ddp", "build_ema", "build_posthoc",
           "build_averages", "resolve_lr", "build_optimizer", "build_scheduler", "build_guard", "build_amp",
           "build_losses"]

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
                channels_last: bool = False, in_chans: int | None = None, log: bool = True,
                factory_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``timm.create_model`` moved to ``device`` (channels_last if asked), in train mode.

    ``pretrained``: start from the model's pretrained weights as timm does (its hub download
    and cache); ``pretrained_path``: from this local weights file instead (timm's
    ``pretrained_cfg_overlay`` ``file``). ``in_chans``: input channels when not 3 (a
    checkpoint's training args). ``factory_kwargs``: more ``timm.create_model`` arguments
    (:func:`model_factory_kwargs`: ``--gp``, ``--bn-*``, ``--drop-block``, ``--model-kwargs``,
    ``--initial-checkpoint``). An unknown name, a missing file, weights that cannot be fetched
    or arguments the model refuses are a ``UsageError``. ``log``: log the parameter count.
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
    kwargs.update(factory_kwargs or {})
    initial = kwargs.get("checkpoint_path")
    if initial and not os.path.isfile(initial):
        raise UsageError(f"--initial-checkpoint {initial}: no such file")
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:  # a keyword the model's constructor does not take
        raise UsageError(f"timm.create_model({name!r}) refused its arguments ({one_line(e)[:300]}); check "
                         "--model-kwargs, --gp, --bn-momentum/--bn-eps and --drop-block for this model") from None
    except Exception as e:  # the hub's and the loaders' errors have no common base
        if initial:
            raise UsageError(f"cannot load --initial-checkpoint {initial} into {name}: {one_line(e)[:300]}") from None
        if pretrained_path:
            raise UsageError(f"cannot load --pretrained-path {pretrained_path} into {name}: "
                             f"{one_line(e)[:300]}") from None
        if pretrained:
            raise UsageError(f"cannot get the pretrained weights of {name} ({type(e).__name__}: "
                             f"{one_line(e)[:200]}); check the network or the hub cache, or pass --pretrained-path "
                             "FILE") from None
        if factory_kwargs and isinstance(e, (AssertionError, ValueError, KeyError, RuntimeError)):
            raise UsageError(f"timm.create_model({name!r}) refused its arguments ({type(e).__name__}: "
                             f"{one_line(e)[:300]}); check --model-kwargs, --gp, --bn-momentum/--bn-eps and "
                             "--drop-block for this model") from None
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


def model_factory_kwargs(model: ModelSettings) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of train.py's model flags beyond name, classes and
    dropout, as timm's train.py passes them (timm drops the ones left at None)."""
    kwargs: dict[str, Any] = {"drop_block_rate": model.drop_block_rate, "global_pool": model.global_pool,
                              "bn_momentum": model.bn_momentum, "bn_eps": model.bn_eps}
    if model.initial_checkpoint:
        kwargs["checkpoint_path"] = model.initial_checkpoint
    kwargs.update(model.kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def build_train_model(model: ModelSettings, num_classes: int, device: torch.device) -> nn.Module:
    """train.py's model, as timm's train.py makes it: ``--fuser`` / ``--fast-norm`` set,
    :func:`build_model` with every factory flag, then ``--head-init-scale`` /
    ``--head-init-bias`` and ``--grad-checkpointing``."""
    if model.fuser:
        from timm.utils import set_jit_fuser

        set_jit_fuser(model.fuser)
    if model.fast_norm:
        from timm.layers import set_fast_norm

        set_fast_norm()
    net = build_model(model.name, num_classes, device, drop_rate=model.drop_rate, drop_path_rate=model.path_rate,
                      channels_last=model.channels_last, pretrained=model.pretrained,
                      pretrained_path=model.weights_file, factory_kwargs=model_factory_kwargs(model))
    if model.head_init_scale is not None or model.head_init_bias is not None:
        head = net.get_classifier()
        with torch.no_grad():
            if model.head_init_scale is not None:
                head.weight.mul_(model.head_init_scale)
                head.bias.mul_(model.head_init_scale)
            if model.head_init_bias is not None:
                nn.init.constant_(head.bias, model.head_init_bias)
    if model.grad_checkpointing:
        net.set_grad_checkpointing(enable=True)
    return net


def import_device_modules(modules: Sequence[str] | None) -> None:
    """``--device-modules``: import each module (device backends register themselves)."""
    import importlib

    for name in modules or ():
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"--device-modules {name}: cannot import it ({one_line(e)})") from None


def train_data_config(model: nn.Module, data: DataSettings, model_settings: ModelSettings) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for train.py: ``--input-size`` wins over ``--img-size``,
    then the model's defaults, as in timm."""
    from timm.data import resolve_data_config

    given = {"img_size": data.img_size, "input_size": model_settings.input_size, "crop_pct": data.crop_pct,
             "mean": data.mean, "std": data.std, "interpolation": data.interpolation}
    return resolve_data_config({k: v for k, v in given.items() if v not in (None, "")}, model=model)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compile_model(model: nn.Module, settings: ModelSettings) -> nn.Module:
    """``--torchcompile BACKEND`` (with ``--torchcompile-mode``): ``torch.compile`` of what
    trains (after DDP, as timm does), or ``model`` unchanged."""
    if not settings.compile_backend:
        return model
    return torch.compile(model, backend=settings.compile_backend, mode=settings.compile_mode)


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
    splits.train.img_mode = splits.val.img_mode = image_mode(data.augment.input_img_mode, data_config["input_size"][0])
    if is_stream(splits.train):
        train_loader = build_stream_loader(splits.train, data.batch_size, dist, seed=seed, workers=data.workers,
                                           pin_memory=data.pin_memory or on_device)
    else:
        train_loader = build_train_loader(splits.train, data.batch_size, dist, seed=seed, workers=data.workers,
                                          pin_memory=data.pin_memory or on_device, augment=data.augment)
    eval_loader = build_eval_loader(splits.val, data.eval_batch_size or data.batch_size, dist,
                                    workers=data.workers, pin_memory=data.pin_memory or on_device)
    if not on_device:
        return train_loader, eval_loader
    mean, std = data_config["mean"], data_config["std"]
    erasing = device_random_erasing(data.augment, dist.device)
    return (DeviceLoader(train_loader, dist.device, mean, std, random_erasing=erasing),
            DeviceLoader(eval_loader, dist.device, mean, std))


def convert_sync_bn(model: nn.Module, dist: DistInfo, parallel: ParallelSettings) -> nn.Module:
    """``--sync-bn`` with several processes: timm's ``convert_sync_batchnorm`` (BatchNorm ->
    SyncBatchNorm), on the bare module before the EMA is made from it, as timm's train.py."""
    if not (parallel.sync_bn and dist.distributed):
        return model
    from timm.layers import convert_sync_batchnorm

    _log.info("converted BatchNorm to SyncBatchNorm (--sync-bn); --dist-bn is not needed")
    return convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, dist: DistInfo, *, broadcast_buffers: bool = True) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when several processes train, else ``model``;
    ``broadcast_buffers`` False is timm's ``--no-ddp-bb``."""
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None  # none on CPU (gloo)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


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

    # timm's optimizer_kwargs(args) + **args.opt_kwargs, as its train.py calls create_optimizer_v2
    kwargs: dict[str, Any] = {"momentum": optim.momentum, "layer_decay": optim.layer_decay,
                              "layer_decay_min_scale": optim.layer_decay_min_scale,
                              "layer_decay_no_opt_scale": optim.layer_decay_no_opt_scale}
    if optim.eps is not None:
        kwargs["eps"] = optim.eps
    if optim.betas is not None:
        kwargs["betas"] = tuple(optim.betas)
    kwargs.update(optim.kwargs)
    try:
        optimizer = create_optimizer_v2(model, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay, **kwargs)
        if optim.fused and not sharded and type(optimizer) in _FUSABLE and "fused" not in kwargs:
            try:
                optimizer = create_optimizer_v2(model, opt=optim.opt, lr=lr, weight_decay=optim.weight_decay,
                                                fused=True, **kwargs)
            except RuntimeError as e:  # e.g. parameters on a device without the fused kernel
                _log.info("optimizer: %s without its fused kernel (%s)", type(optimizer).__name__, one_line(e))
        return optimizer
    except TypeError as e:  # an --opt-kwargs key the optimizer does not take
        raise UsageError(f"--opt {optim.opt} --opt-kwargs: {one_line(e)[:300]}") from None
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--opt {optim.opt}: {one_line(e) or 'unknown optimizer'}") from None


def build_scheduler(schedule: ScheduleSettings, optimizer: torch.optim.Optimizer, updates_per_epoch: int, *,
                    eval_metric: str = "top1", seed: int = 42) -> Any:
    """timm ``create_scheduler_v2``; stepped per epoch unless ``--sched-on-updates``.

    ``--sched none`` (or ``constant``) is a constant learning rate after ``--warmup-epochs``:
    timm's ``constant`` schedule, a step schedule whose decay rate is 1 (built as such, so
    it works with timm versions that lack the name). timm's own ``none`` returns no
    scheduler at all, which would also skip the warmup. ``seed`` seeds ``--lr-noise`` (timm:
    ``--seed``).
    """
    return _create_scheduler(schedule, optimizer, updates_per_epoch, eval_metric=eval_metric, seed=seed)[0]


def scheduled_epochs(schedule: ScheduleSettings) -> int:
    """The epochs a run trains, as timm's ``create_scheduler_v2`` counts them: ``--epochs``
    with every ``--lr-cycle-*`` cycle, ``--cooldown-epochs`` and a ``--warmup-prefix``."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return int(_create_scheduler(schedule, probe, 1)[1])


def _create_scheduler(schedule: ScheduleSettings, optimizer: torch.optim.Optimizer, updates_per_epoch: int, *,
                      eval_metric: str = "top1", seed: int = 42) -> tuple[Any, int]:
    from timm.scheduler import create_scheduler_v2

    constant = schedule.name in ("none", "constant")
    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched="step" if constant else schedule.name, num_epochs=schedule.epochs,
            decay_epochs=schedule.decay_epochs, decay_milestones=list(schedule.decay_milestones),
            cooldown_epochs=schedule.cooldown_epochs, patience_epochs=schedule.patience_epochs,
            decay_rate=1.0 if constant else schedule.decay_rate, min_lr=schedule.min_lr,
            warmup_lr=schedule.warmup_lr, warmup_epochs=schedule.warmup_epochs,
            warmup_prefix=schedule.warmup_prefix, plateau_mode="min" if eval_metric == "loss" else "max",
            step_on_epochs=not schedule.on_updates, updates_per_epoch=updates_per_epoch,
            noise=list(schedule.noise) if schedule.noise else None, noise_pct=schedule.noise_pct,
            noise_std=schedule.noise_std, noise_seed=seed, cycle_mul=schedule.cycle_mul,
            cycle_decay=schedule.cycle_decay, cycle_limit=schedule.cycle_limit, k_decay=schedule.k_decay,
        )
    except (AssertionError, ValueError) as e:
        why = one_line(e).rstrip(".")
        hint = f"; try {_SCHEDULERS}" if "unknown" in why.lower() else ""
        raise UsageError(f"--sched {schedule.name}: {why}{hint}") from None
    if scheduler is None:
        raise UsageError(f"--sched {schedule.name}: unknown scheduler; try {_SCHEDULERS}")
    return scheduler, num_epochs


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


def build_distillation(distill: DistillSettings, model: nn.Module, student: nn.Module, criterion: nn.Module,
                       device: torch.device, *, averages: Averages | None = None, verbose: bool = True) -> Any:
    """``--kd-model-name``: timm's ``LogitDistillationTask`` / ``TokenDistillationTask`` around
    the train loss ``criterion``, or None. The teacher is the named timm model with its
    pretrained weights (as timm's train.py), or with ``ema`` this run's first EMA (a mean
    teacher that follows the training). The task runs ``model`` (what trains: DDP-wrapped or
    compiled) and is the loop's train loss (:func:`engine.train_one_epoch` calls it with the
    inputs); ``student`` is the bare module, whose pretrained config gives the normalization."""
    if distill.model_name is None:
        return None
    from timm.task import LogitDistillationTask, TokenDistillationTask

    teacher: Any = distill.model_name
    if teacher == "ema":
        teacher = averages.members[0].module if averages is not None and averages.members else None
        if teacher is None:
            raise UsageError("--kd-model-name ema needs an unsharded EMA on the model's device (--model-ema)")
    common = dict(student_model=student, teacher_model=teacher, criterion=criterion,
                  distill_loss_weight=distill.distill_weight, task_loss_weight=distill.task_weight,
                  temperature=distill.temperature, device=device, verbose=verbose)
    try:
        if distill.distill_type == "token":
            task = TokenDistillationTask(distill_type=distill.token_type, **common)
        else:
            task = LogitDistillationTask(loss_type=distill.loss_type, **common)
    except Exception as e:  # the hub's and the model factories' errors have no common base
        raise UsageError(f"--kd-model-name {distill.model_name}: cannot build the teacher ({type(e).__name__}: "
                         f"{one_line(e)[:200]})") from None
    task.trainable_module = model  # the student as it trains (timm: prepare_distributed / compile)
    if verbose:
        _log.info("distillation: %s from %s, temperature %g, weights task %g / distillation %g",
                  distill.distill_type, "this run's EMA" if distill.model_name == "ema" else distill.model_name,
                  distill.temperature, task.task_loss_weight, task.distill_loss_weight)
    return task


def build_losses(loss: LossSettings, num_classes: int, device: torch.device, *,
                 num_aug_splits: int = 0) -> tuple[Callable, Callable, Any]:
    """(train loss, eval loss, timm Mixup or None), as timm's train.py picks them: JSD with
    ``--jsd-loss``, ``--bce-loss``'s BinaryCrossEntropy with mixup/cutmix or smoothing."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if loss.mixup_enabled:
        mixup_fn = Mixup(mixup_alpha=loss.mixup, cutmix_alpha=loss.cutmix,
                         cutmix_minmax=list(loss.cutmix_minmax) if loss.cutmix_minmax else None,
                         prob=loss.mixup_prob, switch_prob=loss.mixup_switch_prob, mode=loss.mixup_mode,
                         label_smoothing=loss.smoothing, num_classes=num_classes)
    bce = dict(target_threshold=loss.bce_target_thresh, sum_classes=loss.bce_sum, pos_weight=loss.bce_pos_weight)
    if loss.jsd:
        train_loss: nn.Module = JsdCrossEntropy(num_splits=num_aug_splits, smoothing=loss.smoothing)
    elif mixup_fn is not None:  # smoothing is in mixup's soft targets
        train_loss = BinaryCrossEntropy(**bce) if loss.bce else SoftTargetCrossEntropy()
    elif loss.smoothing:
        train_loss = (BinaryCrossEntropy(smoothing=loss.smoothing, **bce) if loss.bce
                      else LabelSmoothingCrossEntropy(smoothing=loss.smoothing))
    else:
        train_loss = nn.CrossEntropyLoss()
    return train_loss.to(device), nn.CrossEntropyLoss().to(device), mixup_fn
