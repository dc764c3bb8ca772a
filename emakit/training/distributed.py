"""One process or many: ``DistInfo`` says which, and the few collectives the trainer needs.

A run is distributed when torchrun launched it with more than one process (``WORLD_SIZE``
> 1 in the environment). Rank 0 (``dist.is_main``) alone logs to the console at INFO,
writes files and shows progress bars. Launch commands::

    python train.py DATA                                         # one process
    torchrun --standalone --nproc_per_node=2 train.py DATA        # one machine, 2 processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 \\
        --master_addr=<node 0 address> --master_port=29500 train.py DATA  # node 0 of 2 (node_rank=1 on the other)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from .bn import bn_buffers

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "all_reduce_sum", "broadcast_ints",
           "distribute_bn", "resolve_device"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank``, ``local_rank`` on its node, ``world_size``,
    and the ``device`` it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, writes files and shows progress (rank 0)."""
        return self.rank == 0


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` (the flag's kind, ``kinds.Device``, checked it is available): default cuda
    (``cuda:<local_rank>``) when available, else cpu."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def init_distributed(device: str | None = None, timeout_s: float = 600.0, *, always_group: bool = False) -> DistInfo:
    """Read torchrun's environment, pick the device and start the process group if needed.

    nccl on CUDA, gloo on CPU. ``timeout_s`` bounds every collective, so a rank that died
    does not leave the others waiting forever. ``always_group``: start the group under
    torchrun even for one process (FSDP needs one at any world size).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1 and not (always_group and "MASTER_ADDR" in os.environ):
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend, init_method="env://",
                                      timeout=timedelta(seconds=timeout_s))
    info = DistInfo(rank=torch_dist.get_rank(), local_rank=local_rank,
                    world_size=torch_dist.get_world_size(), device=dev)
    _log.info("distributed: rank %d of %d (local rank %d) on %s, backend %s",
              info.rank, info.world_size, local_rank, dev, backend)
    return info


def shutdown_distributed(dist: DistInfo, *, synchronize: bool = False) -> None:
    """Destroy the process group started by :func:`init_distributed` (no-op otherwise).

    ``synchronize=True`` (clean exits only) waits at a barrier first, so no rank closes its
    connections while another is still finishing: gloo aborts a process whose peer vanished.
    Error paths skip it, since a rank stuck elsewhere would never reach the barrier.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():  # also one process started with always_group
        if synchronize and dist.distributed:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def gather_objects(obj: Any, dist: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group); *collective*."""
    if not dist.distributed:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], dist: DistInfo) -> list[float]:
    """Sum plain numbers over all ranks (float64, so counts up to 2**53 stay exact)."""
    if not dist.distributed:
        return [float(v) for v in values]
    comm_device = dist.device if dist.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=comm_device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_ints(values: list[int], dist: DistInfo) -> list[int]:
    """Rank 0's plain integers on every rank (as they are without a process group); *collective*."""
    if not (dist.distributed and torch_dist.is_initialized()):
        return [int(v) for v in values]
    comm_device = dist.device if dist.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=comm_device)
    torch_dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


@torch.no_grad()
def distribute_bn(module: nn.Module, dist: DistInfo, mode: str) -> None:
    """Make BatchNorm running statistics equal on every rank before evaluation.

    ``reduce`` averages them over ranks, ``broadcast`` copies rank 0's (timm's
    ``distribute_bn``); '' does nothing. The statistics are the running mean and var of
    :func:`.bn.bn_layers` (every tracking BatchNorm, SyncBatchNorm, timm's BatchNormAct).
    Works for a CPU-held EMA under nccl by staging through the rank's device.
    """
    if not dist.distributed or not mode:
        return
    for buf in (b for b in bn_buffers(module).values() if b.is_floating_point()):  # mean and var, not the count
        staged = buf if (dist.device.type == "cuda") == (buf.device.type == "cuda") else buf.to(dist.device)
        if mode == "reduce":
            torch_dist.all_reduce(staged, op=torch_dist.ReduceOp.SUM)
            staged.div_(dist.world_size)
        elif mode == "broadcast":
            torch_dist.broadcast(staged, src=0)
        else:
            raise ValueError(f"dist-bn mode {mode!r}: use reduce, broadcast or ''")
        if staged is not buf:
            buf.copy_(staged)
