"""The checkpoint layout of a training run: every key, which component writes it, and the
small readers that only depend on the layout.

A checkpoint (``last.pth.tar``, or the same entries in a ``last.dcp`` folder) is one dict:

| key | written by | content |
|---|---|---|
| ``epoch``, ``arch``, ``version`` | ``checkpoints.checkpoint_state`` | last completed epoch (-1 inside epoch 0), model name, format version |
| ``state_dict`` | the model | weights (timm's key) |
| ``state_dict_ema``, ``ema`` | ``Averages`` | the first EMA's weights (timm's key) and its counter/config |
| ``state_dict_ema_<i>``, ``ema_<i>`` | ``Averages`` | further EMAs |
| ``posthoc_ema`` | ``Averages`` (post-hoc tracker) | power-EMA profiles, snapshot plan (in ``last`` only) |
| ``posthoc_ema_profiles`` | ``Averages``, DCP folders only | a sharded tracker's profiles, joined back on read |
| ``ema_bn_recal`` | ``Averages`` | recalibrated BatchNorm statistics of each EMA |
| ``optimizer``, ``scheduler``, ``amp_scaler`` | optimizer, LR scheduler, GradScaler | their ``state_dict()`` |
| ``args``, ``metric``, ``metrics`` | ``checkpoints.checkpoint_state`` | the flags (timm's ``args``), the selection metric, all metrics |
| ``train_position`` | ``fit`` (a stop inside an epoch) | step, sampler position, every rank's RNG states |

The constants below are the only spelling of these keys in the trainer; ``emakit.checkpoint``
(the core) owns the EMA key pattern and the foreign formats it reads.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emakit.checkpoint import CheckpointError, check_state_dict_compat, ema_checkpoint_keys, ema_indices
from emakit.ema import is_sharded, unwrap_model

from . import UsageError, one_line
from .fsdp import full_model_state, full_optimizer_state, sharded_model_state, sharded_optimizer_state

__all__ = ["EPOCH", "ARCH", "VERSION", "MODEL", "OPTIMIZER", "SCHEDULER", "SCALER", "ARGS", "METRIC", "METRICS",
           "POSTHOC", "POSTHOC_PROFILES", "BN_RECAL", "TRAIN_POSITION", "is_sharded_key", "ema_entry_keys",
           "checkpoint_arg", "checkpoint_is_emakit", "holds_training_state", "steps_done", "check_ema_entry",
           "CHECKPOINT_VERSION", "model_entries", "ema_entries", "run_entries", "sharded_templates", "TrainPosition"]

EPOCH, ARCH, VERSION = "epoch", "arch", "version"
MODEL = "state_dict"
OPTIMIZER, SCHEDULER, SCALER = "optimizer", "scheduler", "amp_scaler"
ARGS, METRIC, METRICS = "args", "metric", "metrics"
POSTHOC = "posthoc_ema"
POSTHOC_PROFILES = "posthoc_ema_profiles"  # a sharded post-hoc tracker's profiles in a DCP folder
BN_RECAL = "ema_bn_recal"
TRAIN_POSITION = "train_position"  # mid-epoch checkpoints: where the stopped epoch resumes
CHECKPOINT_VERSION = 2  # timm writes version 2 with the same keys
# The entries a DCP folder stores as shards (every rank writes its own); the rest is plain.
_SHARDED = re.compile(rf"^({MODEL}|{OPTIMIZER}|state_dict_ema(_\d+)?|{POSTHOC_PROFILES})$")


def is_sharded_key(key: str) -> bool:
    """True for the entries a DCP folder keeps as shards: weights, EMA weights, optimizer
    state and a sharded post-hoc tracker's profiles."""
    return bool(_SHARDED.match(key))


def ema_entry_keys(ckpt: dict[str, Any]) -> list[tuple[str, str]]:
    """(weights key, meta key) of every EMA the checkpoint holds: ``state_dict_ema`` / ``ema``,
    then ``state_dict_ema_<i>`` / ``ema_<i>``."""
    return [ema_checkpoint_keys(i) for i in ema_indices(ckpt)]


def checkpoint_arg(ckpt: dict[str, Any], name: str, default: Any = None) -> Any:
    """A training flag recorded in the checkpoint's ``args`` (ours, or timm's Namespace, which
    :func:`emakit.checkpoint.load_checkpoint` turns into a dict)."""
    args = ckpt.get(ARGS)
    return args.get(name, default) if isinstance(args, dict) else default


