"""Worker for tests/test_fsdp_train.py: FSDP2 training pieces (emakit.training.fsdp / dcp).

Modes (``python fsdp_train_worker.py <mode> <out>``):

- ``single``: one process, a plain tiny ViT, AdamW from timm's ``create_optimizer_v2`` (two
  param groups), two EMAs (an ``Averages``); trains 4 steps on fixed batches of 8. Writes the reference
  states after steps 2 and 4, a single-file checkpoint after step 2 (``single2.pth``, standard
  layout) and a DCP folder after step 2 (``dcp1``) written by one process.
- ``fsdp`` (torchrun, 2 ranks): first 2 steps under DDP (``ddp2.pth``, ``dcp_ddp``); then the
  same training sharded with :func:`apply_fsdp`, each rank on
  its half of every batch; counts collectives during the EMA updates; after step 2 writes
  the gathered single-file checkpoint ``fsdp2.pth`` and the DCP folder ``dcp2``; then resumes
  fresh sharded models from ``dcp2``, ``dcp1``, ``single2.pth``, ``dcp_ddp`` and ``ddp2.pth`` and continues to step 4.
  Checkpoints are written and resumed by train.py's own path: ``checkpoints.checkpoint_state``
  (``state.run_entries`` + the model's and averages' entries), ``resume.read_resume`` + ``resume.restore``.
  Also shards test_resnet / test_convnext / resnet18 (and a bf16 mixed-precision ViT) and runs
  a step. Rank 0 writes ``fsdp.json`` and ``fsdp*.pt``.
- ``kill`` (torchrun, 2 ranks): writes ``killdcp`` after step 1, trains a step, and saves again
  while rank 1 kills itself with SIGKILL inside DCP's write (after writing its shard files,
  before the folder is complete).
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch

STEPS, BATCH, CLASSES = 4, 8, 5
EMA_DECAYS = (0.9, 0.5)
LR = 1e-3  # AdamW
# The key part of a qkv bias has an analytically zero gradient (softmax is shift invariant):
# Adam divides its roundoff (~1e-10) by its own size, so those elements move by up to ~lr/10
# per step in a direction set by the reduction order. With it, FSDP x2 vs one process differ by
# 1.1e-5 there after 4 steps (every other tensor < 2e-6); it is left out so that the comparison
# measures FSDP, not attention's null direction.
QKV_BIAS = False


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def settings(*extra: str):
    """train.py's settings of this training (a constant LR: the resume positions the schedule)."""
    from emakit.training.config import parse_settings

    return parse_settings(["--model", "test_vit", "--device", "cpu", "-b", str(BATCH), "--opt", "adamw",
                           "--lr", str(LR), "--weight-decay", "0.05", "--sched", "none", "--warmup-epochs", "0",
                           "--model-ema-decay", ",".join(map(str, EMA_DECAYS)), *extra])


@dataclass
class Parts:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    averages: Any  # emakit.training.averages.Averages: the two EMAs in one MultiEMA
    scheduler: Any


def build(sharded: bool, ddp: bool = False) -> Parts:
    """The parts of the run, with the same initial weights everywhere: a plain, DDP-wrapped or
    sharded model, timm's AdamW (two param groups), the EMAs and train.py's scheduler."""
    import timm
    from timm.optim import create_optimizer_v2

    from emakit import MultiEMA
    from emakit.training.averages import Averages
    from emakit.training.build import build_scheduler
    from emakit.training.fsdp import apply_fsdp

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=CLASSES, qkv_bias=QKV_BIAS)
    if sharded:
        apply_fsdp(model)
    opt = create_optimizer_v2(model, "adamw", lr=LR, weight_decay=0.05)
    averages = Averages(MultiEMA(model, decays=EMA_DECAYS))
    model = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    return Parts(model, opt, averages, build_scheduler(settings().schedule, opt, 1))


