"""The trainer's helpers for several EMAs, post-hoc EMA and BN recalibration, without a
training run: EMA selection, summary columns, resuming EMAs a checkpoint lacks, restoring
BatchNorm statistics, the default snapshot interval."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emakit import ModelEMA, MultiEMA
from emakit.training.averages import (auto_posthoc_every, ema_checkpoint_state, posthoc_sweep_command,
                                      recalibrated_bn, resume_ema)
from emakit.training.evaluation import best_ema_index, chosen_metrics
from emakit.training.outputs import SUMMARY_COLUMNS, summary_columns


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_select_first_keeps_eval_metric_on_the_first_ema_and_best_takes_the_best_one():
    raw = {"top1": 50.0, "loss": 1.0}
    emas = [{"top1": 60.0, "loss": 0.9}, {"top1": 70.0, "loss": 0.95}, {"top1": 70.0, "loss": 0.8}]
    assert chosen_metrics(raw, [], "top1", "best")["top1"] == 50.0             # no EMA: the raw weights
    assert chosen_metrics(raw, emas, "top1", "first")["top1"] == 60.0
    assert chosen_metrics(raw, emas, "top1", "best")["top1"] == 70.0
    assert chosen_metrics(raw, emas, "loss", "best")["loss"] == 0.8            # lower is better
    assert best_ema_index(emas, "top1") == 1                           # a tie goes to the first
    assert best_ema_index(emas, "loss") == 2


def test_summary_columns_are_unchanged_for_one_ema_and_grow_per_extra_ema():
    assert summary_columns(0) == summary_columns(1) == SUMMARY_COLUMNS
    cols = summary_columns(3)
    assert cols[:11] == SUMMARY_COLUMNS[:11] and cols[-2:] == ["ema_best", "lr"]
    assert cols[11:17] == ["ema1_eval_loss", "ema1_eval_top1", "ema1_eval_top5",
                          "ema2_eval_loss", "ema2_eval_top1", "ema2_eval_top5"]


def test_checkpoint_keys_of_one_ema_are_timms_and_extra_emas_get_numbered_keys():
    model = nn.Linear(2, 2)
    assert set(ema_checkpoint_state(ModelEMA(model, decay=0.9))) == {"state_dict_ema", "ema"}
    multi = ema_checkpoint_state(MultiEMA(model, decays=[0.9, 0.99, 0.999]))
    assert set(multi) == {"state_dict_ema", "ema", "state_dict_ema_1", "ema_1", "state_dict_ema_2", "ema_2"}
    assert [multi[k]["config"]["decay"] for k in ("ema", "ema_1", "ema_2")] == [0.9, 0.99, 0.999]


def test_resuming_more_emas_than_the_checkpoint_holds_restarts_the_new_ones_from_the_weights(caplog):
    model = nn.Linear(2, 2)
    saved = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(3):
        saved.update(model)
    ckpt = saved.checkpoint_state()
    multi = MultiEMA(model, decays=[0.9, 0.99])
    with torch.no_grad():
        model.weight.add_(1.0)  # the resumed model weights differ from the EMA's
    resume_ema(multi, ckpt, "old.pth.tar", model)
    assert torch.equal(multi[0].module.weight, saved.module.weight)
    assert torch.equal(multi[1].module.weight, model.weight)
    assert multi[0].num_updates == multi[1].num_updates == 3  # one counter: they stay in step
    assert "no weights for ema1 (state_dict_ema_1)" in caplog.text


def test_resuming_fewer_emas_than_the_checkpoint_holds_warns_about_the_dropped_ones(caplog):
    model = nn.Linear(2, 2)
    ckpt = ema_checkpoint_state(MultiEMA(model, decays=[0.9, 0.99]))
    resume_ema(ModelEMA(model, decay=0.9), ckpt, "old.pth.tar", model)
    assert "holds 1 more EMA(s) than configured (state_dict_ema_1)" in caplog.text


def test_recalibrated_bn_changes_only_bn_statistics_inside_and_restores_them_bit_exactly():
    net = bn_net()
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(4, 3, 6, 6) * 3 + 1, torch.zeros(4)) for _ in range(3)]
    with recalibrated_bn(net, batches, 2, torch.device("cpu")) as buffers:
        inside = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k          # restored
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert not torch.equal(inside[k], v) and torch.equal(buffers[k], inside[k]), k
        else:
            assert torch.equal(inside[k], v), k                 # parameters (BN's too) untouched inside
    assert int(buffers["1.num_batches_tracked"]) == 2
    # torch's own estimate over the same two batches (cumulative average)
    reference = bn_net()
    reference(torch.randn(2, 3, 6, 6))
    reference.load_state_dict(before)
    torch.optim.swa_utils.update_bn([x for x, _ in batches[:2]], reference)
    torch.testing.assert_close(buffers["1.running_mean"], reference[1].running_mean)
    torch.testing.assert_close(buffers["1.running_var"], reference[1].running_var)


def test_recalibrated_bn_restores_the_statistics_when_the_evaluation_fails():
    net = bn_net()
    net(torch.randn(2, 3, 6, 6))
    before = net[1].running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"):
        with recalibrated_bn(net, [(torch.randn(4, 3, 6, 6) + 5, None)], 1, torch.device("cpu")):
            raise RuntimeError("boom")
    assert torch.equal(net[1].running_mean, before)


@pytest.mark.parametrize("cap", [2, 16, 50])
@pytest.mark.parametrize("total", [1, 7, 16, 17, 50, 51, 99, 100, 101, 1000, 12345, 10**6])
def test_posthoc_interval_fits_the_cap_with_the_last_step_and_uses_more_than_half_of_it(total, cap):
    every = auto_posthoc_every(total, cap)
    stored = len(range(every, total + 1, every)) + (1 if total % every else 0)  # multiples + the last step
    assert every == max(1, math.ceil(total / cap))
    assert stored <= cap
    assert stored == total if total <= cap else stored > cap // 2


def test_the_sweep_command_quotes_paths_and_omits_an_absent_data_path():
    assert posthoc_sweep_command(None, "out/run/last.pth.tar") == \
        "python validate.py --checkpoint out/run/last.pth.tar --posthoc-sigma-rel 0.02,0.05,0.08,0.15"
    assert posthoc_sweep_command("my data", "c.pth.tar").startswith("python validate.py 'my data' --checkpoint")
