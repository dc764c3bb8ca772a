"""emakit: an exponential moving average (EMA) of model weights for PyTorch.

``import emakit`` imports nothing beyond torch; the names below load their module (and
torch) on first use, so that ``train.py`` and ``validate.py`` can take over the stop
signals (``emakit.training.lifecycle``) before the 1-2 s import of torch. The trainer
lives in ``emakit.training`` (needs timm, torchvision, yaml, tqdm); checkpoint I/O in
``emakit.checkpoint``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ema import ModelEMA, MultiEMA, unwrap_model
    from .schedules import (
        available_schedules,
        decay_to_half_life,
        half_life_to_decay,
        parse_half_life,
        register_schedule,
        scale_decay,
    )

__version__ = "0.1.0"

_HOMES = {"ModelEMA": "ema", "MultiEMA": "ema", "unwrap_model": "ema", "register_schedule": "schedules",
          "available_schedules": "schedules", "parse_half_life": "schedules", "half_life_to_decay": "schedules",
          "decay_to_half_life": "schedules", "scale_decay": "schedules"}

__all__ = [*_HOMES, "__version__"]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'emakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
