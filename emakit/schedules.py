"""Decay schedules for the EMA, their registry, half-life parsing and batch-size scaling.

A schedule is a pure function ``fn(decay, step, total_steps, **kwargs) -> float`` that
returns the per-update decay. ``decay`` is the target (steady-state) decay, ``step`` is
the number of averaging updates made *before* this one (0 for the first), and
``total_steps`` is the planned number of updates (``None`` when unknown).

Built-in schedules:

* ``constant``  -> ``decay``
* ``warmup``    -> ``1 - (1 + step / inv_gamma) ** -power`` clamped to ``[min_decay, decay]``
  (timm ModelEmaV3 ``use_warmup``, @crowsonkb); defaults ``inv_gamma=1``, ``power=2/3``.
* ``threshold`` -> ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's
  ``ExponentialMovingAverage(num_updates=...)``, SuperGradients' ``threshold``).
* ``exp``       -> ``decay * (1 - exp(-beta * step / total_steps))`` (SuperGradients'
  ``exp`` decay), default ``beta=15``; needs ``total_steps``.
* ``power``     -> ``(1 - 1 / (step + 1)) ** (gamma + 1)``: EDM2's power-function profile
  (Karras et al. 2024, Eq. 127; ``emakit.posthoc.power_beta`` at update ``t = step + 1``).
  The first averaging update copies the model (decay 0); at update t the average weighs
  the weights of update tau by the integral of ``(gamma+1) x^gamma / t^(gamma+1)`` over
  ``(tau-1, tau]``. Needs ``gamma >= 0`` (``emakit.posthoc.sigma_rel_to_gamma`` converts a
  relative width sigma_rel); ``decay`` is ignored: the profile's width grows with training.

Only ``torch``-free standard library code lives here so that it is importable anywhere.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Callable, Protocol

__all__ = ["ScheduleFn", "register_schedule", "get_schedule", "available_schedules", "validate_schedule_kwargs",
           "HalfLife", "parse_half_life", "half_life_to_decay", "decay_to_half_life", "scale_decay"]


class ScheduleFn(Protocol):
    """Signature of a decay schedule: ``fn(decay, step, total_steps, **kwargs) -> float``."""

    def __call__(self, decay: float, step: int, total_steps: int | None, **kwargs: float) -> float: ...


def _constant(decay: float, step: int, total_steps: int | None) -> float:
    return decay


def _warmup(decay: float, step: int, total_steps: int | None, *, inv_gamma: float = 1.0, power: float = 2.0 / 3.0,
            min_decay: float = 0.0) -> float:
    # power=2/3 reaches 0.999 at ~31.6k steps and 0.9999 at ~1M steps; power=3/4 suits
    # shorter runs (values from @crowsonkb's EMA warmup, used by timm's ModelEmaV3).
    value = 1.0 - (1.0 + step / inv_gamma) ** -power
    return max(min(value, decay), min_decay)


def _threshold(decay: float, step: int, total_steps: int | None) -> float:
    return min(decay, (1.0 + step) / (10.0 + step))


def _exp(decay: float, step: int, total_steps: int | None, *, beta: float = 15.0) -> float:
    if not total_steps:
        raise ValueError("schedule='exp' needs total_steps (the planned number of EMA updates)")
    return decay * (1.0 - math.exp(-beta * step / total_steps))


def _power(decay: float, step: int, total_steps: int | None, *, gamma: float | None = None) -> float:
    if gamma is None or not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool)) \
            or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"schedule='power' needs gamma=<exponent >= 0> (e.g. emakit.posthoc.sigma_rel_to_gamma(0.05) "
                         f"~ 16.97), got {gamma!r}")
    t = step + 1  # 1-based number of this averaging update
    # The expression of emakit.posthoc.power_beta, so both give the same bits.
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


_BUILTIN = {"constant": _constant, "warmup": _warmup, "threshold": _threshold, "exp": _exp, "power": _power}
_REGISTRY: dict[str, Callable[..., float]] = dict(_BUILTIN)

# Schedules that cannot be evaluated without the planned number of updates.
NEEDS_TOTAL_STEPS = {"exp"}


def register_schedule(name: str, fn: ScheduleFn, *, overwrite: bool = False) -> None:
    """Register a custom decay schedule under ``name``.

    ``fn(decay, step, total_steps, **kwargs) -> float`` must be pure and return a value in
    ``[0, 1]``; extra keyword arguments are passed from ``ModelEMA(..., **schedule_kwargs)``.
    Re-registering an existing name needs ``overwrite=True``; built-ins cannot be replaced.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"schedule name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"schedule {name!r}: fn must be callable, got {type(fn).__name__}")
    if name in _BUILTIN:
        raise ValueError(f"schedule {name!r} is built in and cannot be replaced; pick another name")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"schedule {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn


