"""The two loops: ``train_one_epoch`` (optimizer steps + EMA updates) and ``evaluate``.

They take explicit objects, never the argparse namespace. ``evaluate_many`` scores any
modules on one pass over the data, so the raw model and every EMA are validated on the same
decoded batches; ``evaluate`` is its one-module form (torchvision's ``log_suffix``).

Every optimizer step is checked before it is taken: a non-finite loss (any micro-batch of
the step, any rank) or non-finite gradient never reaches the optimizer or the EMA; the
:class:`NonfiniteGuard` policy either stops the run (:class:`TrainingDiverged`) or skips
the step. The same check carries the "stop requested" flag of a signal, so under DDP all
ranks agree on the step boundary where they stop (one tiny all-reduce and one host sync
per optimizer step; without DDP, one host sync).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.ema import local_shard

from .distributed import DistInfo, all_reduce_sum
from .settings import OptimSettings, RunSettings

if TYPE_CHECKING:  # for annotations only
    from .averages import Averages
    from timm.scheduler.scheduler import Scheduler

__all__ = ["AmpSettings", "TrainOptions", "NonfiniteGuard", "EpochProgress", "TrainingDiverged", "train_one_epoch",
           "evaluate", "evaluate_many", "EvalTarget", "optimizer_step"]

_log = logging.getLogger(__name__)


@dataclass
class AmpSettings:
    """Mixed precision: autocast ``dtype`` when ``enabled``, and the fp16 ``scaler`` if any."""

    enabled: bool = False
    dtype: torch.dtype = torch.float16
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """An autocast context for ``device`` (a no-op context when AMP is off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


@dataclass
class TrainOptions:
    """Per-step settings of :func:`train_one_epoch`: the run's optimizer settings (gradient
    accumulation, clipping) and run settings (log interval) as declared, plus what the
    trainer derives (channels_last, whether this rank shows a progress bar, AMP)."""

    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    channels_last: bool = False
    progress: bool = False
    amp: AmpSettings = field(default_factory=AmpSettings)


class TrainingDiverged(Exception):
    """A non-finite loss or gradient under ``--on-nonfinite stop``, too many consecutive
    skipped steps under ``skip``, or non-finite weights; ``str`` says where and why."""


@dataclass
class NonfiniteGuard:
    """What a non-finite loss or gradient does (``--on-nonfinite``): ``stop`` the run, or
    ``skip`` the optimizer step (and the EMA update) and stop after ``max_consecutive``
    skipped steps in a row. Lives across epochs; ``total`` counts the skipped steps."""

    policy: str = "stop"
    max_consecutive: int = 10
    consecutive: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if self.policy not in ("stop", "skip"):
            raise ValueError(f"on-nonfinite policy {self.policy!r}: use stop or skip")
        if self.max_consecutive < 1:
            raise ValueError(f"max-nonfinite-skips {self.max_consecutive} must be >= 1")


@dataclass
class EpochProgress:
    """How far an epoch got: micro-batches consumed, optimizer steps taken/skipped, EMA
    updates, the training-loss sum and sample counts. Saved in a mid-epoch checkpoint so a
    resumed epoch continues where it stopped (plain types only)."""

    batches: int = 0
    steps: int = 0
    ema: int = 0
    skipped: int = 0
    nonfinite: int = 0
    loss_sum: float = 0.0
    loss_samples: int = 0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for a checkpoint."""
        return dict(vars(self))

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "EpochProgress":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer checkpoint format)."""
        return cls(**state)


def _progress(loader: Iterable, enabled: bool, desc: str) -> Iterable:
    """Wrap ``loader`` in a tqdm bar on a TTY when ``enabled`` (rank 0 only, by the caller)."""
    if not enabled or not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions) -> bool:
    """Clip, step and (fp16) update the scaler; False when the scaler skipped the step
    because of inf/nan gradients (the scale went down), so the caller skips the EMA too."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad

    scaler = opts.amp.scaler
    if scaler is not None and opts.optim.clip_grad is not None:
        scaler.unscale_(optimizer)
    if opts.optim.clip_grad is not None:
        params = model_parameters(model, exclude_head="agc" in opts.optim.clip_mode)
        dispatch_clip_grad(params, value=opts.optim.clip_grad, mode=opts.optim.clip_mode)
    if scaler is None:
        optimizer.step()
        _synchronize(opts)
        return True
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    _synchronize(opts)
    # GradScaler.update() lowers the scale exactly when this step found inf/nan gradients
    # and optimizer.step() was skipped (torch.amp.GradScaler docs, "skipping iterations").
    return scaler.get_scale() >= scale_before


def _synchronize(opts: TrainOptions) -> None:
    """``--synchronize-step``: wait for the device after each optimizer step, as timm does."""
    if opts.run.synchronize_step and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _forward_backward(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                      loss_fn: Callable, opts: TrainOptions, device: torch.device,
                      accum: int, sync: bool) -> torch.Tensor:
    sync_ctx = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
    with sync_ctx:
        with opts.amp.autocast(device):
            if hasattr(loss_fn, "get_trainable_module"):  # a timm distillation task: it runs the model itself
                loss = loss_fn(inputs, target)["loss"]
            else:
                loss = loss_fn(model(inputs), target)
        scaled = loss / accum if accum > 1 else loss
        if opts.amp.scaler is not None:
            opts.amp.scaler.scale(scaled).backward()
        else:
            scaled.backward()
    return loss.detach()


def _mean_lr(optimizer: torch.optim.Optimizer) -> float:
    lrs = [g["lr"] for g in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(
    epoch: int,
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    *,
    device: torch.device,
    opts: TrainOptions,
    dist: DistInfo = DistInfo(),
    averages: Averages | None = None,
    lr_scheduler: Scheduler | None = None,
    mixup_fn: Callable | None = None,
    guard: NonfiniteGuard | None = None,
    stop_requested: Callable[[], bool] | None = None,
    start: EpochProgress | None = None,
) -> dict[str, Any]:
    """Train one epoch; update ``averages`` (the run's EMAs and post-hoc tracker,
    :class:`~emakit.training.averages.Averages`) after every optimizer step that was taken.

    With ``opts.optim.grad_accum_steps = k`` an optimizer step (and an EMA update) happens once
    per k micro-batches and at the end of the epoch. ``guard`` (default: stop) decides what
    a non-finite loss or gradient does; such a step is never taken. ``stop_requested`` is
    polled at every step boundary (agreed over ranks): when it holds, the epoch ends there
    with ``stopped`` True and ``progress`` saying how far it got. ``start``: continue a
    stopped epoch (the loader must already skip ``start.batches`` batches).

    Returns the mean training ``loss`` over all ranks (finite steps only),
    ``optimizer_steps``, ``ema_updates``, ``skipped_steps`` (fp16 scaler and non-finite),
    ``nonfinite_steps``, ``samples`` (all ranks), ``seconds``, ``img_per_sec``, ``lr``,
    ``stopped`` and ``progress`` (an :class:`EpochProgress`).
    """
    model.train()
    guard = guard or NonfiniteGuard()
    num_batches = len(loader)  # type: ignore[arg-type]
    accum = max(1, opts.optim.grad_accum_steps)
    updates_per_epoch = math.ceil(num_batches / accum)
    last_group_start = num_batches - (num_batches % accum or accum)
    prog = EpochProgress(**vars(start)) if start is not None else EpochProgress()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.tensor(prog.loss_sum, dtype=acc_dtype, device=device)
    group_loss = torch.zeros((), dtype=acc_dtype, device=device)
    group_samples, samples_before, stopped = 0, prog.samples, False
    # A skipped step must leave no trace: its forward passes already updated the BatchNorm
    # statistics (with NaN, when the activations were), so "skip" restores them.
    buffers = list(model.buffers()) if guard.policy == "skip" else []
    saved_buffers = [b.clone() for b in buffers]
    start_time = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (inputs, target) in enumerate(_progress(loader, opts.progress, f"train {epoch}"), prog.batches):
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        if opts.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        group = accum if batch_idx < last_group_start else num_batches - last_group_start
        if buffers and batch_idx % accum == 0:
            torch._foreach_copy_(saved_buffers, buffers)
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        loss = _forward_backward(model, inputs, target, loss_fn, opts, device, group, need_update)
        group_loss += loss.to(acc_dtype) * inputs.shape[0]
        group_samples += inputs.shape[0]
        prog.samples += inputs.shape[0]
        if not need_update:
            continue
        bad_loss, bad_grad, stopped = _check_step(model, group_loss, opts, dist, stop_requested)
        done = prog.steps + prog.skipped + 1
        if bad_loss or bad_grad:
            _skip_nonfinite(epoch, done, updates_per_epoch, group_loss, bad_loss, bad_grad, guard, dist)
            optimizer.zero_grad(set_to_none=True)
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)
            prog.skipped += 1
            prog.nonfinite += 1
        else:
            guard.consecutive = 0
            _finish_update(model, optimizer, opts, averages, prog)
        if bad_loss == 0:  # this rank's losses are finite: they count in the epoch mean
            loss_sum += group_loss
            prog.loss_samples += group_samples
        group_loss.zero_()
        group_samples = 0
        prog.batches = batch_idx + 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=epoch * updates_per_epoch + done)
        if dist.is_main and (done == 1 or done % opts.run.log_interval == 0 or done == updates_per_epoch):
            _log.info("train %d [%d/%d] loss %.4f lr %.3e", epoch, done, updates_per_epoch,
                      loss.item(), _mean_lr(optimizer), extra={"track": "train_step"})  # trackers.py
        if stopped and prog.batches < num_batches:
            break
    prog.loss_sum = loss_sum.item()
    stats = _epoch_stats(loss_sum, prog, prog.samples - samples_before, time.perf_counter() - start_time,
                         optimizer, dist)
    stats.update(stopped=stopped and prog.batches < num_batches, progress=prog)
    return stats


def _check_step(model: nn.Module, group_loss: torch.Tensor, opts: TrainOptions, dist: DistInfo,
                stop_requested: Callable[[], bool] | None) -> tuple[int, int, bool]:
    """(this rank's loss non-finite, gradients non-finite, stop agreed) for the step about to
    be taken, with one host sync. Under DDP the loss and stop flags are summed over ranks so
    every rank takes the same decision (gradients are already identical after DDP's
    all-reduce). With an fp16 scaler, inf gradients are its business (it skips the step)."""
    flags = [(~torch.isfinite(group_loss)).to(torch.float64)]
    grads = [p.grad for p in model.parameters() if p.grad is not None] if opts.amp.scaler is None else []
    # FSDP: each rank checks its own gradient shards (no gather); the verdict is summed below.
    sharded = any(hasattr(g, "to_local") for g in grads)
    grads = [local_shard(g) for g in grads]
    # The 2-norm per tensor is a fused, vectorised read of the gradients (the inf-norm is 20x
    # slower on CPU); it is non-finite when an element is, or when a huge finite gradient
    # overflows it, which the exact check below tells apart (only then, so rarely).
    flags += [(~torch.isfinite(n)).any().to(torch.float64) for n in _norms_by_group(grads, 2.0)]
    stop = bool(stop_requested()) if stop_requested is not None else False
    if not dist.distributed:
        values = torch.stack(flags).tolist()  # the one host sync
        return int(values[0]), int(sum(values[1:]) > 0 and _nonfinite_exactly(grads)), stop
    import torch.distributed as torch_dist

    comm_device = dist.device if dist.device.type == "cuda" else torch.device("cpu")
    mine = flags[0].to(comm_device).reshape(1)
    agreed = torch.stack([flags[0], sum(flags[1:], torch.zeros((), dtype=torch.float64, device=flags[0].device)),
                          torch.tensor(float(stop), dtype=torch.float64, device=flags[0].device)]).to(comm_device)
    torch_dist.all_reduce(agreed)  # [loss non-finite on some rank, gradients (same on all ranks), stop]
    local_loss, any_loss, grad, any_stop = torch.cat([mine, agreed]).tolist()
    # Gradients are identical on every rank after DDP's all-reduce: the exact check agrees too.
    # Under FSDP each rank holds other shards: the exact verdicts are summed (rare path).
    exact = grad > 0 and _nonfinite_exactly(grads)
    if grad > 0 and sharded:
        exact = all_reduce_sum([float(exact)], dist)[0] > 0
    return (1 if local_loss else 2 if any_loss else 0), int(exact), any_stop > 0


def _norms_by_group(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Per (device, dtype) group, the ``order``-norms of its tensors, stacked."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return [torch.stack(torch._foreach_norm(g, order)) for g in groups.values()]


def _nonfinite_exactly(grads: list[torch.Tensor]) -> bool:
    """True when an element is NaN/inf: max |g| cannot overflow (the slow path, see above)."""
    return not all(bool(torch.isfinite(n).all()) for n in _norms_by_group(grads, math.inf))


def _skip_nonfinite(epoch: int, step: int, steps: int, group_loss: torch.Tensor, bad_loss: int, bad_grad: int,
                    guard: NonfiniteGuard, dist: DistInfo) -> None:
    """Account for a non-finite step; raise :class:`TrainingDiverged` when the policy says stop."""
    if bad_loss == 1:
        what = f"the loss is {group_loss.item():g}"
    elif bad_loss:
        what = "the loss is not finite on another process"
    else:
        what = "the gradients hold non-finite values"
    guard.consecutive += 1
    guard.total += 1
    where = f"epoch {epoch}, step {step}/{steps}"
    if guard.policy == "stop":
        raise TrainingDiverged(f"training diverged at {where}: {what} (--on-nonfinite stop)")
    if guard.consecutive >= guard.max_consecutive:
        raise TrainingDiverged(f"training diverged at {where}: {what}; {guard.consecutive} non-finite steps in a "
                               f"row (--on-nonfinite skip, --max-nonfinite-skips {guard.max_consecutive})")
    if dist.is_main:
        _log.warning("%s: %s: step skipped, EMA not updated (%d in a row, %d in all; --on-nonfinite skip)",
                     where, what, guard.consecutive, guard.total)


def _finish_update(model: nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions,
                   averages: Averages | None, prog: EpochProgress) -> None:
    """One optimizer step, then the averages (skipped with the step when fp16 overflowed)."""
    stepped = optimizer_step(model, optimizer, opts)
    optimizer.zero_grad(set_to_none=True)
    if not stepped:
        prog.skipped += 1
        _log.debug("fp16 gradient scaler skipped a step (inf/nan gradients); EMA not updated")
        return
    prog.steps += 1
    if averages is not None and averages.update(model):
        prog.ema += 1


def _epoch_stats(loss_sum: torch.Tensor, prog: EpochProgress, samples_now: int, seconds: float,
                 optimizer: torch.optim.Optimizer, dist: DistInfo) -> dict[str, Any]:
    total_loss, loss_samples, total_samples, samples_now = all_reduce_sum(
        [loss_sum.item(), float(prog.loss_samples), float(prog.samples), float(samples_now)], dist)
    return {
        "loss": total_loss / loss_samples if loss_samples else float("nan"),
        "optimizer_steps": prog.steps,
        "ema_updates": prog.ema,
        "skipped_steps": prog.skipped,
        "nonfinite_steps": prog.nonfinite,
        "samples": int(total_samples),
        "seconds": seconds,
        "img_per_sec": samples_now / seconds if seconds > 0 else float("nan"),
        "lr": _mean_lr(optimizer),
    }


@dataclass
class EvalTarget:
    """One set of weights for :func:`evaluate_many`: ``module`` lives on ``device`` (the CPU
    for a ``--model-ema-force-cpu`` EMA) and gets batches cast to ``input_dtype`` when given
    (a bfloat16 EMA evaluated without autocast); ``label`` is the log suffix, e.g. ``" (EMA)"``."""

    module: nn.Module
    device: torch.device
    input_dtype: torch.dtype | None = None
    label: str = ""


@torch.no_grad()
def evaluate_many(
    targets: Sequence[EvalTarget],
    loader: Iterable,
    loss_fn: Callable,
    *,
    amp: AmpSettings | None = None,
    channels_last: bool = False,
    dist: DistInfo = DistInfo(),
    progress: bool = False,
) -> list[dict[str, float]]:
    """Loss, top-1, top-5 (percent) and sample count of every target over one pass of ``loader``.

    Each batch is loaded (decoded, transformed) once and fed to every target in turn, so
    the raw weights and k EMAs cost one pass over the data instead of k + 1; every
    target's numbers are those of a pass of its own (same batches, same sums in the same
    order). A batch is moved to each distinct (device, dtype) once. Every rank evaluates
    its disjoint share and the sums of all targets are all-reduced together, so
    ``samples`` equals the dataset size and the metrics are exact.
    """
    amp = amp or AmpSettings()
    modes = [t.module.training for t in targets]
    for t in targets:
        t.module.eval()
    sums = [[0.0, 0.0, 0.0] for _ in targets]  # loss * n, top-1 hits, top-5 hits
    count = 0.0
    label = f"eval{targets[0].label}" if len(targets) == 1 else f"eval ({len(targets)} weight sets)"
    try:
        for inputs, target in _progress(loader, progress, label):
            moved: dict[tuple[torch.device, torch.dtype | None], tuple[torch.Tensor, torch.Tensor]] = {}
            for t, acc in zip(targets, sums):
                key = (t.device, t.input_dtype)
                if key not in moved:
                    x = inputs.to(t.device, dtype=t.input_dtype, non_blocking=True)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    moved[key] = x, target.to(t.device, non_blocking=True)
                x, y = moved[key]
                with amp.autocast(t.device):
                    output = t.module(x)
                output = output.float()
                acc[0] += loss_fn(output, y).item() * inputs.shape[0]
                topk = output.topk(min(5, output.shape[-1]), dim=-1).indices
                hits = topk.eq(y.unsqueeze(-1))
                acc[1] += hits[:, 0].sum().item()
                acc[2] += hits.any(dim=-1).sum().item()
            count += inputs.shape[0]
    finally:
        for t, mode in zip(targets, modes):
            t.module.train(mode)
    totals = all_reduce_sum([v for acc in sums for v in acc] + [count], dist)
    n = max(totals[-1], 1.0)
    results = []
    for i, t in enumerate(targets):
        loss_sum, correct1, correct5 = totals[3 * i:3 * i + 3]
        metrics = {"loss": loss_sum / n, "top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n,
                   "samples": int(totals[-1])}
        if dist.is_main:
            _log.info("eval%s: loss %.4f top1 %.3f top5 %.3f (%d samples)", t.label, metrics["loss"],
                      metrics["top1"], metrics["top5"], metrics["samples"])
        results.append(metrics)
    return results


def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable,
    *,
    device: torch.device,
    amp: AmpSettings | None = None,
    channels_last: bool = False,
    dist: DistInfo = DistInfo(),
    log_suffix: str = "",
    progress: bool = False,
    input_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss, top-1, top-5 (percent) and sample count of one ``model`` over the whole loader:
    :func:`evaluate_many` with a single :class:`EvalTarget`."""
    return evaluate_many([EvalTarget(model, device, input_dtype, log_suffix)], loader, loss_fn, amp=amp,
                         channels_last=channels_last, dist=dist, progress=progress)[0]
