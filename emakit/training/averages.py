"""Every weight average of a run, owned by one :class:`Averages` object: the EMA(s), the
post-hoc power EMA, BatchNorm recalibration at evaluation, their checkpoint entries and
their resume.

- **Several EMAs** (``--model-ema-decay 0.999,0.9998,0.9999``) are one ``MultiEMA``: one
  update reads the model once for all of them. EMA ``i`` is named ``ema`` (i = 0) or
  ``ema<i>`` in ``summary.csv`` columns and logs, ``ema:<i>`` in ``validate.py --weights``,
  and is stored in checkpoints under ``state_dict_ema`` + ``ema`` (i = 0, timm's key) or
  ``state_dict_ema_<i>`` + ``ema_<i>`` (:func:`emakit.checkpoint.ema_checkpoint_keys`). One
  value stays a plain ``ModelEMA``.
- **Post-hoc EMA** (``--model-ema-posthoc``, Karras et al. 2024, EDM2): rank 0 tracks a
  ``PowerEMA`` (power-schedule ``ModelEMA`` s; the run's EMAs join the same ``MultiEMA``
  engine, so one fused pass updates EMAs and profiles) after every optimizer step and writes
  its snapshots into ``<run>/posthoc/`` (:class:`PosthocTracker`), within ``--posthoc-budget``
  (:func:`posthoc_snapshot_cap`); ``validate.py --posthoc-sigma-rel`` rebuilds any EMA length.
  Under ``--fsdp`` every rank tracks its shards of the profiles (no collective per update);
  on a snapshot step every rank takes part in gathering each profile to rank 0, which writes
  the same files as a one-process run (*gathered snapshots*).
- **BN recalibration** (``--model-ema-bn-recal N``): :func:`recalibrated_bn` re-estimates an
  EMA's BatchNorm statistics for the evaluation only and puts the averaged ones back.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import nn

from emakit import ModelEMA, MultiEMA
from emakit.checkpoint import ema_checkpoint_keys, ema_indices
from emakit.ema import local_shard
from emakit.schedules import parse_half_life
from emakit.posthoc import DTYPES as _DTYPES
from emakit.posthoc import (Footprint, PowerEMA, SnapshotWriter, budget_max_snapshots, estimate_footprint, human_bytes,
                            list_snapshots, model_fp32_bytes, parse_budget)

from . import UsageError, one_line
from .bn import bn_buffers, recalibrate_bn  # bn_buffers: re-exported, the one BatchNorm walker
from .distributed import DistInfo, broadcast_ints
from .fsdp import broadcast_tensors
from .state import BN_RECAL, EPOCH, POSTHOC, POSTHOC_PROFILES, check_ema_entry, ema_entries, steps_done

__all__ = ["Averages", "ema_members", "ema_label", "ema_selector", "ema_checkpoint_keys", "ema_checkpoint_state",
           "describe_ema", "bn_buffers", "recalibrated_bn", "auto_posthoc_every", "posthoc_snapshot_cap",
           "PosthocTracker", "posthoc_sweep_command", "SWEEP_SIGMA_RELS"]

_log = logging.getLogger(__name__)

_EmaSet = Union[ModelEMA, MultiEMA]
SWEEP_SIGMA_RELS = "0.02,0.05,0.08,0.15"  # the sweep suggested at the end of a post-hoc run


# --------------------------------------------------------------------------- several EMAs
def ema_members(ema: _EmaSet | None) -> list[ModelEMA]:
    """The individual EMAs: ``[ema]`` for a ``ModelEMA``, its members for a ``MultiEMA``."""
    if ema is None:
        return []
    return list(ema) if isinstance(ema, MultiEMA) else [ema]


def ema_label(index: int) -> str:
    """Column / log name of EMA ``index``: ``ema``, ``ema1``, ``ema2``, ..."""
    return "ema" if index == 0 else f"ema{index}"


def ema_selector(index: int) -> str:
    """``validate.py --weights`` value that picks EMA ``index``: ``ema``, ``ema:1``, ..."""
    return "ema" if index == 0 else f"ema:{index}"


def ema_checkpoint_state(ema: _EmaSet | None, *, full: bool = True) -> dict[str, Any]:
    """Every EMA's weights and meta under its checkpoint keys (:func:`~.state.ema_entries`)."""
    return ema_entries(ema_members(ema), full=full)


