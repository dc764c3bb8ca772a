"""The fit loop behind ``train.py``: build -> resume -> epochs -> checkpoints -> summary.

Build order is the one timm users expect: create the timm model -> move it to the device
(channels_last if asked) -> wrap in DDP when torchrun launched several processes -> create
the EMA from the unwrapped module -> optimizer, LR scheduler, AMP scaler -> resume. Every
check a user can fail (data, model name, EMA settings, resume file, output folder) runs
before the output folder is created, so a bad command leaves nothing behind.

Each epoch trains, validates the raw weights and every EMA as separate passes (each EMA's
BatchNorm statistics recalibrated first with ``--model-ema-bn-recal``), appends a row to
``summary.csv`` and saves ``last.pth.tar`` atomically (plus ``model_best.pth.tar`` and the
best ``--checkpoint-hist`` epochs). All random state at the start of an epoch is a pure
function of (seed, epoch, rank), so ``--resume`` continues bit-exactly on the CPU. A stop
signal writes a mid-epoch ``last.pth.tar`` (``train_position``: the step, every rank's
generator states and progress) that resumes bit-exactly too; a non-finite loss, gradient or
checkpoint state ends the run (``--on-nonfinite``) and is never written (see ``lifecycle``). At the
end, rank 0 plots ``summary.png`` and, with ``--model-ema-posthoc``, reports the snapshot
folder and the ``validate.py`` command that sweeps EMA lengths over it.

Checkpoint keys beyond timm's (``averages`` module): ``state_dict_ema_<i>`` / ``ema_<i>``
for EMA i >= 1, ``posthoc_ema`` (the power EMA state), ``ema_bn_recal`` (each EMA's
recalibrated BatchNorm buffers of that epoch).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from emakit import ModelEMA, MultiEMA
from emakit.schedules import parse_half_life
from emakit.checkpoint import (CheckpointError, CheckpointSaver, find_nonfinite, load_checkpoint,
                               load_state_dict_strict, remove_stale_temp_files, write_text_atomic)

from . import UsageError
from .averages import (BN_RECAL_CHECKPOINT_KEY, POSTHOC_CHECKPOINT_KEY, EmaSet, PosthocTracker, auto_posthoc_every,
                       describe_ema, ema_checkpoint_keys, ema_checkpoint_state, ema_label, ema_members, ema_selector,
                       posthoc_snapshot_cap, posthoc_sweep_command, recalibrated_bn)
from .bn import has_batchnorm
from .build import build_model
from .logs import LogSetup
from .config import args_to_yaml, resolve_ema_decay
from .data import (AugmentConfig, DataSplits, DeviceLoader, ResumableSampler, build_datasets, build_eval_loader,
                   build_train_loader, build_transforms, device_random_erasing, epoch_seed, flip_labels,
                   resolve_data_config_for, set_epoch)
from .distributed import DistInfo, distribute_bn, init_distributed, shutdown_distributed, all_reduce_sum
from .engine import AmpSettings, EpochProgress, EvalTarget, NonfiniteGuard, TrainingDiverged, TrainOptions, \
    evaluate_many, train_one_epoch
from .lifecycle import EXIT_DIVERGED, EXIT_WRITE_FAILED, RunStopped, StopSignals, rng_state, set_rng_state, \
    signal_name
from .resume import (check_ema_entry, check_optimizer_state, ema_entry_keys, normalize_resume_checkpoint,
                     steps_done, warn_batch_change)
from .rundir import RunLock, checkpoint_is_emakit, claim_run_folder, write_marker

__all__ = ["Trainer", "FitResult", "TrainingInterrupted", "RunStopped", "build_trainer", "fit", "close_trainer",
           "SUMMARY_COLUMNS", "summary_columns"]

_log = logging.getLogger(__name__)
CHECKPOINT_VERSION = 2  # timm writes version 2 with the same keys
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5",
                   "ema_eval_loss", "ema_eval_top1", "ema_eval_top5", "lr"]
_EVAL_KEYS = ("loss", "top1", "top5")
_SCHEDULERS = "cosine, step, multistep, plateau, poly, tanh, none"  # named in --sched errors
_UNBOUNDED_POSTHOC_SNAPSHOTS = 50  # default snapshot steps with --posthoc-budget none


TRAIN_POSITION_KEY = "train_position"  # mid-epoch checkpoints: where the stopped epoch resumes


class TrainingInterrupted(RunStopped):
    """A stop signal ended training; ``checkpoint`` is the resumable file, if any."""


@dataclass
class Trainer:
    """Everything the loop needs, built by :func:`build_trainer`."""

    args: argparse.Namespace
    dist: DistInfo
    data: DataSplits
    model: nn.Module              # what trains: possibly DDP-wrapped and/or compiled
    model_without_ddp: nn.Module  # the bare module: evaluated, saved, averaged
    ema: EmaSet | None            # one ModelEMA, or a MultiEMA for several decays / half-lives
    ema_device: torch.device
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    amp: AmpSettings
    train_loader: torch.utils.data.DataLoader | DeviceLoader
    eval_loader: torch.utils.data.DataLoader | DeviceLoader
    train_loss_fn: Callable
    eval_loss_fn: Callable
    mixup_fn: Any | None
    updates_per_epoch: int
    start_epoch: int = 0
    posthoc: PosthocTracker | None = None  # rank 0 only, with --model-ema-posthoc
    output_dir: str | None = None
    saver: CheckpointSaver | None = None
    run_lock: RunLock | None = None      # rank 0: the run folder's lock, released by close_trainer
    resumed_by_emakit: bool = False      # the --resume checkpoint was written by emakit (rundir rules)
    summary_rows: list[dict[str, Any]] = field(default_factory=list)
    summary_columns: list[str] = field(default_factory=lambda: list(SUMMARY_COLUMNS))
    guard: NonfiniteGuard = field(default_factory=NonfiniteGuard)  # --on-nonfinite
    signals: StopSignals | None = None  # set by train.py; None: Ctrl-C raises KeyboardInterrupt
    resume_position: dict[str, Any] | None = None  # train_position of a mid-epoch --resume file
    last_good: tuple[str, str] | None = None  # (path, "epoch 3") of the newest intact checkpoint
    nonfinite_at_start: frozenset[str] = frozenset()  # model keys non-finite by design (masks)


@dataclass
class FitResult:
    """What a finished run reports: its folder and the best raw / (first) EMA epochs, and
    with several EMAs the best of all of them with its ``--weights`` selector."""

    output_dir: str | None
    epochs_run: int
    best_raw: tuple[float, int] | None
    best_ema: tuple[float, int] | None
    eval_metric: str
    best_any_ema: tuple[float, int, str] | None = None


# --------------------------------------------------------------------------- building blocks
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


def build_ema(args: argparse.Namespace, model_without_ddp: nn.Module, *, updates_per_epoch: int,
              global_batch_size: int, total_steps: int) -> EmaSet | None:
    """The EMA from the bare module, or None with ``--no-model-ema``; bad settings -> UsageError.

    One decay / half-life gives a ``ModelEMA``; a comma list gives one ``MultiEMA`` whose
    members share every other setting and are updated in one pass.

    The EMA equals timm's train.py for the same flags: timm passes the optimizer step count
    to ``ModelEmaV3.update(model, step=n)``, whose decay is 0 at the first step (after
    ``update_after_step``), so its first update copies the model; hence ``copy_first=True``
    here (``ModelEMA``'s library default blends instead; docs/CONTRACTS.md).
    """
    if not args.model_ema:
        return None
    decay, half_life, schedule = resolve_ema_decay(args)
    shared: dict[str, Any] = dict(
        schedule=schedule, update_every=args.model_ema_every, update_after_step=args.model_ema_after,
        copy_first=True,  # timm's train.py: ModelEmaV3.update(model, step=n) copies at n = 1 (see build_ema)
        device="cpu" if args.model_ema_force_cpu else None, dtype=args.model_ema_dtype,
        buffers=args.model_ema_buffers, steps_per_epoch=updates_per_epoch,
        global_batch_size=global_batch_size, total_steps=total_steps)
    try:
        if isinstance(decay, list):
            ema: EmaSet = MultiEMA(model_without_ddp, decays=decay, **shared)
        elif isinstance(half_life, list):
            ema = MultiEMA(model_without_ddp, half_lives=half_life, **shared)
        else:
            ema = ModelEMA(model_without_ddp, decay=decay, half_life=half_life, **shared)
    except ValueError as e:
        raise UsageError(f"invalid EMA settings: {' '.join(str(e).split())}") from None
    members = ema_members(ema)
    how = describe_ema(members[0]) if len(members) == 1 else f"{len(members)} EMAs in one fused update (" + \
        ", ".join(f"{ema_label(i)} {describe_ema(m)}" for i, m in enumerate(members)) + ")"
    _log.info("EMA: %s, schedule %s, every %d step(s), on %s%s", how, schedule, args.model_ema_every,
              "cpu" if args.model_ema_force_cpu else "the model's device",
              f", dtype {args.model_ema_dtype}" if args.model_ema_dtype else "")
    return ema


def build_posthoc(args: argparse.Namespace, model_without_ddp: nn.Module, dist: DistInfo, *, total_steps: int,
                  saved: dict[str, Any] | None) -> PosthocTracker | None:
    """Rank 0's post-hoc EMA tracker with ``--model-ema-posthoc`` (None elsewhere).

    ``--posthoc-budget`` (with ``--posthoc-max-snapshots``) caps the snapshot steps
    (:func:`posthoc_snapshot_cap`). The snapshot interval is ``--posthoc-every``, else the
    resumed run's, else :func:`auto_posthoc_every` of the planned optimizer steps and the
    cap (50 snapshot steps when unbounded); the tracker widens it when the run does not fit.
    """
    if not args.model_ema_posthoc or not dist.is_main:
        return None
    try:
        budget_bytes, cap = posthoc_snapshot_cap(model_without_ddp, args.posthoc_budget,
                                                 n_profiles=len(args.posthoc_sigma_rels),
                                                 snapshot_dtype=args.posthoc_dtype,
                                                 max_snapshots=args.posthoc_max_snapshots)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    every = args.posthoc_every or int((saved or {}).get("snapshot_every") or 0) or \
        auto_posthoc_every(total_steps, cap or _UNBOUNDED_POSTHOC_SNAPSHOTS)
    try:
        return PosthocTracker(model_without_ddp, sigma_rels=args.posthoc_sigma_rels, every=every,
                              snapshot_dtype=args.posthoc_dtype, max_snapshots=cap, total_steps=total_steps,
                              budget_bytes=budget_bytes, device="cpu" if args.model_ema_force_cpu else None)
    except ValueError as e:
        raise UsageError(f"invalid post-hoc EMA settings: {' '.join(str(e).split())}") from None


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr``, or timm's rule: lr_base * (global batch / lr_base_size), sqrt-scaled for ada*/lamb."""
    if args.lr:
        return float(args.lr)
    global_batch = args.batch_size * world_size * args.grad_accum_steps
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / args.lr_base_size
    lr = args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)
    _log.info("lr %.4g = lr-base %.4g x (global batch %d / %d)%s", lr, args.lr_base, global_batch,
              args.lr_base_size, " ^0.5" if scale == "sqrt" else "")
    return lr


