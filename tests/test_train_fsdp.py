"""train.py --fsdp and --checkpoint-format dcp end to end (torchrun, 2 gloo ranks on the CPU).

One module fixture trains every run once (tiny test_resnet, 32 px, 10 classes, batch 4 per
rank: 3 optimizer steps per epoch at 2 ranks): an FSDP run and a DDP run with the same seed
and flags, 1-epoch sources for the resume matrix in both checkpoint formats (FSDP x2, DDP x2,
one process), and the resumes to 2 epochs. The expectations come from other engines: the DDP
run (full replicas, torch's own optimizer state dict), the single-file checkpoints a DDP or
one-process run writes, and timm's ``load_checkpoint``. The FSDP and DDP runs (and the
FSDP DCP source and its resume) also track post-hoc EMA profiles: under FSDP every rank holds
its shards and rank 0 writes the gathered snapshots, which must equal the DDP run's (rank 0
alone tracks them on a full replica, the pre-FSDP engine). Runs of one engine share a
process (tests/train_many.py): four launches for the fifteen runs.
"""
from __future__ import annotations

import csv
import json
import shlex
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
# --no-opt-fused: DDP's SGD would take torch's fused kernel, which FSDP2 cannot (torch has no
# sharded one); with the loop on both, FSDP and DDP runs stay comparable bit for bit. The
# one-process sources (FUSED) keep the fused kernel: their checkpoints' optimizer groups say
# fused=True, which the FSDP2 and DDP runs that resume them must not take over.
ARGS = [*FAST_ARGS, "-b", "4", "--seed", "7", "--model-ema-half-life", "2ba,6ba"]
FUSED = ("one1", "one_dcp1")
# Post-hoc EMA profiles (gathered snapshots under FSDP): a snapshot every 2 steps, stored in float32
POSTHOC = ["--model-ema-posthoc", "--posthoc-every", "2", "--posthoc-dtype", "float32"]
STEPS, SIGMA_RELS = 6, ("0.050000", "0.100000")  # 2 epochs x 3 steps; the default profiles
WITH_POSTHOC = ("r_ff_dcp",)  # the matrix row that continues fsdp_dcp1's profiles from its DCP folder
# float16 autocast; on the CPU without a gradient scaler, as timm's train.py (the scaler, and
# FSDP's ShardedGradScaler, are CUDA-only: the GPU check's tests cover them)
FP16 = ["--amp", "--amp-dtype", "float16"]
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
from emakit.training.lifecycle import end_process
end_process(train.main(sys.argv[1:]))
'''


def _argv(data: Path, out: Path, name: str, *flags: str, fsdp: bool = True) -> list[str]:
    kernel = [] if name in FUSED else ["--no-opt-fused"]
    return [str(data), *ARGS, *kernel, "--output", str(out), "--experiment", name, *(["--fsdp"] if fsdp else []),
            *flags]


def _launcher(ranks: int, fsdp: bool) -> list[str]:
    return [*torchrun(), "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 or fsdp else [sys.executable]

# rank 0 of a train.py --fsdp --model-ema-posthoc run finds the disk full when it writes the
# second snapshot step's first file; each rank writes its exit status to STATUS_FILE.rankN.
FULL_DISK_AT_SECOND_SNAPSHOT = r'''
import errno, os, sys
sys.path.insert(0, os.environ["REPO"])
import emakit.posthoc as posthoc
original, writes = posthoc._atomic_save, []

def fill_the_disk(obj, path):
    writes.append(path)
    if len(writes) == 3 and os.environ["RANK"] == "0":
        raise OSError(errno.ENOSPC, "No space left on device", path)
    return original(obj, path)

