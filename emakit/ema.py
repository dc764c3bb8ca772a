"""ModelEMA: an exponential moving average of a model's weights.

``ema = decay * ema + (1 - decay) * model`` for every floating-point tensor, done as one
fused in-place ``torch._foreach_lerp_`` per group of tensors that share (device, dtype).
Integer buffers (``num_batches_tracked``) are copied, never averaged.

Typical use, after each optimizer step::

    ema = ModelEMA(model, decay=0.9998)          # model may be DDP-wrapped or compiled
    ...
    optimizer.step()
    ema.update(model)
    ...
    with ema.swapped_into(model):                # validate the EMA weights in place
        evaluate(model)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import schedules as _sched

__all__ = ["ModelEMA", "MultiEMA", "unwrap_model"]

_log = logging.getLogger(__name__)
_DEFAULT_DECAY = 0.9999
_BUFFER_MODES = ("average", "copy")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare module under any nesting of DDP/DataParallel and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{name}={value!r} is outside [{lo}, {hi}{bracket}")


def _tensors(module: nn.Module, include_buffers: bool) -> list[Tensor]:
    tensors = [p for p in module.parameters()]
    if include_buffers:
        tensors += [b for b in module.buffers()]
    return tensors


class _Plan:
    """Pairs of (EMA tensor, model tensor) split into what is averaged and what is copied,
    averaged pairs grouped by (device, dtype) so each group is one foreach call."""

    def __init__(self, ema_module: nn.Module, model: nn.Module, average_buffers: bool) -> None:
        e_params, m_params = list(ema_module.parameters()), list(model.parameters())
        e_bufs, m_bufs = list(ema_module.buffers()), list(model.buffers())
        if len(e_params) != len(m_params) or len(e_bufs) != len(m_bufs):
            raise ValueError(
                "model does not have the structure the EMA was created from "
                f"({len(m_params)} parameters/{len(m_bufs)} buffers vs {len(e_params)}/{len(e_bufs)}); "
                "pass the same model (wrapped or not) that ModelEMA was built from"
            )
        self.groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        self.copy_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        for e, m in zip(e_params + e_bufs, m_params + m_bufs):
            if e.shape != m.shape:
                raise ValueError(f"EMA tensor shape {tuple(e.shape)} != model tensor shape {tuple(m.shape)}")
        for e, m in zip(e_params, m_params):
            self._add(e, m)
        for e, m in zip(e_bufs, m_bufs):
            if average_buffers:
                self._add(e, m)
            else:
                self.copy_pairs[0].append(e)
                self.copy_pairs[1].append(m)

    def _add(self, e: Tensor, m: Tensor) -> None:
        if not (e.is_floating_point() or e.is_complex()):
            self.copy_pairs[0].append(e)
            self.copy_pairs[1].append(m)
            return
        key = (e.device, e.dtype, m.device, m.dtype)
        ema_list, model_list = self.groups.setdefault(key, ([], []))
        ema_list.append(e)
        model_list.append(m)


def _lerp_group(key: tuple, ema_list: list[Tensor], model_list: list[Tensor], weight: float) -> None:
    """``ema += weight * (model - ema)`` for one (device, dtype) group, in place."""
    e_dev, e_dtype, m_dev, m_dtype = key
    if m_dev == e_dev and m_dtype == e_dtype:
        torch._foreach_lerp_(ema_list, model_list, weight)
        return
    if m_dev == e_dev:
        # Mixed precision (e.g. fp32 master EMA of a bf16 model): scale then accumulate; the
        # add promotes the bf16 source into the fp32 destination without a model-size copy.
        torch._foreach_mul_(ema_list, 1.0 - weight)
        torch._foreach_add_(ema_list, model_list, alpha=weight)
        return
    # Different device (EMA kept on CPU): one transfer per tensor, then the same fused lerp.
    moved = [m.to(device=e_dev, dtype=e_dtype, non_blocking=True) for m in model_list]
    if m_dev.type == "cuda":
        torch.cuda.current_stream(m_dev).synchronize()
    torch._foreach_lerp_(ema_list, moved, weight)


def _copy_pairs(dst: list[Tensor], src: list[Tensor]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s, non_blocking=False)


class ModelEMA(nn.Module):
    """Exponential moving average of a model's weights (parameters and, by default, buffers).

    Args:
        model: the model to average; plain, DDP/DataParallel-wrapped or ``torch.compile``d.
            The EMA always holds a copy of the bare module, with unprefixed state-dict keys.
        decay: target per-update decay in ``[0, 1)``. Default 0.9999 when ``half_life`` is
            not given; giving both is an error.
        schedule: name of a registered schedule: ``constant`` (default), ``warmup``,
            ``threshold``, ``exp`` or one added with :func:`emakit.register_schedule`.
        half_life: Composer-style half-life (``"2000ba"``, ``"0.5ep"``, ``"1.2Mimg"``); the
            target decay becomes ``0.5 ** (1 / half_life_in_batches)`` per optimizer step.
        update_every: average only every k-th :meth:`update` call, with decay ``decay ** k``
            so the averaging time constant stays the same. Default 1.
        update_after_step: the first N updates copy the model instead of averaging. Default 0.
        copy_first: the first averaging update (update ``update_after_step + update_every``)
            copies the model too, as timm's ``ModelEmaV3.update(model, step=n)`` does (its
            ``get_decay`` is 0 at ``step = update_after_step + 1``) and as emakit's ``train.py``
            uses it. Default False: the first update blends the model into the EMA's initial
            copy of it (``decay * W0 + (1 - decay) * W1``), like ``ModelEmaV3.update(model)``
            called without a step.
        min_decay: lower clamp of the ``warmup`` schedule. Default 0.
        device: keep the EMA on this device (e.g. ``"cpu"``); default: the model's device,
            followed if the model moves after the EMA was created.
        dtype: floating dtype of the EMA (e.g. ``torch.float32`` master weights for a bf16
            model); default: the model's.
        buffers: ``"average"`` (default) averages float buffers such as BatchNorm running
            statistics; ``"copy"`` copies all buffers from the model.
        steps_per_epoch: optimizer steps per epoch, needed by half-lives in epochs.
        global_batch_size: images per optimizer step over all ranks, needed by half-lives in images.
        total_steps: planned number of :meth:`update` calls, needed by the ``exp`` schedule.
        **schedule_kwargs: extra arguments of the schedule (``inv_gamma``, ``power``, ``beta``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float | None = None,
        schedule: str = "constant",
        half_life: str | None = None,
        update_every: int = 1,
        update_after_step: int = 0,
        copy_first: bool = False,
        min_decay: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        buffers: str = "average",
        steps_per_epoch: int | None = None,
        global_batch_size: int | None = None,
        total_steps: int | None = None,
        **schedule_kwargs: float,
    ) -> None:
        super().__init__()
        self.decay = self._resolve_decay(decay, half_life, steps_per_epoch, global_batch_size)
        self.half_life = half_life
        self._validate_options(schedule, update_every, update_after_step, min_decay, buffers, total_steps)
        _sched.validate_schedule_kwargs(schedule, schedule_kwargs)
        self.schedule = schedule
        self.schedule_kwargs = dict(schedule_kwargs)
        if schedule == "warmup":
            self.schedule_kwargs.setdefault("min_decay", float(min_decay))
        self.update_every = int(update_every)
        self.update_after_step = int(update_after_step)
        self.copy_first = bool(copy_first)
        self.min_decay = float(min_decay)
        self.buffers_mode = buffers
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.device = torch.device(device) if device is not None else None
        self.dtype = _parse_dtype(dtype)
        self._num_updates = 0
        self._swapped = False

        bare = unwrap_model(model)
        self.module = copy.deepcopy(bare)
        self.module.eval()
        self.module.requires_grad_(False)
        if self.device is not None or self.dtype is not None:
            self.module.to(device=self.device, dtype=self.dtype)
        # fail now, not mid-training, if the schedule errors
        self.decay_at(self.update_after_step + 1 + (self.update_every if self.copy_first else 0))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _resolve_decay(decay, half_life, steps_per_epoch, global_batch_size) -> float:
        if decay is not None and half_life is not None:
            raise ValueError(
                f"decay={decay!r} and half_life={half_life!r} both set the EMA time constant; give only one"
            )
        if half_life is not None:
            batches = _sched.parse_half_life(half_life).in_batches(
                steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size
            )
            return _sched.half_life_to_decay(batches)
        decay = _DEFAULT_DECAY if decay is None else decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise ValueError(f"decay={decay!r} must be a number in [0, 1), e.g. 0.9998")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} is outside [0, 1); typical values are 0.999-0.9999")
        return float(decay)

    @staticmethod
    def _validate_options(schedule, update_every, update_after_step, min_decay, buffers, total_steps) -> None:
        _sched.get_schedule(schedule)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every={update_every!r} must be a positive integer (1 = every step)")
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int) or update_after_step < 0:
            raise ValueError(f"update_after_step={update_after_step!r} must be a non-negative integer")
        _check_range("min_decay", min_decay, 0.0, 1.0)
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"buffers={buffers!r} is not accepted; use 'average' or 'copy'")
        if schedule in _sched.NEEDS_TOTAL_STEPS and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"schedule={schedule!r} needs total_steps=<planned number of EMA updates>, got {total_steps!r}")

    # ------------------------------------------------------------------ state
    @property
    def num_updates(self) -> int:
        """Number of :meth:`update` calls so far (restored by ``load_state_dict``)."""
        return self._num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._num_updates = int(value)

    def get_extra_state(self) -> dict[str, int]:
        return {"num_updates": self._num_updates}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._num_updates = int(state["num_updates"])

    def config(self) -> dict[str, Any]:
        """The EMA's settings as plain Python types (stored in checkpoints)."""
        return {
            "decay": self.decay, "schedule": self.schedule, "half_life": self.half_life,
            "update_every": self.update_every, "update_after_step": self.update_after_step,
            "copy_first": self.copy_first,
            "min_decay": self.min_decay, "buffers": self.buffers_mode,
            "device": None if self.device is None else str(self.device),
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "schedule_kwargs": dict(self.schedule_kwargs), "total_steps": self.total_steps,
        }

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"state_dict_ema": <bare module state dict>, "ema": {"num_updates", "config"}}``:
        timm's key for the weights, so timm's ``load_checkpoint(..., use_ema=True)`` reads it."""
        return {
            "state_dict_ema": self.module.state_dict(),
            "ema": {"num_updates": self._num_updates, "config": self.config()},
        }

    def load_checkpoint_state(self, state_dict_ema: dict[str, Tensor], ema_meta: dict[str, Any] | None = None) -> None:
        """Restore weights (unprefixed keys) and, when given, the update counter."""
        self.module.load_state_dict(state_dict_ema)
        if ema_meta is not None:
            self._num_updates = int(ema_meta.get("num_updates", 0))
            saved = ema_meta.get("config") or {}
            changed = {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}
            if changed:
                _log.warning("EMA settings differ from the checkpoint's (saved, now): %s", changed)

    # ------------------------------------------------------------------ decay
    def decay_at(self, step: int) -> float:
        """Per-update decay applied when update number ``step`` (1-based) averages.

        0.0 (a copy) for ``step <= update_after_step`` and, with ``copy_first``, for the first
        averaging update; otherwise the schedule evaluated at the number of averaging steps
        before this one, raised to ``update_every``.
        """
        if step <= self.update_after_step or (self.copy_first and step - self.update_after_step <= self.update_every):
            return 0.0
        fn = _sched.get_schedule(self.schedule)
        d = float(fn(self.decay, step - self.update_after_step - 1, self.total_steps, **self.schedule_kwargs))
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise ValueError(f"schedule {self.schedule!r} returned decay {d} at step {step}; it must be in [0, 1]")
        return d ** self.update_every

    # ------------------------------------------------------------------ update
    def _plan(self, model: nn.Module) -> _Plan:
        bare = unwrap_model(model)
        if self.device is None:
            self._follow_device(bare)
        return _Plan(self.module, bare, self.buffers_mode == "average")

    def _follow_device(self, bare: nn.Module) -> None:
        src = next(iter(bare.parameters()), None)
        dst = next(iter(self.module.parameters()), None)
        if src is not None and dst is not None and src.device != dst.device:
            _log.info("model moved to %s after the EMA was created; moving the EMA with it", src.device)
            self.module.to(device=src.device)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimizer step and average the model into the EMA when it is due."""
        if self._swapped:
            raise RuntimeError("update() inside swapped_into(): the EMA holds the model's weights until the block ends")
        self._num_updates += 1
        n = self._num_updates
        if n <= self.update_after_step:
            self._apply(model, 1.0)
        elif (n - self.update_after_step) % self.update_every == 0:
            self._apply(model, 1.0 - self.decay_at(n))

    def _apply(self, model: nn.Module, weight: float) -> None:
        plan = self._plan(model)
        for key, (ema_list, model_list) in plan.groups.items():
            if weight == 1.0:
                _copy_pairs(ema_list, model_list)
            else:
                _lerp_group(key, ema_list, model_list, weight)
        _copy_pairs(*plan.copy_pairs)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Hard copy: every EMA tensor := the model's (the counter is unchanged)."""
        self._apply(model, 1.0)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (e.g. at the end of training)."""
        bare = unwrap_model(model)
        _Plan(self.module, bare, True)  # structure check
        _copy_pairs(_tensors(bare, True), _tensors(self.module, True))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the EMA weights into ``model`` in place for the body; restore them bit-exactly.

        Same-dtype tensors are exchanged one at a time (extra memory: the largest tensor);
        tensors whose dtype differs (fp32 EMA of a bf16 model) keep a copy of the model's
        values for the restore. Yields the bare model. ``update()`` inside the block raises.
        """
        bare = unwrap_model(model)
        _Plan(self.module, bare, True)  # structure check before touching anything
        pairs = list(zip(_tensors(bare, True), _tensors(self.module, True)))
        with torch.no_grad():
            saved = self._swap_in(pairs)
        self._swapped = True
        try:
            yield bare
        finally:
            with torch.no_grad():
                self._swap_out(pairs, saved)
            self._swapped = False

    @staticmethod
    def _swap_in(pairs: Sequence[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
        saved: dict[int, Tensor] = {}
        for i, (m, e) in enumerate(pairs):
            if m.dtype == e.dtype:
                tmp = m.clone()
                m.copy_(e)
                e.copy_(tmp)
            else:
                saved[i] = m.clone()
                m.copy_(e)
        return saved

    @staticmethod
    def _swap_out(pairs: Sequence[tuple[Tensor, Tensor]], saved: dict[int, Tensor]) -> None:
        for i, (m, e) in enumerate(pairs):
            if i in saved:
                m.copy_(saved[i])
            else:
                tmp = m.clone()
                m.copy_(e)
                e.copy_(tmp)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the averaged module."""
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        src = f"half_life={self.half_life!r}" if self.half_life else f"decay={self.decay}"
        return f"{src}, schedule={self.schedule!r}, update_every={self.update_every}, num_updates={self._num_updates}"


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
        resolved = getattr(torch, aliases.get(name, name), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating dtype: float32, bfloat16 or float16")
    return dtype


def _fused_lerp(model_list: list[Tensor], ema_lists: list[list[Tensor]], weights: list[float]) -> None:
    """Lerp k EMAs toward the same model tensors in one ``_foreach_lerp_`` call with per-tensor
    (ScalarList) weights. The lists are interleaved tensor by tensor, so each model tensor is
    still in cache when the next EMA reads it: measured 0.84x the time of k separate updates
    for 3 EMAs of resnet50 on CPU (splitting tensors into cache-sized chunks was slower)."""
    dst = [el[j] for j in range(len(model_list)) for el in ema_lists]
    src = [m for m in model_list for _ in ema_lists]
    torch._foreach_lerp_(dst, src, weights * len(model_list))


class MultiEMA(nn.Module):
    """Several EMAs of one model with different time constants, updated in one pass.

    All EMAs share every setting but the time constant (``decays`` or ``half_lives``), so
    they average on the same steps; :meth:`update` reads the model once for all of them.
    ``ema[i]`` is the i-th :class:`ModelEMA` (``ema[0]`` is the "main" one).

    Args:
        model: the model to average (plain, wrapped or compiled).
        decays: per-EMA target decays, e.g. ``(0.999, 0.9998, 0.9999)``.
        half_lives: per-EMA half-lives instead of decays, e.g. ``("1000ba", "0.5ep")``.
        **kwargs: any other :class:`ModelEMA` argument, shared by all EMAs.
    """

    def __init__(self, model: nn.Module, *, decays: Sequence[float] | None = None,
                 half_lives: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__()
        if (decays is None) == (half_lives is None):
            raise ValueError("give MultiEMA either decays=[...] or half_lives=[...], exactly one")
        values = list(decays if decays is not None else half_lives)
        if not values:
            raise ValueError("MultiEMA needs at least one decay or half-life")
        key = "decay" if decays is not None else "half_life"
        self.emas = nn.ModuleList(ModelEMA(model, **{key: v}, **kwargs) for v in values)
        self._fused_ok = True

    def __len__(self) -> int:
        return len(self.emas)

    def __getitem__(self, index: int) -> ModelEMA:
        return self.emas[index]

    def __iter__(self) -> Iterator[ModelEMA]:
        return iter(self.emas)

    def _try_fused(self, model_list: list[Tensor], ema_lists: list[list[Tensor]], weights: list[float]) -> bool:
        if not self._fused_ok:
            return False
        try:
            _fused_lerp(model_list, ema_lists, weights)
            return True
        except (TypeError, RuntimeError):  # an older torch without the ScalarList overload
            _log.info("fused multi-EMA lerp unavailable in torch %s; updating EMAs one by one", torch.__version__)
            self._fused_ok = False
            return False

    @property
    def num_updates(self) -> int:
        """Update calls so far (the same for every EMA)."""
        return self.emas[0].num_updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimizer step for every EMA and average the model into all that are due."""
        first = self.emas[0]
        n = first.num_updates + 1
        due = n <= first.update_after_step or (n - first.update_after_step) % first.update_every == 0
        if not due or n <= first.update_after_step:
            for ema in self.emas:
                ema.update(model)
            return
        if any(e._swapped for e in self.emas):
            raise RuntimeError("update() inside swapped_into(): the EMA holds the model's weights until the block ends")
        plans = [ema._plan(model) for ema in self.emas]
        weights = [1.0 - ema.decay_at(n) for ema in self.emas]
        for key, (_, model_list) in plans[0].groups.items():
            ema_lists = [plan.groups[key][0] for plan in plans]
            if not (key[0] == key[2] and key[1] == key[3] and self._try_fused(model_list, ema_lists, weights)):
                for ema_list, w in zip(ema_lists, weights):
                    _lerp_group(key, ema_list, model_list, w)
        for plan in plans:
            _copy_pairs(*plan.copy_pairs)
        for ema in self.emas:
            ema.num_updates = n