def build_optimizer(args: argparse.Namespace, model_without_ddp: nn.Module) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2`` (weight decay skips biases and norms, as in timm)."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"momentum": args.momentum}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(model_without_ddp, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   layer_decay=args.layer_decay, **kwargs)
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--opt {args.opt}: {' '.join(str(e).split()) or 'unknown optimizer'}") from None


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    """timm ``create_scheduler_v2``; stepped per epoch unless ``--sched-on-updates``.

    ``--sched none`` (or ``constant``) is a constant learning rate after ``--warmup-epochs``:
    timm's ``constant`` schedule, a step schedule whose decay rate is 1 (built as such, so
    it works with timm versions that lack the name). timm's own ``none`` returns no
    scheduler at all, which would also skip the warmup.
    """
    from timm.scheduler import create_scheduler_v2

    constant = args.sched in ("none", "constant")
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="step" if constant else args.sched, num_epochs=args.epochs,
            decay_epochs=args.decay_epochs, decay_milestones=args.decay_milestones,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
            decay_rate=1.0 if constant else args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
            plateau_mode="min" if args.eval_metric == "loss" else "max",
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
        )
    except (AssertionError, ValueError) as e:
        why = " ".join(str(e).split()).rstrip(".")
        hint = f"; try {_SCHEDULERS}" if "unknown" in why.lower() else ""
        raise UsageError(f"--sched {args.sched}: {why}{hint}") from None
    if scheduler is None:
        raise UsageError(f"--sched {args.sched}: unknown scheduler; try {_SCHEDULERS}")
    return scheduler


def build_guard(args: argparse.Namespace) -> NonfiniteGuard:
    """``--on-nonfinite`` / ``--max-nonfinite-skips`` (also from YAML); bad values -> UsageError."""
    try:
        return NonfiniteGuard(args.on_nonfinite, int(args.max_nonfinite_skips))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--on-nonfinite/--max-nonfinite-skips: {e}") from None


def build_amp(args: argparse.Namespace, device: torch.device) -> AmpSettings:
    """Autocast settings; a GradScaler only for float16 (bfloat16 needs none)."""
    if not args.amp:
        return AmpSettings()
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    _log.info("AMP: autocast %s on %s%s", args.amp_dtype, device.type, " with a gradient scaler" if scaler else "")
    return AmpSettings(enabled=True, dtype=dtype, scaler=scaler)


