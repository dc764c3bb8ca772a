"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU at toy sizes and
lands in one JSON (timm's train.py is not in the wheel: its run is recorded as skipped)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, subprocess_env

SCRIPT = REPO / "bench" / "gpu_check.sh"


def _env() -> dict[str, str]:
    import sys

    env = subprocess_env(PYTHON=sys.executable)
    env.pop("OUT", None)
    return env


@pytest.mark.slow
def test_dry_run_records_every_step(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], env=_env(), capture_output=True,
                         text=True, timeout=400, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["failed_steps"] == 0
    for step in ("env", "pytest", "data", "throughput", "synthetic", "ema"):
        assert step in report and "error" not in report[step], (step, report.get(step))
    assert report["env"]["dry_run"] is True and report["env"]["cpu_count"] >= 1
    assert report["pytest"]["exit_status"] in (0, 5) and report["pytest"]["counts"].get("failed", 0) == 0
    assert report["data"]["images"] == 40
    through = report["throughput"]
    assert through["emakit"]["rc"] == 0 and through["emakit"]["img_per_s"] > 0, through["emakit"]
    assert through["emakit_vit_fsdp"]["rc"] == 0 and through["emakit_vit_fsdp"]["img_per_s"] > 0
    assert "skipped" in through["timm"]
    for model in ("test_resnet", "test_vit"):
        assert report["synthetic"][model]["emakit"]["img_per_s"] > 0
        assert report["ema"][model]["update_ms"] > 0 and report["ema"][model]["floor_ms"] > 0
    for log in ("pytest_cuda.log", "train_emakit.log", "train_emakit_vit_fsdp.log", "ema.log"):
        assert (out / log).is_file(), log
    assert not (out / "data").exists()  # the generated images are removed


@pytest.mark.parametrize("argv, words", [(["--bogus"], "unknown argument --bogus"),
                                         (["--timm-train", "/nonexistent/train.py"], "is not a file")])
def test_bad_arguments_one_line_exit_2(tmp_path, argv, words):
    run = subprocess.run(["bash", str(SCRIPT), *argv, "--out", str(tmp_path / "o")], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert os.access(SCRIPT, os.X_OK)
