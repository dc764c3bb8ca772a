"""End-to-end train.py runs on one process: outputs, summary vs log, exact resume, gradient
accumulation, bf16 AMP, CPU-held EMA, Ctrl-C. Expectations come from the files on disk and
from counts computed from the dataset, not from the trainer's own bookkeeping."""
from __future__ import annotations

import csv
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, count_images, subprocess_env

pytestmark = pytest.mark.slow

SUMMARY_HEADER = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5",
                  "raw_eval_loss", "raw_eval_top1", "raw_eval_top5", "ema_eval_loss", "ema_eval_top1", "ema_eval_top5", "lr"]
CHECKPOINT_KEYS = {"epoch", "arch", "version", "state_dict", "state_dict_ema", "ema", "optimizer",
                   "scheduler", "amp_scaler", "args", "metric", "metrics"}


def fast(data, out: Path, *extra, experiment: str = "run") -> list:
    return [data, *FAST_ARGS, "--output", out, "--experiment", experiment, *extra]


def read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_no_argument_run_trains_on_digits_writes_all_outputs_and_the_ema_reaches_90(tmp_path, record_property):
    from emakit.training.config import build_parser

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py")], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    record_property("digits_preset_wall_s", round(wall, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "output").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}-resnet18-32", runs[0].name)
    run = runs[0]
    import yaml

    epochs = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())["epochs"]  # the preset in force
    for name in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "train.log"):
        assert (run / name).is_file(), name
    assert len(list(run.glob("checkpoint-*.pth.tar"))) == min(epochs, build_parser().get_default("checkpoint_hist"))
    header, rows = read_summary(run / "summary.csv")
    assert header == SUMMARY_HEADER and [int(r["epoch"]) for r in rows] == list(range(epochs))
    assert "digits" in (run / "train.log").read_text()
    ema_top1 = float(rows[-1]["ema_eval_top1"])
    record_property("digits_preset_ema_top1", ema_top1)
    print(f"\ndigits preset: EMA top-1 {ema_top1:.2f}% (raw {float(rows[-1]['raw_eval_top1']):.2f}%), wall {wall:.1f}s")
    assert ema_top1 >= 90.0
    assert load(run / "last.pth.tar")["metrics"]["ema_eval_samples"] == 360  # 20% of 1797, every one counted


LOG_LINE = re.compile(
    r"epoch (\d+)/\d+: train loss ([\d.]+) \| raw top1 ([\d.]+) top5 ([\d.]+) loss ([\d.]+) \| "
    r"EMA top1 ([\d.]+) top5 ([\d.]+) loss ([\d.]+) \| lr ([\d.e+-]+)")


def test_image_folder_run_writes_outputs_and_the_summary_matches_the_log(run_train, tmp_path, image_folder):
    code, out, err = run_train(fast(image_folder, tmp_path, "--epochs", "3", "--checkpoint-hist", "2"))
    assert code == 0, err
    run = tmp_path / "run"
    for name in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "train.log"):
        assert (run / name).is_file(), name
    assert len(list(run.glob("checkpoint-*.pth.tar"))) == 2
    header, rows = read_summary(run / "summary.csv")
    assert header == SUMMARY_HEADER
    logged = [m.groups() for m in LOG_LINE.finditer((run / "train.log").read_text())]
    assert len(logged) == len(rows) == 3
    logged_columns = [("train_loss", 4), ("raw_eval_top1", 2), ("raw_eval_top5", 2), ("raw_eval_loss", 4),
                      ("ema_eval_top1", 2), ("ema_eval_top5", 2), ("ema_eval_loss", 4)]
    for row, line in zip(rows, logged):
        assert int(line[0]) == int(row["epoch"])
        for (col, nd), text in zip(logged_columns, line[1:-1]):
            assert round(float(row[col]), nd) == pytest.approx(float(text), abs=10 ** -nd), col
        assert float(row["lr"]) == pytest.approx(float(line[-1]), rel=1e-3)
    n_val = count_images(image_folder / "val")
    for row in rows:  # top-1 is a whole number of correct images out of n_val
        assert row["eval_top1"] == row["ema_eval_top1"]  # timm's meaning under --model-ema
        for col in ("raw_eval_top1", "ema_eval_top1"):
            correct = float(row[col]) * n_val / 100
            assert abs(correct - round(correct)) < 1e-6
    ckpt = load(run / "last.pth.tar")
    assert CHECKPOINT_KEYS <= ckpt.keys()
    assert ckpt["arch"] == "test_resnet" and ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict)
    assert ckpt["state_dict_ema"].keys() == ckpt["state_dict"].keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict_ema"])
    assert ckpt["metrics"]["eval_samples"] == ckpt["metrics"]["ema_eval_samples"] == n_val
    assert "best raw top1" in out and "best EMA top1" in out


