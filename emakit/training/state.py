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
from typing import Any

import torch

from emakit.checkpoint import CheckpointError, check_state_dict_compat, ema_checkpoint_keys, ema_indices

from . import UsageError, one_line

__all__ = ["EPOCH", "ARCH", "VERSION", "MODEL", "OPTIMIZER", "SCHEDULER", "SCALER", "ARGS", "METRIC", "METRICS",
           "POSTHOC", "POSTHOC_PROFILES", "BN_RECAL", "TRAIN_POSITION", "is_sharded_key", "ema_entry_keys",
           "checkpoint_arg", "steps_done", "check_ema_entry"]

EPOCH, ARCH, VERSION = "epoch", "arch", "version"
MODEL = "state_dict"
OPTIMIZER, SCHEDULER, SCALER = "optimizer", "scheduler", "amp_scaler"
ARGS, METRIC, METRICS = "args", "metric", "metrics"
POSTHOC = "posthoc_ema"
POSTHOC_PROFILES = "posthoc_ema_profiles"  # a sharded post-hoc tracker's profiles in a DCP folder
BN_RECAL = "ema_bn_recal"
TRAIN_POSITION = "train_position"  # mid-epoch checkpoints: where the stopped epoch resumes
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