def available_schedules() -> list[str]:
    """Names of all registered schedules, sorted."""
    return sorted(_REGISTRY)


def get_schedule(name: str) -> Callable[..., float]:
    """Return the schedule registered as ``name`` or raise ``ValueError`` listing the choices."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"schedule={name!r} is unknown; accepted: {', '.join(available_schedules())} "
                         "(or add one with emakit.register_schedule(name, fn))") from None


def validate_schedule_kwargs(name: str, kwargs: dict[str, float]) -> None:
    """Raise ``ValueError`` if ``kwargs`` are not keyword arguments the schedule accepts."""
    params = inspect.signature(get_schedule(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in list(params.items())[3:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if unknown := [key for key in kwargs if key not in accepted]:
        raise ValueError(f"unknown argument {unknown[0]!r} for schedule {name!r}; accepted: "
                         f"{', '.join(accepted) or 'none'}")


# --------------------------------------------------------------------------- half-life

_UNITS = {"ba": "ba", "batch": "ba", "batches": "ba", "ep": "ep", "epoch": "ep", "epochs": "ep",
          "img": "img", "sp": "img", "samples": "img"}
_SCALE = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}
_HALF_LIFE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMG]?)\s*([a-z]+)\s*$")
_HALF_LIFE_HELP = "use a positive number and a unit: '2000ba' (batches), '0.5ep' (epochs), '1.2Mimg' (images)"


class HalfLife:
    """A parsed half-life: ``value`` in ``unit`` ("ba", "ep" or "img")."""

    __slots__ = ("value", "unit", "text")

    def __init__(self, value: float, unit: str, text: str) -> None:
        self.value, self.unit, self.text = value, unit, text

    def __repr__(self) -> str:
        return f"HalfLife({self.text!r})"

    def in_batches(self, *, steps_per_epoch: int | None = None, global_batch_size: int | None = None) -> float:
        """The half-life in optimizer steps (batches); epochs/images need the conversion factor."""
        if self.unit == "ba":
            return self.value
        if self.unit == "ep":
            if not steps_per_epoch or steps_per_epoch <= 0:
                raise ValueError(f"half_life={self.text!r} is in epochs and needs steps_per_epoch (optimizer steps "
                                 "per epoch)")
            return self.value * steps_per_epoch
        if not global_batch_size or global_batch_size <= 0:
            raise ValueError(f"half_life={self.text!r} is in images and needs global_batch_size (images per "
                             "optimizer step, all ranks)")
        return self.value / global_batch_size


def parse_half_life(text: str) -> HalfLife:
    """Parse a Composer-style half-life string such as ``"2000ba"``, ``"0.5ep"`` or ``"1.2Mimg"``."""
    if not isinstance(text, str):
        raise ValueError(f"half_life={text!r} is not a string; {_HALF_LIFE_HELP}")
    match = _HALF_LIFE_RE.match(text)
    if not match or match.group(3) not in _UNITS:
        raise ValueError(f"half_life={text!r} is malformed; {_HALF_LIFE_HELP}")
    value = float(match.group(1)) * _SCALE[match.group(2)]
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"half_life={text!r} must be positive; {_HALF_LIFE_HELP}")
    return HalfLife(value, _UNITS[match.group(3)], text.strip())


def half_life_to_decay(half_life_updates: float, interval: float = 1.0) -> float:
    """Per-update decay whose old average weighs one half after ``half_life_updates`` steps.

    ``decay = 0.5 ** (interval / half_life)``, both in the same unit (Composer's EMA).
    """
    if not half_life_updates > 0:
        raise ValueError(f"half-life must be positive, got {half_life_updates}")
    return 0.5 ** (interval / half_life_updates)


def decay_to_half_life(decay: float) -> float:
    """Number of updates after which a constant ``decay`` leaves half of the old average."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay={decay} must be in (0, 1) to have a half-life")
    return math.log(0.5) / math.log(decay)


def scale_decay(decay: float, kappa: float) -> float:
    """EMA scaling rule (Busbridge et al. 2023, "How to Scale Your EMA"): when the batch size
    grows by ``kappa``, the per-step decay becomes ``decay ** kappa`` so the EMA averages over
    the same number of images."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay} is outside [0, 1)")
    if not kappa > 0:
        raise ValueError(f"kappa={kappa} must be positive")
    return decay ** kappa
