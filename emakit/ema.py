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
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import schedules as _sched

__all__ = ["ModelEMA", "MultiEMA", "unwrap_model", "is_sharded", "local_shard", "reshard_fsdp"]

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


def _dtensor_type() -> type | None:
    """torch's DTensor class if ``torch.distributed.tensor`` is loaded (a sharded model
    loaded it), else None: no tensor can be a DTensor then, and ``import emakit`` stays light."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor, as after FSDP2's ``fully_shard``:
    the EMA then keeps this rank's local shards instead of a copy of the module."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in unwrap_model(model).parameters())


def _rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() else 0


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view of the live storage, no communication); a
    plain tensor as it is."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _module_tensors(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(parameters, buffers) of ``module`` as local tensors: the whole tensors of a plain
    module, this rank's shards of a sharded one."""
    params, buffers = list(module.parameters()), list(module.buffers())
    if _dtensor_type() is None:
        return params, buffers
    return [local_shard(p) for p in params], [local_shard(b) for b in buffers]


def _flat(tensors: tuple[list[Tensor], list[Tensor]]) -> list[Tensor]:
    return tensors[0] + tensors[1]


GATHER_BUCKET_BYTES = 64 << 20
"""Gathered bytes per collective when :meth:`ModelEMA.state_dict_ema` gathers a sharded EMA
(a tensor larger than this is gathered alone): peak extra memory on every rank, against one
collective per tensor."""


def _row_sharded(mesh: Any, placements: Any, shape: torch.Size) -> bool:
    """Sharded along dim 0 over a 1-D mesh, as FSDP2 shards by default: rank ``r`` holds rows
    ``[r * c, (r + 1) * c)`` of ``c = ceil(rows / world)`` (``torch.chunk``'s split; the last
    ranks hold fewer, possibly none). Decided from the global spec alone, so every rank agrees."""
    from torch.distributed.tensor import Shard

    return (mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard)
            and placements[0].dim == 0 and len(shape) >= 1)


