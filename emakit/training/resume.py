"""Checks that make ``--resume`` faithful, run before anything is written.

A resumed checkpoint may come from emakit, from timm's ``train.py`` or from a hand-edited
file. Everything that would fail (or silently go wrong) only after training started is
checked here first and reported as one ``UsageError`` line naming the problem and the fix:

- malformed entries: ``state_dict_ema*`` not a tensor dict of the model's keys and shapes,
  ``ema*`` metadata without a non-negative integer ``num_updates``, an ``optimizer`` that is
  not a ``{"state", "param_groups"}`` dict;
- an optimizer state that does not fit this run's optimizer (another ``--opt``, another
  ``--layer-decay``): torch would load it and fail with a KeyError at the first step;
- ``module.`` / ``_orig_mod.`` prefixes (timm checkpoints saved from a DDP/compiled model)
  are stripped (:func:`emakit.checkpoint.strip_prefixes`), as validate.py does.

It also names what a resume changes without failing: another batch size or
``--grad-accum-steps`` (lr, steps per epoch, the EMA's time constant).
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from emakit.checkpoint import CheckpointError, check_state_dict_compat, strip_prefixes

from . import UsageError

__all__ = ["checkpoint_arg", "ema_entry_keys", "normalize_resume_checkpoint", "check_ema_entry",
           "check_optimizer_state", "steps_done", "warn_batch_change"]

_log = logging.getLogger(__name__)

# Per-parameter optimizer state that has the parameter's shape (torch/timm optimizers).
_ELEMENTWISE_STATE = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
                      "sum", "exp_inf", "grad_avg", "ax", "prev", "mu_product"}
# Group options that every group carries whatever the optimizer (set by timm / the LR scheduler).
_GROUP_BOOKKEEPING = {"params", "lr", "initial_lr", "weight_decay", "lr_scale", "param_names"}


def checkpoint_arg(ckpt: dict[str, Any], name: str, default: Any = None) -> Any:
    """A training flag recorded in the checkpoint: emakit's ``args`` dict or timm's Namespace."""
    args = ckpt.get("args")
    if isinstance(args, dict):
        return args.get(name, default)
    if isinstance(args, argparse.Namespace):
        return getattr(args, name, default)
    return default


def ema_entry_keys(ckpt: dict[str, Any]) -> list[tuple[str, str]]:
    """(weights key, meta key) of every EMA the checkpoint holds: ``state_dict_ema`` / ``ema``,
    then ``state_dict_ema_<i>`` / ``ema_<i>``."""
    keys = [("state_dict_ema", "ema")] if ckpt.get("state_dict_ema") is not None else []
    extra = sorted(int(k[len("state_dict_ema_"):]) for k in ckpt
                   if k.startswith("state_dict_ema_") and k[len("state_dict_ema_"):].isdigit())
    return keys + [(f"state_dict_ema_{i}", f"ema_{i}") for i in extra]


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def normalize_resume_checkpoint(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """Strip wrapper prefixes from every weights entry and check the shape of the EMA and
    optimizer entries (types, required keys); malformed -> ``UsageError``. Returns ``ckpt``."""
    for weights_key in ["state_dict"] + [k for k, _ in ema_entry_keys(ckpt)]:
        value = ckpt.get(weights_key)
        if value is None:
            continue
        if not _is_tensor_dict(value):
            raise UsageError(f"--resume {path}: {weights_key} is not a state dict (name -> tensor) but "
                             f"{type(value).__name__}; the checkpoint is damaged, resume an intact one "
                             "(e.g. a checkpoint-<epoch>.pth.tar)")
        try:
            ckpt[weights_key] = strip_prefixes(value)
        except CheckpointError as e:
            raise UsageError(f"--resume {path}: {weights_key}: {' '.join(str(e).split())}") from None
    for weights_key, meta_key in ema_entry_keys(ckpt):
        _check_ema_meta(ckpt.get(meta_key), meta_key, path)
    _check_optimizer_entry(ckpt.get("optimizer"), path)
    return ckpt


def _check_ema_meta(meta: Any, key: str, path: str) -> None:
    if meta is None:
        return
    count = meta.get("num_updates") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or isinstance(count, bool) or not isinstance(count, int) or count < 0 \
            or not isinstance(meta.get("config", {}), dict):
        raise UsageError(f"--resume {path}: {key} is malformed (expected {{'num_updates': int >= 0, 'config': "
                         f"dict}}, found {type(meta).__name__} {str(meta)[:80]!r}); the checkpoint is damaged, "
                         "resume an intact one")


def _check_optimizer_entry(opt: Any, path: str) -> None:
    if opt is None:
        return
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    ok = isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list) \
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    if not ok:
        raise UsageError(f"--resume {path}: its optimizer entry is malformed (expected a torch optimizer "
                         f"state_dict with 'state' and 'param_groups', found {type(opt).__name__}); pass "
                         "--no-resume-opt to start a fresh optimizer state")


def check_ema_entry(module: torch.nn.Module, state_dict_ema: dict[str, Any], key: str, path: str) -> None:
    """The EMA weights must have exactly the model's keys and shapes."""
    try:
        check_state_dict_compat(module, state_dict_ema)
    except CheckpointError as e:
        raise UsageError(f"--resume {path}: {key}: {' '.join(str(e).split())}") from None


