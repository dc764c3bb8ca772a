"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: which modules to shard, how,
and the gathered single-file checkpoint pieces in the layout a DDP or single-process run writes.

Sharding: :func:`apply_fsdp` calls ``fully_shard`` on each repeated block that
:func:`shard_blocks` finds (timm's ``blocks`` / ``layers`` / ``stages``, torchvision/timm
ResNets' ``layer1..4``; else a size-based rule), then on the root. Build the optimizer *after*
it, on the sharded parameters (DTensors); the EMA (:class:`emakit.ModelEMA`) of the sharded
model then keeps this rank's shards only.

Single-file checkpoints stay interchangeable between world sizes and engines:

- :func:`full_model_state` gathers the model to whole CPU tensors on rank 0 (``{}`` elsewhere)
  with torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``;
- :func:`full_optimizer_state` does the same for the optimizer and converts torch's
  parameter-name keyed layout into the standard ``optimizer.state_dict()`` layout (integer ids
  in ``param_groups`` order), exactly what ``optimizer.state_dict()`` of the same model and the
  same param groups writes in a DDP or single-process run;
- :func:`load_full_model_state` / :func:`load_full_optimizer_state` take such standard dicts
  (read from a file written by any world size, DDP, FSDP or one process) into a sharded or
  plain model/optimizer: each rank cuts its own shard, no communication.
- the EMA's own methods do its part: ``ema.state_dict_ema(full=True)`` (a collective: every
  rank calls it) and ``ema.load_checkpoint_state(sd, meta)`` (whole tensors or DTensors).

The sharded form for ``torch.distributed.checkpoint`` folders is in :mod:`emakit.training.dcp`.
Every function here works for plain (one process), DDP-wrapped and ``fully_shard``-ed models;
functions marked *collective* must be called by every rank.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..ema import reshard_fsdp, unwrap_model

__all__ = ["shard_blocks", "apply_fsdp", "broadcast_buffers_before_forward", "broadcast_buffers", "broadcast_tensors",
           "reshard", "full_model_state", "full_optimizer_state", "load_full_model_state",
           "load_full_optimizer_state", "load_sharded_optimizer_state", "sharded_model_state",
           "sharded_optimizer_state", "optimizer_state_to_ids", "optimizer_state_to_names",
           "DEFAULT_MIN_BLOCK_PARAMS"]

# Containers of repeated blocks, in the order they are looked for (timm ViT/DeiT/EVA/Mixer:
# blocks; Swin/MaxViT-like: layers; ConvNeXt/EfficientNet/RegNet-like: stages; ResNets: layer1..4).
_BLOCK_CONTAINERS = ("blocks", "layers", "stages")
_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
# Size-based fallback: a module is a unit once the parameters not yet in a unit below it reach this.
DEFAULT_MIN_BLOCK_PARAMS = 1_000_000


def _children(container: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in container.named_children() if any(True for _ in m.parameters())]


