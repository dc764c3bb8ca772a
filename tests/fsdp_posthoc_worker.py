"""Worker for tests/test_fsdp_posthoc.py: the post-hoc tracker on a sharded (FSDP2) model.

Run by ``torchrun --standalone --nproc_per_node=2 fsdp_posthoc_worker.py <out>`` (gloo, CPU).
Every rank builds a tiny timm ResNet twice: a plain replica with a one-process
``PosthocTracker`` (the reference engine, its own snapshot folder) and the same model sharded
with ``apply_fsdp`` with a sharded ``PosthocTracker`` (every rank, gathered snapshots). At
each step both models get the same new weights (the replica's, cut into shards), and the
sharded model's BatchNorm buffers get a rank-dependent offset on rank 1 (as each rank's own
training statistics would), so only rank 0's buffers are the replica's. Every rank writes
what it measured to ``<out>/posthoc_rank<r>.json``; rank 0's snapshot folders are
``<out>/sharded`` and ``<out>/reference``, the DCP folder ``<out>/dcp``.
"""
from __future__ import annotations

import errno
import json
import os
import sys

import torch
import torch.distributed as dist

STEPS, EVERY, SIGMA_RELS = 4, 3, (0.05, 0.1)


def perturb(replica, k: int) -> None:
    """Step ``k``'s new weights and buffers of the replica (deterministic, same on every rank)."""
    gen = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for t in list(replica.parameters()) + [b for b in replica.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=gen) * 0.1)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a)[:3], sorted(b)[:3])
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def main(out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import timm

    import emakit.posthoc as posthoc_module
    from emakit import ModelEMA
    from emakit.training.averages import Averages, PosthocTracker, posthoc_snapshot_cap
    from emakit.training.dcp import dcp_folder_to_checkpoint, save_dcp
    from emakit.training.distributed import DistInfo
    from emakit.training.fsdp import apply_fsdp, load_full_model_state
    from fsdp_ema_worker import count_python_collectives

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, local_rank=rank, world_size=world)
    torch.manual_seed(0)
    replica = timm.create_model("test_resnet", num_classes=5)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    apply_fsdp(model)
    results: dict = {"rank": rank}

    # the budget's cap and the logged sizes count the whole model, not this rank's shard
    results["cap"] = list(posthoc_snapshot_cap(model, "17x", n_profiles=2, snapshot_dtype="float16"))
    results["cap_reference"] = list(posthoc_snapshot_cap(replica, "17x", n_profiles=2, snapshot_dtype="float16"))
    kwargs = dict(sigma_rels=SIGMA_RELS, every=EVERY, snapshot_dtype="float32", max_snapshots=8, total_steps=STEPS)
    reference = PosthocTracker(replica, **kwargs)
    tracker = PosthocTracker(model, **kwargs, ema=ModelEMA(model, decay=0.9), dist=info)
    results["sharded"] = [tracker.sharded, reference.sharded]
    results["model_bytes"] = [tracker.model_bytes, reference.model_bytes]
    results["footprint"] = [tracker.projected_footprint().total_bytes, reference.projected_footprint().total_bytes]
    results["memory_bytes"] = [tracker.memory_bytes(), reference.memory_bytes()]
    if rank == 0:
        tracker.open_folder(os.path.join(out, "sharded"))
        reference.open_folder(os.path.join(out, "reference"))
    tracker.sync_interval()
    results["interval"] = tracker.interval

    counts = []
    for k in range(STEPS):
        perturb(replica, k)
        load_full_model_state(model, replica.state_dict())  # each rank cuts its shards
        with torch.no_grad():
            for b in model.buffers():
                if b.is_floating_point():
                    b.add_(float(rank))  # rank 1's own BatchNorm statistics
        reference.update(replica)
        count, ops = count_python_collectives(lambda: tracker.update(model))
        counts.append([tracker.power.step, count, len(ops)])
    results["update_collectives"] = counts
    if rank == 0:
        reference.finish()
    tracker.finish()  # step 4 is off the interval: rank 0 decides, every rank gathers

    # the gathered checkpoint entry: rank 0 holds the one-process layout, the others nothing
    state = tracker.state_dict(full=True)
    expected = reference.state_dict()
    results["state_plain"] = {k: v for k, v in state.items() if k != "profiles"} == \
        {k: v for k, v in expected.items() if k != "profiles"}
    results["state_profile_sizes"] = [len(p) for p in state["profiles"]]
    if rank == 0:
        results["state_max_diff"] = max(max_diff(a, b) for a, b in zip(state["profiles"], expected["profiles"]))

    # one process -> FSDP: the reference's whole tensors load into the sharded profiles
    fresh = PosthocTracker(model, **kwargs, dist=info)
    fresh.load_state_dict(expected)
    again = fresh.state_dict(full=True)
    if rank == 0:
        results["loaded_max_diff"] = max(max_diff(a, b) for a, b in zip(again["profiles"], expected["profiles"]))
    results["loaded_step"] = fresh.power.step

    # FSDP -> a DCP folder -> one process offline: the single-file layout again, rank 0's buffers
    averages = Averages(None, tracker)
    sharded = averages.checkpoint_state(full=False)
    results["dcp_keys"] = sorted(sharded)
    results["dcp_plain_has_profiles"] = "profiles" in sharded["posthoc_ema"]
    save_dcp(os.path.join(out, "dcp"), {**sharded, "epoch": 0})
    if rank == 0:
        ckpt = dcp_folder_to_checkpoint(os.path.join(out, "dcp"))
        results["dcp_max_diff"] = max(max_diff(a, b) for a, b in zip(ckpt["posthoc_ema"]["profiles"],
                                                                       expected["profiles"]))
        results["dcp_step"] = ckpt["posthoc_ema"]["step"]
        results["dcp_top_keys"] = sorted(ckpt)

    # rank 0's write fails (a full disk) on a snapshot step: every rank raises, none hangs
    if rank == 0:
        def full_disk(obj, path):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        posthoc_module._atomic_save = full_disk
    for _ in range(EVERY - tracker.power.step % EVERY - 1):
        tracker.update(model)
    try:
        tracker.update(model)
        results["write_error"] = None
    except OSError as e:
        results["write_error"] = [e.errno, str(e)]
    results["after_error_interval"] = tracker.interval
    dist.barrier()
    with open(os.path.join(out, f"posthoc_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