def describe_ema(member: ModelEMA) -> str:
    """``decay 0.9998`` or ``half-life 0.5ep (decay 0.939 per step)``."""
    if member.half_life:
        return f"half-life {member.half_life} (decay {member.decay:.6g} per step)"
    return f"decay {member.decay:.6g}"


# --------------------------------------------------------------------------- BN recalibration
@contextlib.contextmanager
def recalibrated_bn(module: nn.Module, loader: Iterable, num_batches: int, device: torch.device, *,
                    channels_last: bool = False,
                    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``module`` carries BatchNorm statistics re-estimated over
    ``num_batches`` batches of ``loader`` (``recalibrate_bn``: cumulative average, pooled
    over DDP ranks); on exit its own buffers are put back bit-exactly.

    Why restore: an EMA averages its BatchNorm buffers along with the weights, and the
    next update must continue from that average, exactly as without recalibration (the
    checkpoint's ``state_dict_ema`` and a resumed run are unchanged by the flag). The
    recalibrated statistics are a function of the EMA weights and the data, cheap to
    recompute; the block yields copies of them for the checkpoint's ``ema_bn_recal`` key.
    """
    saved = {name: buf.clone() for name, buf in bn_buffers(module).items()}
    try:
        recalibrate_bn(module, loader, num_batches, device, channels_last=channels_last, autocast=autocast)
        yield {name: buf.detach().clone() for name, buf in bn_buffers(module).items()}
    finally:
        with torch.no_grad():
            live = bn_buffers(module)
            for name, value in saved.items():
                live[name].copy_(value)


# --------------------------------------------------------------------------- post-hoc EMA
def auto_posthoc_every(total_steps: int, max_snapshots: int) -> int:
    """Snapshot interval for a run of ``total_steps`` optimizer steps that stores at most
    ``max_snapshots`` snapshot steps, the last step included: ``ceil(total_steps / max_snapshots)``.

    The run then stores the multiples of the interval plus the last step when it is off the
    interval, ``ceil(total_steps / every) <= max_snapshots`` of them (and more than half of
    ``max_snapshots`` for a run longer than that); a shorter run saves every step.
    """
    if int(max_snapshots) < 1:
        raise ValueError(f"max_snapshots must be >= 1, got {max_snapshots!r}")
    return max(1, -(-int(total_steps) // int(max_snapshots)))


def posthoc_snapshot_cap(model: nn.Module, budget: str, *, n_profiles: int, snapshot_dtype: str,
                         max_snapshots: int | None = None) -> tuple[int | None, int | None]:
    """(budget in bytes, cap on snapshot steps) for ``--posthoc-budget`` (and the optional
    ``--posthoc-max-snapshots``); ``(None, None)`` when unbounded.

    One snapshot step stores ``n_profiles`` files of the model's state in
    ``snapshot_dtype`` (``estimate_footprint``: tensor bytes plus torch.save's headers), so
    with the default two float16 profiles a step costs about the model's float32 bytes and
    a budget of ``Nx`` holds N - 1 steps (the headers take a little more than the model).
    ``ValueError`` when the budget cannot hold the 2 steps a reconstruction needs.
    """
    parsed = parse_budget(budget)
    model_bytes = model_fp32_bytes(model)
    per_step = estimate_footprint(model, 1, n_profiles, _DTYPES[snapshot_dtype]).bytes_per_snapshot
    budget_bytes = parsed.resolve(model_bytes)
    cap = budget_max_snapshots(budget_bytes, per_step)
    if cap is not None and cap < 2:
        need = 2 * per_step
        raise ValueError(f"--posthoc-budget {budget} ({human_bytes(budget_bytes)}) holds {cap} snapshot step(s) of "
                         f"{human_bytes(per_step)} ({n_profiles} profiles in {snapshot_dtype}) and a reconstruction "
                         f"needs at least 2: pass --posthoc-budget {math.ceil(need / model_bytes * 10) / 10:g}x "
                         f"({human_bytes(need)}) or more")
    if max_snapshots is not None:
        cap = max_snapshots if cap is None else min(cap, max_snapshots)
    return budget_bytes, cap


class PosthocTracker:
    """The power-function EMAs and their snapshot folder (EDM2, ``emakit.posthoc``): rank 0's
    alone for a plain or DDP model, every rank's (its shards) for a sharded (FSDP2) one.

    ``update(model)`` follows the EMA update (after every optimizer step that was taken)
    and saves the profiles every ``every`` steps. The tracker is built before the output
    folder exists (so resume errors leave nothing behind); :meth:`open_folder` (rank 0) then
    binds the snapshot folder, deletes snapshots newer than the resumed step and fits the
    planned run into the cap (widening the interval and thinning stored snapshots when a
    resumed run was extended).

    Sharded model (``sharded``), gathered snapshots: only rank 0 has the folder and its
    writer. On a snapshot step every rank takes part in gathering each profile, one at a
    time, to rank 0 (CPU tensors), which writes the same files as a one-process run. So that
    all ranks agree on when to gather, rank 0's interval (planned by :meth:`open_folder`,
    doubled by thinning) is broadcast after planning (:meth:`sync_interval`) and after each
    save together with whether rank 0's write failed; a failed write then raises the same
    ``OSError`` on every rank. :meth:`finish` decides on rank 0 and broadcasts. Updates
    between snapshots issue no collective.

    Args:
        model: the bare model.
        sigma_rels: tracked profile widths.
        every: base snapshot interval in optimizer steps.
        snapshot_dtype: ``float16`` | ``bfloat16`` | ``float32`` for the files (accumulation is float32).
        max_snapshots: optional bound on snapshot steps (from the budget, ``posthoc_snapshot_cap``).
        total_steps: planned optimizer steps of the whole run (interval planning, footprint projection).
        budget_bytes: the disk budget the cap comes from (reported in the logs), None if unbounded.
        device: where the profiles live (default: next to the model).
        ema: the run's EMA(s) to update in the same fused pass as the profiles (one engine,
            ``PowerEMA(alongside=...)``): :meth:`update` then advances them too, the loop must
            not call ``ema.update`` as well (``owns_ema``), and their checkpoint keys and
            state are unchanged. Default None: the EMAs are updated on their own.
        dist: the run's processes (a sharded tracker broadcasts rank 0's interval and write
            outcome over them); default None: one process.
    """

    def __init__(self, model: nn.Module, *, sigma_rels: Sequence[float], every: int, snapshot_dtype: str,
                 max_snapshots: int | None, total_steps: int, budget_bytes: int | None = None,
                 device: torch.device | str | None = None, ema: _EmaSet | None = None,
                 dist: DistInfo | None = None) -> None:
        self.power = PowerEMA(model, sigma_rels, dtype=torch.float32, device=device, alongside=ema_members(ema))
        self.sharded = self.power.sharded
        self.dist = dist if dist is not None else DistInfo()
        self._synced_interval: int | None = None  # a sharded tracker without the writer: rank 0's interval
        self.owns_ema = ema is not None
        self.every = int(every)
        self.snapshot_dtype = snapshot_dtype
        self.max_snapshots = max_snapshots
        self.total_steps = int(total_steps)
        self.budget_bytes = budget_bytes
        self.model_bytes = model_fp32_bytes(self.power)
        self.writer: SnapshotWriter | None = None
        self._resumed_interval: int | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self, *, full: bool = True) -> dict[str, Any]:
        """``PowerEMA.state_dict()`` plus the snapshot settings: plain types and tensors.
        Sharded tracker: *collective*; ``full`` gathers whole profiles to rank 0 (the other
        ranks' ``profiles`` are empty dicts), else DTensors over this rank's shards."""
        if self.sharded and not full:
            self._broadcast_buffers()
        state = self.power.state_dict(full=full, rank0_only=full)
        state.update(snapshot_every=self.every, snapshot_interval=self.interval, snapshot_dtype=self.snapshot_dtype)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the profiles and step counter (``ValueError`` if the profiles differ)."""
        self.power.load_state_dict(state)
        if int(state.get("snapshot_every", 0)) == self.every:
            self._resumed_interval = int(state.get("snapshot_interval", self.every))

    @property
    def interval(self) -> int:
        """The snapshot interval in use (the base one until the folder is planned; on a
        sharded tracker's other ranks, rank 0's as last broadcast)."""
        if self.writer is not None:
            return self.writer.every
        return self._synced_interval or self.every

    def _broadcast(self, values: list[int]) -> list[int]:
        return broadcast_ints(values, self.dist) if self.sharded else values

    def _broadcast_buffers(self) -> None:
        """Sharded tracker: the profiles' buffers (averaged BatchNorm statistics, not sharded,
        each rank's own) := rank 0's, the ones its snapshots and gathered checkpoints hold, so
        that a DCP folder (which writes one rank's copy of a replicated tensor) holds them too."""
        broadcast_tensors([t for k in range(len(self.power.members))
                           for t in self.power.profile_state_dict(k, full=False).values() if not hasattr(t, "to_local")])

    def sync_interval(self) -> None:
        """Sharded tracker, every rank after rank 0's :meth:`open_folder`: take rank 0's
        planned interval (*collective*; no-op otherwise)."""
        if self.sharded:
            self._synced_interval = self._broadcast([self.interval])[0]

    # ------------------------------------------------------------------ snapshots
    def open_folder(self, folder: str) -> None:
        """Bind the snapshot folder (created if needed), drop snapshots newer than the
        current step (a crashed run may have written some after its last checkpoint) and
        plan the run into the cap (``SnapshotWriter.plan``)."""
        self.writer = SnapshotWriter(folder, self.every, dtype=_DTYPES[self.snapshot_dtype],
                                     max_snapshots=self.max_snapshots)
        resumed = self._resumed_interval
        if resumed and resumed > self.writer.every and resumed % self.every == 0:
            self.writer.every = resumed  # thinning doubled the interval before the resume
        removed = self.writer.prune_after(self.power.step)
        if removed:
            _log.info("post-hoc EMA: deleted %d snapshot file(s) newer than the resumed step %d",
                      removed, self.power.step)
        before, files = self.writer.every, len(list_snapshots(folder, missing_ok=True))
        self.writer.plan(max(self.total_steps, self.power.step, 1))
        if self.writer.every != before:
            thinned = files - len(list_snapshots(folder, missing_ok=True))
            _log.info("post-hoc EMA: %d planned steps fit the budget at one snapshot every %d steps (not %d)%s",
                      self.total_steps, self.writer.every, before,
                      f"; deleted {thinned} older snapshot file(s) off that interval" if thinned else "")

    def update(self, model: nn.Module) -> None:
        """Advance every profile (and the run's EMAs when ``owns_ema``) one step in one fused
        pass; save the profiles if the step is on the interval (sharded: *collective* on that
        step only, every rank gathers; ``OSError`` on every rank when rank 0's write failed)."""
        self.power.update(model)
        if self.sharded:
            if self.power.step % self.interval == 0:
                self._save_gathered()
        elif self.writer is not None:
            self.writer.maybe_save(self.power)

    def _save_gathered(self) -> None:
        """Sharded tracker, every rank: gather each profile to rank 0, which writes it; then
        every rank takes rank 0's interval (thinning may have doubled it) and its outcome."""
        error = None
        if self.writer is not None:
            try:
                self.writer.save(self.power)  # gathers every profile even when a write fails
            except OSError as e:
                error = e
        else:
            for _ in self.power.gathered_profiles():
                pass  # this rank's part of each gather
        interval, failed = self._broadcast([self.interval, int(error is not None)])
        self._synced_interval = interval
        if failed:
            raise error if error is not None else OSError("rank 0 could not write a post-hoc EMA snapshot")

    def stored_steps(self) -> list[int]:
        """Steps that have a snapshot in the folder, ascending."""
        if self.writer is None:
            return []
        return sorted({s.step for s in list_snapshots(self.writer.folder, missing_ok=True)})

    def finish(self) -> None:
        """Save the final step too when it is off the interval, so a post-hoc sweep
        reconstructs the EMA at the same step as ``last.pth.tar``. Sharded tracker: call it on
        every rank (rank 0 decides, all gather; *collective*)."""
        needed = self.writer is not None and self.power.step > 0 and self.power.step not in self.stored_steps()
        if not self.sharded:
            if needed:
                self.writer.save(self.power)
        elif self._broadcast([int(needed)])[0]:
            self._save_gathered()

    def projected_footprint(self) -> Footprint:
        """Disk use the folder will reach after ``total_steps``: the multiples of the
        interval plus the last step, ceil(total_steps / interval) snapshot steps."""
        n = -(-max(self.total_steps, 1) // self.interval)
        return estimate_footprint(self.power, n, len(self.power.sigma_rels), _DTYPES[self.snapshot_dtype])

    def describe_budget(self) -> str:
        """``budget 726.0 MiB (17x the model's 42.7 MiB float32 bytes, 16 snapshot steps)`` or ``no budget``."""
        if self.budget_bytes is None:
            return "no budget" if self.max_snapshots is None else f"at most {self.max_snapshots} snapshot steps"
        return (f"budget {human_bytes(self.budget_bytes)} ({self.budget_bytes / self.model_bytes:.3g}x the model's "
                f"{human_bytes(self.model_bytes)} float32 bytes, at most {self.max_snapshots} snapshot steps)")

    def disk_usage(self) -> int:
        """Bytes of the snapshot files in the folder now."""
        return self.writer.disk_usage() if self.writer is not None else 0

    def memory_bytes(self) -> int:
        """Bytes held by the tracked profiles in this process (float32 accumulation; this
        rank's shards for a sharded model)."""
        return sum(t.numel() * t.element_size() for profile in self.power.profiles
                   for t in map(local_shard, profile))


def posthoc_sweep_command(data: str | None, checkpoint: str, sigma_rels: str = SWEEP_SIGMA_RELS) -> str:
    """The ``validate.py`` command that sweeps EMA lengths over a run's snapshots."""
    parts = ["python", "validate.py"] + ([data] if data else []) + [
        "--checkpoint", checkpoint, "--posthoc-sigma-rel", sigma_rels]
    return " ".join(shlex.quote(os.fspath(p)) for p in parts)


# --------------------------------------------------------------------------- all of them
@dataclass
class AverageTarget:
    """One EMA as evaluation sees it: its name (``ema``, ``ema1``...), ``--weights`` selector
    and the module holding its weights."""

    name: str
    selector: str
    module: nn.Module | None  # None for a sharded (FSDP) EMA: evaluate it through ModelEMA.swapped_into


class Averages:
    """Every weight average of a run: the EMA(s) (one ``ModelEMA`` or a fused ``MultiEMA``),
    the post-hoc tracker, BatchNorm recalibration at evaluation, their checkpoint
    entries (the keys are spelled in :func:`emakit.checkpoint.ema_checkpoint_keys`) and their
    resume.

    The loop calls :meth:`update` after every optimizer step taken (with a post-hoc tracker,
    built with the EMAs in its engine, one fused pass updates EMAs and profiles); evaluation iterates
    :meth:`targets` by name. A failed post-hoc snapshot write (a full disk) does not raise
    inside the loop: it is kept in :attr:`write_error` (on rank 0; under FSDP on every rank)
    and the loop stops at the next agreed step boundary.

    Args:
        ema: the run's EMA(s), or None without ``--model-ema``.
        posthoc: the post-hoc tracker (``--model-ema-posthoc``; rank 0's, or every rank's
            under FSDP), else None.
        device: where the EMA weights live (``--model-ema-force-cpu``: the CPU).
        bn_recal: training batches for BatchNorm recalibration before each EMA evaluation (0: off).
    """

    def __init__(self, ema: ModelEMA | MultiEMA | None = None, posthoc: PosthocTracker | None = None, *,
                 device: torch.device | None = None, bn_recal: int = 0) -> None:
        self.ema = ema
        self.posthoc = posthoc
        self.members: list[ModelEMA] = ema_members(ema)
        self.device = device if device is not None else (
            next(iter(self.members[0].module.parameters())).device
            if self.members and self.members[0].module is not None else torch.device("cpu"))
        self.bn_recal = int(bn_recal)
        self.write_error: OSError | None = None

    # ------------------------------------------------------------------ what there is
    @property
    def count(self) -> int:
        """How many EMAs (the post-hoc profiles are not evaluated each epoch and do not count)."""
        return len(self.members)

    def targets(self) -> list[AverageTarget]:
        """Each EMA with its name and ``--weights`` selector, in order."""
        return [AverageTarget(ema_label(i), ema_selector(i), m.module) for i, m in enumerate(self.members)]

    def describe(self) -> str:
        """``decay 0.9998`` or ``3 EMAs in one fused update (ema decay 0.999, ema1 ...)``."""
        if len(self.members) == 1:
            return describe_ema(self.members[0])
        return f"{len(self.members)} EMAs in one fused update (" + ", ".join(
            f"{ema_label(i)} {describe_ema(m)}" for i, m in enumerate(self.members)) + ")"

    # ------------------------------------------------------------------ the loop
    def update(self, model: nn.Module) -> bool:
        """Advance every average one optimizer step; True when an EMA was updated (the
        ``ema_updates`` count), False with only a post-hoc tracker."""
        owned = self.posthoc is not None and self.posthoc.owns_ema
        if self.ema is not None and not owned:
            self.ema.update(model)
        if self.posthoc is not None and self.write_error is None:
            try:
                self.posthoc.update(model)  # with owns_ema, the EMA(s) too, in the same fused pass
            except OSError as e:
                self.write_error = e
        return self.ema is not None

    # ------------------------------------------------------------------ checkpoints
    @property
    def sharded(self) -> bool:
        """True when the EMAs hold this rank's shards of an FSDP model (no module of their own)."""
        return any(m.sharded for m in self.members)

    def checkpoint_state(self, bn_recal: list[dict[str, torch.Tensor]] | None = None, *,
                         full: bool = True) -> dict[str, Any]:
        """The checkpoint entries: every EMA's weights + meta, the post-hoc state and the
        epoch's recalibrated BatchNorm buffers (``{"num_batches": N, "buffers": [per EMA]}``).
        Sharded EMAs: *collective*; ``full`` gathers whole tensors to rank 0 (single file),
        else DTensors over the shards (a DCP folder). A sharded post-hoc tracker's profiles
        then go under :data:`POSTHOC_PROFILES` (``{"0": DTensors, "1": ...}``, a sharded
        key of the folder) and ``posthoc_ema`` keeps its plain values."""
        state = ema_checkpoint_state(self.ema, full=full)
        if self.posthoc is not None:
            posthoc = self.posthoc.state_dict(full=full)
            if self.posthoc.sharded and not full:
                state[POSTHOC_PROFILES] = {str(k): p for k, p in enumerate(posthoc.pop("profiles"))}
            state[POSTHOC] = posthoc
        if bn_recal:
            state[BN_RECAL] = {"num_batches": self.bn_recal, "buffers": bn_recal}
        return state

    def rank_buffers(self) -> list[dict[str, torch.Tensor]]:
        """This rank's EMA buffers (CPU copies): under DDP each rank averaged its own
        BatchNorm statistics since the last evaluation, so a mid-epoch stop keeps them all."""
        return [{k: b.detach().cpu().clone() for k, b in _member_buffers(m).items()} for m in self.members]

    def load_rank_buffers(self, saved: list[dict[str, torch.Tensor]]) -> None:
        """Put back what :meth:`rank_buffers` returned (a mid-epoch resume)."""
        with torch.no_grad():
            for member, buffers in zip(self.members, saved or []):
                for name, buf in _member_buffers(member).items():
                    if name in buffers:
                        buf.copy_(buffers[name])

    # ------------------------------------------------------------------ resume
    def check_resume(self, ckpt: dict[str, Any], path: str, *, drop_ema: bool, model: nn.Module | None = None) -> None:
        """Before anything is loaded: an EMA held by the checkpoint is continued or dropped
        explicitly (``--drop-ema``), and its weights fit the model (``model``: the bare model,
        needed for sharded EMAs, which hold no module to compare with)."""
        held = [ema_checkpoint_keys(i) for i in ema_indices(ckpt)]
        if drop_ema and self.ema is not None:
            raise UsageError("--drop-ema drops the resumed checkpoint's EMA, but --model-ema continues it: "
                             "pass only one of them")
        if self.ema is None and held:
            counter = (ckpt.get(held[0][1]) or {}).get("num_updates", "unknown")
            if not drop_ema:
                raise UsageError(f"--resume {path} holds {len(held)} EMA(s) ({', '.join(k for k, _ in held)}; "
                                 f"{counter} updates) but this run has no --model-ema, so its checkpoints would lose "
                                 "them: pass --model-ema (and the run's EMA flags) to continue, or --drop-ema to drop "
                                 "them")
            _log.warning("--drop-ema: the checkpoint's %d EMA(s) (%s, %s updates) are not continued; this run's "
                         "checkpoints hold no EMA", len(held), ", ".join(k for k, _ in held), counter)
        for member, (weights_key, _) in zip(self.members, held):
            check_ema_entry(member.module if member.module is not None else model, ckpt[weights_key], weights_key, path)

    @property
    def in_images(self) -> bool:
        """Every EMA's length is a half-life in images or epochs (a batch change keeps it)."""
        return bool(self.members) and all(m.half_life and parse_half_life(m.half_life).unit in ("img", "ep")
                                          for m in self.members)

    def load_resume(self, ckpt: dict[str, Any], path: str, model: nn.Module, *, updates_per_epoch: int = 0) -> None:
        """Continue every average from the checkpoint (run :meth:`check_resume` first)."""
        if self.ema is not None:
            resume_ema(self.ema, ckpt, path, model, updates_per_epoch=updates_per_epoch)
        if self.posthoc is not None:
            resume_posthoc(self.posthoc, ckpt, path)
        elif ckpt.get(POSTHOC) is not None:
            _log.info("--resume %s tracked a post-hoc EMA; it stops here (no --model-ema-posthoc)", path)


def _member_buffers(member: ModelEMA) -> dict[str, torch.Tensor]:
    """The EMA's live buffers by name (not sharded under FSDP: each rank has its own)."""
    if member.module is not None:
        return dict(member.module.named_buffers())
    return {k: v for k, v in member.state_dict_ema(full=False).items() if not hasattr(v, "to_local")}


def resume_ema(ema: _EmaSet, ckpt: dict[str, Any], path: str, model: nn.Module, *,
               updates_per_epoch: int = 0) -> None:
    """Each EMA's weights and update counter from its checkpoint keys; an EMA the checkpoint
    lacks restarts from the (already resumed) model weights, with the others' counter.

    A checkpoint without EMA metadata (timm's) has no counter: it is set to the optimizer
    steps taken so far, ``(epoch + 1) * updates_per_epoch``, which is the step number timm's
    train.py passes to ``ModelEmaV3.update`` next, so a resumed ``--model-ema-warmup`` EMA
    continues its warmup instead of being overwritten by the raw weights.
    """
    members, missing, uncounted = ema_members(ema), [], []
    steps = steps_done(ckpt[EPOCH], updates_per_epoch) if isinstance(ckpt.get(EPOCH), int) else 0
    for i, member in enumerate(members):
        weights_key, meta_key = ema_checkpoint_keys(i)
        if ckpt.get(weights_key) is None:
            missing.append(i)
            continue
        try:
            member.load_checkpoint_state(ckpt[weights_key], ckpt.get(meta_key))
        except RuntimeError as e:
            raise UsageError(f"--resume {path}: EMA weights do not fit the model: {one_line(e)[:300]}") from None
        if ckpt.get(meta_key) is None:
            uncounted.append(i)
            member.num_updates = steps
    if uncounted:
        _log.info("--resume %s has no EMA update counter (a timm checkpoint): set to %d = (epoch %s + 1) x %d "
                  "optimizer steps per epoch, the step timm's train.py continues from", path, steps,
                  ckpt.get(EPOCH), updates_per_epoch)
    counter = max((m.num_updates for i, m in enumerate(members) if i not in missing), default=steps)
    for i in missing:
        _log.warning("--resume %s has no weights for %s (%s): it restarts from the resumed weights", path,
                     ema_label(i), ema_checkpoint_keys(i)[0])
        members[i].set(model)
        members[i].num_updates = counter
    extra = [ema_checkpoint_keys(i)[0] for i in ema_indices(ckpt) if i >= len(members)]
    if extra:
        _log.warning("--resume %s holds %d more EMA(s) than configured (%s); they are not continued",
                     path, len(extra), ", ".join(extra))


def resume_posthoc(posthoc: PosthocTracker, ckpt: dict[str, Any], path: str) -> None:
    """The power EMA's profiles and step from the checkpoint; without them it starts now."""
    state = ckpt.get(POSTHOC)
    if state is None:
        _log.warning("--resume %s has no post-hoc EMA state: the post-hoc EMA starts at the resumed epoch "
                     "(its snapshots cover training from here on; older ones in posthoc/ are deleted)", path)
        return
    try:
        posthoc.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--resume {path}: post-hoc EMA: {one_line(e)[:300]}; pass the run's "
                         f"--posthoc-sigma-rels {','.join(f'{x:g}' for x in state.get('sigma_rels', []))}") from None