def _rows_per_rank(shape: torch.Size, world: int) -> tuple[int, int]:
    """(rows per rank ``c``, elements per row) of a row-sharded tensor."""
    return -(-shape[0] // world), math.prod(shape[1:])


def _buckets(names: list[str], named: dict[str, Tensor], specs: dict) -> Iterator[list[str]]:
    """``names`` split into runs that share (mesh, dtype) and hold up to GATHER_BUCKET_BYTES of
    gathered output each, in order (the same split on every rank: it reads global shapes only)."""
    bucket: list[str] = []
    size, key = 0, None
    for name in names:
        mesh, _, shape, _ = specs[name]
        world = mesh.size()
        c, per_row = _rows_per_rank(shape, world)
        nbytes = world * c * per_row * named[name].element_size()
        this = (mesh, named[name].dtype)  # DeviceMesh compares by its ranks and device type
        if bucket and (this != key or size + nbytes > GATHER_BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size, key = size + nbytes, this
    if bucket:
        yield bucket


def _gather_rows(names: list[str], named: dict[str, Tensor], specs: dict, keep: bool) -> dict[str, Tensor]:
    """One ``all_gather_into_tensor`` for the row-sharded tensors ``names`` (one mesh, one
    dtype): each rank packs its shards, zero-padded to ``c`` rows, into one flat buffer; the
    whole tensors are cut out of the gathered ``world`` buffers onto the CPU (``{}`` unless
    ``keep``)."""
    import torch.distributed as dist

    mesh = specs[names[0]][0]
    world, me = mesh.size(), mesh.get_local_rank()
    device = torch.device(mesh.device_type)
    layout, total = [], 0  # layout: (name, shape, c, per_row, offset in the flat buffer)
    for name in names:
        shape = specs[name][2]
        c, per_row = _rows_per_rank(shape, world)
        mine = max(0, min(c, shape[0] - me * c))
        local = named[name]
        if tuple(local.shape) != (mine, *shape[1:]):
            raise RuntimeError(f"EMA shard {name}: local shape {tuple(local.shape)} on mesh rank {me}, expected "
                               f"{(mine, *shape[1:])} (torch.chunk rows of {tuple(shape)} over {world})")
        layout.append((name, shape, c, per_row, total))
        total += c * per_row
    flat = torch.zeros(total, dtype=named[names[0]].dtype, device=device)
    for name, _, _, _, offset in layout:
        flat[offset:offset + named[name].numel()].copy_(named[name].reshape(-1))
    gathered = torch.empty(world * total, dtype=flat.dtype, device=device)
    dist.all_gather_into_tensor(gathered, flat, group=mesh.get_group())
    if not keep:
        return {}
    grid = gathered.view(world, total)
    out = {}
    for name, shape, c, per_row, offset in layout:
        whole = torch.empty(shape, dtype=flat.dtype, device="cpu")
        for r in range(world):
            lo, hi = r * c, min((r + 1) * c, shape[0])
            if hi > lo:
                whole[lo:hi].copy_(grid[r, offset:offset + (hi - lo) * per_row].view(hi - lo, *shape[1:]))
        out[name] = whole
    return out


class _ShardedState:
    """The EMA of a sharded (FSDP2 ``fully_shard``) model: a clone of this rank's local shard
    of every parameter and of every buffer (buffers are not sharded), in the model's order.

    Nothing here communicates except :meth:`state_dict` with ``full=True`` (bucketed
    all-gathers, for single-file checkpoints) and loading a full state dict (each rank cuts
    its own shard, no communication). The sharded state dict holds DTensors built from the
    local shards, so torch.distributed.checkpoint saves and reshards it like a model's.
    """

    def __init__(self, bare: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> None:
        persistent = list(bare.state_dict().keys())  # FSDP2's state_dict only wraps shards: no collective
        dtensor = _dtensor_type()
        self.specs: dict[str, tuple[Any, Any, torch.Size, tuple[int, ...]]] = {}
        self.param_names, self.params = self._clone(bare.named_parameters(), device, dtype, dtensor)
        self.buffer_names, self.buffers = self._clone(bare.named_buffers(), device, dtype, dtensor)
        held = set(self.param_names + self.buffer_names)
        self.persistent = [n for n in persistent if n in held]  # the model's state_dict order, as a plain EMA's

    def _clone(self, named: Iterator[tuple[str, Tensor]], device, dtype, dtensor) -> tuple[list[str], list[Tensor]]:
        names, tensors = [], []
        for name, t in named:
            if dtensor is not None and isinstance(t, dtensor):
                self.specs[name] = (t.device_mesh, t.placements, t.shape, t.stride())
            local = local_shard(t).detach()
            cast = dtype if dtype is not None and local.is_floating_point() else None
            names.append(name)
            tensors.append(local.to(device=device, dtype=cast, copy=True))
        return names, tensors

    def named(self) -> dict[str, Tensor]:
        """Every local tensor by its state-dict name."""
        return dict(zip(self.param_names + self.buffer_names, self.params + self.buffers))

    def state_dict(self, full: bool, rank0_only: bool = False) -> dict[str, Tensor]:
        """Persistent entries: DTensors over the local shards (``full=False``, for
        torch.distributed.checkpoint), or whole tensors gathered onto the CPU (``full=True``;
        a collective: every rank must call it; with ``rank0_only`` the other ranks drop the
        gathered tensors at once and return ``{}``).

        The gather packs the row-sharded tensors (FSDP2's default ``Shard(0)`` on a 1-D mesh)
        into flat buffers of up to :data:`GATHER_BUCKET_BYTES` of gathered output and gathers
        each with one ``all_gather_into_tensor``: a resnet50 EMA is 2 collectives instead of
        161. Any other placement falls back to ``DTensor.full_tensor`` (one each). Both give
        the same bytes."""
        from torch.distributed.tensor import DTensor

        named = self.named()
        keep = not (full and rank0_only) or _rank() == 0
        out: dict[str, Tensor] = {}
        rows: list[str] = []  # the row-sharded names, gathered in buckets below
        for name in self.persistent:
            local = named[name]
            if name not in self.specs:
                if keep:
                    out[name] = local.detach().cpu() if full else local
                continue
            mesh, placements, shape, stride = self.specs[name]
            if full and _row_sharded(mesh, placements, shape):
                out[name] = local  # a placeholder that keeps the model's order
                rows.append(name)
                continue
            if local.device.type != mesh.device_type:
                local = local.to(mesh.device_type)
            dt = DTensor.from_local(local, mesh, placements, shape=shape, stride=stride, run_check=False)
            if not full:
                out[name] = dt
                continue
            whole = dt.full_tensor()  # every rank takes part in the all-gather
            if keep:
                whole = whole.cpu()
                if whole.untyped_storage().nbytes() > whole.numel() * whole.element_size():
                    whole = whole.clone()  # a view into FSDP's padded buffer (uneven shards): no padding saved
                out[name] = whole
        for bucket in _buckets(rows, named, self.specs):
            out.update(_gather_rows(bucket, named, self.specs, keep))
        return out if keep else {}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Copy whole tensors (this rank cuts its shard) or DTensors into the local shards: a
        DTensor sharded as this EMA is (a DCP load into :meth:`state_dict` ``full=False``) is
        copied shard to shard with no communication; any other sharding is gathered first.
        Missing or unexpected persistent keys raise."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        missing = [n for n in self.persistent if n not in state_dict]
        unexpected = [k for k in state_dict if k not in set(self.persistent)]
        if missing or unexpected:
            raise RuntimeError(f"EMA state dict does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        named = self.named()
        for name in self.persistent:
            value = state_dict[name].detach()
            if isinstance(value, DTensor):
                spec = self.specs.get(name)
                if spec is not None and value.device_mesh == spec[0] and tuple(value.placements) == tuple(spec[1]) \
                        and tuple(value.shape) == tuple(spec[2]):
                    named[name].copy_(value.to_local())  # our own sharding (a DCP load): no communication
                    continue
                value = value.full_tensor()
            if name in self.specs:
                mesh, placements, shape, _ = self.specs[name]
                if tuple(value.shape) != tuple(shape):
                    raise RuntimeError(f"EMA tensor {name}: shape {tuple(value.shape)} != model shape {tuple(shape)}")
                value = distribute_tensor(value.to(mesh.device_type), mesh, placements, src_data_rank=None).to_local()
            named[name].copy_(value)


class _Plan:
    """Pairs of (EMA tensor, model tensor) split into what is averaged and what is copied,
    averaged pairs grouped by (device, dtype) so each group is one foreach call.

    Takes the EMA's and the model's tensors as ``(parameters, buffers)`` lists in matching
    order: whole tensors for a plain model, this rank's local shards for a sharded one.
    """

    def __init__(self, ema_tensors: tuple[list[Tensor], list[Tensor]],
                 model_tensors: tuple[list[Tensor], list[Tensor]], average_buffers: bool) -> None:
        (e_params, e_bufs), (m_params, m_bufs) = ema_tensors, model_tensors
        if len(e_params) != len(m_params) or len(e_bufs) != len(m_bufs):
            raise ValueError(f"model does not have the structure the EMA was created from ({len(m_params)} "
                             f"parameters/{len(m_bufs)} buffers vs {len(e_params)}/{len(e_bufs)}); pass the same "
                             "model (wrapped or not) that ModelEMA was built from")
        self.groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        self.copy_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        for i, (e, m) in enumerate(zip(e_params + e_bufs, m_params + m_bufs)):
            if e.shape != m.shape:
                raise ValueError(f"EMA tensor shape {tuple(e.shape)} != model tensor shape {tuple(m.shape)}")
            # parameters, and buffers unless buffers="copy", are averaged when floating (or complex)
            averaged = (i < len(e_params) or average_buffers) and (e.is_floating_point() or e.is_complex())
            ema_list, model_list = (self.groups.setdefault((e.device, e.dtype, m.device, m.dtype), ([], []))
                                    if averaged else self.copy_pairs)
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
        model: nn.Module, *, decay: float | None = None, schedule: str = "constant", half_life: str | None = None,
        update_every: int = 1, update_after_step: int = 0, copy_first: bool = False, min_decay: float = 0.0,
        device: torch.device | str | None = None, dtype: torch.dtype | str | None = None, buffers: str = "average",
        steps_per_epoch: int | None = None, global_batch_size: int | None = None, total_steps: int | None = None,
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
        self.num_updates = 0  # update() calls so far (restored by load_state_dict)
        self._swapped = False

        bare = unwrap_model(model)
        self.module: nn.Module | None = None
        self._shards: _ShardedState | None = None
        if is_sharded(bare):  # FSDP2 cannot be deep-copied, and a full copy is what it avoids
            self._shards = _ShardedState(bare, self.device, self.dtype)
        else:
            self.module = copy.deepcopy(bare).eval().requires_grad_(False)
            if self.device is not None or self.dtype is not None:
                self.module.to(device=self.device, dtype=self.dtype)
        # fail now, not mid-training, if the schedule errors
        self.decay_at(self.update_after_step + 1 + (self.update_every if self.copy_first else 0))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _resolve_decay(decay, half_life, steps_per_epoch, global_batch_size) -> float:
        if decay is not None and half_life is not None:
            raise ValueError(f"decay={decay!r} and half_life={half_life!r} both set the EMA time constant; "
                             "give only one")
        if half_life is not None:
            return _sched.half_life_to_decay(_sched.parse_half_life(half_life).in_batches(
                steps_per_epoch=steps_per_epoch, global_batch_size=global_batch_size))
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
        if not 0.0 <= min_decay < 1.0:
            raise ValueError(f"min_decay={min_decay!r} is outside [0.0, 1.0)")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"buffers={buffers!r} is not accepted; use 'average' or 'copy'")
        if schedule in _sched.NEEDS_TOTAL_STEPS and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"schedule={schedule!r} needs total_steps=<planned number of EMA updates>, "
                             f"got {total_steps!r}")

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, int]:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.num_updates = int(state["num_updates"])

    def config(self) -> dict[str, Any]:
        """The EMA's settings as plain Python types (stored in checkpoints)."""
        return {"decay": self.decay, "schedule": self.schedule, "half_life": self.half_life,
                "update_every": self.update_every, "update_after_step": self.update_after_step,
                "copy_first": self.copy_first, "min_decay": self.min_decay, "buffers": self.buffers_mode,
                "device": None if self.device is None else str(self.device),
                "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
                "schedule_kwargs": dict(self.schedule_kwargs), "total_steps": self.total_steps}

    @property
    def sharded(self) -> bool:
        """True when built from a sharded (FSDP2) model: the EMA holds this rank's shards only."""
        return self._shards is not None

    def state_dict_ema(self, full: bool = True, rank0_only: bool = False) -> dict[str, Tensor]:
        """The averaged weights under the bare model's state-dict keys.

        A plain EMA returns its module's state dict. A sharded EMA returns, with ``full=True``,
        whole tensors on the CPU (an all-gather per tensor: every rank must call it; with
        ``rank0_only`` only rank 0 keeps them and the others return ``{}``, so no rank but the
        writer holds a full copy), else DTensors over its local shards (no communication) for
        ``torch.distributed.checkpoint``.
        """
        return self._shards.state_dict(full, rank0_only) if self._shards is not None else self.module.state_dict()

    def checkpoint_state(self, full: bool = True, rank0_only: bool = False) -> dict[str, Any]:
        """``{"state_dict_ema": <bare module state dict>, "ema": {"num_updates", "config"}}``:
        timm's key for the weights, so timm's ``load_checkpoint(..., use_ema=True)`` reads it.
        ``full`` and ``rank0_only`` as in :meth:`state_dict_ema` (matter for a sharded EMA only)."""
        return {"state_dict_ema": self.state_dict_ema(full, rank0_only),
                "ema": {"num_updates": self.num_updates, "config": self.config()}}

    def load_checkpoint_state(self, state_dict_ema: dict[str, Tensor], ema_meta: dict[str, Any] | None = None) -> None:
        """Restore weights (unprefixed keys) and, when given, the update counter. Whole tensors
        and DTensors of any sharding are accepted, by a plain EMA and by a sharded one."""
        if self._shards is not None:
            self._shards.load_state_dict(state_dict_ema)
        else:
            self.module.load_state_dict(_gathered(state_dict_ema))
        if ema_meta is not None:
            self.num_updates = int(ema_meta.get("num_updates", 0))
            saved = ema_meta.get("config") or {}
            if changed := {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}:
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
    def _ema_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        return (self._shards.params, self._shards.buffers) if self._shards is not None else _module_tensors(self.module)

    def _plan(self, model: nn.Module, average_buffers: bool | None = None) -> _Plan:
        bare = unwrap_model(model)
        if self.device is None and self._shards is None:
            self._follow_device(bare)
        if average_buffers is None:
            average_buffers = self.buffers_mode == "average"
        return _Plan(self._ema_tensors(), _module_tensors(bare), average_buffers)

    def _follow_device(self, bare: nn.Module) -> None:
        src = next(iter(bare.parameters()), None)
        dst = next(iter(self.module.parameters()), None)
        if src is not None and dst is not None and src.device != dst.device:
            _log.info("model moved to %s after the EMA was created; moving the EMA with it", src.device)
            self.module.to(device=src.device)

    def weight_at(self, step: int) -> float | None:
        """Weight of the model in update number ``step`` (1-based): ``ema += w * (model - ema)``.

        1.0 (a copy) for ``step <= update_after_step``; ``1 - decay_at(step)`` on the steps
        that average (every ``update_every``-th after ``update_after_step``); None on the
        steps in between, which only count.
        """
        if step <= self.update_after_step:
            return 1.0
        if (step - self.update_after_step) % self.update_every == 0:
            return 1.0 - self.decay_at(step)
        return None

    def _check_not_swapped(self) -> None:
        if self._swapped:
            raise RuntimeError("update() inside swapped_into(): the EMA holds the model's weights until the block ends")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimizer step and average the model into the EMA when it is due."""
        self._check_not_swapped()
        self.num_updates += 1
        if (weight := self.weight_at(self.num_updates)) is not None:
            self._apply(model, weight)

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
        self._plan(bare, True)  # structure check
        _copy_pairs(_flat(_module_tensors(bare)), _flat(self._ema_tensors()))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the EMA weights into ``model`` in place for the body; restore them bit-exactly.

        Same-dtype tensors are exchanged one at a time (extra memory: the largest tensor);
        tensors whose dtype differs (fp32 EMA of a bf16 model) keep a copy of the model's
        values for the restore. Yields the bare model. ``update()`` inside the block raises.

        A sharded (FSDP2) EMA swaps this rank's shards into the model's shards: the forward
        passes in the body gather the EMA weights, with no full copy anywhere. The model is
        resharded before and after, so no stale gathered weights are used or kept.
        """
        bare = unwrap_model(model)
        self._plan(bare, True)  # structure check before touching anything
        pairs = list(zip(_flat(_module_tensors(bare)), _flat(self._ema_tensors())))
        reshard_fsdp(bare)
        with torch.no_grad():
            saved = self._swap(pairs)
        self._swapped = True
        try:
            yield bare
        finally:
            reshard_fsdp(bare)
            with torch.no_grad():
                self._swap(pairs, saved)
            self._swapped = False

    @staticmethod
    def _swap(pairs: Sequence[tuple[Tensor, Tensor]], saved: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
        """Exchange each same-dtype (model, EMA) pair. Other pairs: swapping in (``saved`` None)
        keeps a copy of the model tensor (returned) and writes the EMA's into it; swapping out
        writes the copy back."""
        kept: dict[int, Tensor] = {}
        for i, (m, e) in enumerate(pairs):
            if m.dtype == e.dtype:
                tmp = m.clone()
                m.copy_(e)
                e.copy_(tmp)
            elif saved is None:
                kept[i] = m.clone()
                m.copy_(e)
            else:
                m.copy_(saved[i])
        return kept

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through the averaged module (a sharded EMA has none: use :meth:`swapped_into`)."""
        if self.module is None:
            raise RuntimeError("a sharded (FSDP) EMA holds only this rank's shards and has no module to run; "
                               "evaluate it with `with ema.swapped_into(model): model(x)`")
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        src = f"half_life={self.half_life!r}" if self.half_life else f"decay={self.decay}"
        return f"{src}, schedule={self.schedule!r}, update_every={self.update_every}, num_updates={self.num_updates}"


def reshard_fsdp(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module in ``model`` (no-op for plain
    models), so the next forward gathers the shards as they are now."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return
    for m in model.modules():
        if isinstance(m, fsdp_module):
            m.reshard()


def _gathered(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with DTensors replaced by whole tensors (an all-gather each)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return state_dict
    return {k: (v.full_tensor() if isinstance(v, dtensor) else v) for k, v in state_dict.items()}


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
    torch._foreach_lerp_(dst, [m for m in model_list for _ in ema_lists], weights * len(model_list))


def _member(model: nn.Module | None, spec: ModelEMA | dict[str, Any], shared: dict[str, Any]) -> ModelEMA:
    """One MultiEMA member: a ModelEMA as given, or one built from ``{**shared, **spec}``."""
    if isinstance(spec, ModelEMA):
        if shared:
            raise ValueError(f"MultiEMA(members=[ModelEMA, ...]) takes no shared settings, got {sorted(shared)}; "
                             "give them to each ModelEMA")
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"MultiEMA members must be ModelEMA objects or dicts of ModelEMA arguments, "
                         f"got {type(spec).__name__}")
    if model is None:
        raise ValueError("MultiEMA(members=[{...}]) needs the model to build its members from")
    return ModelEMA(model, **{**shared, **spec})


class MultiEMA(nn.Module):
    """Several EMAs of one model, updated in one pass.

    :meth:`update` reads the model once for all of them: every member due on this step is
    averaged by one fused ``_foreach_lerp_`` per (device, dtype) group of tensors, whatever
    its decay, schedule or schedule arguments (e.g. EDM2 power profiles that differ in
    ``gamma``); members that copy on this step (``update_after_step``) are copied in the
    same pass, members between their ``update_every`` steps only count. ``ema[i]`` is the
    i-th :class:`ModelEMA` (``ema[0]`` is the "main" one); each member keeps its own
    state dict, checkpoint state and :meth:`ModelEMA.swapped_into`.

    Args:
        model: the model to average (plain, wrapped, compiled or FSDP2-sharded).
        decays: per-EMA target decays, e.g. ``(0.999, 0.9998, 0.9999)``.
        half_lives: per-EMA half-lives instead of decays, e.g. ``("1000ba", "0.5ep")``.
        members: instead of ``decays`` / ``half_lives``: one entry per EMA, either a dict of
            :class:`ModelEMA` arguments (merged over ``**kwargs``), e.g.
            ``[{"decay": 0.9998}, {"schedule": "power", "gamma": 6.94, "dtype": torch.float32}]``,
            or a :class:`ModelEMA` already built from this model (then no ``**kwargs``).
            Each member keeps its own update counter and schedule position.
        **kwargs: any other :class:`ModelEMA` argument, shared by all EMAs.
    """

    def __init__(self, model: nn.Module | None = None, *, decays: Sequence[float] | None = None,
                 half_lives: Sequence[str] | None = None,
                 members: Sequence[ModelEMA | dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__()
        if sum(x is not None for x in (decays, half_lives, members)) != 1:
            raise ValueError("give MultiEMA either decays=[...] or half_lives=[...] or members=[...], exactly one")
        if members is None:
            key = "decay" if decays is not None else "half_life"
            members = [{key: v} for v in (decays if decays is not None else half_lives)]
        emas = [_member(model, spec, kwargs) for spec in members]
        if not emas:
            raise ValueError("MultiEMA needs at least one decay, half-life or member")
        self.emas = nn.ModuleList(emas)
        self._fused_ok = True

    def __len__(self) -> int:
        return len(self.emas)

    def __getitem__(self, index: int) -> ModelEMA:
        return self.emas[index]

    def __iter__(self) -> Iterator[ModelEMA]:
        return iter(self.emas)

    def _try_fused(self, model_list: list[Tensor], ema_lists: list[list[Tensor]], weights: list[float]) -> bool:
        if self._fused_ok:
            try:
                _fused_lerp(model_list, ema_lists, weights)
            except (TypeError, RuntimeError):  # an older torch without the ScalarList overload
                _log.info("fused multi-EMA lerp unavailable in torch %s; updating EMAs one by one", torch.__version__)
                self._fused_ok = False
        return self._fused_ok

    @property
    def num_updates(self) -> int:
        """Update calls so far of ``ema[0]`` (every member's unless loaded from different states)."""
        return self.emas[0].num_updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Count one optimizer step for every EMA and average the model into all that are due."""
        for ema in self.emas:
            ema._check_not_swapped()
        # Each member counts its own updates (they agree unless loaded from different states).
        due = [(ema, w) for ema in self.emas if (w := ema.weight_at(ema.num_updates + 1)) is not None]
        # Averaged tensor groups, bucketed so that one bucket reads one model tensor list: the
        # same (device, dtype) key and the same buffer mode (which decides what is in a group).
        buckets: dict[tuple, tuple[list[Tensor], list[tuple[list[Tensor], float]]]] = {}
        for ema, weight in due:
            plan = ema._plan(model)
            for key, (ema_list, model_list) in plan.groups.items():
                if weight == 1.0:
                    _copy_pairs(ema_list, model_list)
                else:
                    buckets.setdefault((key, ema.buffers_mode), (model_list, []))[1].append((ema_list, weight))
            _copy_pairs(*plan.copy_pairs)
        for (key, _), (model_list, targets) in buckets.items():
            same_kind = key[0] == key[2] and key[1] == key[3]
            if not (len(targets) > 1 and same_kind
                    and self._try_fused(model_list, [t[0] for t in targets], [t[1] for t in targets])):
                for ema_list, weight in targets:
                    _lerp_group(key, ema_list, model_list, weight)
        for ema in self.emas:
            ema.num_updates += 1