def checkpoint_is_emakit(ckpt: Mapping[str, Any]) -> bool:
    """Written by emakit's train.py: it has EMA metadata (``ema``, which timm does not write)
    or its ``args`` hold ``model_ema_schedule``, a flag timm's train.py does not have."""
    args = ckpt.get(ARGS)
    return isinstance(ckpt.get(ema_checkpoint_keys(0)[1]), dict) or (isinstance(args, dict)
                                                                     and "model_ema_schedule" in args)


# Keys only a checkpoint written to resume training holds (ours, timm's, torchvision's, SuperGradients').
_TRAINING_KEYS = (OPTIMIZER, "optimizer_state_dict", SCHEDULER, "lr_scheduler")
_WEIGHTS_KEYS = (MODEL, "model", "net")


def holds_training_state(ckpt: Any) -> bool:
    """True for a training checkpoint's entries (ours or a peer's): optimizer or scheduler
    state, or an epoch with weights and no ``posthoc`` entry (a post-hoc result may be replaced)."""
    if not isinstance(ckpt, dict):
        return False
    weights = any(k in ckpt for k in _WEIGHTS_KEYS)
    return any(k in ckpt for k in _TRAINING_KEYS) or (EPOCH in ckpt and weights and "posthoc" not in ckpt)


def steps_done(epoch: int, updates_per_epoch: int) -> int:
    """Optimizer steps a run has taken after finishing ``epoch`` (0-based), counted as
    timm's train.py counts them: ``(epoch + 1) * updates_per_epoch``."""
    return (int(epoch) + 1) * int(updates_per_epoch)


def check_ema_entry(module: torch.nn.Module, state_dict_ema: dict[str, Any], key: str, path: str) -> None:
    """The EMA weights must have exactly the model's keys and shapes (``UsageError`` naming
    the entry and the file otherwise)."""
    try:
        check_state_dict_compat(module, state_dict_ema)
    except CheckpointError as e:
        raise UsageError(f"--resume {path}: {key}: {one_line(e)}") from None


# --------------------------------------------------------------------------- the entries each part writes
def model_entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, full: bool = True
                  ) -> dict[str, Any]:
    """The model's and the optimizer's entries (``optimizer`` None: the model's alone).

    ``full``: whole tensors in the layout a one-process run writes: a plain (or DDP) model's
    own state dicts, a sharded (FSDP2) model's gathered to CPU (*collective*; meaningful on
    rank 0). Not ``full``: this rank's shards (DTensors; parameter-name keyed optimizer state)
    for a DCP folder, no communication."""
    if not full:
        state = {MODEL: sharded_model_state(model)}
        if optimizer is not None:
            state[OPTIMIZER] = sharded_optimizer_state(model, optimizer)
    elif is_sharded(model):
        state = {MODEL: full_model_state(model)}
        if optimizer is not None:
            state[OPTIMIZER] = full_optimizer_state(model, optimizer)
    else:
        state = {MODEL: unwrap_model(model).state_dict()}  # a DDP wrapper's keys without module.
        if optimizer is not None:
            state[OPTIMIZER] = optimizer.state_dict()
    return state


def ema_entries(members: Sequence[Any], *, full: bool = True) -> dict[str, Any]:
    """Every EMA's weights and meta (update counter, settings) under its checkpoint keys
    (``members``: the ModelEMA members in order). A sharded (FSDP) EMA gives whole tensors on
    rank 0 (``{}`` elsewhere; *collective*) with ``full``, else DTensors over its shards."""
    own_weights, own_meta = ema_checkpoint_keys(0)  # what ModelEMA.checkpoint_state returns
    state: dict[str, Any] = {}
    for i, member in enumerate(members):
        weights_key, meta_key = ema_checkpoint_keys(i)
        part = member.checkpoint_state(full=full, rank0_only=full)
        state[weights_key], state[meta_key] = part[own_weights], part[own_meta]
    return state


