"""``--resume``: the checks that make it faithful, run before anything is written, then the
load (weights, averages, optimizer, scaler) and the LR schedule's position.

A resumed checkpoint may come from emakit, from timm's ``train.py`` or from a hand-edited
file. Everything that would fail (or silently go wrong) only after training started is
checked here first and reported as one ``UsageError`` line naming the problem and the fix:

- malformed entries: ``state_dict_ema*`` not a tensor dict of the model's keys and shapes,
  ``ema*`` metadata without a non-negative integer ``num_updates``, an ``optimizer`` that is
  not a ``{"state", "param_groups"}`` dict;
- an optimizer state that does not fit this run's optimizer (another ``--opt``, another
  ``--layer-decay``): torch would load it and fail with a KeyError at the first step;
- non-finite values: a NaN or an infinity in the weights, an EMA, the post-hoc profiles or
  the optimizer state (a diverged or damaged file; training from it would diverge again);
- ``module.`` / ``_orig_mod.`` prefixes (timm checkpoints saved from a DDP/compiled model)
  are stripped (:func:`emakit.checkpoint.strip_prefixes`), as validate.py does.

It also names what a resume changes without failing: another batch size or
``--grad-accum-steps`` (lr, steps per epoch, the EMA's time constant).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emakit.checkpoint import (CheckpointError, describe_nonfinite, load_checkpoint, load_state_dict_strict,
                               nonfinite_names, previous_intact_checkpoint, strip_prefixes)
from emakit.ema import is_sharded

from . import UsageError, one_line
from .averages import Averages
from .dcp import join_posthoc_profiles, load_dcp, names_dcp_folder, read_dcp_meta, resolve_dcp_folder
from .engine import AmpSettings, EpochProgress
from .fsdp import load_full_model_state, load_full_optimizer_state, load_sharded_optimizer_state
from .settings import Resolved, TrainSettings
from .state import (ARCH, ARGS, EPOCH, METRICS, MODEL, OPTIMIZER, POSTHOC, POSTHOC_PROFILES, SCALER, SCHEDULER,
                    TRAIN_POSITION, TrainPosition, checkpoint_arg, checkpoint_is_emakit, ema_entry_keys,
                    sharded_templates)

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler

__all__ = ["ResumeSource", "read_resume", "restore", "check_resume_folder", "load_optimizer_state", "position_scheduler"]

_log = logging.getLogger(__name__)

# Per-parameter optimizer state that has the parameter's shape (torch/timm optimizers).
_ELEMENTWISE_STATE = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
                      "sum", "exp_inf", "grad_avg", "ax", "prev", "mu_product"}
# Group options that every group carries whatever the optimizer (set by timm / the LR scheduler).
_GROUP_BOOKKEEPING = {"params", "lr", "initial_lr", "weight_decay", "lr_scale", "param_names"}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checkpoint's ``optimizer`` entry into ``optimizer`` of ``model``: a DCP folder's
    name-keyed shards, a single file's whole state into a sharded (FSDP2) model, or
    ``optimizer.load_state_dict`` for a plain one. Every path keeps this run's kernel choice
    (``fused`` / ``foreach``): torch would take it from the saved groups, so a checkpoint
    written with the fused kernel would turn it on under ``--no-opt-fused``, or under
    ``--fsdp``, where torch has no kernel for sharded parameters."""
    chosen = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    if _name_keyed(saved):  # from a DCP folder
        load_sharded_optimizer_state(model, optimizer, saved)
    elif is_sharded(model):
        load_full_optimizer_state(model, optimizer, saved)
    else:
        optimizer.load_state_dict(saved)
    for group, keep in zip(optimizer.param_groups, chosen):
        group.update(keep)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _normalize(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """Strip wrapper prefixes from every weights entry and check the shape of the EMA and
    optimizer entries (types, required keys); malformed -> ``UsageError``. Returns ``ckpt``."""
    for weights_key in [MODEL] + [k for k, _ in ema_entry_keys(ckpt)]:
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
            raise UsageError(f"--resume {path}: {weights_key}: {one_line(e)}") from None
    for weights_key, meta_key in ema_entry_keys(ckpt):
        _check_ema_meta(ckpt.get(meta_key), meta_key, path)
    _check_optimizer_entry(ckpt.get(OPTIMIZER), path)
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


def _check_optimizer_state(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, path: str, *,
                          opt: str | None, layer_decay: float | None) -> None:
    """``UsageError`` naming the mismatch (``--opt``, ``--layer-decay``, structure) and the fix
    when the checkpoint's optimizer state does not fit this run's optimizer."""
    saved = ckpt.get(OPTIMIZER)
    if saved is None:
        return
    changed = []
    for flag, name, now in (("--opt", "opt", opt), ("--layer-decay", "layer_decay", layer_decay)):
        before = checkpoint_arg(ckpt, name)
        if name == "opt" and before is not None:
            before, now = str(before).lower(), str(now).lower()
        if before != now and ckpt.get(ARGS) is not None:
            changed.append(f"{flag} {before} (checkpoint) vs {now} (now)")
    reason = "; ".join(changed) or _optimizer_mismatch(saved, optimizer)
    if reason:
        keep = " ".join(f"{flag} {checkpoint_arg(ckpt, name)}" for flag, name in
                        (("--opt", "opt"), ("--layer-decay", "layer_decay")) if checkpoint_arg(ckpt, name) is not None)
        hint = f"pass {keep} to continue its optimizer, or " if keep else "pass "
        raise UsageError(f"--resume {path}: the checkpoint's optimizer state does not fit this run's optimizer "
                         f"({reason}); {hint}--no-resume-opt to start a fresh optimizer state")


def _warn_batch_change(ckpt: dict[str, Any], path: str, settings: TrainSettings, resolved: Resolved,
                       averages: Averages) -> None:
    """Warn when ``-b`` or ``--grad-accum-steps`` differs from the checkpoint's run, naming
    what changes: the lr, the steps per epoch and the EMA time constant (unless it is a
    half-life in images)."""
    batch_size, grad_accum_steps = settings.data.batch_size, settings.optim.grad_accum_steps
    old_b, old_accum = checkpoint_arg(ckpt, "batch_size"), checkpoint_arg(ckpt, "grad_accum_steps", 1)
    if not isinstance(old_b, int) or old_b <= 0:
        return
    old_accum = old_accum if isinstance(old_accum, int) and old_accum > 0 else 1
    changes = [f"{flag} {old} -> {now}" for flag, old, now in
               (("-b", old_b, batch_size), ("--grad-accum-steps", old_accum, grad_accum_steps)) if old != now]
    if not changes:
        return
    metrics = ckpt.get(METRICS) if isinstance(ckpt.get(METRICS), dict) else {}
    old_steps, per_epoch = metrics.get("optimizer_steps"), resolved.updates_per_epoch
    steps = (f"steps per epoch {old_steps} -> {per_epoch}" if isinstance(old_steps, int)
             else f"{per_epoch} steps per epoch now")
    old_lr, lr = checkpoint_arg(ckpt, "lr"), float(resolved.lr)
    same_global = old_b * old_accum == batch_size * grad_accum_steps
    lr_text = (f"lr {old_lr:.4g} -> {lr:.4g}" if isinstance(old_lr, (int, float)) and old_lr != lr else
               f"lr stays {lr:.4g} ({'same global batch' if same_global else 'an explicit --lr is not rescaled'})")
    effects = [lr_text, steps]
    if averages.count > 0:
        ratio = (batch_size * grad_accum_steps) / (old_b * old_accum)
        effects.append("the EMA half-life (in images or epochs) stays the same" if averages.in_images else
                       f"the EMA time constant changes: each EMA step now averages {ratio:g}x the images (give "
                       "--model-ema-half-life in images, e.g. '1.2Mimg', to keep it fixed)")
    _log.warning("--resume %s: %s: %s", path, ", ".join(changes), "; ".join(effects))


# --------------------------------------------------------------------------- the resume flow
@dataclass
class ResumeSource:
    """A ``--resume`` checkpoint read and checked before the model exists: the file's entries
    (a DCP folder's plain ones, its shards read later by :func:`restore`), where a stopped
    epoch continues (``position``), and whether emakit wrote it (run-folder rules)."""

    path: str
    ckpt: dict[str, Any]
    folder: bool
    position: TrainPosition | None
    by_emakit: bool

    @property
    def posthoc_state(self) -> dict[str, Any] | None:
        """The post-hoc tracker's saved state (its snapshot plan), if the checkpoint has one."""
        return self.ckpt.get(POSTHOC)


def read_resume(settings: TrainSettings, world_size: int) -> ResumeSource | None:
    """The ``--resume`` checkpoint of ``settings`` read and checked (training checkpoint of this
    ``--model``, well-formed entries, a mid-epoch position this run can continue), or None
    without ``--resume``. ``UsageError`` for anything that would make the resume unfaithful."""
    path = settings.run.resume
    if settings.run.drop_ema and not path:
        raise UsageError("--drop-ema drops a resumed checkpoint's EMA: it needs --resume PATH")
    if not path:
        return None
    folder = names_dcp_folder(path)
    ckpt = _check_training_checkpoint(_read_folder(path) if folder else _read_file(path), path, settings.model.name)
    position = TrainPosition.read(ckpt, path, world_size=world_size, batch_size=settings.data.batch_size,
                                  grad_accum_steps=settings.optim.grad_accum_steps,
                                  parse_progress=EpochProgress.from_dict)
    return ResumeSource(path, ckpt, folder, position, checkpoint_is_emakit(ckpt))


def restore(src: ResumeSource, settings: TrainSettings, resolved: Resolved, *, model: nn.Module,
            averages: Averages, optimizer: torch.optim.Optimizer, amp: AmpSettings, lr_scheduler: Scheduler) -> int:
    """Load ``src`` into this run's parts and return the epoch to start at; ``src.ckpt`` is
    released afterwards.

    A DCP folder's shards are read in this run's layout first (*collective*). Then everything
    that could fail or silently lose state is checked before anything is loaded: every float
    tensor that will be loaded is finite, the EMA is continued or explicitly dropped
    (``--drop-ema``) and its weights fit the model, the optimizer state fits this optimizer
    (``--opt``, ``--layer-decay``); a changed batch is named in a warning. Then weights,
    averages, optimizer and scaler are loaded. The LR schedule is not restored: it is a
    function of the flags and the epoch (:func:`position_scheduler`), so ``--resume`` with a
    larger ``--epochs`` extends the cosine instead of replaying the old one (timm does the
    same); a stopped epoch continues at the LR of its step."""
    ckpt, path, run, per_epoch = src.ckpt, src.path, settings.run, resolved.updates_per_epoch
    if src.folder:  # the sharded entries, read by every rank into this run's own layout (any world size)
        _fill_from_folder(ckpt, path, model=model, averages=averages,
                          optimizer=optimizer if run.restore_optimizer else None)
    _check_finite(ckpt, path, model, restore_optimizer=run.restore_optimizer, drop_ema=run.drop_ema)
    averages.check_resume(ckpt, path, drop_ema=run.drop_ema, model=model)
    if run.restore_optimizer:
        _check_optimizer_state(ckpt, optimizer, path, opt=settings.optim.opt, layer_decay=settings.optim.layer_decay)
    _warn_batch_change(ckpt, path, settings, resolved, averages)
    _load_weights(ckpt, path, model)
    averages.load_resume(ckpt, path, model, updates_per_epoch=per_epoch)
    if run.restore_optimizer:
        _load_optimizer_and_scaler(ckpt, path, model, optimizer, amp)
    start_epoch = int(ckpt[EPOCH]) + 1
    if src.position is not None:
        _log.info("resumed from %s: stopped in epoch %d after step %s, continuing there", path, start_epoch,
                  src.position.steps_done)
    else:
        _log.info("resumed from %s: epoch %d done, continuing at epoch %d", path, ckpt[EPOCH], start_epoch)
    position_scheduler(lr_scheduler, start_epoch, per_epoch, settings.schedule.on_updates,
                        ckpt.get(SCHEDULER) if run.restore_optimizer else None)
    if src.position is not None:  # the LR of the step the stopped epoch continues at
        lr_scheduler.step_update(num_updates=start_epoch * per_epoch + src.position.steps_done)
    src.ckpt = {}
    return start_epoch


def _read_file(path: str) -> dict[str, Any]:
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"--resume: {one_line(e)}") from None


