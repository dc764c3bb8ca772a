"""A run never reports success on a wrong result (issue 19, cause 1, and the unsafe-pickle
wording of cause 4), through the real CLIs.

- ``emakit posthoc`` / ``emakit export`` refuse labels that do not fit the weights (another
  class count, another architecture, a ``--checkpoint`` of another model): exit 2, one line
  naming what differs and the fix, no output file;
- ``validate.py`` refuses a weight set holding NaN or an infinity (pickled or safetensors),
  naming the file, the weight set and the tensor;
- ``train.py --resume`` refuses a checkpoint with a non-finite weight, EMA or optimizer
  tensor before anything is written (no run folder);
- a code-running pickle planted as a post-hoc snapshot (or passed as a checkpoint) is
  refused as unsafe, not called damaged, and its code never runs.

Every case runs as its own process (forks of one warm interpreter, ``tests/cli_batch.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow

M, V, T = "emakit: error: ", "validate.py: error: ", "train.py: error: "


class _Evil:
    """Pickles as a call of os.system (touching a marker file) when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poisoned(ckpt: dict, key: str, value: float) -> dict:
    """A copy of ``ckpt`` whose ``key`` entry's fc.weight (or first optimizer buffer) holds ``value``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
    if key == "optimizer":
        state = {i: {n: t.clone() for n, t in s.items()} for i, s in ckpt["optimizer"]["state"].items()}
        first = next(iter(state.values()))["momentum_buffer"]
        first.view(-1)[1] = value
        out["optimizer"] = {"state": state, "param_groups": ckpt["optimizer"]["param_groups"]}
    else:
        weights = {k: t.clone() for k, t in ckpt[key].items()}
        weights["fc.weight"][0, 0] = value
        out[key] = weights
    return out


@pytest.fixture(scope="module")
def world(image_folder_many: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real 10-class run with post-hoc snapshots, and the files the cases point at."""
    from emakit.checkpoint import load_checkpoint, save_checkpoint, save_safetensors

    root = tmp_path_factory.mktemp("wrong")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(image_folder_many), *FAST_ARGS, "--epochs", "2",
                           "--model-ema-posthoc", "--output", str(root), "--experiment", "run"],
                          cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "run"
    w = {"root": root, "data": image_folder_many, "run": run, "last": run / "last.pth.tar",
         "marker": root / "pwned"}
    ckpt = load_checkpoint(w["last"])
    assert ckpt["state_dict"]["fc.weight"].shape[0] == 10
    for name, key, value in (("nan_raw", "state_dict", float("nan")), ("inf_ema", "state_dict_ema", float("inf")),
                             ("inf_opt", "optimizer", float("-inf"))):
        w[name] = root / f"{name}.pth.tar"
        save_checkpoint(_poisoned(ckpt, key, value), w[name])
    w["nan_st"] = root / "nan.safetensors"
    save_safetensors(_poisoned(ckpt, "state_dict", float("nan"))["state_dict"], w["nan_st"],
                     metadata={"arch": "test_resnet", "num_classes": 10, "weights": "raw"})
    # A checkpoint of a run of another architecture (same class count).
    other = timm.create_model("test_efficientnet", num_classes=10)
    w["other"] = root / "other.pth.tar"
    save_checkpoint({"epoch": 1, "arch": "test_efficientnet", "state_dict": other.state_dict(),
                     "args": {"model": "test_efficientnet", "num_classes": 10}}, w["other"])
    # A snapshot folder with a code-running pickle planted among the real snapshots.
    w["planted"] = root / "planted"
    shutil.copytree(run / "posthoc", w["planted"])
    w["evil_snap"] = w["planted"] / "posthoc-000000002-s0.050000.pt"
    torch.save({"format": "emakit-posthoc", "state_dict": _Evil(w["marker"])}, w["evil_snap"])
    w["evil_ckpt"] = root / "evil.pth.tar"
    torch.save({"state_dict": _Evil(w["marker"]), "epoch": 1}, w["evil_ckpt"])
    return w


def _cases(w: dict[str, Path]) -> dict[str, dict]:
    m, r, out = ["-m", "emakit"], w["run"], w["root"] / "out"
    posthoc = [*m, "posthoc", str(r / "posthoc"), "--sigma-rel", "0.05"]
    train = ["train.py", str(w["data"]), *FAST_ARGS, "--epochs", "3", "--output", str(out)]
    cases = {
        "posthoc_ok": [*posthoc, "-o", str(out / "ok.safetensors"), "--checkpoint", str(w["last"])],
        "posthoc_num_classes": [*posthoc, "-o", str(out / "e.safetensors"), "--checkpoint", str(w["last"]),
                                "--num-classes", "5"],
        "posthoc_other_arch": [*posthoc, "-o", str(out / "e.safetensors"), "--checkpoint", str(w["other"])],
        "posthoc_other_arch_pth": [*posthoc, "-o", str(out / "e.pth.tar"), "--checkpoint", str(w["other"])],
        "posthoc_model_flag": [*posthoc, "-o", str(out / "e.safetensors"), "--model", "test_efficientnet"],
        "export_num_classes": [*m, "export", str(w["last"]), "--num-classes", "5", "-o", str(out / "x.safetensors")],
        "validate_nan_raw": ["validate.py", str(w["data"]), "--checkpoint", str(w["nan_raw"])],
        "validate_nan_raw_ema_only": ["validate.py", str(w["data"]), "--checkpoint", str(w["nan_raw"]),
                                      "--weights", "ema"],
        "validate_nan_safetensors": ["validate.py", str(w["data"]), "--checkpoint", str(w["nan_st"]),
                                     "--model", "test_resnet"],
        "validate_inf_ema": ["validate.py", str(w["data"]), "--checkpoint", str(w["inf_ema"]), "--weights", "both"],
        "resume_nan_raw": [*train, "--experiment", "nan_raw", "--resume", str(w["nan_raw"])],
        "resume_inf_ema": [*train, "--experiment", "inf_ema", "--resume", str(w["inf_ema"])],
        "resume_inf_opt": [*train, "--experiment", "inf_opt", "--resume", str(w["inf_opt"])],
        "posthoc_planted": [*m, "posthoc", str(w["planted"]), "--sigma-rel", "0.05", "-o", str(out / "p.safetensors"),
                            "--checkpoint", str(w["last"])],
        "validate_evil": ["validate.py", str(w["data"]), "--checkpoint", str(w["evil_ckpt"]), "--model", "test_resnet"],
    }
    return {k: {"argv": v} for k, v in cases.items()}


