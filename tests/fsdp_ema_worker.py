"""Worker for tests/test_fsdp_ema.py, run by ``torchrun --nproc_per_node=2`` (gloo, CPU).

Trains a tiny timm model sharded with FSDP2 (``fully_shard`` per block, then the root) and,
beside it on every rank, a plain replica fed the same batches: with every rank seeing the
same batch, the averaged gradient equals the replica's, so the two must train alike. A
sharded ModelEMA/MultiEMA follows the FSDP model and a plain one follows the replica.
Every rank writes what it measured to ``<out>/rank<r>.json``; the test asserts on it.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


class CollectiveCounter(TorchDispatchMode):
    """Counts every dispatched op of torch's collective namespaces (c10d, functional c10d)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "c10d" in name:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def count_python_collectives(fn) -> tuple[int, list[str]]:
    """Run ``fn`` with every public torch.distributed collective patched to count calls, and
    under :class:`CollectiveCounter`; returns (python-level count, dispatched op names)."""
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
             "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier", "send", "recv",
             "all_gather_object", "broadcast_object_list"]
    seen: list[str] = []
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(n, f):
        def counted(*a, **k):
            seen.append(n)
            return f(*a, **k)
        return counted

    for n, f in originals.items():
        setattr(dist, n, wrap(n, f))
    try:
        with CollectiveCounter() as counter:
            fn()
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return len(seen), counter.calls


def per_tensor_full_state(ema, keep: bool = True) -> dict:
    """A sharded EMA's whole state dict the way torch gathers a DTensor, one
    ``full_tensor()`` per sharded tensor, as CPU copies (``{}`` unless ``keep``; the gathers
    run either way): the expectation for the EMA's bucketed gather, and the baseline
    ``bench/ema_gather.py`` times it against."""
    from torch.distributed.tensor import DTensor

    shards, out = ema._shards, {}
    for name in shards.persistent:
        local = shards.named()[name]
        if name in shards.specs:
            mesh, placements, shape, stride = shards.specs[name]
            local = DTensor.from_local(local, mesh, placements, shape=shape, stride=stride,
                                       run_check=False).full_tensor()
        if keep:
            out[name] = local.cpu().clone()
    return out


def main(out: str) -> None:
    import timm
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.fsdp import fully_shard

    from emakit import ModelEMA, MultiEMA
    from emakit.posthoc import PowerEMA

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=7)
    replica = copy.deepcopy(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(replica.parameters(), lr=0.05, momentum=0.9)

    ema = ModelEMA(model, decay=0.9, schedule="warmup")
    ref = ModelEMA(replica, decay=0.9, schedule="warmup")
    multi = MultiEMA(model, decays=[0.5, 0.8, 0.95])
    ref_multi = MultiEMA(replica, decays=[0.5, 0.8, 0.95])
    power, ref_power = PowerEMA(model, (0.05, 0.10)), PowerEMA(replica, (0.05, 0.10))  # EDM2 profiles

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    y = torch.randint(0, 7, (4,), generator=gen)
    update_counts = []
    for _ in range(5):
        for net, o in ((model, opt), (replica, ref_opt)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            o.step()
        # The replica's gradient is one rank's; FSDP averages identical ones: same step.
        update_counts.append(count_python_collectives(
            lambda: (ema.update(model), multi.update(model), power.update(model))))
        ref.update(replica)
        ref_multi.update(replica)
        ref_power.update(replica)

    forward_count = count_python_collectives(lambda: model(x))  # positive control: FSDP gathers
    full = ema.state_dict_ema(full=True)
    expected = ref.module.state_dict()
    max_diff = max((full[k] - expected[k]).abs().max().item() for k in expected)
    multi_diff = max((m.state_dict_ema(full=True)[k] - r.module.state_dict()[k]).abs().max().item()
                     for m, r in zip(multi, ref_multi) for k in expected)
    power_diff = max((power.profile_state_dict(i)[k] - ref_power.profile_state_dict(i)[k]).abs().max().item()
                     for i in range(2) for k in expected)  # profile_state_dict gathers: every rank calls
    power_keys_ok = power.keys == ref_power.keys == list(expected)
    local_bytes = sum(t.numel() * t.element_size() for t in ema._ema_tensors()[0])
    full_bytes = sum(p.numel() * p.element_size() for p in replica.parameters())

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with ema.swapped_into(model):
            swapped_out = model.eval()(x)
        raw_out = model(x)
        model.train()
        ref_out = ref.module(x)
    after = model.state_dict()
    restored = all(torch.equal(before[k].full_tensor() if hasattr(before[k], "full_tensor") else before[k],
                               after[k].full_tensor() if hasattr(after[k], "full_tensor") else after[k])
                   for k in before)

    # Round trips: the gathered dict into a fresh sharded EMA, the sharded (DTensor) dict into a plain one.
    fresh = ModelEMA(model, decay=0.9)
    fresh.load_checkpoint_state(full, {"num_updates": 5})
    fresh_diff = max((fresh.state_dict_ema(full=True)[k] - full[k]).abs().max().item() for k in full)
    plain = ModelEMA(replica, decay=0.9)
    plain.load_checkpoint_state(ema.state_dict_ema(full=False))
    plain_diff = max((plain.module.state_dict()[k] - full[k]).abs().max().item() for k in full)

    # A DCP folder written by both ranks, for the test to read back on one process.
    save({"ema": ema.state_dict_ema(full=False)}, storage_writer=FileSystemWriter(os.path.join(out, "dcp")))
    if rank == 0:
        torch.save(full, os.path.join(out, "full_ema.pt"))

    result = {
        "rank": rank, "world": world,
        "update_python_collectives": [c for c, _ in update_counts],
        "update_dispatched_collectives": [len(ops) for _, ops in update_counts],
        "forward_python_collectives": forward_count[0], "forward_dispatched_collectives": len(forward_count[1]),
        "max_diff": max_diff, "multi_diff": multi_diff, "power_diff": power_diff, "power_keys_ok": power_keys_ok,
        "power_step": power.step, "num_updates": ema.num_updates,
        "local_bytes": local_bytes, "full_bytes": full_bytes,
        "swap_out_diff": (swapped_out - ref_out).abs().max().item(), "restored": restored,
        "raw_vs_ema_out_diff": (raw_out - ref_out).abs().max().item(),
        "fresh_diff": fresh_diff, "plain_diff": plain_diff,
        "forward_raises": _forward_raises(ema, x),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _forward_raises(ema, x) -> str:
    try:
        ema(x)
    except RuntimeError as e:
        return str(e)
    return ""


if __name__ == "__main__":
    main(sys.argv[1])