def build_losses(args: argparse.Namespace, num_classes: int, device: torch.device) -> tuple[Callable, Callable, Any]:
    """(train loss, eval loss, timm Mixup or None), as timm's train.py picks them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        train_loss: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss = nn.CrossEntropyLoss()
    return train_loss.to(device), nn.CrossEntropyLoss().to(device), mixup_fn


# --------------------------------------------------------------------------- resume
def load_resume(path: str, model_name: str) -> dict[str, Any]:
    """Read a ``--resume`` file and check it is a training checkpoint of ``model_name``;
    wrapper prefixes (``module.``, ``_orig_mod.``) are stripped and the EMA / optimizer
    entries checked for shape (:func:`emakit.training.resume.normalize_resume_checkpoint`)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"--resume: {' '.join(str(e).split())}") from None
    # epoch: the last completed one; -1 only in a checkpoint written inside epoch 0 (train_position)
    lowest_epoch = -1 if isinstance(ckpt.get(TRAIN_POSITION_KEY), dict) else 0
    if not isinstance(ckpt.get("state_dict"), dict) or isinstance(ckpt.get("epoch"), bool) \
            or not isinstance(ckpt.get("epoch"), int) or ckpt["epoch"] < lowest_epoch:
        found = ", ".join(sorted(map(str, ckpt))[:8])
        raise UsageError(f"--resume {path} is not a training checkpoint (keys: {found}); "
                         "it needs state_dict and epoch, as written by train.py")
    arch = ckpt.get("arch")
    if arch and arch != model_name:
        raise UsageError(f"--resume {path} is a checkpoint of {arch}, but --model is {model_name}; "
                         f"pass --model {arch}")
    return normalize_resume_checkpoint(ckpt, path)


def check_resume(ckpt: dict[str, Any], args: argparse.Namespace, *, model_without_ddp: nn.Module,
                 ema: EmaSet | None, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> None:
    """Everything about ``--resume`` that could fail or silently lose state, checked before
    anything is loaded or written: the EMA is continued or explicitly dropped
    (``--drop-ema``), EMA weights fit the model, the optimizer state fits this optimizer
    (``--opt``, ``--layer-decay``); a changed batch is named in a warning."""
    path, held = args.resume, ema_entry_keys(ckpt)
    if getattr(args, "drop_ema", False) and ema is not None:
        raise UsageError("--drop-ema drops the resumed checkpoint's EMA, but --model-ema continues it: "
                         "pass only one of them")
    if ema is None and held:
        counter = (ckpt.get(held[0][1]) or {}).get("num_updates", "unknown")
        if not getattr(args, "drop_ema", False):
            raise UsageError(f"--resume {path} holds {len(held)} EMA(s) ({', '.join(k for k, _ in held)}; "
                             f"{counter} updates) but this run has no --model-ema, so its checkpoints would lose "
                             "them: pass --model-ema (and the run's EMA flags) to continue, or --drop-ema to drop them")
        _log.warning("--drop-ema: the checkpoint's %d EMA(s) (%s, %s updates) are not continued; this run's "
                     "checkpoints hold no EMA", len(held), ", ".join(k for k, _ in held), counter)
    for member, (weights_key, _) in zip(ema_members(ema), held):
        check_ema_entry(member.module, ckpt[weights_key], weights_key, path)
    if not args.no_resume_opt:
        check_optimizer_state(ckpt, optimizer, args, path)
    members = ema_members(ema)
    in_images = bool(members) and all(m.half_life and parse_half_life(m.half_life).unit in ("img", "ep")
                                      for m in members)
    warn_batch_change(ckpt, args, path, updates_per_epoch=updates_per_epoch, ema_in_images=in_images)


def apply_resume(ckpt: dict[str, Any], path: str, *, model_without_ddp: nn.Module, ema: EmaSet | None,
                 optimizer: torch.optim.Optimizer, amp: AmpSettings, restore_optimizer: bool = True,
                 posthoc: PosthocTracker | None = None, updates_per_epoch: int = 0) -> int:
    """Load weights, EMA(s), post-hoc EMA, optimizer and scaler state; returns the epoch to start at.

    Run :func:`check_resume` first. The LR schedule is not restored here: it is a function of
    the flags and the epoch, set by :func:`position_scheduler`, so ``--resume`` with a larger
    ``--epochs`` extends the cosine instead of replaying the old one (timm does the same).
    ``updates_per_epoch`` sets the EMA update counter of a checkpoint that has none (timm's).
    """
    try:
        load_state_dict_strict(model_without_ddp, ckpt["state_dict"])
    except CheckpointError as e:
        raise UsageError(f"--resume {path}: {' '.join(str(e).split())}") from None
    if ema is not None:
        resume_ema(ema, ckpt, path, model_without_ddp, updates_per_epoch=updates_per_epoch)
    if posthoc is not None:
        resume_posthoc(posthoc, ckpt, path)
    elif ckpt.get(POSTHOC_CHECKPOINT_KEY) is not None:
        _log.info("--resume %s tracked a post-hoc EMA; it stops here (no --model-ema-posthoc)", path)
    if restore_optimizer:
        try:
            if ckpt.get("optimizer") is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            if amp.scaler is not None and ckpt.get("amp_scaler"):
                amp.scaler.load_state_dict(ckpt["amp_scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UsageError(f"--resume {path}: cannot restore the optimizer state ({' '.join(str(e).split())[:200]});"
                             " pass --no-resume-opt to start a fresh optimizer state") from None
    start_epoch = int(ckpt["epoch"]) + 1
    position = ckpt.get(TRAIN_POSITION_KEY)
    if isinstance(position, dict):
        _log.info("resumed from %s: stopped in epoch %d after step %s, continuing there", path, start_epoch,
                  position.get("steps_done"))
    else:
        _log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt["epoch"], start_epoch)
    return start_epoch


def resume_ema(ema: EmaSet, ckpt: dict[str, Any], path: str, model_without_ddp: nn.Module, *,
               updates_per_epoch: int = 0) -> None:
    """Each EMA's weights and update counter from its checkpoint keys; an EMA the checkpoint
    lacks restarts from the (already resumed) model weights, with the others' counter.

    A checkpoint without EMA metadata (timm's) has no counter: it is set to the optimizer
    steps taken so far, ``(epoch + 1) * updates_per_epoch``, which is the step number timm's
    train.py passes to ``ModelEmaV3.update`` next, so a resumed ``--model-ema-warmup`` EMA
    continues its warmup instead of being overwritten by the raw weights.
    """
    members, missing, uncounted = ema_members(ema), [], []
    steps = steps_done(ckpt["epoch"], updates_per_epoch) if isinstance(ckpt.get("epoch"), int) else 0
    for i, member in enumerate(members):
        weights_key, meta_key = ema_checkpoint_keys(i)
        if ckpt.get(weights_key) is None:
            missing.append(i)
            continue
        try:
            member.load_checkpoint_state(ckpt[weights_key], ckpt.get(meta_key))
        except RuntimeError as e:
            raise UsageError(f"--resume {path}: EMA weights do not fit the model: {' '.join(str(e).split())[:300]}") \
                from None
        if ckpt.get(meta_key) is None:
            uncounted.append(i)
            member.num_updates = steps
    if uncounted:
        _log.info("--resume %s has no EMA update counter (a timm checkpoint): set to %d = (epoch %s + 1) x %d "
                  "optimizer steps per epoch, the step timm's train.py continues from", path, steps,
                  ckpt.get("epoch"), updates_per_epoch)
    counter = max((m.num_updates for i, m in enumerate(members) if i not in missing), default=steps)
    for i in missing:
        _log.warning("--resume %s has no weights for %s (%s): it restarts from the resumed weights", path,
                     ema_label(i), ema_checkpoint_keys(i)[0])
        members[i].set(model_without_ddp)
        members[i].num_updates = counter
    extra = sorted(k for k in ckpt if k.startswith("state_dict_ema_") and k[len("state_dict_ema_"):].isdigit()
                   and int(k[len("state_dict_ema_"):]) >= len(members))
    if extra:
        _log.warning("--resume %s holds %d more EMA(s) than configured (%s); they are not continued",
                     path, len(extra), ", ".join(extra))


def resume_posthoc(posthoc: PosthocTracker, ckpt: dict[str, Any], path: str) -> None:
    """The power EMA's profiles and step from the checkpoint; without them it starts now."""
    state = ckpt.get(POSTHOC_CHECKPOINT_KEY)
    if state is None:
        _log.warning("--resume %s has no post-hoc EMA state: the post-hoc EMA starts at the resumed epoch "
                     "(its snapshots cover training from here on; older ones in posthoc/ are deleted)", path)
        return
    try:
        posthoc.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--resume {path}: post-hoc EMA: {' '.join(str(e).split())[:300]}; pass the run's "
                         f"--posthoc-sigma-rels {','.join(f'{x:g}' for x in state.get('sigma_rels', []))}") from None