@pytest.fixture(scope="module")
def batch(world: dict[str, Path]) -> dict[str, dict]:
    """Run every case once (see tests/cli_batch.py); results by case id."""
    cases = _cases(world)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")],
                          input=json.dumps(list(cases.values())), capture_output=True, text=True,
                          env=subprocess_env(CLI_BATCH_TIMEOUT="200"), cwd=str(world["root"]), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(cases, json.loads(proc.stdout)))


def error_line(result: dict, prefix: str) -> str:
    """Exit status 2, no Traceback, exactly one error line on stderr (train.py logs its
    progress there too); that line."""
    assert result["rc"] == 2, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, result["stderr"]
    if prefix != T:
        assert result["stderr"].count("\n") == 1, result["stderr"]
    return lines[0]


# --------------------------------------------------------------------------- labels that do not fit
def test_posthoc_with_matching_labels_still_writes(batch, world):
    assert batch["posthoc_ok"]["rc"] == 0, batch["posthoc_ok"]
    assert (world["root"] / "out" / "ok.safetensors").is_file()


def test_posthoc_refuses_a_class_count_the_weights_do_not_have(batch, world):
    line = error_line(batch["posthoc_num_classes"], M)
    assert "10 classes" in line and "num_classes=5" in line and "--num-classes 10" in line
    assert not (world["root"] / "out" / "e.safetensors").exists()


@pytest.mark.parametrize("case", ["posthoc_other_arch", "posthoc_other_arch_pth"])
def test_posthoc_refuses_a_checkpoint_of_another_architecture(batch, world, case):
    line = error_line(batch[case], M)
    assert str(world["other"]) in line and "another model" in line and str(world["run"] / "posthoc") in line
    assert "pass the checkpoint of the run that wrote the snapshots" in line
    assert not list((world["root"] / "out").glob("e.*"))


def test_posthoc_refuses_a_model_flag_of_another_architecture(batch, world):
    line = error_line(batch["posthoc_model_flag"], M)
    assert "do not fit test_efficientnet" in line and "--model" in line and "conv1" in line
    assert not (world["root"] / "out" / "e.safetensors").exists()


def test_export_refuses_a_class_count_the_weights_do_not_have(batch, world):
    line = error_line(batch["export_num_classes"], M)
    assert "num_classes=5" in line and "--num-classes 10" in line
    assert not (world["root"] / "out" / "x.safetensors").exists()


# --------------------------------------------------------------------------- non-finite weights
def test_validate_refuses_nan_weights_naming_file_set_and_tensor(batch, world):
    line = error_line(batch["validate_nan_raw"], V)
    assert str(world["nan_raw"]) in line and "raw weights" in line and "fc.weight holds NaN" in line
    assert "another checkpoint" in line
    assert batch["validate_nan_raw"]["stdout"] == ""  # no score was printed


def test_validate_scores_the_finite_ema_of_a_file_whose_raw_weights_are_nan(batch):
    result = batch["validate_nan_raw_ema_only"]
    assert result["rc"] == 0, result
    assert json.loads(result["stdout"].splitlines()[-1])["weights"] == "ema"


def test_validate_refuses_nan_weights_in_a_safetensors_file(batch, world):
    line = error_line(batch["validate_nan_safetensors"], V)
    assert str(world["nan_st"]) in line and "fc.weight holds NaN" in line


def test_validate_refuses_an_infinite_ema_naming_the_ema_set(batch, world):
    line = error_line(batch["validate_inf_ema"], V)
    assert str(world["inf_ema"]) in line and "ema weights" in line and "fc.weight holds an infinity" in line


@pytest.mark.parametrize("case,tensor", [("resume_nan_raw", "state_dict['fc.weight'] holds NaN"),
                                         ("resume_inf_ema", "state_dict_ema['fc.weight'] holds an infinity"),
                                         ("resume_inf_opt", "['momentum_buffer'] holds an infinity")])
def test_resume_refuses_non_finite_state_before_writing_anything(batch, world, case, tensor):
    line = error_line(batch[case], T)
    assert f"--resume {world[case[len('resume_'):]]}" in line and tensor in line and "diverge" in line
    assert "earlier checkpoint" in line
    assert not (world["root"] / "out" / case[len("resume_"):]).exists()  # no run folder
    assert "last good" not in batch[case]["stderr"]


# --------------------------------------------------------------------------- unsafe pickles
def test_a_planted_code_running_snapshot_is_refused_as_unsafe_not_damaged(batch, world):
    line = error_line(batch["posthoc_planted"], M)
    assert str(world["evil_snap"]) in line and "unsafe" in line and "weights_only" in line
    assert "damaged" not in line
    assert not world["marker"].exists()
    assert not (world["root"] / "out" / "p.safetensors").exists()


def test_a_code_running_checkpoint_is_refused_as_unsafe(batch, world):
    line = error_line(batch["validate_evil"], V)
    assert str(world["evil_ckpt"]) in line and "unsafe" in line and "posix.system" in line
    assert not world["marker"].exists()
