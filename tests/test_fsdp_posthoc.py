"""train.py --fsdp --model-ema-posthoc: gathered snapshots (torchrun, 2 gloo ranks on the CPU).

One module fixture trains: an FSDP x2 run and a DDP x2 run with the same seed and flags
(tiny test_resnet, 32 px, batch 4 per rank: 3 optimizer steps per epoch, 2 epochs, a snapshot
every 2 steps in float32), and an FSDP x2 run writing DCP folders that stops after epoch 0
and is resumed to epoch 1. The expectations come from the DDP run (rank 0 alone tracks the
profiles on a full replica, the pre-FSDP engine) and from the uninterrupted FSDP run. The
tracker itself is checked at module level by tests/fsdp_posthoc_worker.py against a
one-process tracker on a plain replica.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env
from test_train_distributed import torchrun
from test_train_fsdp import _load, _max_diff, _ok, _train

pytestmark = pytest.mark.slow
TOL = 1e-5
POSTHOC = ["--model-ema-posthoc", "--posthoc-every", "2", "--posthoc-dtype", "float32"]
STEPS, SIGMA_RELS = 6, ("0.050000", "0.100000")  # 2 epochs x 3 steps; the default profiles
SWEEP = "0.03,0.08"


def _snapshots(run: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted((run / "posthoc").glob("*.pt"))}


def _profiles_diff(a: dict, b: dict) -> float:
    assert len(a["profiles"]) == len(b["profiles"]) == 2
    return max(_max_diff(x, y) for x, y in zip(a["profiles"], b["profiles"]))


def _plain(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "profiles"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, image_folder_many: Path) -> Path:
    out = tmp_path_factory.mktemp("fsdp_posthoc")
    data = image_folder_many
    _ok(_train(data, out, "fsdp", "--epochs", "2", *POSTHOC))
    _ok(_train(data, out, "ddp", "--epochs", "2", *POSTHOC, fsdp=False))
    dcp = ["--checkpoint-format", "dcp", *POSTHOC]
    _ok(_train(data, out, "resumed", "--epochs", "1", *dcp))
    _ok(_train(data, out, "resumed", "--epochs", "2", *dcp, "--resume", str(out / "resumed" / "last.dcp")))
    return out


def test_fsdp_snapshots_equal_the_ddp_runs(runs):
    """must-show 1: the same snapshot files (steps x sigma_rels), each tensor within 1e-5 of
    the DDP run's (measured: 0.0, bitwise), in the same key order (the one-process layout)."""
    fsdp, ddp = _snapshots(runs / "fsdp"), _snapshots(runs / "ddp")
    expected = {f"posthoc-{step:09d}-s{s}.pt" for step in range(2, STEPS + 1, 2) for s in SIGMA_RELS}
    assert set(fsdp) == set(ddp) == expected
    diffs = {}
    for name, snap in fsdp.items():
        other = ddp[name]
        assert {k: v for k, v in snap.items() if k != "state_dict"} == \
            {k: v for k, v in other.items() if k != "state_dict"}  # step, sigma_rel, gamma, dtype, format
        assert list(snap["state_dict"]) == list(other["state_dict"])
        assert all(t.dtype == torch.float32 for t in snap["state_dict"].values() if t.is_floating_point())
        diffs[name] = _max_diff(snap["state_dict"], other["state_dict"])
    print("FSDP x2 vs DDP x2 post-hoc snapshots, max abs diff:", max(diffs.values()))
    assert max(diffs.values()) <= TOL, diffs
    log = (runs / "fsdp" / "train.log").read_text()
    assert "snapshots gathered to rank 0" in log
    assert "budget 24.4 MiB (17x the model's 1.4 MiB float32 bytes, at most 8 snapshot steps)" in log
    # the cap and the logged sizes count the whole model on every engine, not a rank's shard
    assert "budget 24.4 MiB (17x the model's 1.4 MiB float32 bytes, at most 8 snapshot steps)" in \
        (runs / "ddp" / "train.log").read_text()


def test_validate_posthoc_sweep_of_the_fsdp_run_equals_the_ddp_runs(runs, image_folder_many):
    """must-show 2: validate.py --posthoc-sigma-rel reconstructs and scores the same EMAs."""
    procs = {run: subprocess.Popen([sys.executable, str(REPO / "validate.py"), str(image_folder_many), "--checkpoint",
                                    str(runs / run / "last.pth.tar"), "--posthoc-sigma-rel", SWEEP],
                                   env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run in ("fsdp", "ddp")}  # side by side: one process each
    records = {}
    for run, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        records[run] = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert [r["sigma_rel"] for r in records["fsdp"]] == [r["sigma_rel"] for r in records["ddp"]] == [0.03, 0.08]
    for a, b in zip(records["fsdp"], records["ddp"]):
        assert a["posthoc_step"] == b["posthoc_step"] == STEPS and a["samples"] == b["samples"] == 30
        assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["loss"], b["loss"])