@pytest.mark.parametrize("extra", [[], ["--workers", "1", "--mixup", "0.4", "--drop", "0.2", "--opt", "adamw"]],
                         ids=["default", "workers-mixup-dropout-adamw"])
def test_resume_is_bitwise_exact(run_train, tmp_path, image_folder, extra):
    code, _, err = run_train(fast(image_folder, tmp_path, "--epochs", "2", *extra, experiment="straight"))
    assert code == 0, err
    # The state a run stopped after epoch 0 leaves behind is its epoch-0 checkpoint.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoint-0.pth.tar", stopped / "last.pth.tar")
    assert load(stopped / "last.pth.tar")["epoch"] == 0
    code, _, err = run_train(fast(image_folder, tmp_path, "--epochs", "2", "--resume", stopped / "last.pth.tar",
                                  *extra, experiment="resumed"))
    assert code == 0, err
    a, b = load(tmp_path / "straight" / "last.pth.tar"), load(tmp_path / "resumed" / "last.pth.tar")
    for key in ("state_dict", "state_dict_ema", "ema", "optimizer", "metrics", "epoch"):
        assert_same(a[key], b[key], key)
    first = load(tmp_path / "straight" / "checkpoint-0.pth.tar")
    assert not torch.equal(first["state_dict_ema"]["fc.weight"], a["state_dict_ema"]["fc.weight"])  # it moved