def step(p: Parts, k: int, data, rank: int = 0, world: int = 1, counts: list | None = None) -> None:
    """Optimizer step ``k`` on this rank's slice of batch ``k``, then the EMA update (its
    collectives counted into ``counts`` when given)."""
    x, y = data[k]
    n = BATCH // world
    p.opt.zero_grad()
    torch.nn.functional.cross_entropy(p.model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
    p.opt.step()
    if counts is None:
        p.averages.update(p.model)
        return
    from fsdp_ema_worker import count_python_collectives

    count, ops = count_python_collectives(lambda: p.averages.update(p.model))
    counts.append([count, len(ops)])


def ema_keys(i: int) -> tuple[str, str]:
    """(weights key, meta key) of EMA ``i``, written out here as the expectation."""
    return ("state_dict_ema", "ema") if i == 0 else (f"state_dict_ema_{i}", f"ema_{i}")


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def full_checkpoint(p: Parts, epoch: int, *, sharded: bool = False) -> dict | None:
    """The checkpoint train.py writes (checkpoints.checkpoint_state): the single-file dict,
    gathered (collective; rank 0's, None elsewhere), or the sharded form for save_dcp."""
    from emakit.training.checkpoints import checkpoint_state
    from emakit.training.state import run_entries

    plain = run_entries(epoch=epoch, arch="test_vit", scheduler=p.scheduler, scaler=None, flags=settings().flags,
                        metric=None, metrics={})
    return checkpoint_state(p.model, p.opt, p.averages, plain, sharded=sharded, is_main=_is_main())


def sharded_checkpoint(p: Parts, epoch: int) -> dict:
    return full_checkpoint(p, epoch, sharded=True)


def resume(p: Parts, path, world: int = 1) -> int:
    """train.py's ``--resume path`` into ``p`` (resume.read_resume + resume.restore; collective
    for a sharded model or a folder read by several ranks); returns the checkpoint's epoch."""
    from emakit.ema import is_sharded
    from emakit.training.build import build_amp
    from emakit.training.resume import read_resume, restore
    from emakit.training.settings import Resolved

    s = settings("--resume", str(path))
    resolved = Resolved(num_classes=CLASSES, lr=LR, updates_per_epoch=1, total_steps=STEPS, img_size=32,
                        global_batch_size=BATCH, epochs=s.schedule.epochs)
    return restore(read_resume(s, world), s, resolved, model=p.model, averages=p.averages, optimizer=p.opt,
                   amp=build_amp(s.run, torch.device("cpu"), sharded=is_sharded(p.model)),
                   lr_scheduler=p.scheduler) - 1


def single(out: str) -> None:
    from emakit.checkpoint import save_checkpoint
    from emakit.training.dcp import save_dcp

    data = batches()
    p = build(False)
    for k in range(STEPS):
        step(p, k, data)
        if k == 1:
            ckpt = full_checkpoint(p, epoch=1)
            ckpt["standard_optimizer"] = p.opt.state_dict()
            save_checkpoint(ckpt, os.path.join(out, "single2.pth"))
            save_dcp(os.path.join(out, "dcp1"), sharded_checkpoint(p, epoch=1))
    save_checkpoint(full_checkpoint(p, epoch=3), os.path.join(out, "single4.pth"))


def continue_from(p: Parts, data, rank: int = 0, world: int = 1) -> dict | None:
    """Steps 3 and 4, then the gathered checkpoint."""
    for k in range(2, STEPS):
        step(p, k, data, rank, world)
    return full_checkpoint(p, epoch=3)


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the tensors of two (nested) state dicts with equal keys."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a)[:5], sorted(b)[:5])
        return max([max_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (a, b)  # (0.9, 0.999) stays a tuple
        return max([max_diff(x, y) for x, y in zip(a, b)] or [0.0])
    assert a == b, (a, b)
    return 0.0


def ema_gather(ema) -> dict:
    """The sharded EMA's gathered state dict against the expectation, one
    ``DTensor.full_tensor()`` per tensor (torch's own gather), at the default bucket size and
    at 4 KiB buckets (several collectives): bitwise equal, the model's key order, and the
    number of collectives."""
    import emakit.ema as ema_mod
    from fsdp_ema_worker import count_python_collectives, per_tensor_full_state

    expected = per_tensor_full_state(ema)
    report = {"sharded": len(ema._shards.specs)}
    default = ema_mod.GATHER_BUCKET_BYTES
    for label, size in (("default", default), ("4KiB", 4096)):
        ema_mod.GATHER_BUCKET_BYTES = size
        try:
            got = {}
            python, ops = count_python_collectives(lambda: got.update(ema.state_dict_ema(full=True)))
        finally:
            ema_mod.GATHER_BUCKET_BYTES = default
        report[label] = {"python": python, "ops": len(ops), "keys_in_order": list(got) == list(expected),
                         "equal": all(torch.equal(got[k], expected[k]) and got[k].device.type == "cpu"
                                      for k in expected)}
    return report


def fsdp(out: str) -> None:
    import torch.distributed as dist

    from emakit.checkpoint import save_checkpoint
    from emakit.training.dcp import read_dcp_meta, save_dcp
    from emakit.training.fsdp import full_model_state, full_optimizer_state
    from fsdp_ema_worker import count_python_collectives

    # gloo's timeout turns a transport deadlock into an error that test_fsdp_train recognises
    # (default 30 min); no collective here waits on a rank for more than a few seconds.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    results: dict = {"world": world}
    # DDP x2 for two steps (each rank on its half batch): a single file and a DCP folder to resume from.
    p = build(False, ddp=True)
    for k in range(2):
        step(p, k, data, rank, world)
    ddp2 = full_checkpoint(p, epoch=1)
    if rank == 0:
        save_checkpoint({**ddp2, "standard_optimizer": p.opt.state_dict()}, os.path.join(out, "ddp2.pth"))
    save_dcp(os.path.join(out, "dcp_ddp"), sharded_checkpoint(p, epoch=1))
    del p

    p = build(True)
    model, emas = p.model, p.averages.members
    update_counts = []
    for k in range(STEPS):
        step(p, k, data, rank, world, counts=update_counts)
        if k == 1:
            ckpt2 = full_checkpoint(p, epoch=1)
            if rank == 0:
                save_checkpoint(ckpt2, os.path.join(out, "fsdp2.pth"))
            save_dcp(os.path.join(out, "dcp2"), sharded_checkpoint(p, epoch=1))
    results["update_collectives"] = update_counts
    reload = count_python_collectives(lambda: emas[0].load_checkpoint_state(emas[0].state_dict_ema(full=False)))
    results["ema_reload_collectives"] = [reload[0], len(reload[1])]  # DCP's case: the EMA's own sharding
    results["full_state_sizes"] = [len(full_model_state(model)), len(full_optimizer_state(model, p.opt)),
                                   len(emas[0].state_dict_ema(full=True, rank0_only=True))]
    results["ema_gather"] = ema_gather(emas[0])
    results["forward_collectives"] = len(count_python_collectives(lambda: model(data[0][0][:2]))[1])
    with torch.no_grad():  # an evaluation forward leaves every parameter sharded (EMA updates need that)
        model(data[0][0][:2])
    from torch.distributed.tensor import DTensor
    results["sharded_after_eval_forward"] = all(isinstance(t, DTensor) for t in model.parameters())
    final = full_checkpoint(p, epoch=3)

    # Resume fresh sharded models from each source, as train.py --resume does, and continue steps 3-4.
    resumed = {}
    for label in ("dcp2", "dcp1", "single2", "dcp_ddp", "ddp2"):
        r = build(True)
        path = os.path.join(out, f"{label}.pth" if label in ("single2", "ddp2") else label)
        assert resume(r, path, world) == 1
        if label == "dcp2":
            results["dcp2_meta_world"] = read_dcp_meta(path)["world_size"]
        loaded = full_checkpoint(r, epoch=1)
        if rank == 0:
            torch.save(loaded, os.path.join(out, f"fsdp_loaded_{label}.pt"))
        resumed[label] = continue_from(r, data, rank, world)

    # Other model families: shard, one step, names of the units.
    import timm
    from emakit.training.fsdp import apply_fsdp

    families = {}
    for name in ("test_resnet", "test_convnext", "resnet18"):
        torch.manual_seed(0)
        m = timm.create_model(name, num_classes=CLASSES)
        units = apply_fsdp(m)
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        x, y = data[0]
        torch.nn.functional.cross_entropy(m(x[:4]), y[:4]).backward()
        o.step()
        families[name] = {"units": units, "local_numel": sum(p.to_local().numel() for p in m.parameters()),
                          "numel": sum(p.numel() for p in m.parameters())}
    torch.manual_seed(0)
    m = timm.create_model("test_vit", num_classes=CLASSES)
    apply_fsdp(m, mp_dtype=torch.bfloat16)
    out_bf16 = m(data[0][0][:2])
    out_bf16.float().sum().backward()
    results["bf16"] = {"out_dtype": str(out_bf16.dtype), "param_dtype": str(next(m.parameters()).dtype),
                       "grad_dtype": str(next(m.parameters()).grad.dtype)}
    results["families"] = families
    if rank == 0:
        torch.save(final, os.path.join(out, "fsdp_final.pt"))
        torch.save(ckpt2, os.path.join(out, "fsdp_step2.pt"))
        for label, state in resumed.items():
            torch.save(state, os.path.join(out, f"fsdp_resumed_{label}.pt"))
    with open(os.path.join(out, f"fsdp_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def kill(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint import filesystem

    from emakit.training.dcp import save_dcp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    p = build(True)
    folder = os.path.join(out, "killdcp")
    step(p, 0, data, rank, world)
    save_dcp(folder, sharded_checkpoint(p, epoch=0))
    saved = full_checkpoint(p, epoch=0)
    if rank == 0:
        torch.save(saved, os.path.join(out, "kill_saved.pt"))
    step(p, 1, data, rank, world)
    original = filesystem.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        future = original(self, plan, planner)
        future.wait()  # this rank's shard files are on disk; the folder is not complete yet
        if rank == 1:
            with open(os.path.join(out, "killed_mid_save"), "w") as f:
                f.write(str(sorted(os.listdir(self.path))))
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    filesystem.FileSystemWriter.write_data = write_then_die
    save_dcp(folder, sharded_checkpoint(p, epoch=1))
    with open(os.path.join(out, f"survived_rank{rank}"), "w") as f:  # never reached
        f.write("saved")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    {"single": single, "fsdp": fsdp, "kill": kill}[sys.argv[1]](sys.argv[2])