def _repeated_blocks(bare: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every repeated block under the known container attributes; a stage
    with a ``blocks`` container of its own contributes its blocks (finer units: less memory
    gathered at once), else the whole stage."""
    for attr in _BLOCK_CONTAINERS:
        container = getattr(bare, attr, None)
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and len(container) > 0:
            units = []
            for name, child in _children(container):
                inner = getattr(child, "blocks", None)
                if isinstance(inner, (nn.ModuleList, nn.Sequential)) and len(_children(inner)) > 1:
                    units += [(f"{attr}.{name}.blocks.{n}", m) for n, m in _children(inner)]
                else:
                    units.append((f"{attr}.{name}", child))
            return units
    if all(isinstance(getattr(bare, a, None), nn.Sequential) for a in _RESNET_LAYERS):
        return [(f"{a}.{n}", m) for a in _RESNET_LAYERS for n, m in _children(getattr(bare, a))]
    return []


def _size_based_blocks(bare: nn.Module, min_params: int) -> list[tuple[str, nn.Module]]:
    """Bottom-up: a (non-root) module becomes a unit when the parameters under it that are not
    already inside a unit reach ``min_params``; units never nest."""
    units: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> int:
        remaining = sum(p.numel() for p in module.parameters(recurse=False))
        for name, child in module.named_children():
            remaining += visit(f"{prefix}.{name}" if prefix else name, child)
        if prefix and remaining >= min_params:
            units.append((prefix, module))
            return 0
        return remaining

    visit("", bare)
    return units


def shard_blocks(model: nn.Module, min_params: int | None = None) -> list[tuple[str, nn.Module]]:
    """The modules to wrap with ``fully_shard`` one by one before the root, as (name, module).

    timm models' repeated blocks (``blocks``, ``layers``, ``stages``, a stage's own ``blocks``)
    and ResNets' residual blocks (``layer1..4`` children); for any other model a size rule:
    bottom-up, a module becomes a unit once the parameters under it not already in a unit
    reach ``min_params`` (default :data:`DEFAULT_MIN_BLOCK_PARAMS` = 1M), so units never nest.
    Passing ``min_params`` forces the size rule. An empty list means: shard the root only.
    """
    bare = unwrap_model(model)
    if min_params is None:
        blocks = _repeated_blocks(bare)
        if blocks:
            return blocks
        min_params = DEFAULT_MIN_BLOCK_PARAMS
    if min_params < 1:
        raise ValueError(f"min_params={min_params!r} must be a positive number of parameters")
    return _size_based_blocks(bare, int(min_params))


def apply_fsdp(model: nn.Module, *, mp_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
               mesh: Any = None, min_params: int | None = None) -> list[str]:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on each of :func:`shard_blocks`,
    then on the root. *Collective* (needs an initialized process group).

    Args:
        model: the bare model, already on its device (not DDP-wrapped).
        mp_dtype: compute dtype of the forward/backward (e.g. ``torch.bfloat16`` from
            ``--amp-dtype``): ``MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=float32)``;
            the sharded parameters, the optimizer and the EMA stay float32. None (default): no
            mixed precision, everything in the parameters' dtype.
        reshard_after_forward: free the gathered parameters of each block and of the root
            after their forward (default True: least memory, one more all-gather per block in
            backward, and after an evaluation forward every parameter is its sharded DTensor
            again). Measured on torch 2.15: torch's own default (None) keeps the root gathered,
            and after a ``no_grad`` forward the root's parameters stay registered as whole
            plain tensors until the next backward, an EMA update then fails on the shapes.
            With False, call :func:`reshard` after evaluation.
        mesh: a 1-D ``DeviceMesh``; default one over the whole world on the parameters' device type.
        min_params: passed to :func:`shard_blocks` (forces the size rule).

    Returns the names of the wrapped blocks, in order (for a log line). Build the optimizer
    after this call, from the model's (now sharded) parameters.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("FSDP needs a process group: launch with torchrun (init_process_group first)")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError("apply_fsdp takes the bare model; FSDP replaces DDP, do not wrap it in both")
    if mesh is None:
        param = next(model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    blocks = shard_blocks(model, min_params)
    for _, block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root too (torch's own default keeps the root gathered after forward): after a no_grad
    # forward its parameters would stay registered as whole plain tensors until the next backward.
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return [name for name, _ in blocks]


def broadcast_buffers_before_forward(model: nn.Module) -> Any:
    """DDP's ``broadcast_buffers`` for an FSDP2 model: before each training forward (the
    module in train mode, gradients enabled) every buffer (BatchNorm running statistics) is
    set to rank 0's, one broadcast per dtype, so BatchNorm statistics follow rank 0 exactly as
    under DDP and an FSDP run matches a DDP run. Returns the hook handle (``.remove()``)."""
    def hook(module: nn.Module, _args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            broadcast_buffers(module)

    return model.register_forward_pre_hook(hook)


def broadcast_buffers(model: nn.Module) -> None:
    """Set every buffer of ``model`` to rank 0's, one broadcast per (device, dtype); *collective*
    (a no-op without a process group or with one process). Buffers are not sharded by FSDP2:
    between evaluations each rank's BatchNorm statistics are its own."""
    broadcast_tensors(list(model.buffers()))


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Set every (plain, not sharded) tensor to rank 0's in place, one broadcast per (device,
    dtype); *collective*, a no-op without a process group or with one process. CPU tensors
    (``--model-ema-force-cpu``) go through the GPU under nccl."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    nccl = dist.get_backend() == "nccl"
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for buf in tensors:
        groups.setdefault((buf.device, buf.dtype), []).append(buf)
    with torch.no_grad():
        for (device, _), bufs in groups.items():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            if nccl and device.type == "cpu":
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(flat, src=0)
            for b, value in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(value.view_as(b))


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module in ``model`` (no communication; a
    no-op for a plain model or one already sharded), so its parameters are the sharded
    DTensors again, e.g. after an evaluation forward with ``reshard_after_forward=False``."""
    reshard_fsdp(unwrap_model(model))


# ----------------------------------------------------------------------------- state dicts
def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as whole CPU tensors under the bare model's keys (no ``module.``),
    on rank 0; ``{}`` on the other ranks. *Collective* for a sharded model (an all-gather per
    tensor, one at a time: rank 0's peak is the state dict plus one tensor)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def sharded_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state dict in sharded form (DTensors over this rank's shards, no
    communication; whole tensors for a plain model), for :func:`emakit.training.dcp.save_dcp`
    and as the template :func:`emakit.training.dcp.load_dcp` fills."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def load_full_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True) -> Any:
    """Load whole tensors (a single-file checkpoint's ``state_dict``, from any world size and
    engine) or a sharded dict (DTensors, e.g. from :func:`sharded_model_state` filled by
    ``load_dcp``) into ``model``: a sharded model's ranks each cut their own shard, no
    communication. Returns torch's (missing_keys, unexpected_keys); ``strict`` raises on either."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    full = not any(hasattr(v, "to_local") for v in state_dict.values())  # DTensors: a DCP folder's shards
    return set_model_state_dict(model, state_dict, options=_options(full_state_dict=full, strict=strict))