def test_resume_continues_in_the_checkpoint_folder_and_keeps_its_summary(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path, "--epochs", "1"))
    assert code == 0, err
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "2", "--resume", tmp_path / "run" / "last.pth.tar"])
    assert code == 0, err
    _, rows = read_summary(tmp_path / "run" / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert load(tmp_path / "run" / "last.pth.tar")["epoch"] == 1


def test_gradient_accumulation_ema_updates_equal_optimizer_steps(run_train, tmp_path, image_folder):
    batch, accum, epochs = 4, 4, 2
    code, _, err = run_train(fast(image_folder, tmp_path, "-b", batch, "--grad-accum-steps", accum,
                                  "--opt", "adamw", "--epochs", epochs))
    assert code == 0, err
    batches = count_images(image_folder / "train") // batch       # full batches only (drop_last)
    steps = math.ceil(batches / accum) * epochs                     # the last partial group steps too
    ckpt = load(tmp_path / "run" / "last.pth.tar")
    assert ckpt["ema"]["num_updates"] == steps
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {steps}


def test_bf16_autocast_on_cpu_with_a_float32_ema_trains(run_train, tmp_path, image_folder, monkeypatch):
    import timm

    create_model = timm.create_model

    def bf16_model(*args, **kwargs):  # the model is held in bf16 (autocast alone keeps fp32 parameters)
        return create_model(*args, **kwargs).to(torch.bfloat16)

    monkeypatch.setattr(timm, "create_model", bf16_model)
    code, _, err = run_train(fast(image_folder, tmp_path, "--amp", "--amp-dtype", "bfloat16",
                                  "--model-ema-dtype", "float32", "--epochs", "2", "--device", "cpu"))
    assert code == 0, err
    ckpt = load(tmp_path / "run" / "last.pth.tar")
    raw = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert raw and all(v.dtype == torch.bfloat16 for v in raw)  # the trained model really was bf16
    floats = [v for v in ckpt["state_dict_ema"].values() if v.is_floating_point()]
    assert len(floats) == len(raw) and all(v.dtype == torch.float32 for v in floats)  # --model-ema-dtype
    # fp32 master weights hold what a bf16 copy cannot: the EMA is not a bf16 value widened
    assert any(not torch.equal(v, v.bfloat16().float()) for v in floats)
    assert ckpt["ema"]["num_updates"] == 2 * (count_images(image_folder / "train") // 8)
    m = ckpt["metrics"]
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["ema_eval_loss"])


def test_a_cpu_held_ema_is_still_validated(run_train, tmp_path, image_folder, monkeypatch):
    from emakit.ema import ModelEMA

    # On a CPU-only machine the EMA lands on the CPU whether or not it is forced there, so
    # the test watches the placement request itself: the device every ModelEMA is built for.
    placements = []
    init = ModelEMA.__init__

    def spy(self, model, *args, **kwargs):
        placements.append((kwargs.get("device"), next(model.parameters()).device))
        init(self, model, *args, **kwargs)
        placements[-1] += (self.device,)

    monkeypatch.setattr(ModelEMA, "__init__", spy)
    code, _, err = run_train(fast(image_folder, tmp_path, "--model-ema-force-cpu", "--epochs", "1"))
    assert code == 0, err
    assert placements, "no ModelEMA was built"
    for asked, _, placed in placements:  # forced: an explicit CPU placement, not "the model's device" (None)
        assert asked is not None and torch.device(asked) == torch.device("cpu"), placements
        assert placed == torch.device("cpu"), placements
    _, rows = read_summary(tmp_path / "run" / "summary.csv")
    assert rows[0]["ema_eval_top1"] != "" and float(rows[0]["ema_eval_loss"]) > 0
    assert load(tmp_path / "run" / "last.pth.tar")["ema"]["config"]["device"] == "cpu"


def test_no_model_ema_leaves_the_ema_columns_empty(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path, "--no-model-ema", "--epochs", "1"))
    assert code == 0, err
    _, rows = read_summary(tmp_path / "run" / "summary.csv")
    assert rows[0]["ema_eval_top1"] == "" and rows[0]["eval_top1"] != ""
    assert "state_dict_ema" not in load(tmp_path / "run" / "last.pth.tar")


def test_ctrl_c_exits_130_and_leaves_a_resumable_checkpoint(tmp_path, image_folder, run_train):
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, fast(image_folder, tmp_path, "--epochs", "1000"))]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "last.pth.tar"
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no checkpoint appeared"
        time.sleep(0.5)  # land somewhere inside a later epoch (or a checkpoint write)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert "no checkpoint was written" not in message and message.endswith(f"--resume {last}")
    ckpt = load(last)  # loads with weights_only=True: intact
    position = ckpt.get("train_position")
    if position is not None:  # stopped during training: a mid-epoch checkpoint of exactly that step
        assert f"stopped by SIGINT at epoch {position['epoch']}, step {position['steps_done']}/3: " in message
        epoch = position["epoch"]
    else:  # stopped during an evaluation or a save: that epoch's checkpoint
        assert f"stopped by SIGINT after epoch {ckpt['epoch']}: the resumable checkpoint is {last}" in message
        epoch = ckpt["epoch"] + 1
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no temp file left behind
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", epoch + 1, "--resume", last])
    assert code == 0, err
    assert load(last)["epoch"] == epoch


def test_a_compiled_model_saves_unprefixed_weights_and_ema(run_train, tmp_path, image_folder):
    # "eager" runs the torch.compile (dynamo) wrapper without code generation: fast, same wrapping.
    code, _, err = run_train(fast(image_folder, tmp_path, "--torchcompile", "eager", "--epochs", "1"))
    assert code == 0, err
    ckpt = load(tmp_path / "run" / "last.pth.tar")
    import timm

    expected = set(timm.create_model("test_resnet", num_classes=3).state_dict())
    assert set(ckpt["state_dict"]) == set(ckpt["state_dict_ema"]) == expected
    assert ckpt["ema"]["num_updates"] == count_images(image_folder / "train") // 8
