"""BatchNorm recalibration and the PNG plots."""
from __future__ import annotations

import csv
import subprocess
import sys

import torch
from torch import nn

from conftest import colour_pixels, densest_row, subprocess_env
from emakit.training.bn import bn_buffers, has_batchnorm, recalibrate_bn
from emakit.training.plots import plot_summary, plot_sweep, plot_sweeps


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 5, 5, generator=gen) * 2 + 1, torch.zeros(8)) for _ in range(n)]


def test_the_bn_walker_finds_every_tracking_batchnorm_and_nothing_else():
    """One walker for recalibration, its restore and distribute_bn: the running statistics of
    BatchNorm layers (subclasses such as timm's BatchNormAct2d and SyncBatchNorm included),
    never a non-tracking BatchNorm's, an InstanceNorm's or another module's buffers."""
    import timm.layers

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                        nn.Sequential(timm.layers.BatchNormAct2d(4), nn.SyncBatchNorm(4)),
                        nn.BatchNorm2d(4, track_running_stats=False), nn.InstanceNorm2d(4, track_running_stats=True))
    net.register_buffer("running_mean_of_something", torch.zeros(1))
    found = bn_buffers(net)
    assert sorted(found) == sorted(f"{layer}.{b}" for layer in ("1", "2.0", "2.1")
                                   for b in ("running_mean", "running_var", "num_batches_tracked"))
    assert found["2.0.running_var"] is net[2][0].running_var  # the live buffers, not copies
    assert bn_buffers(nn.BatchNorm1d(2)).keys() == {"running_mean", "running_var", "num_batches_tracked"}


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


# the tab10 colour cycle (raw, ema, ema1; matplotlib's default) and plot_summary's grey train-loss line
C0, C1, C2, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#808080"
LEFT, RIGHT = (0, 0, 500, 400), (500, 0, 1000, 400)  # the top-1 and the loss panel


def test_plots_are_written_as_pngs_of_the_expected_size(tmp_path):
    from PIL import Image

    write_summary(tmp_path / "summary.csv")
    out = plot_summary(tmp_path / "summary.csv")
    assert out == tmp_path / "summary.png"
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 400)
    for colour in (C0, C1, C2):  # every series is drawn across the epochs (a legend swatch is ~30 px)
        for box in (LEFT, RIGHT):
            xs, _ = colour_pixels(out, colour, box)
            assert len(xs) and xs.max() - xs.min() > 300, (colour, box)
    sweep = plot_sweep([0.02, 0.05, 0.1], [70.0, 75.5, 74.0], tmp_path / "sweep.png", best_index=1)
    with Image.open(sweep) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    xs, ys = colour_pixels(sweep, C0)
    assert len(xs) > 300 and xs.max() - xs.min() > 300  # the sweep line spans the sigma_rel axis
    two = plot_sweeps([("a", [0.02, 0.1], [70.0, 71.0], 1), ("b", [0.05, 0.2], [72.0, 69.0], 0)], tmp_path / "two.png")
    for colour in (C0, C1):  # one line per sweep
        xs, _ = colour_pixels(two, colour)
        assert len(xs) and xs.max() - xs.min() > 200, colour
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_plot_draws_each_series_at_its_value(tmp_path):
    """Flat series at equally spaced values must be drawn as long horizontal lines, in the
    right panel, at equally spaced heights in value order; empty columns draw no line."""
    cols = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "ema_eval_loss", "ema_eval_top1",
            "ema_eval_top5", "ema1_eval_loss", "ema1_eval_top1", "ema1_eval_top5", "lr"]
    with open(tmp_path / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(4):  # top-5 (95) is not plotted: it must not move any line
            w.writerow([e, 4.0, 3.0, 20, 95, 2.0, 50, 95, 1.0, 80, 95, 0.1])
    out = plot_summary(tmp_path / "summary.csv")
    top1 = {v: densest_row(out, c, LEFT) for v, c in ((20, C0), (50, C1), (80, C2))}
    loss = {v: densest_row(out, c, RIGHT) for v, c in ((4.0, GREY), (3.0, C0), (2.0, C1), (1.0, C2))}
    for (_, count) in [*top1.values(), *loss.values()]:
        assert count > 200, (top1, loss)  # a line across the panel, not a legend swatch
    for rows in ({v: r for v, (r, _) in top1.items()}, {v: r for v, (r, _) in loss.items()}):
        values = sorted(rows)  # larger value -> higher on the image (smaller row), equal steps
        steps = [rows[a] - rows[b] for a, b in zip(values, values[1:])]
        assert all(s > 40 for s in steps) and max(steps) - min(steps) <= 2, rows

    empty_ema = tmp_path / "no_ema"
    empty_ema.mkdir()
    with open(empty_ema / "summary.csv", "w", newline="") as f:  # a --no-model-ema run: EMA cells empty
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(4):
            w.writerow([e, 4.0, 3.0, 20, 95, "", "", "", "", "", "", 0.1])
    bare = plot_summary(empty_ema / "summary.csv")
    assert densest_row(bare, C0, LEFT)[1] > 200
    for colour in (C1, C2):
        for box in (LEFT, RIGHT):
            xs, _ = colour_pixels(bare, colour, box)
            assert len(xs) == 0 or xs.max() - xs.min() < 60, colour  # at most a legend swatch


def test_importing_the_plots_module_does_not_import_matplotlib():
    """matplotlib is imported when a plot is drawn, not when plots (or the trainer) is
    imported: ``train.py --help`` and runs that never plot do not pay for it."""
    code = ("import sys, emakit.training.plots, emakit.training.fit; "
            "print([m for m in sys.modules if m.split('.')[0] == 'matplotlib'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_failed_plot_is_a_warning_not_a_failed_run(tmp_path, caplog):
    from emakit.training.plots import plot_summary_quietly

    (tmp_path / "summary.csv").write_text("epoch,eval_top1\n")  # a header and no rows
    with caplog.at_level("WARNING", logger="emakit"):
        plot_summary_quietly(str(tmp_path))
    assert "could not plot" in caplog.text and "no rows" in caplog.text
    assert not (tmp_path / "summary.png").exists()