def optimizer_state_to_ids(state: dict[str, Any]) -> dict[str, Any]:
    """torch's parameter-name keyed optimizer state dict (``get_optimizer_state_dict``:
    ``state`` keyed by parameter names, ``param_groups[i]["params"]`` lists of names) in the
    standard ``optimizer.state_dict()`` layout: integer ids numbered through the param groups
    in order, exactly as ``torch.optim.Optimizer.state_dict`` numbers them."""
    ids: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            if not isinstance(name, str):
                raise ValueError("optimizer state is already in the integer-id layout")
            params.append(ids.setdefault(name, len(ids)))
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    unknown = [k for k in state["state"] if k not in ids]
    if unknown:
        raise ValueError(f"optimizer state for parameters in no param group: {unknown[:5]}")
    return {"state": {ids[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap_model(model).named_parameters(remove_duplicate=False)}


def optimizer_state_to_names(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_ids` for ``optimizer`` of ``model``: a standard
    ``optimizer.state_dict()`` (integer ids) keyed by the parameter names of the optimizer's
    own param groups, position by position. Raises ValueError when the group structure differs
    (number of groups, or of parameters in a group): the checkpoint is not this optimizer's."""
    names = _param_names(model)
    saved_groups, groups = state.get("param_groups"), optimizer.param_groups
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(f"optimizer state has {len(saved_groups or [])} param groups, this optimizer "
                         f"{len(groups)}: it was written for other param groups (optimizer/weight decay settings)")
    to_name: dict[Any, str] = {}
    out_groups = []
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"optimizer param group {i} has {len(saved['params'])} parameters in the checkpoint, "
                             f"{len(group['params'])} here: it was written for another model or param grouping")
        for pid, p in zip(saved["params"], group["params"]):
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            to_name[pid] = names[id(p)]
        out_groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": [to_name[pid] for pid in saved["params"]]})
    unknown = [k for k in state.get("state", {}) if k not in to_name]
    if unknown:
        raise ValueError(f"optimizer state for parameter ids {unknown[:5]} that are in no param group")
    return {"state": {to_name[pid]: v for pid, v in state.get("state", {}).items()}, "param_groups": out_groups}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict gathered to whole CPU tensors on rank 0 (``{}`` elsewhere) in
    the standard ``optimizer.state_dict()`` layout (see :func:`optimizer_state_to_ids`), so a
    single-file checkpoint's ``optimizer`` is the same whatever wrote it. *Collective*.

    torch's helper fills an optimizer that has not stepped yet by a step with zero gradients
    and lr 0 (state with ``step`` 1): save after the first optimizer step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    return optimizer_state_to_ids(state) if state else {}


def sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state in sharded, parameter-name keyed form (DTensors over this rank's
    shards; no communication), for :func:`emakit.training.dcp.save_dcp` and as the template
    that ``load_dcp`` fills."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a standard ``optimizer.state_dict()`` (integer ids, whole tensors: a single-file
    checkpoint's ``optimizer`` from any world size, DDP, FSDP or one process) into ``optimizer``
    of ``model``, plain or sharded; each rank cuts its own shard of every state tensor, no
    communication. Every rank passes the whole dict. Hyperparameters (lr, ...) come from
    the checkpoint, as with ``optimizer.load_state_dict``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    named = optimizer_state_to_names(model, optimizer, state)
    set_optimizer_state_dict(model, optimizer, {**named}, options=_options(full_state_dict=True))
    # torch's helper hands hyperparameters back with tuples turned into lists (betas): set them
    # as the checkpoint has them, as Optimizer.load_state_dict does.
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})


def load_sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a parameter-name keyed optimizer state dict in sharded form (:func:`sharded_optimizer_state`
    after ``load_dcp`` filled it) into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state)
