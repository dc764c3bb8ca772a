"""train.py --fsdp and --checkpoint-format dcp end to end (torchrun, 2 gloo ranks on the CPU).

One module fixture trains every run once (tiny test_resnet, 32 px, 10 classes, batch 4 per
rank: 3 optimizer steps per epoch at 2 ranks): an FSDP run and a DDP run with the same seed
and flags, 1-epoch sources for the resume matrix in both checkpoint formats (FSDP x2, DDP x2,
one process), and the resumes to 2 epochs. The expectations come from other engines: the DDP
run (full replicas, torch's own optimizer state dict), the single-file checkpoints a DDP or
one-process run writes, and timm's ``load_checkpoint``.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env
from test_train_distributed import torchrun

pytestmark = pytest.mark.slow
TOL = 1e-5
# Two EMAs (one fused MultiEMA) ride along in every run.
ARGS = [*FAST_ARGS, "-b", "4", "--seed", "7", "--model-ema-half-life", "2ba,6ba"]
# BatchNorm recalibration of the EMAs at evaluation (it leaves the training trajectory as it is)
RECAL = ["--model-ema-bn-recal", "2"]
WEIGHTS = ("state_dict", "state_dict_ema", "state_dict_ema_1")

# rank 1 of a train.py --checkpoint-format dcp run SIGKILLs itself inside DCP's write of the
# second checkpoint (epoch 1), after its shard files are on disk; the folder is not complete.
KILL_DURING_SECOND_SAVE = r'''
import os, signal, sys
sys.path.insert(0, os.environ["REPO"])
from torch.distributed.checkpoint import filesystem
original, saves = filesystem.FileSystemWriter.write_data, []

def write_then_die(self, plan, planner):
    future = original(self, plan, planner)
    saves.append(self.path)
    if len(saves) == 2 and os.environ["RANK"] == "1":
        future.wait()
        open(os.environ["KILL_MARK"], "w").write(str(self.path))
        os.kill(os.getpid(), signal.SIGKILL)
    return future

filesystem.FileSystemWriter.write_data = write_then_die
import train
sys.exit(train.main(sys.argv[1:]))
'''


def _train(data: Path, out: Path, name: str, *flags: str, ranks: int = 2, fsdp: bool = True,
           script: str | None = None, **env: str) -> subprocess.CompletedProcess:
    launcher = [*torchrun(), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 or fsdp else [sys.executable]
    cmd = [*launcher, script or str(REPO / "train.py"), str(data), *ARGS, "--output", str(out),
           "--experiment", name, *(["--fsdp"] if fsdp else []), *flags]
    return subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), **env), capture_output=True, text=True,
                          timeout=400, cwd=str(out.parent))


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _load(path: Path) -> dict:
    if path.is_dir():
        from emakit.training.dcp import dcp_folder_to_checkpoint

        return dcp_folder_to_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# (run name, epochs, launch, format, resume from, extra flags)
SOURCES = [("fsdp", 2, "fsdp", "file", None), ("ddp", 2, "ddp", "file", None),
           ("fsdp_dcp1", 1, "fsdp", "dcp", None, *RECAL), ("ddp_dcp1", 1, "ddp", "dcp", None, *RECAL),
           ("one1", 1, "one", "file", None), ("one_dcp1", 1, "one", "dcp", None)]
# The resume matrix: (row id, run name, launch, written format, resumed checkpoint, reference run, bitwise)
MATRIX = [
    ("fsdp2->fsdp2 file", "r_ff", "fsdp", "file", "fsdp/checkpoint-0.pth.tar", "fsdp", True),
    ("fsdp2->fsdp2 dcp", "r_ff_dcp", "fsdp", "dcp", "fsdp_dcp1/last.dcp", "fsdp", True),
    ("ddp2->fsdp2 file", "r_df", "fsdp", "file", "ddp/checkpoint-0.pth.tar", "fsdp", True),
    ("ddp2->fsdp2 dcp", "r_df_dcp", "fsdp", "file", "ddp_dcp1/last.dcp", "fsdp", True),
    ("single->fsdp2 file", "r_sf", "fsdp", "file", "one1/last.pth.tar", "ref_sd", False),
    ("single->fsdp2 dcp", "r_sf_dcp", "fsdp", "file", "one_dcp1/last.dcp", "ref_sd", False),
    ("fsdp2->single file", "r_fs", "one", "file", "fsdp/checkpoint-0.pth.tar", "r_fs", False),
    ("fsdp2->single dcp", "r_fs_dcp", "one", "file", "fsdp_dcp1/last.dcp", "r_fs", False),
]
# References for a changed process count: the same checkpoint continued by the engines that
# existed before FSDP. A one-process file into DDP x2 here; for FSDP x2 -> one process, the
# FSDP run's epoch-0 file is bitwise the DDP run's (test_fsdp_run_equals_ddp_run), so the file
# row is the one-process resume of a DDP file, the path that predates FSDP, and the DCP row is
# compared with it.
REFERENCES = [("ref_sd", "ddp", "one1/last.pth.tar")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, image_folder_many: Path) -> Path:
    out = tmp_path_factory.mktemp("train_fsdp")
    data = image_folder_many

    def launch(name: str, epochs: int, how: str, fmt: str, resume: str | None, *extra: str) -> None:
        flags = ["--epochs", str(epochs), "--checkpoint-format", fmt, *extra]
        if resume:
            flags += ["--resume", str(out / resume)]
        _ok(_train(data, out, name, *flags, ranks=1 if how == "one" else 2, fsdp=how == "fsdp"))

    for source in SOURCES:
        launch(*source)
    for name, how, resume in REFERENCES:
        launch(name, 2, how, "file", resume)
    for _, name, how, fmt, resume, _, _ in MATRIX:
        launch(name, 2, how, fmt, resume)
    return out


def test_fsdp_run_equals_ddp_run(runs):
    """must-show 1: same seed and flags, fp32: final model and EMA within 1e-5 of the DDP run
    (measured: 0.0, bitwise), summary.csv equal to the printed precision."""
    fsdp, ddp = _load(runs / "fsdp" / "last.pth.tar"), _load(runs / "ddp" / "last.pth.tar")
    for key in WEIGHTS:
        assert _max_diff(fsdp[key], ddp[key]) <= TOL, key
    epoch0 = [_load(runs / run / "checkpoint-0.pth.tar") for run in ("fsdp", "ddp")]
    for key in WEIGHTS:
        assert _max_diff(epoch0[0][key], epoch0[1][key]) == 0.0, key
    assert fsdp["ema"]["num_updates"] == ddp["ema"]["num_updates"] == fsdp["ema_1"]["num_updates"] == 2 * 3
    # each EMA evaluated swapped into the sharded model, BatchNorm recalibrated there: the same
    # statistics and metrics as DDP's evaluation of the EMA's own module (the 1-epoch DCP runs)
    sources = [_load(runs / run / "last.dcp") for run in ("fsdp_dcp1", "ddp_dcp1")]
    recal = [ckpt["ema_bn_recal"]["buffers"] for ckpt in sources]
    assert len(recal[0]) == len(recal[1]) == 2
    for a, b in zip(*recal):
        assert _max_diff(a, b) <= TOL
    for key in ("ema_eval_loss", "ema_eval_top1", "ema1_eval_loss", "ema1_eval_top1"):
        assert f"{sources[0]['metrics'][key]:.4f}" == f"{sources[1]['metrics'][key]:.4f}", key
    assert sources[0]["metrics"]["ema_eval_loss"] != _load(runs / "fsdp" / "checkpoint-0.pth.tar")["metrics"][
        "ema_eval_loss"]  # the recalibration did change what was evaluated
    # the gathered optimizer state is in the standard integer-id layout, as DDP's
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == ddp["optimizer"]["state"].keys()
    assert max((a["momentum_buffer"] - ddp["optimizer"]["state"][i]["momentum_buffer"]).abs().max().item()
               for i, a in fsdp["optimizer"]["state"].items()) <= TOL
    a, b = _rows(runs / "fsdp"), _rows(runs / "ddp")
    assert len(a) == len(b) == 2 and a[0].keys() == b[0].keys()
    for ra, rb in zip(a, b):
        for col in ra:
            if ra[col] != rb[col]:
                assert f"{float(ra[col]):.4f}" == f"{float(rb[col]):.4f}", (col, ra[col], rb[col])
    log = (runs / "fsdp" / "train.log").read_text()
    assert "FSDP2 over 2 process(es): fully_shard on 4 blocks (layer1.0, layer2.0, layer3.0, layer4.0)" in log


def test_gathered_checkpoint_loads_in_timm_and_validate_reproduces_the_ema_top1(runs, image_folder_many):
    """must-show 3: timm's load_checkpoint(use_ema=True) gives exactly the EMA tensors (and
    those of the DDP run); our validate.py scores the logged EMA top-1 to the sample."""
    import timm
    from timm.models import load_checkpoint

    path = runs / "fsdp" / "last.pth.tar"
    saved, ddp = _load(path), _load(runs / "ddp" / "last.pth.tar")
    model = timm.create_model("test_resnet", num_classes=10)
    load_checkpoint(model, str(path), use_ema=True)
    assert _max_diff(model.state_dict(), saved["state_dict_ema"]) == 0.0
    assert _max_diff(model.state_dict(), ddp["state_dict_ema"]) <= TOL
    for checkpoint, row in ((path, _rows(runs / "fsdp")[-1]), (runs / "r_ff_dcp" / "last.dcp",
                                                                _rows(runs / "r_ff_dcp")[-1])):
        proc = _ok(subprocess.run([sys.executable, str(REPO / "validate.py"), str(image_folder_many),
                                   "--checkpoint", str(checkpoint), "--use-ema"],
                                  env=subprocess_env(), capture_output=True, text=True, timeout=300))
        record = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        samples = _load(checkpoint)["metrics"]["ema_eval_samples"]
        assert record["samples"] == samples == 30 and record["epoch"] == int(row["epoch"])
        assert round(record["top1"] * samples / 100) == round(float(row["ema_eval_top1"]) * samples / 100)
        assert abs(record["loss"] - float(row["ema_eval_loss"])) < 1e-4


def test_dcp_folder_exports_offline_to_the_ema_weights(runs, tmp_path):
    """emakit export reads a DCP folder: the EMA weights equal the single-file checkpoint of the
    same state (the FSDP file run's epoch 0, bitwise: the same seed and flags)."""
    from safetensors.torch import load_file

    out = tmp_path / "ema.safetensors"
    _ok(subprocess.run([sys.executable, "-m", "emakit", "export", str(runs / "fsdp_dcp1" / "last.dcp"), "-o",
                        str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=str(REPO)))
    epoch0 = _load(runs / "fsdp" / "checkpoint-0.pth.tar")
    assert _max_diff(load_file(str(out)), epoch0["state_dict_ema"]) == 0.0
    assert sorted(p.name for p in (runs / "fsdp_dcp1").iterdir() if p.suffix == ".dcp") == ["last.dcp",
                                                                                          "model_best.dcp"]


@pytest.mark.parametrize("row, name, how, fmt, resume, reference, bitwise", MATRIX, ids=[m[0] for m in MATRIX])
def test_resume_matrix_continues_to_the_same_final_ema(runs, row, name, how, fmt, resume, reference, bitwise):
    """must-show 4. Same process count: bitwise equal to the uninterrupted FSDP x2 run. Changed
    process count: each rank then sees other samples in another order (the sampler shards by
    rank), so no uninterrupted run is comparable; the reference is the same checkpoint continued
    by the pre-FSDP engines (DDP x2 / one process from a file), within 1e-5 (measured 0.0)."""
    final = _load(runs / name / ("last.dcp" if fmt == "dcp" else "last.pth.tar"))
    expected = _load(runs / reference / "last.pth.tar")
    assert final["epoch"] == 1 and final["ema"]["num_updates"] == expected["ema"]["num_updates"]
    for key in WEIGHTS:
        diff = _max_diff(final[key], expected[key])
        assert diff == 0.0 if bitwise else diff <= TOL, (key, diff)
    assert f"resumed from {runs / resume}" in (runs / name / "train.log").read_text()


def test_kill_9_of_one_rank_during_a_dcp_save_keeps_the_previous_folder(runs, image_folder_many, tmp_path):
    """must-show 5: rank 1 SIGKILLed inside the epoch-1 save: last.dcp is still epoch 0's, whole
    (equal to the FSDP file run's epoch 0), and the run resumes from it."""
    script = tmp_path / "kill_train.py"
    script.write_text(KILL_DURING_SECOND_SAVE)
    out, mark = tmp_path / "out", tmp_path / "killed"
    out.mkdir()
    proc = _train(image_folder_many, out, "killed", "--epochs", "2", "--checkpoint-format", "dcp",
                  script=str(script), KILL_MARK=str(mark))
    assert proc.returncode != 0 and mark.exists(), proc.stderr[-3000:]
    run = out / "killed"
    assert len(list(run.glob(".last.dcp.dcp-tmp-*"))) == 1  # the half-written new folder
    kept = _load(run / "last.dcp")
    epoch0 = _load(runs / "fsdp" / "checkpoint-0.pth.tar")
    assert kept["epoch"] == 0
    for key in WEIGHTS:
        assert _max_diff(kept[key], epoch0[key]) == 0.0, key


def test_fsdp_stopped_mid_epoch_into_a_dcp_folder_resumes_bitwise(runs, image_folder_many, tmp_path):
    """SIGTERM in the middle of epoch 0 of an FSDP x2 run writing DCP folders (the "fsdp" run's
    flags), then --resume of last.dcp: the same weights and EMA as the "fsdp" run that never
    stopped, bitwise. (Mid-epoch each rank's BatchNorm statistics differ; the folder must hold
    rank 0's, which the run continues with.)"""
    from test_train_signals import SIGNALLING_TRAIN

    script = tmp_path / "signalling_train.py"
    script.write_text(SIGNALLING_TRAIN)
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--epochs", "2", "--checkpoint-format", "dcp", "--log-interval", "1"]
    proc = _train(image_folder_many, out, "stopped", *flags, script=str(script), SIGNAL_AT="train 0 [1/3]",
                  STATUS_FILE=str(tmp_path / "status"))
    assert [(tmp_path / f"status.rank{r}").read_text() for r in (0, 1)] == ["143", "143"], proc.stderr[-3000:]
    last = out / "stopped" / "last.dcp"
    position = _load(last)["train_position"]
    assert 1 <= position["steps_done"] < 3 and position["processes"] == 2
    _ok(_train(image_folder_many, out, "stopped", *flags, "--resume", str(last), script=str(script),
               STATUS_FILE=str(tmp_path / "status")))
    straight, resumed = _load(runs / "fsdp" / "last.pth.tar"), _load(last)
    for key in WEIGHTS:
        assert _max_diff(straight[key], resumed[key]) == 0.0, key
    assert resumed["ema"]["num_updates"] == straight["ema"]["num_updates"] == 2 * 3