def check_resume_position(ckpt: dict[str, Any], args: argparse.Namespace, world_size: int) -> dict[str, Any] | None:
    """The ``train_position`` of a checkpoint written mid-epoch (None for an epoch-end one).

    Continuing a stopped epoch exactly needs the same process count, batch size and
    accumulation (they fix which samples each rank has seen); otherwise a ``UsageError``
    names what differs and the way out (the epoch-end checkpoint)."""
    position = ckpt.get(TRAIN_POSITION_KEY)
    if position is None:
        return None
    ranks = position.get("ranks") if isinstance(position, dict) else None
    if not isinstance(ranks, list) or not all(isinstance(r, dict) and isinstance(r.get("rng"), dict)
                                              and isinstance(r.get("progress"), dict) for r in ranks) \
            or len(ranks) != position.get("processes") or not isinstance(position.get("steps_done"), int):
        raise UsageError(f"--resume {args.resume}: its {TRAIN_POSITION_KEY} entry is malformed; "
                         "resume from an epoch-end checkpoint (checkpoint-<epoch>.pth.tar) instead")
    try:
        for r in ranks:
            EpochProgress.from_dict(r["progress"])
            if not {"python", "numpy", "torch"} <= r["rng"].keys():
                raise KeyError("rng")
    except (TypeError, KeyError):
        raise UsageError(f"--resume {args.resume}: its {TRAIN_POSITION_KEY} entry is malformed; resume from an "
                         "epoch-end checkpoint (checkpoint-<epoch>.pth.tar) instead") from None
    now = {"processes": world_size, "batch_size": args.batch_size, "grad_accum_steps": args.grad_accum_steps}
    differ = [f"{k} {position.get(k)} -> {v}" for k, v in now.items() if position.get(k) != v]
    if differ:
        raise UsageError(f"--resume {args.resume} stopped in the middle of epoch {position.get('epoch')}; continuing "
                         f"it needs the same {', '.join(now)} ({'; '.join(differ)}): use those, or "
                         + (f"resume from checkpoint-{int(ckpt['epoch'])}.pth.tar (the end of the epoch before)"
                            if int(ckpt["epoch"]) >= 0 else "start a fresh run"))
    return position


def position_scheduler(lr_scheduler: Any, start_epoch: int, updates_per_epoch: int, on_updates: bool,
                       saved_state: dict[str, Any] | None) -> None:
    """Set the LR for ``start_epoch``. Only the plateau scheduler carries state that the
    epoch number cannot rebuild (best metric, bad epochs); it is restored from the checkpoint."""
    from timm.scheduler import PlateauLRScheduler

    if isinstance(lr_scheduler, PlateauLRScheduler):
        if saved_state:
            lr_scheduler.load_state_dict(saved_state)
        return
    if on_updates:
        lr_scheduler.step_update(start_epoch * updates_per_epoch)
    else:
        lr_scheduler.step(start_epoch)


# --------------------------------------------------------------------------- output folder
def wanted_output_dir(args: argparse.Namespace, img_size: int) -> tuple[str, bool]:
    """(folder, named): ``<output>/<experiment>``, else the resumed checkpoint's folder, else
    timm's ``<output>/YYYYMMDD-HHMMSS-<model>-<img size>``; ``named`` is False for the last."""
    if args.experiment:
        return os.path.join(args.output, args.experiment), True
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume)), True
    from timm.models import safe_model_name

    return os.path.join(args.output, "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"),
                                               safe_model_name(args.model), str(img_size)])), False


def choose_output_dir(args: argparse.Namespace, img_size: int, *, resumed_by_emakit: bool = False
                      ) -> tuple[str, RunLock]:
    """The run folder and its held lock, by the rules of :mod:`emakit.training.rundir`: a
    resume continues in its checkpoint's folder when that folder is ours; otherwise a folder
    that holds a run is never written and the first free ``-1``, ``-2``... suffix is used."""
    wanted, named = wanted_output_dir(args, img_size)
    return claim_run_folder(wanted, resume=args.resume or None, resumed_by_emakit=resumed_by_emakit, named=named)


def prepare_output_dir(path: str, args: argparse.Namespace) -> None:
    """Create the run folder, mark it as ours and write ``args.yaml``; OSError -> UsageError."""
    try:
        os.makedirs(path, exist_ok=True)
        write_marker(path)
        write_text_atomic(os.path.join(path, "args.yaml"), args_to_yaml(args))
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"cannot write to output folder {path}: {reason}; "
                         "pass --output PATH with a writable folder") from None


def _agree(ok: bool, dist: DistInfo) -> bool:
    """True on every rank when ``ok`` holds on every rank (so all fail together, none hang)."""
    return all_reduce_sum([0.0 if ok else 1.0], dist)[0] == 0.0


def _read_summary(path: str, before_epoch: int) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit()
                and int(row["epoch"]) < before_epoch]


def summary_columns(num_emas: int) -> list[str]:
    """``summary.csv`` columns: ``SUMMARY_COLUMNS`` for no or one EMA; with several, each
    extra EMA's ``ema<i>_eval_{loss,top1,top5}`` after the first's, then ``ema_best`` (the
    ``--weights`` selector of the epoch's best EMA by ``--eval-metric``) and ``lr``."""
    if num_emas <= 1:
        return list(SUMMARY_COLUMNS)
    extra = [f"{ema_label(i)}_eval_{k}" for i in range(1, num_emas) for k in _EVAL_KEYS]
    return SUMMARY_COLUMNS[:-1] + extra + ["ema_best", "lr"]