def test_checkpoint_posthoc_state_equals_the_ddp_runs(runs):
    """must-show 3: last.pth.tar's posthoc_ema, gathered to rank 0, has the DDP run's layout
    and values (profiles within 1e-5; measured 0.0); the epoch copies hold none, as before."""
    fsdp, ddp = _load(runs / "fsdp" / "last.pth.tar"), _load(runs / "ddp" / "last.pth.tar")
    a, b = fsdp["posthoc_ema"], ddp["posthoc_ema"]
    assert _plain(a) == _plain(b) == {"step": STEPS, "sigma_rels": [0.05, 0.1], "snapshot_every": 2,
                                      "snapshot_interval": 2, "snapshot_dtype": "float32"}
    assert [list(p) for p in a["profiles"]] == [list(p) for p in b["profiles"]]
    diff = _profiles_diff(a, b)
    print("FSDP x2 vs DDP x2 checkpoint posthoc_ema profiles, max abs diff:", diff)
    assert diff <= TOL
    assert "posthoc_ema" not in _load(runs / "fsdp" / "checkpoint-1.pth.tar")


def test_fsdp_dcp_resume_continues_the_profiles_bitwise(runs):
    """FSDP x2 into DCP folders, stopped after epoch 0 and resumed: the same snapshot files and
    post-hoc state as the uninterrupted FSDP run, bitwise. The folder holds the profiles as
    shards (posthoc_ema_profiles, rank 0's BatchNorm averages) and the rest as plain values."""
    from emakit.training.dcp import read_dcp_meta

    straight, resumed = _snapshots(runs / "fsdp"), _snapshots(runs / "resumed")
    assert set(straight) == set(resumed)
    for name, snap in straight.items():
        assert _max_diff(snap["state_dict"], resumed[name]["state_dict"]) == 0.0, name
    final = _load(runs / "resumed" / "last.dcp")
    expected = _load(runs / "fsdp" / "last.pth.tar")["posthoc_ema"]
    assert _plain(final["posthoc_ema"]) == _plain(expected)
    assert _profiles_diff(final["posthoc_ema"], expected) == 0.0
    meta = read_dcp_meta(runs / "resumed" / "last.dcp")
    assert "posthoc_ema_profiles" in meta["sharded_keys"] and "profiles" not in meta["plain"]["posthoc_ema"]
    assert f"resumed from {runs / 'resumed' / 'last.dcp'}" in (runs / "resumed" / "train.log").read_text()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp_posthoc_worker")
    proc = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "fsdp_posthoc_worker.py"), str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, [json.loads((out / f"posthoc_rank{r}.json").read_text()) for r in range(2)]


def test_sharded_tracker_updates_without_collectives_and_caps_like_one_process(worker):
    """Every rank: no collective in PosthocTracker.update on a non-snapshot step (the gathers
    only on the snapshot step), the budget's cap, the model bytes and the footprint those of a
    one-process tracker on the plain replica, and half its profile memory per rank."""
    _, ranks = worker
    for r in ranks:
        assert r["sharded"] == [True, False]
        assert [c for c in r["update_collectives"] if c[0] != 3] == [[1, 0, 0], [2, 0, 0], [4, 0, 0]], r
        step3 = next(c for c in r["update_collectives"] if c[0] == 3)
        assert step3[1] >= 1 and step3[2] > 0  # the counter sees the snapshot step's gathers
        assert r["cap"] == r["cap_reference"] and r["cap"][1] == 16
        assert r["model_bytes"][0] == r["model_bytes"][1]
        assert r["footprint"][0] == r["footprint"][1]
        assert 0.45 <= r["memory_bytes"][0] / r["memory_bytes"][1] <= 0.55
        assert r["interval"] == 3


def test_sharded_tracker_writes_the_one_process_files_and_state(worker):
    """Rank 0's gathered snapshots are byte for byte the one-process tracker's files (rank 0's
    BatchNorm averages, no FSDP padding); the gathered state, the state loaded from one
    process and a DCP folder read offline are its values; a failed write on rank 0 raises on
    every rank (no hang)."""
    out, (r0, r1) = worker
    names = sorted(p.name for p in (out / "sharded").iterdir())
    assert names == sorted(p.name for p in (out / "reference").iterdir()) == [
        f"posthoc-{step:09d}-s{s}.pt" for step in (3, 4) for s in SIGMA_RELS]
    for name in names:
        assert (out / "sharded" / name).read_bytes() == (out / "reference" / name).read_bytes(), name
    assert r0["state_plain"] and r1["state_plain"]
    assert r0["state_profile_sizes"] == [92, 92] and r1["state_profile_sizes"] == [0, 0]  # gathered to rank 0 only
    assert r0["state_max_diff"] == r0["loaded_max_diff"] == r0["dcp_max_diff"] == 0.0
    assert r0["loaded_step"] == r1["loaded_step"] == r0["dcp_step"] == 4
    assert r0["dcp_keys"] == ["posthoc_ema", "posthoc_ema_profiles"] and not r0["dcp_plain_has_profiles"]
    assert r0["dcp_top_keys"] == ["dcp_ranks", "epoch", "posthoc_ema"]  # the profiles joined back
    assert r0["write_error"][0] == 28 and "No space left on device" in r0["write_error"][1]
    assert r1["write_error"] == [None, "rank 0 could not write a post-hoc EMA snapshot"]
    assert r0["after_error_interval"] == r1["after_error_interval"] == 3