def run_entries(*, epoch: int, arch: str, scheduler: Any, scaler: Any, flags: Mapping[str, Any],
                metric: float | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The plain entries of a training checkpoint (timm's ``epoch``/``arch``/``version``/
    ``scheduler``/``args``/``metric`` and ours): ``scheduler`` and ``scaler`` are the LR
    scheduler and the GradScaler (None: no scaler)."""
    return {EPOCH: epoch, ARCH: arch, VERSION: CHECKPOINT_VERSION, SCHEDULER: scheduler.state_dict(),
            SCALER: scaler.state_dict() if scaler is not None else None, ARGS: dict(flags), METRIC: metric,
            METRICS: dict(metrics)}


def sharded_templates(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      members: Sequence[Any]) -> dict[str, Any]:
    """The sharded entries of this run's own layout (model, optimizer, EMA weights as DTensors
    or whole tensors), as templates for a DCP read, which reshards into them."""
    state = model_entries(model, optimizer, full=False)
    for i, member in enumerate(members):
        state[ema_checkpoint_keys(i)[0]] = member.state_dict_ema(full=False)
    return state


# --------------------------------------------------------------------------- a stop inside an epoch
@dataclass(frozen=True)
class TrainPosition:
    """The ``train_position`` entry of a checkpoint written inside an epoch: where the epoch
    stopped, what fixes which samples each rank has seen (processes, batch size,
    accumulation), and per rank its generator states, epoch progress and (DDP) EMA buffers."""

    epoch: int
    steps_done: int
    batches_done: int
    steps_per_epoch: int
    processes: int
    batch_size: int
    grad_accum_steps: int
    ranks: list[dict[str, Any]]

    @staticmethod
    def rank_entry(rng: dict[str, Any], progress: dict[str, Any], ema_buffers: list | None) -> dict[str, Any]:
        """One rank's part of ``ranks`` (``progress``: ``EpochProgress.to_dict()``; ``ema_buffers``
        None: not kept)."""
        entry = {"rng": rng, "progress": progress}
        return entry if ema_buffers is None else {**entry, "ema_buffers": ema_buffers}

    def rank(self, rank: int) -> tuple[dict[str, Any], dict[str, Any], list]:
        """(generator states, progress, EMA buffers) of ``rank``."""
        mine = self.ranks[rank]
        return mine["rng"], mine["progress"], mine.get("ema_buffers") or []

    @classmethod
    def read(cls, ckpt: Mapping[str, Any], path: str, *, world_size: int, batch_size: int, grad_accum_steps: int,
             parse_progress: Callable[[dict[str, Any]], Any]) -> TrainPosition | None:
        """The position of a checkpoint written mid-epoch (None for an epoch-end one).

        Continuing a stopped epoch exactly needs the same process count, batch size and
        accumulation; otherwise a ``UsageError`` names what differs and the way out (the
        epoch-end checkpoint). A malformed entry (``parse_progress`` raises TypeError or
        KeyError on a rank's progress) is a ``UsageError`` too."""
        entry = ckpt.get(TRAIN_POSITION)
        if entry is None:
            return None
        try:
            position = cls(**entry)
            if not isinstance(position.ranks, list) or len(position.ranks) != position.processes \
                    or not isinstance(position.steps_done, int):
                raise TypeError(TRAIN_POSITION)
            for rng, progress, _ in map(position.rank, range(position.processes)):
                parse_progress(progress)
                if not {"python", "numpy", "torch"} <= rng.keys():
                    raise KeyError("rng")
        except (TypeError, KeyError, AttributeError):
            raise UsageError(f"--resume {path}: its {TRAIN_POSITION} entry is malformed; resume from an "
                             "epoch-end checkpoint (checkpoint-<epoch>.pth.tar) instead") from None
        now = {"processes": world_size, "batch_size": batch_size, "grad_accum_steps": grad_accum_steps}
        differ = [f"{k} {getattr(position, k)} -> {v}" for k, v in now.items() if getattr(position, k) != v]
        if differ:
            raise UsageError(f"--resume {path} stopped in the middle of epoch {position.epoch}; continuing "
                             f"it needs the same {', '.join(now)} ({'; '.join(differ)}): use those, or "
                             + (f"resume from checkpoint-{int(ckpt[EPOCH])}.pth.tar (the end of the epoch before)"
                                if int(ckpt[EPOCH]) >= 0 else "start a fresh run"))
        return position

    def entry(self) -> dict[str, Any]:
        """The checkpoint entry: ``{"train_position": {...}}`` (plain types and tensors)."""
        return {TRAIN_POSITION: dict(vars(self))}
