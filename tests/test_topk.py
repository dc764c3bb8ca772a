"""Top-5 on ten classes, where it is neither 100% by construction nor equal to top-1.

train.py's summary row, log line and checkpoint metrics, and validate.py's JSON record, are
each compared with top-k computed here from the saved weights' logits (a fresh timm model,
images read by PIL, ``topk`` on float64 logits: conftest.plain_eval).
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import FAST_ARGS, IDENTITY_EVAL_FLAGS, MANY_CLASSES, load_images, plain_eval

pytestmark = pytest.mark.slow
timm = pytest.importorskip("timm")


def _assert_topk(got_top1: float, got_top5: float, expected: dict, where: str) -> None:
    assert got_top1 == pytest.approx(expected["top1"], abs=1e-6), where
    assert got_top5 == pytest.approx(expected["top5"], abs=1e-6), where
    # the case that catches a top-5 computed as top-1, or as "any class" (100%)
    assert expected["top1"] < expected["top5"] < 100.0, (where, expected)


def test_train_summary_log_and_checkpoint_top5_match_topk_of_the_saved_weights(run_train, tmp_path,
                                                                              image_folder_many):
    code, _, err = run_train([image_folder_many, *FAST_ARGS, *IDENTITY_EVAL_FLAGS, "--interpolation", "bilinear",
                              "--output", tmp_path, "--experiment", "run", "--epochs", "1"])
    assert code == 0, err
    run = tmp_path / "run"
    ckpt = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    images, labels = load_images(image_folder_many / "val", MANY_CLASSES)
    raw, ema = plain_eval(ckpt["state_dict"], images, labels), plain_eval(ckpt["state_dict_ema"], images, labels)
    with open(run / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    _assert_topk(float(row["raw_eval_top1"]), float(row["raw_eval_top5"]), raw, "summary raw")
    _assert_topk(float(row["eval_top1"]), float(row["eval_top5"]), ema, "summary eval_* (timm's: the EMA)")
    _assert_topk(float(row["ema_eval_top1"]), float(row["ema_eval_top5"]), ema, "summary EMA")
    m = ckpt["metrics"]
    _assert_topk(m["raw_eval_top1"], m["raw_eval_top5"], raw, "checkpoint raw")
    _assert_topk(m["ema_eval_top1"], m["ema_eval_top5"], ema, "checkpoint EMA")
    log = (run / "train.log").read_text()
    assert f"raw top1 {raw['top1']:.2f} top5 {raw['top5']:.2f}" in log
    assert f"EMA top1 {ema['top1']:.2f} top5 {ema['top5']:.2f}" in log


def test_validate_top5_matches_topk_of_the_logits(tmp_path, capsys, image_folder_many):
    import validate
    from emakit.checkpoint import save_checkpoint

    torch.manual_seed(3)
    model = timm.create_model("test_resnet", num_classes=len(MANY_CLASSES))
    with torch.no_grad():
        model.fc.weight.mul_(20)  # spread the logits so the ranking is not a near-tie
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "c.pth.tar"
    save_checkpoint({"epoch": 0, "arch": "test_resnet", "version": 2, "state_dict": state,
                     "args": {"model": "test_resnet", "num_classes": len(MANY_CLASSES)}, "metric": 0.0,
                     "metrics": {}}, ckpt)
    capsys.readouterr()
    code = validate.main([str(image_folder_many), "--checkpoint", str(ckpt), *IDENTITY_EVAL_FLAGS,
                          "--interpolation", "bilinear"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    expected = plain_eval(state, *load_images(image_folder_many / "val", MANY_CLASSES))
    assert record["samples"] == expected["samples"] == 3 * len(MANY_CLASSES)
    _assert_topk(record["top1"], record["top5"], expected, "validate.py")
    assert record["top5_err"] == pytest.approx(100.0 - expected["top5"])