def write_summary(path: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rewrite ``summary.csv`` (atomically) with ``columns`` (default ``SUMMARY_COLUMNS``);
    empty cells for a missing EMA."""
    columns = columns or SUMMARY_COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- build
def _build_loaders(args: argparse.Namespace, data: DataSplits, data_config: dict[str, Any],
                   dist: DistInfo) -> tuple[Any, Any]:
    aug = AugmentConfig(no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
                        interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                        re_count=args.recount)
    on_device = dist.device.type == "cuda" and not args.no_prefetcher  # the GPU input path
    data.train.transform, data.val.transform = build_transforms(data_config, aug, uint8=on_device)
    train_loader = build_train_loader(data.train, args.batch_size, dist, seed=args.seed, workers=args.workers,
                                      pin_memory=args.pin_mem or on_device)
    eval_loader = build_eval_loader(data.val, args.validation_batch_size or args.batch_size, dist,
                                    workers=args.workers, pin_memory=args.pin_mem or on_device)
    if not on_device:
        return train_loader, eval_loader
    mean, std = data_config["mean"], data_config["std"]
    return (DeviceLoader(train_loader, dist.device, mean, std, random_erasing=device_random_erasing(aug, dist.device)),
            DeviceLoader(eval_loader, dist.device, mean, std))


def _wrap_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None  # none on CPU (gloo)
    return DistributedDataParallel(model, device_ids=device_ids)


def _load_data(args: argparse.Namespace) -> tuple[DataSplits, int]:
    data = build_datasets(args.data, args.train_split, args.val_split, args.skip_bad_images,
                          threads=max(2, args.workers))
    _log.info("data: %s", data.description)
    num_classes = args.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise UsageError(f"--num-classes {num_classes} is less than the {len(data.classes)} classes in the data")
    if args.label_noise > 0:
        # Flip among the classes present, so a flipped label is always a real class.
        flipped = flip_labels(data.train, args.label_noise, len(data.classes), args.seed)
        _log.info("label noise: %d of %d training labels (%.0f%%) flipped to a random other class (seed %d); "
                  "validation labels are clean", len(flipped), len(data.train), 100 * args.label_noise, args.seed)
    return data, num_classes


def _build_parts(args: argparse.Namespace, dist: DistInfo) -> dict[str, Any]:
    data, num_classes = _load_data(args)
    if getattr(args, "drop_ema", False) and not args.resume:
        raise UsageError("--drop-ema drops a resumed checkpoint's EMA: it needs --resume PATH")
    ckpt = load_resume(args.resume, args.model) if args.resume else None
    resumed_by_emakit = ckpt is not None and checkpoint_is_emakit(ckpt)
    resume_position = check_resume_position(ckpt, args, dist.world_size) if ckpt else None
    args.num_classes = num_classes
    args.lr = resolve_lr(args, dist.world_size)
    seed_all(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    check_compile_backend(args.torchcompile)
    model_without_ddp = build_model(args.model, num_classes, dist.device, drop_rate=args.drop,
                                    drop_path_rate=args.drop_path, channels_last=args.channels_last,
                                    pretrained_path=args.pretrained_path if args.pretrained else None)
    data_config = resolve_data_config_for(model_without_ddp, img_size=args.img_size, crop_pct=args.crop_pct,
                                          mean=args.mean, std=args.std, interpolation=args.interpolation)
    train_loader, eval_loader = _build_loaders(args, data, data_config, dist)
    model = _wrap_ddp(model_without_ddp, dist)
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    ema = build_ema(args, model_without_ddp, updates_per_epoch=updates_per_epoch,
                    global_batch_size=args.batch_size * dist.world_size * args.grad_accum_steps,
                    total_steps=updates_per_epoch * args.epochs)
    _log_bn_recal(args.model_ema_bn_recal if ema is not None else 0, model_without_ddp, args.model)
    posthoc = build_posthoc(args, model_without_ddp, dist, total_steps=updates_per_epoch * args.epochs,
                            saved=ckpt.get(POSTHOC_CHECKPOINT_KEY) if ckpt else None)
    optimizer = build_optimizer(args, model_without_ddp)
    lr_scheduler = build_scheduler(args, optimizer, updates_per_epoch)
    amp = build_amp(args, dist.device)
    start_epoch = 0
    if ckpt is not None:
        check_resume(ckpt, args, model_without_ddp=model_without_ddp, ema=ema, optimizer=optimizer,
                     updates_per_epoch=updates_per_epoch)
        start_epoch = apply_resume(ckpt, args.resume, model_without_ddp=model_without_ddp, ema=ema,
                                   optimizer=optimizer, amp=amp, restore_optimizer=not args.no_resume_opt,
                                   posthoc=posthoc, updates_per_epoch=updates_per_epoch)
        position_scheduler(lr_scheduler, start_epoch, updates_per_epoch, args.sched_on_updates,
                           None if args.no_resume_opt else ckpt.get("scheduler"))
        if resume_position is not None:  # the LR of the step the stopped epoch continues at
            lr_scheduler.step_update(num_updates=start_epoch * updates_per_epoch + resume_position["steps_done"])
        del ckpt
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)  # after DDP, as timm does
    train_loss_fn, eval_loss_fn, mixup_fn = build_losses(args, num_classes, dist.device)
    return dict(data=data, model=model, model_without_ddp=model_without_ddp, ema=ema, posthoc=posthoc,
                optimizer=optimizer, lr_scheduler=lr_scheduler, amp=amp, train_loader=train_loader,
                eval_loader=eval_loader,
                train_loss_fn=train_loss_fn, eval_loss_fn=eval_loss_fn, mixup_fn=mixup_fn,
                updates_per_epoch=updates_per_epoch, start_epoch=start_epoch, img_size=data_config["input_size"][-1],
                resumed_by_emakit=resumed_by_emakit,
                resume_position=resume_position, guard=build_guard(args),
                last_good=(os.path.abspath(args.resume), "the checkpoint this run resumed from") if args.resume else None,
                nonfinite_at_start=frozenset(k for k, v in model_without_ddp.state_dict().items()
                                             if v.is_floating_point() and not bool(torch.isfinite(v).all())))


def _log_bn_recal(num_batches: int, model_without_ddp: nn.Module, model_name: str) -> None:
    """Say what ``--model-ema-bn-recal`` does to the reported EMA metrics (or that it cannot)."""
    if num_batches <= 0:
        return
    if not has_batchnorm(model_without_ddp):
        _log.warning("--model-ema-bn-recal: %s has no BatchNorm layer, nothing to recalibrate", model_name)
        return
    _log.info("EMA BatchNorm recalibration: %d training batches per process before each EMA evaluation; the "
              "checkpoints' state_dict_ema* keep the averaged statistics, the evaluated ones are in ema_bn_recal",
              num_batches)


def _setup_output(tr: Trainer, img_size: int, logs: LogSetup | None) -> None:
    """Rank 0 creates the folder, args.yaml, the log file and the checkpoint saver; every
    rank learns whether that worked, so a failure stops all of them."""
    args, error = tr.args, None
    if tr.dist.is_main:
        try:
            path, tr.run_lock = choose_output_dir(args, img_size, resumed_by_emakit=tr.resumed_by_emakit)
            args.experiment = os.path.basename(os.path.normpath(path))
            prepare_output_dir(path, args)
        except UsageError as e:
            error = e
    if not _agree(error is None, tr.dist):
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
    tr.saver = CheckpointSaver(path, max_history=args.checkpoint_hist, decreasing=args.eval_metric == "loss")
    if tr.start_epoch > 0:
        tr.saver.restore(up_to_epoch=tr.start_epoch - 1)
        tr.summary_rows = _read_summary(os.path.join(path, "summary.csv"), tr.start_epoch)
    _log.info("output folder: %s", path)
    if tr.posthoc is not None:
        _open_posthoc_folder(tr.posthoc, os.path.join(path, "posthoc"))


def _open_posthoc_folder(posthoc: PosthocTracker, folder: str) -> None:
    """Bind the snapshot folder (pruning snapshots newer than a resumed step) and log the
    projected disk footprint."""
    try:
        posthoc.open_folder(folder)
    except OSError as e:
        raise UsageError(f"cannot write post-hoc snapshots to {folder}: {e.strerror or e}") from None
    sigmas = ", ".join(f"{s:g}" for s in posthoc.power.sigma_rels)
    _log.info("post-hoc EMA: sigma_rel %s, accumulated in float32 (%.1f MiB in memory); a snapshot every %d "
              "optimizer step(s) in %s into %s; projected footprint %s; %s", sigmas, posthoc.memory_bytes() / 2**20,
              posthoc.writer.every, posthoc.snapshot_dtype, folder, posthoc.projected_footprint(),
              posthoc.describe_budget())


def build_trainer(args: argparse.Namespace, logs: LogSetup | None = None) -> Trainer:
    """Build everything in the user's expected order; raises ``UsageError`` for bad input
    before the output folder exists. Call :func:`close_trainer` when done."""
    dist = init_distributed(args.device)
    try:
        parts = _build_parts(args, dist)
        img_size = parts.pop("img_size")
        ema_device = torch.device("cpu") if args.model_ema_force_cpu else dist.device
        tr = Trainer(args=args, dist=dist, ema_device=ema_device,
                     summary_columns=summary_columns(len(ema_members(parts["ema"]))), **parts)
        try:
            _setup_output(tr, img_size, logs)
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


# --------------------------------------------------------------------------- the loop
def _train_options(args: argparse.Namespace, tr: Trainer) -> TrainOptions:
    return TrainOptions(grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                        channels_last=args.channels_last, log_interval=args.log_interval,
                        progress=tr.dist.is_main and not args.no_progress, amp=tr.amp)


def _ema_input_dtype(tr: Trainer) -> torch.dtype | None:
    """Feed a low-precision EMA (``--model-ema-dtype bfloat16``) inputs of its dtype when
    autocast is off, so its evaluation does not fail on a dtype mismatch."""
    members = ema_members(tr.ema)
    param = next(iter(members[0].module.parameters()), None) if members else None
    if param is None or tr.amp.enabled or param.dtype == torch.float32:
        return None
    return param.dtype


def _ema_autocast(tr: Trainer) -> Callable[[], contextlib.AbstractContextManager] | None:
    """Autocast factory for forward passes of the EMA outside ``evaluate`` (BN recalibration):
    the AMP settings, or the EMA's own dtype for a low-precision EMA without AMP."""
    if tr.amp.enabled:
        return lambda: tr.amp.autocast(tr.ema_device)
    dtype = _ema_input_dtype(tr)
    if dtype is None:
        return None
    return lambda: torch.autocast(device_type=tr.ema_device.type, dtype=dtype)


def _bn_recal_context(tr: Trainer, module: nn.Module) -> contextlib.AbstractContextManager:
    """``recalibrated_bn`` over ``--model-ema-bn-recal`` training batches, or a no-op yielding None."""
    if tr.args.model_ema_bn_recal <= 0:
        return contextlib.nullcontext(None)
    return recalibrated_bn(module, tr.train_loader, tr.args.model_ema_bn_recal, tr.ema_device,
                           channels_last=tr.args.channels_last, autocast=_ema_autocast(tr))


def evaluate_raw_and_emas(tr: Trainer) -> tuple[dict[str, float], list[dict[str, float]],
                                                list[dict[str, torch.Tensor]]]:
    """Validate the raw weights and every EMA in one pass over the validation data (each
    batch decoded once, fed to all of them: ``evaluate_many``), BN buffers synced first.

    Returns (raw metrics, one metrics dict per EMA, the recalibrated BatchNorm buffers of
    each EMA: empty without ``--model-ema-bn-recal``). With recalibration every EMA is
    evaluated under statistics re-estimated for its own weights, and keeps its averaged
    statistics afterwards (see ``recalibrated_bn``).
    """
    args, progress = tr.args, tr.dist.is_main and not tr.args.no_progress
    distribute_bn(tr.model_without_ddp, tr.dist, args.dist_bn)
    targets = [EvalTarget(tr.model_without_ddp, tr.dist.device)]
    members = ema_members(tr.ema)
    input_dtype = _ema_input_dtype(tr) if members else None
    for i, member in enumerate(members):
        distribute_bn(member.module, tr.dist, args.dist_bn)
        targets.append(EvalTarget(member.module, tr.ema_device, input_dtype, f" ({ema_label(i).upper()})"))
    with contextlib.ExitStack() as stack:
        recal = [stack.enter_context(_bn_recal_context(tr, member.module)) for member in members]
        results = evaluate_many(targets, tr.eval_loader, tr.eval_loss_fn, amp=tr.amp,
                                channels_last=args.channels_last, dist=tr.dist, progress=progress)
    return results[0], results[1:], [buffers for buffers in recal if buffers is not None]


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


def _epoch_metrics(epoch: int, train: dict[str, float], raw: dict[str, float],
                   emas: list[dict[str, float]], eval_metric: str = "top1") -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "train_loss": train["loss"], "eval_loss": raw["loss"],
                           "eval_top1": raw["top1"], "eval_top5": raw["top5"], "lr": train["lr"],
                           "eval_samples": raw["samples"], "train_samples": train["samples"],
                           "optimizer_steps": train["optimizer_steps"], "ema_updates": train["ema_updates"],
                           "skipped_steps": train["skipped_steps"]}
    for key in ("loss", "top1", "top5", "samples"):
        row[f"ema_eval_{key}"] = emas[0][key] if emas else None
    for i, metrics in enumerate(emas[1:], start=1):
        for key in ("loss", "top1", "top5", "samples"):
            row[f"{ema_label(i)}_eval_{key}"] = metrics[key]
    if len(emas) > 1:
        row["ema_best"] = ema_selector(best_ema_index(emas, eval_metric))
    return row