def _options(group: dict[str, Any]) -> set[str]:
    return set(group) - _GROUP_BOOKKEEPING


def _optimizer_mismatch(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``saved`` does not fit ``optimizer`` (None when it does)."""
    now = optimizer.param_groups
    if len(saved["param_groups"]) != len(now):
        return f"{len(saved['param_groups'])} parameter groups in the checkpoint, {len(now)} now"
    for i, (old, new) in enumerate(zip(saved["param_groups"], now)):
        if len(old["params"]) != len(new["params"]):
            return f"parameter group {i} has {len(old['params'])} parameters in the checkpoint, {len(new['params'])} now"
        # Another torch may add options (torch fills in defaults), so only two option sets
        # of which neither contains the other mean another optimizer.
        if not (_options(old) <= _options(new) or _options(new) <= _options(old)):
            return (f"the checkpoint's optimizer options ({', '.join(sorted(_options(old)))}) differ from this "
                    f"optimizer's ({', '.join(sorted(_options(new)))})")
    params = {pid: p for old, new in zip(saved["param_groups"], now) for pid, p in zip(old["params"], new["params"])}
    for pid, state in saved["state"].items():
        if pid not in params or not isinstance(state, dict):
            return f"state for parameter {pid!r}, which no group lists"
        for name, value in state.items():
            if name in _ELEMENTWISE_STATE and isinstance(value, torch.Tensor) and value.shape != params[pid].shape:
                return (f"{name} of parameter {pid} has shape {list(value.shape)}, the parameter "
                        f"{list(params[pid].shape)}")
    return None


def check_optimizer_state(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                          path: str) -> None:
    """``UsageError`` naming the mismatch (``--opt``, ``--layer-decay``, structure) and the fix
    when the checkpoint's optimizer state does not fit this run's optimizer."""
    saved = ckpt.get("optimizer")
    if saved is None:
        return
    changed = []
    for flag, name in (("--opt", "opt"), ("--layer-decay", "layer_decay")):
        before, now = checkpoint_arg(ckpt, name), getattr(args, name, None)
        if name == "opt" and before is not None:
            before, now = str(before).lower(), str(now).lower()
        if before != now and (before is not None or now is not None) and ckpt.get("args") is not None:
            changed.append(f"{flag} {before} (checkpoint) vs {now} (now)")
    reason = "; ".join(changed) or _optimizer_mismatch(saved, optimizer)
    if reason:
        keep = " ".join(f"{flag} {checkpoint_arg(ckpt, name)}" for flag, name in
                        (("--opt", "opt"), ("--layer-decay", "layer_decay")) if checkpoint_arg(ckpt, name) is not None)
        hint = f"pass {keep} to continue its optimizer, or " if keep else "pass "
        raise UsageError(f"--resume {path}: the checkpoint's optimizer state does not fit this run's optimizer "
                         f"({reason}); {hint}--no-resume-opt to start a fresh optimizer state")


def steps_done(epoch: int, updates_per_epoch: int) -> int:
    """Optimizer steps a run has taken after finishing ``epoch`` (0-based), counted as
    timm's train.py counts them: ``(epoch + 1) * updates_per_epoch``."""
    return (int(epoch) + 1) * int(updates_per_epoch)


def warn_batch_change(ckpt: dict[str, Any], args: argparse.Namespace, path: str, *, updates_per_epoch: int,
                      ema_in_images: bool) -> str | None:
    """Warn when ``-b`` or ``--grad-accum-steps`` differs from the checkpoint's run, naming
    what changes: the lr, the steps per epoch and the EMA time constant (unless it is a
    half-life in images). Returns the warning, None when neither flag changed."""
    old_b, old_accum = checkpoint_arg(ckpt, "batch_size"), checkpoint_arg(ckpt, "grad_accum_steps", 1)
    if not isinstance(old_b, int) or old_b <= 0:
        return None
    old_accum = old_accum if isinstance(old_accum, int) and old_accum > 0 else 1
    changes = [f"{flag} {old} -> {now}" for flag, old, now in
               (("-b", old_b, args.batch_size), ("--grad-accum-steps", old_accum, args.grad_accum_steps)) if old != now]
    if not changes:
        return None
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    old_steps = metrics.get("optimizer_steps")
    steps = (f"steps per epoch {old_steps} -> {updates_per_epoch}" if isinstance(old_steps, int)
             else f"{updates_per_epoch} steps per epoch now")
    old_lr, lr = checkpoint_arg(ckpt, "lr"), float(args.lr)
    same_global = old_b * old_accum == args.batch_size * args.grad_accum_steps
    lr_text = (f"lr {old_lr:.4g} -> {lr:.4g}" if isinstance(old_lr, (int, float)) and old_lr != lr else
               f"lr stays {lr:.4g} ({'same global batch' if same_global else 'an explicit --lr is not rescaled'})")
    effects = [lr_text, steps]
    if getattr(args, "model_ema", False):
        ratio = (args.batch_size * args.grad_accum_steps) / (old_b * old_accum)
        effects.append("the EMA half-life (in images or epochs) stays the same" if ema_in_images else
                       f"the EMA time constant changes: each EMA step now averages {ratio:g}x the images (give "
                       "--model-ema-half-life in images, e.g. '1.2Mimg', to keep it fixed)")
    message = f"--resume {path}: {', '.join(changes)}: {'; '.join(effects)}"
    _log.warning("%s", message)
    return message
