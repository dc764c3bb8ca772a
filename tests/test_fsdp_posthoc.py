"""The post-hoc tracker under FSDP2 at module level (tests/fsdp_posthoc_worker.py, torchrun,
2 gloo ranks on the CPU), against a one-process tracker on a plain replica: no collective
between snapshots, the whole model's cap and footprint, byte-identical gathered snapshots,
the gathered / loaded / DCP state, a failed write on rank 0 raised on every rank. The
train.py runs with --fsdp --model-ema-posthoc are in tests/test_train_fsdp.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from test_train_distributed import torchrun

pytestmark = pytest.mark.slow
SIGMA_RELS = ("0.050000", "0.100000")  # the default profiles


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
    assert r0["dcp_top_keys"] == ["epoch", "posthoc_ema"]  # the profiles joined back
    assert r0["write_error"][0] == 28 and "No space left on device" in r0["write_error"][1]
    assert r1["write_error"] == [None, "rank 0 could not write a post-hoc EMA snapshot"]
    assert r0["after_error_interval"] == r1["after_error_interval"] == 3