def _check_training_checkpoint(ckpt: dict[str, Any], path: str, model_name: str) -> dict[str, Any]:
    """A training checkpoint of ``model_name``; wrapper prefixes (``module.``, ``_orig_mod.``)
    are stripped and the EMA / optimizer entries checked for shape."""
    # epoch: the last completed one; -1 only in a checkpoint written inside epoch 0 (train_position)
    lowest_epoch = -1 if isinstance(ckpt.get(TRAIN_POSITION), dict) else 0
    if not isinstance(ckpt.get(MODEL), dict) or isinstance(ckpt.get(EPOCH), bool) \
            or not isinstance(ckpt.get(EPOCH), int) or ckpt[EPOCH] < lowest_epoch:
        found = ", ".join(sorted(map(str, ckpt))[:8])
        raise UsageError(f"--resume {path} is not a training checkpoint (keys: {found}); "
                         "it needs state_dict and epoch, as written by train.py")
    arch = ckpt.get(ARCH)
    if arch and arch != model_name:
        raise UsageError(f"--resume {path} is a checkpoint of {arch}, but --model is {model_name}; "
                         f"pass --model {arch}")
    return _normalize(ckpt, path)


def _read_folder(path: str) -> dict[str, Any]:
    """A ``--resume`` DCP folder (``--checkpoint-format dcp``: ``last.dcp``) before the model
    exists: its plain keys (epoch, arch, args, EMA counters, train_position ...), with empty
    placeholders for the sharded entries that :func:`_fill_from_folder` reads once the model,
    optimizer and EMAs are built. ``UsageError`` for any other folder."""
    check_resume_folder(path)
    meta = read_dcp_meta(resolve_dcp_folder(path))
    placeholders = {k: ({"state": {}, "param_groups": []} if k == OPTIMIZER else {}) for k in meta["sharded_keys"]}
    return {**meta.get("plain", {}), **placeholders}