def checkpoint_state(tr: Trainer, epoch: int, metric: float, metrics: dict[str, Any],
                     bn_recal: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """The checkpoint dict (DESIGN.md section 3): tensors and plain types only.

    Adds every EMA (``state_dict_ema`` + ``ema``, then ``state_dict_ema_<i>`` + ``ema_<i>``),
    the post-hoc EMA state (``posthoc_ema``) and the epoch's recalibrated BatchNorm buffers
    of each EMA (``ema_bn_recal``: ``{"num_batches": N, "buffers": [per EMA]}``) when on.
    """
    state: dict[str, Any] = {
        "epoch": epoch, "arch": tr.args.model, "version": CHECKPOINT_VERSION,
        "state_dict": tr.model_without_ddp.state_dict(),
        "optimizer": tr.optimizer.state_dict(), "scheduler": tr.lr_scheduler.state_dict(),
        "amp_scaler": tr.amp.scaler.state_dict() if tr.amp.scaler is not None else None,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(tr.args).items()},
        "metric": metric, "metrics": dict(metrics),
    }
    state.update(ema_checkpoint_state(tr.ema))
    if tr.posthoc is not None:
        state[POSTHOC_CHECKPOINT_KEY] = tr.posthoc.state_dict()
    if bn_recal:
        state[BN_RECAL_CHECKPOINT_KEY] = {"num_batches": tr.args.model_ema_bn_recal, "buffers": bn_recal}
    return state


