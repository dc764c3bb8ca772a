"""The two loops: ``train_one_epoch`` (optimizer steps + EMA updates) and ``evaluate``.

They take explicit objects, never the argparse namespace. ``evaluate_many`` scores any
modules on one pass over the data, so the raw model and every EMA are validated on the same
decoded batches; ``evaluate`` is its one-module form (torchvision's ``log_suffix``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import DistInfo, all_reduce_sum

__all__ = ["AmpSettings", "TrainOptions", "train_one_epoch", "evaluate", "evaluate_many", "EvalTarget",
           "optimizer_step"]

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
    """Per-step settings of :func:`train_one_epoch`."""

    grad_accum_steps: int = 1
    clip_grad: float | None = None
    clip_mode: str = "norm"
    channels_last: bool = False
    log_interval: int = 50
    progress: bool = False
    amp: AmpSettings = field(default_factory=AmpSettings)


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
    if scaler is not None and opts.clip_grad is not None:
        scaler.unscale_(optimizer)
    if opts.clip_grad is not None:
        params = model_parameters(model, exclude_head="agc" in opts.clip_mode)
        dispatch_clip_grad(params, value=opts.clip_grad, mode=opts.clip_mode)
    if scaler is None:
        optimizer.step()
        return True
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # GradScaler.update() lowers the scale exactly when this step found inf/nan gradients
    # and optimizer.step() was skipped (torch.amp.GradScaler docs, "skipping iterations").
    return scaler.get_scale() >= scale_before


def _forward_backward(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                      loss_fn: Callable, opts: TrainOptions, device: torch.device,
                      accum: int, sync: bool) -> torch.Tensor:
    sync_ctx = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
    with sync_ctx:
        with opts.amp.autocast(device):
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
    ema: Any | None = None,
    lr_scheduler: Any | None = None,
    mixup_fn: Callable | None = None,
    posthoc: Any | None = None,
) -> dict[str, float]:
    """Train one epoch; update ``ema`` (a ``ModelEMA`` or ``MultiEMA``) and ``posthoc`` (a
    post-hoc EMA tracker, anything with ``update(model)``) after every optimizer step that
    was taken.

    With ``opts.grad_accum_steps = k`` an optimizer step (and an EMA update) happens once
    per k micro-batches and at the end of the epoch. Returns the mean training ``loss``
    over all ranks, ``optimizer_steps``, ``ema_updates``, ``skipped_steps``, ``samples``
    (all ranks), ``seconds``, ``img_per_sec`` and ``lr``.
    """
    model.train()
    num_batches = len(loader)  # type: ignore[arg-type]
    accum = max(1, opts.grad_accum_steps)
    updates_per_epoch = math.ceil(num_batches / accum)
    last_group_start = num_batches - (num_batches % accum or accum)
    stats = {"steps": 0, "ema": 0, "skipped": 0}
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    samples = 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch_idx, (inputs, target) in enumerate(_progress(loader, opts.progress, f"train {epoch}")):
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if mixup_fn is not None:
            inputs, target = mixup_fn(inputs, target)
        if opts.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        group = accum if batch_idx < last_group_start else num_batches - last_group_start
        need_update = batch_idx == num_batches - 1 or (batch_idx + 1) % accum == 0
        loss = _forward_backward(model, inputs, target, loss_fn, opts, device, group, need_update)
        loss_sum += loss.to(loss_sum.dtype) * inputs.shape[0]
        samples += inputs.shape[0]
        if not need_update:
            continue
        _finish_update(model, optimizer, opts, ema, stats, posthoc)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=epoch * updates_per_epoch + stats["steps"] + stats["skipped"])
        done = stats["steps"] + stats["skipped"]
        if dist.is_main and (done == 1 or done % opts.log_interval == 0 or done == updates_per_epoch):
            _log.info("train %d [%d/%d] loss %.4f lr %.3e", epoch, done, updates_per_epoch,
                      loss.item(), _mean_lr(optimizer))
    return _epoch_stats(loss_sum, samples, stats, time.perf_counter() - start, optimizer, dist)


def _finish_update(model: nn.Module, optimizer: torch.optim.Optimizer, opts: TrainOptions,
                   ema: Any | None, stats: dict[str, int], posthoc: Any | None = None) -> None:
    """One optimizer step, then the averages (skipped with the step when fp16 overflowed)."""
    stepped = optimizer_step(model, optimizer, opts)
    optimizer.zero_grad(set_to_none=True)
    if not stepped:
        stats["skipped"] += 1
        _log.debug("fp16 gradient scaler skipped a step (inf/nan gradients); EMA not updated")
        return
    stats["steps"] += 1
    if ema is not None:
        ema.update(model)
        stats["ema"] += 1
    if posthoc is not None:
        posthoc.update(model)


def _epoch_stats(loss_sum: torch.Tensor, samples: int, stats: dict[str, int], seconds: float,
                 optimizer: torch.optim.Optimizer, dist: DistInfo) -> dict[str, float]:
    total_loss, total_samples = all_reduce_sum([loss_sum.item(), float(samples)], dist)
    return {
        "loss": total_loss / max(total_samples, 1.0),
        "optimizer_steps": stats["steps"],
        "ema_updates": stats["ema"],
        "skipped_steps": stats["skipped"],
        "samples": int(total_samples),
        "seconds": seconds,
        "img_per_sec": total_samples / seconds if seconds > 0 else float("nan"),
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