def check_resume_folder(path: str) -> None:
    """``UsageError`` unless ``path`` (a ``--resume`` folder) is a complete checkpoint folder
    written by ``train.py --checkpoint-format dcp``; cheap (reads ``emakit.pt``), run by the
    flag checks before anything else."""
    folder = resolve_dcp_folder(path)
    if folder is None or not read_dcp_meta(folder).get("sharded_keys"):
        raise UsageError(f"--resume {path} is a folder but not a checkpoint folder written by train.py "
                         "--checkpoint-format dcp (no .metadata and emakit.pt); pass a last.dcp folder or a file")


def _fill_from_folder(ckpt: dict[str, Any], path: str, *, model: nn.Module, averages: Averages,
                      optimizer: torch.optim.Optimizer | None) -> None:
    """Read the sharded entries of a ``--resume`` DCP folder into ``ckpt`` (*collective*), in
    this run's own layout whatever wrote the folder (FSDP, DDP or one process, any world
    size): DCP reshards. The model and EMA templates are this run's state dicts, filled in
    place; the optimizer entry is parameter-name keyed. EMAs of the folder beyond this run's
    stay empty placeholders (``--drop-ema`` / the "more EMAs" warning see them). A sharded
    post-hoc state (``posthoc_ema_profiles``) is read into this run's profiles when their
    sigma_rels match and put back in the single-file layout (``dcp.join_posthoc_profiles``)."""
    members = list(averages.members)[:len(ema_entry_keys(ckpt))]  # the folder's extra EMAs stay placeholders
    templates = sharded_templates(model, optimizer if OPTIMIZER in ckpt else None, members)
    tracker, saved = averages.posthoc, ckpt.get(POSTHOC)
    if tracker is not None and POSTHOC_PROFILES in ckpt and isinstance(saved, dict) \
            and [float(x) for x in saved.get("sigma_rels", [])] == list(tracker.power.sigma_rels):
        # (other sigma_rels: left empty, resume_posthoc names the mismatch)
        templates[POSTHOC_PROFILES] = {str(k): p for k, p in enumerate(tracker.power.state_dict(full=False)
                                                                             ["profiles"])}
    try:
        load_dcp(path, templates)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise UsageError(f"--resume {path}: the checkpoint folder does not fit this model/optimizer "
                         f"({one_line(e)[:300]}); check --model, or pass --no-resume-opt") from None
    ckpt.update(templates)
    join_posthoc_profiles(ckpt)