def _log_epoch(epoch: int, num_epochs: int, m: dict[str, Any], seconds: float, img_per_sec: float,
               num_emas: int = 1) -> None:
    ema = "" if m["ema_eval_top1"] is None else (
        f" | EMA top1 {m['ema_eval_top1']:.2f} top5 {m['ema_eval_top5']:.2f} loss {m['ema_eval_loss']:.4f}")
    for i in range(1, num_emas):
        ema += f" | {ema_label(i).upper()} top1 {m[f'{ema_label(i)}_eval_top1']:.2f}"
    if num_emas > 1:
        ema += f" | best of {num_emas} EMAs: {m['ema_best']}"
    _log.info("epoch %d/%d: train loss %.4f | raw top1 %.2f top5 %.2f loss %.4f%s | lr %.4g | %.1fs, %.0f img/s",
              epoch, num_epochs - 1, m["train_loss"], m["eval_top1"], m["eval_top5"], m["eval_loss"], ema,
              m["lr"], seconds, img_per_sec)


def run_epoch(tr: Trainer, epoch: int) -> dict[str, Any]:
    """Train, validate raw and every EMA, step the LR schedule, write summary and checkpoints.

    Ends the run with a :class:`RunStopped` when a stop signal arrives during training (after
    writing a mid-epoch ``last.pth.tar``), when the loss, gradients or weights turn
    non-finite (``--on-nonfinite``; nothing non-finite is ever written), or when a write
    fails (a full disk); every rank raises it together.
    """
    args, start = tr.args, time.perf_counter()
    seed_all(epoch_seed(args.seed, epoch, tr.dist.rank))
    set_epoch(tr.train_loader, epoch, args.seed, tr.dist.rank)
    if tr.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        tr.mixup_fn.mixup_enabled = False
    resumed = _continue_stopped_epoch(tr, epoch)
    posthoc = _WriteTrap(tr.posthoc) if tr.posthoc is not None else None
    try:
        train = train_one_epoch(epoch, tr.model, tr.train_loader, tr.optimizer, tr.train_loss_fn,
                                device=tr.dist.device, opts=_train_options(args, tr), dist=tr.dist, ema=tr.ema,
                                lr_scheduler=tr.lr_scheduler, mixup_fn=tr.mixup_fn, posthoc=posthoc,
                                guard=tr.guard, start=resumed,
                                stop_requested=lambda: _stop_signal(tr) is not None or posthoc is not None
                                and posthoc.error is not None)
    except TrainingDiverged as e:
        raise _diverged(tr, str(e)) from None
    if posthoc is not None and posthoc.error is not None:
        raise _write_failed(tr, "a post-hoc EMA snapshot", posthoc.error)
    if train["stopped"]:
        _stop_mid_epoch(tr, epoch, train["progress"])
    raw, emas, bn_recal = evaluate_raw_and_emas(tr)
    if tr.dist.is_main and epoch == args.epochs - 1:
        _preload_plotting()  # overlaps matplotlib's import with the last checkpoint write
    metrics = _epoch_metrics(epoch, train, raw, emas, args.eval_metric)
    metric = select_metric(raw, emas, args.eval_metric, args.model_ema_select)
    tr.lr_scheduler.step(epoch + 1, metric)
    state = checkpoint_state(tr, epoch, metric, metrics, bn_recal) if tr.dist.is_main else None

    def write() -> None:
        tr.summary_rows.append(metrics)
        write_summary(os.path.join(tr.output_dir, "summary.csv"), tr.summary_rows, tr.summary_columns)
        tr.saver.save(state, epoch, metric, last_only_keys=(POSTHOC_CHECKPOINT_KEY,))

    _write_checked(tr, state, write, f"epoch {epoch}", f"after epoch {epoch}")
    if tr.dist.is_main:
        _log_epoch(epoch, args.epochs, metrics, time.perf_counter() - start, train["img_per_sec"], len(emas))
    return metrics


class _WriteTrap:
    """Wraps the post-hoc tracker so a failed snapshot write (a full disk) is recorded and
    turned into an agreed stop at the next step boundary instead of an exception on rank 0
    alone (the other ranks would wait in their next collective)."""

    def __init__(self, posthoc: PosthocTracker) -> None:
        self.posthoc, self.error = posthoc, None

    def update(self, model: nn.Module) -> None:
        if self.error is None:
            try:
                self.posthoc.update(model)
            except OSError as e:
                self.error = e


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
    tr.train_loader.sampler.skip(progress.batches * tr.args.batch_size)
    set_rng_state(mine["rng"], tr.dist.device)
    for member, buffers in zip(ema_members(tr.ema), mine.get("ema_buffers") or []):
        with torch.no_grad():
            for name, buf in member.module.named_buffers():
                if name in buffers:
                    buf.copy_(buffers[name])
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
        mine["ema_buffers"] = [{k: b.detach().cpu().clone() for k, b in m.module.named_buffers()}
                               for m in ema_members(tr.ema)]
    ranks = _gather(mine, tr.dist)
    signum = next((r["signal"] for r in ranks if r["signal"] is not None), signal.SIGTERM)
    step = progress.steps + progress.skipped
    label = f"epoch {epoch}, step {step}/{tr.updates_per_epoch}"
    state = None
    if tr.dist.is_main:
        state = checkpoint_state(tr, epoch - 1, None, {})
        state[TRAIN_POSITION_KEY] = {
            "epoch": epoch, "steps_done": step, "batches_done": progress.batches,
            "steps_per_epoch": tr.updates_per_epoch, "processes": tr.dist.world_size,
            "batch_size": tr.args.batch_size, "grad_accum_steps": tr.args.grad_accum_steps,
            "ranks": [{k: v for k, v in r.items() if k != "signal"} for r in ranks]}
    _write_checked(tr, state, lambda: tr.saver.save_last(state), f"{label} (mid-epoch)", f"at {label}")
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


def _last_good_text(tr: Trainer) -> str:
    if tr.last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint is {tr.last_good[0]} ({tr.last_good[1]})"


def _diverged(tr: Trainer, reason: str) -> RunStopped:
    hint = "" if tr.last_good else "; lower --lr or add --clip-grad"
    return RunStopped(f"{reason}; {_last_good_text(tr)}{hint}", tr.last_good[0] if tr.last_good else None,
                      EXIT_DIVERGED, resume_hint="lower --lr or add --clip-grad in this command, then resume with")


def _write_failed(tr: Trainer, what: str, error: OSError | None) -> RunStopped:
    why = (error.strerror or str(error)) if error is not None else "failed on rank 0"
    where = f" ({error.filename})" if error is not None and error.filename else ""
    return RunStopped(f"could not write {what}{where}: {why}; {_last_good_text(tr)}",
                      tr.last_good[0] if tr.last_good else None, EXIT_WRITE_FAILED,
                      resume_hint="free space (or fix the folder), then resume with")


