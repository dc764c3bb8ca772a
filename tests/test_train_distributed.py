"""train.py under torchrun on the CPU (gloo): two processes on one node, and two nodes on
127.0.0.1. Checks: identical EMA weights on every rank, exact evaluation counts, and that
only rank 0 writes into the output folder (watched with a Python audit hook)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, count_images, subprocess_env

pytestmark = pytest.mark.slow

# Runs train.main under an audit hook that records every file this rank creates, opens for
# writing, renames, links or deletes inside AUDIT_WATCH; the list goes to AUDIT_LOG.rank<N>.
AUDITED_TRAIN = r'''
import os, sys
watch = os.path.realpath(os.environ["AUDIT_WATCH"])
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT

def inside(path):
    if isinstance(path, int):
        return False
    path = os.path.realpath(os.fsdecode(path))
    return path == watch or path.startswith(watch + os.sep)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (flags or 0) & WRITE_FLAGS or (mode and any(c in mode for c in "wax+")):
            if inside(path):
                writes.append(f"open {path}")
    elif event in ("os.rename", "os.link", "os.symlink"):
        if inside(args[0]) or inside(args[1]):
            writes.append(f"{event} {args[1]}")
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.copyfile"):
        if inside(args[0]) or (event == "shutil.copyfile" and inside(args[1])):
            writes.append(f"{event} {args[0]}")

sys.addaudithook(hook)
sys.path.insert(0, os.environ["REPO"])
import torch
import emakit.training.fit as fit_module

fit = fit_module.fit

def fit_then_dump(tr, *args):
    """Every rank saves its EMA weights after training (outside AUDIT_WATCH), for the test."""
    result = fit(tr, *args)
    folder = os.environ["DUMP_EMA_DIR"]
    os.makedirs(folder, exist_ok=True)
    for average in tr.averages.targets():
        torch.save(average.module.state_dict(), os.path.join(folder, f"{average.name}_rank{tr.dist.rank}.pt"))
    return result

fit_module.fit = fit_then_dump
import train
code = train.main(sys.argv[1:])
log = os.environ["AUDIT_LOG"] + ".rank" + os.environ.get("RANK", "0")
with open(log, "w") as f:
    f.write("\n".join(writes))
from emakit.training.lifecycle import end_process
end_process(code)
'''


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_identical_ema_exact_counts_only_rank0_writes(tmp_path, image_folder):
    out, dump, script = tmp_path / "out", tmp_path / "dump", tmp_path / "audited_train.py"
    script.write_text(AUDITED_TRAIN)
    # Two EMAs, BN recalibration (pooled over ranks) and post-hoc snapshots (rank 0) ride along.
    cmd = [*torchrun(), "--standalone", "--nproc_per_node=2", str(script), str(image_folder),
           *FAST_ARGS, "-b", "4", "--epochs", "2", "--output", str(out), "--experiment", "ddp",
           "--model-ema-half-life", "2ba,4ba", "--model-ema-bn-recal", "2", "--model-ema-posthoc",
           "--posthoc-every", "1"]
    env = subprocess_env(DUMP_EMA_DIR=str(dump), AUDIT_LOG=str(tmp_path / "audit"),
                         AUDIT_WATCH=str(out), REPO=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = torch.load(out / "ddp" / "last.pth.tar", weights_only=True)
    for name, ckpt_key in (("ema", "state_dict_ema"), ("ema1", "state_dict_ema_1")):
        ema = [torch.load(dump / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ema[0].keys() == ema[1].keys()
        for key in ema[0]:
            assert torch.equal(ema[0][key], ema[1][key]), (name, key)
            assert torch.equal(ckpt[ckpt_key][key], ema[0][key]), (name, key)

    n_val = count_images(image_folder / "val")
    assert n_val % 2 == 1  # uneven shards: a padding sampler would count one image twice
    m = ckpt["metrics"]
    assert m["eval_samples"] == m["ema_eval_samples"] == n_val
    # each rank gets ceil(n/2) shuffled images and trains on full batches of 4 only
    per_rank = -(-count_images(image_folder / "train") // 2) // 4 * 4
    assert m["train_samples"] == 2 * per_rank
    assert ckpt["ema"]["num_updates"] == ckpt["ema_1"]["num_updates"] == 2 * (per_rank // 4)
    steps = 2 * (per_rank // 4)
    assert len(list((out / "ddp" / "posthoc").glob("posthoc-*.pt"))) == steps * 2  # every step, 2 profiles
    assert ckpt["posthoc_ema"]["step"] == steps
    assert m["ema1_eval_samples"] == n_val and len(ckpt["ema_bn_recal"]["buffers"]) == 2

    rank0 = (tmp_path / "audit.rank0").read_text().splitlines()
    rank1 = (tmp_path / "audit.rank1").read_text().splitlines()
    assert any("last.pth.tar" in w for w in rank0)  # the hook does see writes
    assert rank1 == []
    assert [p.name for p in out.iterdir()] == ["ddp"]


def test_two_nodes_on_localhost_complete(tmp_path, image_folder):
    port = free_port()
    out = tmp_path / "out"
    procs, logs = [], []
    for node in (0, 1):
        cmd = [*torchrun(), "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train.py"), str(image_folder),
               *FAST_ARGS, "-b", "4", "--epochs", "1", "--output", str(out), "--experiment", "two-nodes"]
        logs.append(open(tmp_path / f"node{node}.log", "w"))
        procs.append(subprocess.Popen(cmd, env=subprocess_env(), stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 180
    try:  # a node that fails (e.g. its port was taken meanwhile) must not leave the other waiting
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs:
            f.close()
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    ckpt = torch.load(out / "two-nodes" / "last.pth.tar", weights_only=True)
    assert ckpt["metrics"]["eval_samples"] == count_images(image_folder / "val")
    assert ckpt["epoch"] == 0


def _bn_worker(rank: int, init_file: str, mode: str, results: dict) -> None:
    import torch.distributed as tdist
    from torch import nn

    from emakit.training.distributed import DistInfo, distribute_bn

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank + 1))      # rank 0: 1, rank 1: 2
    bn.running_var.fill_(float(10 * (rank + 1)))
    distribute_bn(bn, DistInfo(rank=rank, world_size=2), mode)
    results[rank] = (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
    tdist.destroy_process_group()


@pytest.mark.parametrize("mode, mean, var", [("reduce", 1.5, 15.0), ("broadcast", 1.0, 10.0)])
def test_dist_bn_averages_or_broadcasts_batchnorm_statistics(tmp_path, mode, mean, var):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_bn_worker, args=(str(tmp_path / "init"), mode, results), nprocs=2, join=True)
        got = dict(results)
    for rank in (0, 1):
        assert got[rank] == ([mean] * 3, [var] * 3, 0)