def _check_finite(ckpt: dict[str, Any], path: str, model: nn.Module, *, restore_optimizer: bool,
                  drop_ema: bool) -> None:
    """``UsageError`` naming the first tensor (and the file) when a float tensor the resume
    would load holds NaN or an infinity: weights, EMAs, post-hoc profiles, optimizer state
    (not with ``--no-resume-opt``; EMAs not with ``--drop-ema``). Tensors that the freshly
    built ``model`` holds non-finite by design (masks) are left out, as the checkpoint writer
    leaves them out. A sharded model's ranks each check their shards and agree (*collective*)."""
    skip = set(nonfinite_names(list(model.state_dict().items())))
    skip |= set() if restore_optimizer else {OPTIMIZER}
    skip |= {k for k, _ in ema_entry_keys(ckpt)} if drop_ema else set()
    problem = describe_nonfinite(ckpt, skip_keys=frozenset(skip))
    if is_sharded(model) and torch.distributed.is_initialized():
        found: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        previous = previous_intact_checkpoint(path) if os.path.isfile(path) else None
        instead = f"resume from {previous} instead" if previous else \
            "resume from an earlier checkpoint (checkpoint-<epoch>.pth.tar) or start afresh"
        raise UsageError(f"--resume {path}: {problem}; the file is damaged or from a diverged run and training "
                         f"from it would diverge: {instead}")