posthoc._atomic_save = fill_the_disk
import train
code = train.main(sys.argv[1:])
open(os.environ["STATUS_FILE"] + ".rank" + os.environ["RANK"], "w").write(str(code))
from emakit.training.lifecycle import end_process
end_process(code)
'''


def _train(data: Path, out: Path, name: str, *flags: str, ranks: int = 2, fsdp: bool = True,
           script: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [*_launcher(ranks, fsdp), script or str(REPO / "train.py"), *_argv(data, out, name, *flags, fsdp=fsdp)]
    return subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), **env), capture_output=True, text=True,
                          timeout=400, cwd=str(out.parent))


def _train_many(out: Path, runs: list[list[str]], *, ranks: int) -> subprocess.CompletedProcess:
    """Several train.py runs (argv lists) in order in one launch (tests/train_many.py): one
    process start and rendezvous for all of them."""
    listing = out / f"runs-{len(list(out.glob('runs-*.json')))}.json"
    listing.write_text(json.dumps(runs))
    return subprocess.run([*_launcher(ranks, ranks > 1), str(REPO / "tests" / "train_many.py"), str(listing)],
                          env=subprocess_env(REPO=str(REPO)), capture_output=True, text=True,
                          timeout=120 * len(runs), cwd=str(out.parent))


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
SOURCES = [("fsdp", 2, "fsdp", "file", None, *POSTHOC), ("ddp", 2, "ddp", "file", None, *POSTHOC),
           ("fsdp_dcp1", 1, "fsdp", "dcp", None, *RECAL, *POSTHOC), ("ddp_dcp1", 1, "ddp", "dcp", None, *RECAL),
           ("one1", 1, "one", "file", None), ("one_dcp1", 1, "one", "dcp", None),
           ("fsdp_fp16", 2, "fsdp", "file", None, *FP16), ("ddp_fp16", 2, "ddp", "file", None, *FP16)]
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

    def argv(name: str, epochs: int, how: str, fmt: str, resume: str | None, *extra: str) -> list[str]:
        flags = ["--epochs", str(epochs), "--checkpoint-format", fmt, *extra]
        if resume:
            flags += ["--resume", str(out / resume)]
        return _argv(data, out, name, *flags, fsdp=how == "fsdp")

    # one launch per engine, in dependency order: 4 process starts for 15 runs
    runs = [*SOURCES, *((name, 2, how, "file", resume) for name, how, resume in REFERENCES),
            *((name, 2, how, fmt, resume, *(POSTHOC if name in WITH_POSTHOC else ()))
              for _, name, how, fmt, resume, _, _ in MATRIX)]
    order = [("one", lambda r: r[2] == "one" and r[4] is None), ("ddp", lambda r: r[2] == "ddp"),
             ("fsdp", lambda r: r[2] == "fsdp"), ("one", lambda r: r[2] == "one" and r[4] is not None)]
    for how, chosen in order:
        _ok(_train_many(out, [argv(*r) for r in runs if chosen(r)], ranks=1 if how == "one" else 2))
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


def test_fsdp_float16_equals_ddp(runs):
    """--amp --amp-dtype float16 under FSDP vs DDP on the CPU: the same weights and EMA
    (measured: bitwise); no gradient scaler on the CPU, as timm."""
    fsdp, ddp = _load(runs / "fsdp_fp16" / "last.pth.tar"), _load(runs / "ddp_fp16" / "last.pth.tar")
    for key in WEIGHTS[:2]:
        assert _max_diff(fsdp[key], ddp[key]) <= TOL, key
    assert fsdp["amp_scaler"] is None and ddp["amp_scaler"] is None
    initial = _load(runs / "fsdp" / "last.pth.tar")["state_dict"]
    assert _max_diff(fsdp["state_dict"], initial) > 0  # float16 steps were taken: not the fp32 run's weights
    log = (runs / "fsdp_fp16" / "train.log").read_text()
    assert "AMP: autocast float16 on cpu" in log and "gradient scaler" not in log


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


def test_a_resume_keeps_its_own_optimizer_kernel(runs):
    """A one-process checkpoint written with torch's fused SGD kernel, resumed under FSDP2 (a
    file, and a DCP folder) and under DDP: the resumed run keeps the loop it chose (FSDP2 has no
    fused kernel for sharded parameters; --no-opt-fused under DDP), and its checkpoints say so."""
    def kernels(run: str) -> set:
        path = runs / run / "last.pth.tar"
        return {g["fused"] for g in _load(path if path.exists() else runs / run / "last.dcp")["optimizer"][
            "param_groups"]}

    assert kernels("one1") == kernels("one_dcp1") == {True}
    for run in ("r_sf", "r_sf_dcp", "ref_sd"):
        assert True not in kernels(run), run  # torch's "not asked for" (None), or False
        assert "resumed from" in (runs / run / "train.log").read_text()


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


# ----------------------------------------------------------------------------- post-hoc EMA
def _snapshots(run: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted((run / "posthoc").glob("*.pt"))}


def _profiles_diff(a: dict, b: dict) -> float:
    assert len(a["profiles"]) == len(b["profiles"]) == 2
    return max(_max_diff(x, y) for x, y in zip(a["profiles"], b["profiles"]))


def _plain(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "profiles"}


def test_fsdp_posthoc_snapshots_equal_the_ddp_runs(runs):
    """Post-hoc snapshots under FSDP: the same files (steps x sigma_rels) as the DDP run's, each
    tensor within 1e-5 (measured: 0.0, bitwise), in the same key order (the one-process layout)."""
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
    # the cap and the logged sizes count the whole model on every engine, not a rank's shard
    budget = "budget 24.4 MiB (17x the model's 1.4 MiB float32 bytes, at most 8 snapshot steps)"
    assert budget in log and budget in (runs / "ddp" / "train.log").read_text()


def test_validate_posthoc_sweep_of_the_fsdp_run_equals_the_ddp_runs(runs, image_folder_many):
    """validate.py --posthoc-sigma-rel reconstructs and scores the same EMAs from both runs."""
    procs = {run: subprocess.Popen([sys.executable, str(REPO / "validate.py"), str(image_folder_many), "--checkpoint",
                                    str(runs / run / "last.pth.tar"), "--posthoc-sigma-rel", "0.03,0.08"],
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
    """last.pth.tar's posthoc_ema, gathered to rank 0, has the DDP run's layout and values
    (profiles within 1e-5; measured 0.0); the epoch copies hold none, as before."""
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
    """fsdp_dcp1 (FSDP x2 into DCP folders, 1 epoch) resumed to 2 epochs (r_ff_dcp): the
    snapshots of both parts and the final post-hoc state are the uninterrupted FSDP run's,
    bitwise. The folder holds the profiles as shards (posthoc_ema_profiles, with rank 0's
    BatchNorm averages) and the rest as plain values."""
    from emakit.training.dcp import read_dcp_meta

    straight, first, resumed = (_snapshots(runs / run) for run in ("fsdp", "fsdp_dcp1", "r_ff_dcp"))
    assert sorted(first) == [f"posthoc-{step:09d}-s{s}.pt" for step in (2, 3) for s in SIGMA_RELS]  # 3: its end
    assert sorted(resumed) == [f"posthoc-{step:09d}-s{s}.pt" for step in (4, 6) for s in SIGMA_RELS]
    for name in [*(n for n in first if "-000000002-" in n), *resumed]:
        snap = (first if name in first else resumed)[name]
        assert _max_diff(snap["state_dict"], straight[name]["state_dict"]) == 0.0, name
    final = _load(runs / "r_ff_dcp" / "last.dcp")
    expected = _load(runs / "fsdp" / "last.pth.tar")["posthoc_ema"]
    assert _plain(final["posthoc_ema"]) == _plain(expected)
    assert _profiles_diff(final["posthoc_ema"], expected) == 0.0
    # the logged sweep command names the checkpoint the run wrote (the folder, in this format),
    # and it runs: validate.py finds posthoc/ beside last.dcp and sweeps the run's last step
    log = (runs / "fsdp_dcp1" / "train.log").read_text()
    command = shlex.split(log.split("choose the EMA length now: ", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "validate.py"] and \
        command[command.index("--checkpoint") + 1] == str(runs / "fsdp_dcp1" / "last.dcp")
    proc = _ok(subprocess.run([sys.executable, str(REPO / "validate.py"), *command[2:]], env=subprocess_env(),
                              capture_output=True, text=True, timeout=300))
    records = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [r["posthoc_step"] for r in records] == [3] * 4 and len({r["sigma_rel"] for r in records}) == 4
    meta = read_dcp_meta(runs / "fsdp_dcp1" / "last.dcp")
    assert "posthoc_ema_profiles" in meta["sharded_keys"] and "profiles" not in meta["plain"]["posthoc_ema"]


def test_a_full_disk_at_a_gathered_snapshot_stops_every_rank_with_exit_2(image_folder_many, tmp_path):
    """Rank 0 alone writes the gathered snapshots: when its disk is full at the second snapshot
    step (step 4, in epoch 1), every rank stops at the next agreed boundary with exit 2 (none
    waits in a gather), rank 0 says so in one line naming the intact epoch-0 checkpoint, and no
    temporary file is left."""
    script = tmp_path / "full_disk_train.py"
    script.write_text(FULL_DISK_AT_SECOND_SNAPSHOT)
    out, status = tmp_path / "out", tmp_path / "status"
    out.mkdir()
    proc = _train(image_folder_many, out, "full", "--epochs", "3", *POSTHOC, script=str(script),
                  STATUS_FILE=str(status))
    assert [(tmp_path / f"status.rank{r}").read_text() for r in (0, 1)] == ["2", "2"], proc.stderr[-3000:]
    run, last = out / "full", out / "full" / "last.pth.tar"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"train.py: error: could not write a post-hoc EMA snapshot ({run / 'posthoc'}"), proc.stderr[-3000:]
    assert f"No space left on device; the last good checkpoint is {last} (epoch 0)" in errors[0]
    # torchrun prints its own traceback for children that exit non-zero; none comes from a rank
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank") and "Traceback" in ln]
    assert f'File "{REPO / "emakit"}' not in proc.stderr and f'File "{REPO / "train.py"}' not in proc.stderr
    assert _load(last)["epoch"] == 0
    assert sorted(p.name for p in (run / "posthoc").iterdir()) == [f"posthoc-000000002-s{s}.pt" for s in SIGMA_RELS]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
