"""Recompute BatchNorm running statistics for a set of (EMA) weights.

An EMA of the weights is not matched by an EMA of the BatchNorm statistics: the running
mean/var averaged alongside were measured under *other* weights. When the EMA lags (short
runs, high decay), re-estimating the statistics under the EMA weights helps. This is
``torch.optim.swa_utils.update_bn``'s method (a cumulative average over N batches, via
``momentum=None``), restricted to the BatchNorm buffers: parameters are never written,
other layers stay in eval mode (no dropout noise), and under DDP the per-rank statistics
are pooled exactly.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recalibrate_bn", "has_batchnorm", "bn_layers", "bn_buffers"]

_log = logging.getLogger(__name__)


def bn_layers(module: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``module`` that tracks running statistics, by qualified name
    (``''`` for ``module`` itself): ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their
    subclasses (timm's ``BatchNormAct2d``). The one walker over BatchNorm statistics: BN
    recalibration, its restore, and ``distribute_bn`` all see these layers."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The live running-statistics buffers (``running_mean``, ``running_var``,
    ``num_batches_tracked``) of :func:`bn_layers`, by qualified buffer name."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in bn_layers(module).items():
        for buf_name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(layer, buf_name, None)
            if buf is not None:
                out[f"{name}.{buf_name}" if name else buf_name] = buf
    return out


def has_batchnorm(module: nn.Module) -> bool:
    """True if ``module`` contains a BatchNorm layer that tracks running statistics."""
    return bool(bn_layers(module))


@torch.no_grad()
def recalibrate_bn(module: nn.Module, loader: Iterable, num_batches: int, device: torch.device, *,
                   channels_last: bool = False, autocast: Callable[[], contextlib.AbstractContextManager] | None = None
                   ) -> int:
    """Re-estimate every BatchNorm's running mean/var of ``module`` over ``num_batches``.

    Args:
        module: the bare module whose statistics are replaced (e.g. ``ema.module``).
        loader: yields ``(images, targets)`` batches (the training loader).
        num_batches: how many batches to average over (per rank under DDP).
        device: where ``module`` lives; batches are moved there.
        channels_last: convert batches to channels_last memory format.
        autocast: optional context-manager factory used around the forward passes.

    Returns the number of batches used. Only BatchNorm buffers change; the module's
    training flags are restored afterwards.
    """
    bns = list(bn_layers(module).values())
    if not bns or num_batches <= 0:
        return 0
    modes = {m: m.training for m in module.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    module.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    used = 0
    try:
        for images, _ in loader:
            if used >= num_batches:
                break
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                module(images)
            used += 1
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    _pool_across_ranks(bns)
    _log.info("recalibrated %d BatchNorm layers over %d batches", len(bns), used)
    return used


def _pool_across_ranks(bns: list[_BatchNorm]) -> None:
    """Pool per-rank statistics: mean of means, and var = E[var + mean^2] - mean^2
    (the law of total variance for equal sample counts per rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for bn in bns:
        mean, var = bn.running_mean, bn.running_var
        stacked = torch.stack([mean, var + mean * mean]).float()
        dist.all_reduce(stacked)
        stacked /= world
        mean.copy_(stacked[0])
        var.copy_(stacked[1] - stacked[0] * stacked[0])
