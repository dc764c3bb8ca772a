"""One epoch's evaluation: the raw weights and every average on the validation data (one pass
for all of them, or under FSDP each EMA swapped into the sharded model), the value that picks
``model_best``, and the epoch's ``summary.csv`` row and log line."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from .averages import recalibrated_bn
from .distributed import distribute_bn
from .engine import EvalTarget, evaluate_many
from .fsdp import reshard
from .trainer import Trainer

__all__ = ["evaluate_raw_and_emas", "best_ema_index", "chosen_metrics", "epoch_metrics", "log_epoch", "ema_autocast"]

_log = logging.getLogger(__name__)


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


def ema_autocast(tr: Trainer) -> Callable[[], contextlib.AbstractContextManager] | None:
    """Autocast factory for forward passes of the EMA outside ``evaluate`` (BN recalibration):
    the AMP settings, or the EMA's own dtype for a low-precision EMA without AMP."""
    device = tr.averages.device
    if tr.amp.enabled:
        return lambda: tr.amp.autocast(device)
    dtype = _ema_input_dtype(tr)
    return None if dtype is None else lambda: torch.autocast(device_type=device.type, dtype=dtype)


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
    targets, recal, input_dtype = [EvalTarget(tr.model_without_ddp, tr.dist.device)], [], _ema_input_dtype(tr)
    with contextlib.ExitStack() as stack:
        for average in tr.averages.targets():
            distribute_bn(average.module, tr.dist, run.dist_bn)
            recal += _recalibrated(tr, stack, average.module, tr.averages.device)
            targets.append(EvalTarget(average.module, tr.averages.device, input_dtype, f" ({average.name.upper()})"))
        results = evaluate_many(targets, tr.eval_loader, tr.eval_loss_fn, amp=tr.amp, channels_last=channels_last,
                                dist=tr.dist, progress=tr.dist.is_main and run.progress)
    return results[0], results[1:], recal


def _recalibrated(tr: Trainer, stack: contextlib.ExitStack, module: torch.nn.Module, device: torch.device
                  ) -> list[dict[str, torch.Tensor]]:
    """``--model-ema-bn-recal``: ``module`` (an EMA's weights) carries BatchNorm statistics
    re-estimated for its own weights until ``stack`` closes (:func:`.averages.recalibrated_bn`);
    ``[their copies]``, or ``[]`` without the flag."""
    if tr.averages.bn_recal <= 0:
        return []
    return [stack.enter_context(recalibrated_bn(module, tr.train_loader, tr.averages.bn_recal, device,
                                                channels_last=tr.settings.model.channels_last,
                                                autocast=ema_autocast(tr)))]


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
            recal += _recalibrated(tr, stack, swapped, tr.dist.device)
            emas += evaluate_many([EvalTarget(swapped, tr.dist.device, None, f" ({average.name.upper()})")],
                                  tr.eval_loader, tr.eval_loss_fn, **kwargs)
    return raw, emas, recal


def best_ema_index(emas: list[dict[str, float]], eval_metric: str) -> int | None:
    """Index of the best EMA by ``eval_metric`` (lowest loss, else highest); ties -> the first."""
    if not emas:
        return None
    sign = 1.0 if eval_metric == "loss" else -1.0
    return min(range(len(emas)), key=lambda i: (sign * emas[i][eval_metric], i))


def chosen_metrics(raw: dict[str, float], emas: list[dict[str, float]], eval_metric: str,
                   select: str) -> dict[str, float]:
    """The metrics of the weights that pick ``model_best`` (timm's ``eval_*``): the raw weights'
    without EMA, else the first EMA's (``--model-ema-select first``) or the best EMA's (``best``)."""
    if not emas:
        return raw
    return emas[best_ema_index(emas, eval_metric) if select == "best" else 0]


def epoch_metrics(tr: Trainer, epoch: int, train: dict[str, float], raw: dict[str, float],
                   emas: list[dict[str, float]]) -> dict[str, Any]:
    # eval_* keep timm's meaning: the weights that pick model_best (the EMA when there is one)
    chosen = chosen_metrics(raw, emas, tr.settings.run.eval_metric, tr.settings.ema.select)
    row: dict[str, Any] = {"epoch": epoch, "train_loss": train["loss"], "eval_loss": chosen["loss"],
                           "eval_top1": chosen["top1"], "eval_top5": chosen["top5"], "raw_eval_loss": raw["loss"],
                           "raw_eval_top1": raw["top1"], "raw_eval_top5": raw["top5"], "lr": train["lr"],
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


def log_epoch(tr: Trainer, epoch: int, m: dict[str, Any], seconds: float, img_per_sec: float) -> None:
    names = [t.name for t in tr.averages.targets()]
    ema = "" if m["ema_eval_top1"] is None else (
        f" | EMA top1 {m['ema_eval_top1']:.2f} top5 {m['ema_eval_top5']:.2f} loss {m['ema_eval_loss']:.4f}")
    for name in names[1:]:
        ema += f" | {name.upper()} top1 {m[f'{name}_eval_top1']:.2f}"
    if len(names) > 1:
        ema += f" | best of {len(names)} EMAs: {m['ema_best']}"
    _log.info("epoch %d/%d: train loss %.4f | raw top1 %.2f top5 %.2f loss %.4f%s | lr %.4g | %.1fs, %.0f img/s",
              epoch, tr.resolved.epochs - 1, m["train_loss"], m["raw_eval_top1"], m["raw_eval_top5"],
              m["raw_eval_loss"],
              ema, m["lr"], seconds, img_per_sec, extra={"track": "epoch", "metrics": m})  # trackers.py
