"""BatchNorm recalibration and the PNG plots."""
from __future__ import annotations

import builtins
import csv
import logging

import torch
from torch import nn

from emakit.training.bn import has_batchnorm, recalibrate_bn
from emakit.training.plots import plot_summary, plot_sweep


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 5, 5, generator=gen) * 2 + 1, torch.zeros(8)) for _ in range(n)]


def test_bn_recalibration_averages_batch_statistics_and_touches_only_bn_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.Dropout(0.5), nn.BatchNorm2d(4)).eval()
    params = {k: v.clone() for k, v in net.named_parameters()}
    data = batches(6)
    used = recalibrate_bn(net, data + batches(3, seed=1), num_batches=6, device=torch.device("cpu"))
    assert used == 6
    # independent expectation for the first BN: the mean over batches of the per-batch
    # channel mean and of the per-batch unbiased variance (momentum=None cumulative average)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in data])
    vars_ = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for x, _ in data])
    torch.testing.assert_close(net[0].running_mean, means.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(net[0].running_var, vars_.mean(0), atol=1e-5, rtol=0)
    assert net[0].num_batches_tracked.item() == 6
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    assert not net.training and not net[2].training  # modes restored
    assert net[0].momentum == 0.1


def test_bn_recalibration_is_a_no_op_without_batchnorm():
    net = nn.Sequential(nn.Linear(3, 3))
    assert not has_batchnorm(net)
    assert recalibrate_bn(net, [(torch.zeros(2, 3), None)], 5, torch.device("cpu")) == 0


def write_summary(path, epochs=4):
    cols = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "ema_eval_loss",
            "ema_eval_top1", "ema_eval_top5", "ema1_eval_loss", "ema1_eval_top1", "ema1_eval_top5", "lr"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(epochs):
            w.writerow([e, 2 - e * 0.3, 2 - e * 0.2, 30 + e * 10, 80, 2.1 - e * 0.25, 25 + e * 12, 81,
                        2.2 - e * 0.2, 20 + e * 11, 79, 0.1])


def test_plots_are_written_as_pngs_of_the_expected_size(tmp_path):
    from PIL import Image

    write_summary(tmp_path / "summary.csv")
    out = plot_summary(tmp_path / "summary.csv")
    assert out == tmp_path / "summary.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 400)
    sweep = plot_sweep([0.02, 0.05, 0.1], [70.0, 75.5, 74.0], tmp_path / "sweep.png", best_index=1)
    with Image.open(sweep) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    assert not list(tmp_path.glob(".*.tmp"))


def test_plots_without_matplotlib_log_a_notice_and_return_none(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    write_summary(tmp_path / "summary.csv")
    with caplog.at_level(logging.WARNING):
        assert plot_summary(tmp_path / "summary.csv") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "summary.png").exists()
