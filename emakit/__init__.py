"""emakit: an exponential moving average (EMA) of model weights for PyTorch.

``import emakit`` imports nothing beyond torch. The trainer lives in ``emakit.training``
(needs timm, torchvision, yaml, tqdm); checkpoint I/O in ``emakit.checkpoint``.
"""
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

__all__ = [
    "ModelEMA",
    "MultiEMA",
    "unwrap_model",
    "register_schedule",
    "available_schedules",
    "parse_half_life",
    "half_life_to_decay",
    "decay_to_half_life",
    "scale_decay",
    "__version__",
]
