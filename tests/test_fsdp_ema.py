"""The EMA of an FSDP2-sharded model (``fully_shard``), on the CPU with 2 gloo ranks.

One torchrun job (tests/fsdp_ema_worker.py) trains a sharded tiny ViT beside a plain replica
that sees the same batches; these tests read what each rank measured. The expectation is
always the plain ModelEMA/MultiEMA of the replica (the engine the rest of the suite checks
against closed forms and timm), and the collective counter is shown to see FSDP's gathers.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], object]:
    out = tmp_path_factory.mktemp("fsdp_ema")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "fsdp_ema_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, out


def test_sharded_ema_equals_plain_ema_of_the_same_training(fsdp_run):
    ranks, _ = fsdp_run
    for r in ranks:
        assert r["num_updates"] == 5
        assert r["max_diff"] <= 1e-6, r        # gathered sharded EMA vs plain EMA of the replica
        assert r["multi_diff"] <= 1e-6, r      # MultiEMA (fused pass) over shards, 3 decays
        assert r["power_diff"] <= 1e-6, r      # post-hoc power profiles (PowerEMA) over shards
        assert r["power_keys_ok"] and r["power_step"] == 5


def test_update_issues_no_collective(fsdp_run):  # ModelEMA, MultiEMA and PowerEMA updates
    ranks, _ = fsdp_run
    for r in ranks:
        assert r["update_python_collectives"] == [0] * 5
        assert r["update_dispatched_collectives"] == [0] * 5
        assert r["forward_dispatched_collectives"] > 0  # the counter does see FSDP's all-gathers


def test_each_rank_holds_about_half_of_the_ema(fsdp_run):
    ranks, _ = fsdp_run
    full = ranks[0]["full_bytes"]
    assert sum(r["local_bytes"] for r in ranks) == full  # shards partition the parameters exactly
    for r in ranks:
        assert r["local_bytes"] <= 0.55 * full, r


def test_swapped_into_evaluates_the_ema_through_the_sharded_model(fsdp_run):
    ranks, _ = fsdp_run
    for r in ranks:
        assert r["raw_vs_ema_out_diff"] > 1e-3      # the EMA really differs from the raw weights
        assert r["swap_out_diff"] <= 1e-6, r         # ... and the swapped model computes the EMA
        assert r["restored"] is True                 # raw shards back bit-exactly afterwards
        assert "swapped_into" in r["forward_raises"]


def test_state_dict_round_trips_between_sharded_and_plain(fsdp_run):
    ranks, _ = fsdp_run
    for r in ranks:
        assert r["fresh_diff"] == 0.0   # full (gathered) dict -> new sharded EMA: each rank cuts its shard
        assert r["plain_diff"] == 0.0   # DTensor dict -> plain EMA (gathered on load)


def test_dcp_folder_of_two_ranks_loads_on_one_process(fsdp_run):
    from torch.distributed.checkpoint import FileSystemReader, load

    _, out = fsdp_run
    expected = torch.load(out / "full_ema.pt", weights_only=True)
    state = {"ema": {k: torch.zeros_like(v) for k, v in expected.items()}}
    load(state, storage_reader=FileSystemReader(str(out / "dcp")))  # no process group: one reader
    assert state["ema"].keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state["ema"][k], v), k