def _load_weights(ckpt: dict[str, Any], path: str, model: nn.Module) -> None:
    try:
        if is_sharded(model):  # whole tensors (a file from any writer) or DTensors (a DCP folder): each rank cuts
            load_full_model_state(model, ckpt[MODEL])
        else:
            load_state_dict_strict(model, {k: _whole(v) for k, v in ckpt[MODEL].items()})
    except CheckpointError as e:
        raise UsageError(f"--resume {path}: {one_line(e)}") from None
    except RuntimeError as e:
        raise UsageError(f"--resume {path}: the weights do not fit the model ({one_line(e)[:300]})") from None


def _load_optimizer_and_scaler(ckpt: dict[str, Any], path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                               amp: AmpSettings) -> None:
    try:
        if ckpt.get(OPTIMIZER) is not None:
            load_optimizer_state(model, optimizer, ckpt[OPTIMIZER])
        if amp.scaler is not None and ckpt.get(SCALER):
            amp.scaler.load_state_dict(ckpt[SCALER])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"--resume {path}: cannot restore the optimizer state ({one_line(e)[:200]});"
                         " pass --no-resume-opt to start a fresh optimizer state") from None


def _whole(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _name_keyed(optimizer_state: dict[str, Any]) -> bool:
    """True for torch's parameter-name keyed layout (a DCP folder), False for integer ids."""
    return any(isinstance(p, str) for g in optimizer_state.get("param_groups", []) for p in g.get("params", []))


def position_scheduler(lr_scheduler: Scheduler, start_epoch: int, updates_per_epoch: int, on_updates: bool,
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