def _write_checked(tr: Trainer, state: dict[str, Any] | None, write: Callable[[], None], label: str,
                   when: str) -> None:
    """Rank 0: refuse a state with non-finite tensors, else ``write()``; then every rank
    learns the outcome, so a divergence or a failed write stops all of them together."""
    bad, error = [], None
    if tr.dist.is_main:
        bad = find_nonfinite(state, skip_keys=tr.nonfinite_at_start)
        if not bad:
            try:
                write()
            except OSError as e:
                error = e
    nonfinite, failed = all_reduce_sum([float(bool(bad)), float(error is not None)], tr.dist)
    if nonfinite:
        shown = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
        raise _diverged(tr, f"training diverged {when}: non-finite values in {shown or 'the weights (rank 0)'}; "
                            "nothing was saved")
    if failed:
        raise _write_failed(tr, f"the outputs of {label}", error)
    # Only rank 0 writes and reports; the other ranks just know that a checkpoint exists.
    tr.last_good = (tr.saver.last_path if tr.dist.is_main else "last.pth.tar (rank 0)", label)


def _best(rows: list[dict[str, Any]], column: str, lower_is_better: bool) -> tuple[float, int] | None:
    """(best value, its epoch) of ``column`` over summary rows; ties go to the earlier epoch.
    Non-finite values (a diverged evaluation) never count."""
    scored = [(float(r[column]), int(r["epoch"])) for r in rows if r.get(column) not in (None, "")]
    scored = [s for s in scored if math.isfinite(s[0])]
    if not scored:
        return None
    sign = 1.0 if lower_is_better else -1.0
    return min(scored, key=lambda s: (sign * s[0], s[1]))


def _finish_posthoc(tr: Trainer) -> None:
    """Final snapshot, the footprint on disk, and the command that sweeps EMA lengths."""
    posthoc = tr.posthoc
    posthoc.finish()
    steps, used = posthoc.stored_steps(), posthoc.disk_usage()
    _log.info("post-hoc EMA: %d snapshot steps x %d profiles in %s: %.1f MiB on disk (%d bytes, %.2fx the "
              "model's float32 bytes; projected %s; %s)", len(steps), len(posthoc.power.sigma_rels),
              posthoc.writer.folder, used / 2**20, used, used / posthoc.model_bytes, posthoc.projected_footprint(),
              posthoc.describe_budget())
    if posthoc.budget_bytes is not None and used > posthoc.budget_bytes:
        _log.warning("post-hoc EMA: the snapshots take %d bytes, more than the budget of %d bytes",
                     used, posthoc.budget_bytes)
    _log.info("choose the EMA length now: %s", posthoc_sweep_command(tr.args.data, tr.saver.last_path))


def _preload_plotting() -> None:
    """Import pyplot for ``summary.png`` on a daemon thread. Started only after the last
    evaluation, when every loader worker has been forked (no fork while it holds import locks)."""
    import threading

    from .plots import preload_pyplot

    threading.Thread(target=preload_pyplot, name="preload-pyplot", daemon=True).start()


def _plot_summary(tr: Trainer) -> None:
    """``summary.png`` beside ``summary.csv``; without matplotlib, plots.py logs a notice.
    A plot is a convenience: any failure is a warning, never a failed run."""
    from .plots import plot_summary

    path = os.path.join(tr.output_dir, "summary.csv")
    if not tr.summary_rows or not os.path.isfile(path):
        return
    try:
        png = plot_summary(path)
    except Exception as e:  # noqa: BLE001 - matplotlib can fail in many ways (fonts, backends)
        _log.warning("could not plot %s: %s", path, " ".join(str(e).split())[:300])
        return
    if png is not None:
        _log.info("plot: %s", png)


def _console_logs_above_progress_bars(enabled: bool) -> contextlib.AbstractContextManager:
    """Route console log lines through tqdm.write while bars may be shown, so they do not
    land in the middle of a bar."""
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("emakit")])


def fit(tr: Trainer) -> FitResult:
    """Run the epochs from ``tr.start_epoch``. A stop signal, a divergence or a failed write
    raises :class:`RunStopped` (see :func:`run_epoch`)."""
    args = tr.args
    if tr.dist.is_main and tr.start_epoch >= args.epochs:
        _log.warning("nothing to train: the checkpoint finished epoch %d of %d; raise --epochs to continue",
                     tr.start_epoch - 1, args.epochs)
    elif tr.dist.is_main:
        _log.info("training epochs %d-%d, %d optimizer steps per epoch", tr.start_epoch, args.epochs - 1,
                  tr.updates_per_epoch)
    deferred = tr.signals.deferred() if tr.signals is not None else contextlib.nullcontext()
    try:
        with deferred, _console_logs_above_progress_bars(tr.dist.is_main and not args.no_progress):
            for epoch in range(tr.start_epoch, args.epochs):
                run_epoch(tr, epoch)
                if epoch < args.epochs - 1:  # after the last epoch, training is done: finish normally
                    _stop_after_epoch(tr, epoch)
            _finish_run(tr)
    except KeyboardInterrupt:  # signals not taken over (train.main not in the main thread)
        last = tr.last_good[0] if tr.last_good else None
        raise TrainingInterrupted(f"interrupted; {_last_good_text(tr)}", last, 130, error=False) from None
    lower = args.eval_metric == "loss"
    result = FitResult(tr.output_dir, args.epochs - tr.start_epoch,
                       _best(tr.summary_rows, f"eval_{args.eval_metric}", lower),
                       _best(tr.summary_rows, f"ema_eval_{args.eval_metric}", lower), args.eval_metric,
                       _best_of_emas(tr.summary_rows, len(ema_members(tr.ema)), args.eval_metric))
    if tr.dist.is_main:
        _log.info("%s", describe_result(result))
    return result


def _finish_run(tr: Trainer) -> None:
    """After the last epoch: the final post-hoc snapshot and the plot (rank 0)."""
    if not tr.dist.is_main:
        return
    if tr.posthoc is not None:
        try:
            _finish_posthoc(tr)
        except OSError as e:
            raise _write_failed(tr, "the final post-hoc EMA snapshot", e) from None
    _plot_summary(tr)


def _best_of_emas(rows: list[dict[str, Any]], num_emas: int, eval_metric: str) -> tuple[float, int, str] | None:
    """(value, epoch, ``--weights`` selector) of the best EMA over all epochs; None for < 2 EMAs."""
    if num_emas < 2:
        return None
    lower, found = eval_metric == "loss", []
    for i in range(num_emas):
        best = _best(rows, f"{ema_label(i)}_eval_{eval_metric}", lower)
        if best is not None:
            found.append((best[0], best[1], ema_selector(i)))
    if not found:
        return None
    sign = 1.0 if lower else -1.0
    return min(found, key=lambda b: (sign * b[0], b[1]))


def describe_result(result: FitResult) -> str:
    """One line: best raw and EMA metric with their epochs, and the output folder."""
    def fmt(best: tuple[float, int] | None) -> str:
        return "n/a" if best is None else f"{best[0]:.2f} (epoch {best[1]})"

    best_any = "" if result.best_any_ema is None else (
        f"; best of all EMAs: {result.best_any_ema[2]} {result.best_any_ema[0]:.2f} (epoch {result.best_any_ema[1]}, "
        f"validate.py --weights {result.best_any_ema[2]})")
    return (f"best raw {result.eval_metric} {fmt(result.best_raw)}; best EMA {result.eval_metric} "
            f"{fmt(result.best_ema)}{best_any}; outputs in {result.output_dir}")
