"""One evaluation pass for the raw weights and every EMA (``engine.evaluate_many``): each
weight set's numbers equal a separate pass of its own, to the sample, in one process and
under torchrun with two processes (gloo), where every sample is counted once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Shared by the in-process test and the torchrun script: 8 classes (so top-5 is not 100% by
# construction), 45 samples (odd: the two ranks' shares differ, the last batch is ragged),
# a raw model and three "EMAs" with other weights, one of them bfloat16 fed bfloat16 inputs
# (the low-precision EMA path). Returns single-pass and separate-pass metrics and, as an
# independent reference, top-1/top-5 counted from one full forward of every model.
CHECK = r'''
import copy
import torch
from torch import nn
from emakit.training.data import build_eval_loader
from emakit.training.engine import EvalTarget, evaluate, evaluate_many

CLASSES, SAMPLES = 8, 45


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def check(dist):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 3, 6, 6, generator=gen)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    torch.manual_seed(0)
    raw = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, CLASSES))
    models = [raw]
    for k in range(3):
        m = copy.deepcopy(raw)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        models.append(m)
    models[3] = models[3].to(torch.bfloat16)
    dtypes = [None, None, None, torch.bfloat16]
    cpu = torch.device("cpu")
    loader = build_eval_loader(Pairs(x, y), 4, dist)
    labels = ["", " (EMA)", " (EMA1)", " (EMA2)"]
    targets = [EvalTarget(m, cpu, d, lab) for m, d, lab in zip(models, dtypes, labels)]
    one_pass = evaluate_many(targets, loader, nn.CrossEntropyLoss(), dist=dist)
    separate = [evaluate(m, loader, nn.CrossEntropyLoss(), device=cpu, dist=dist, log_suffix=lab, input_dtype=d)
                for m, d, lab in zip(models, dtypes, labels)]
    training_flags = [m.training for m in models]
    reference = []
    with torch.no_grad():
        for m, d in zip(models, dtypes):
            m.eval()
            out = m(x if d is None else x.to(d)).float()
            top5 = out.topk(5, dim=-1).indices
            reference.append({"top1": 100.0 * int((top5[:, 0] == y).sum()) / SAMPLES,
                              "top5": 100.0 * int((top5 == y[:, None]).any(-1).sum()) / SAMPLES,
                              "loss": float(nn.functional.cross_entropy(out, y))})
    return {"one_pass": one_pass, "separate": separate, "reference": reference,
            "training_flags": training_flags}
'''


def _check(one_pass: list[dict], separate: list[dict], reference: list[dict]) -> None:
    assert len(one_pass) == len(separate) == 4
    for got, alone, ref in zip(one_pass, separate, reference):
        assert got == alone  # every number, exactly
        assert got["samples"] == 45
        assert got["top1"] == pytest.approx(ref["top1"], abs=1e-9)
        assert got["top5"] == pytest.approx(ref["top5"], abs=1e-9)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-3)
    # the weight sets differ, and top-5 is a real measurement here (8 classes)
    assert len({(m["top1"], m["loss"]) for m in one_pass}) == 4
    assert any(m["top5"] != m["top1"] for m in one_pass)
    assert all(m["top5"] < 100.0 for m in one_pass)


def test_one_pass_metrics_of_raw_and_each_ema_equal_separate_passes_to_the_sample():
    from emakit.training.distributed import DistInfo

    scope: dict = {}
    exec(CHECK, scope)
    result = scope["check"](DistInfo())
    _check(result["one_pass"], result["separate"], result["reference"])
    assert result["training_flags"] == [True] * 4  # train mode restored


SCRIPT = r'''
import json, os, sys
sys.path.insert(0, os.environ["REPO"])
import torch.distributed as torch_dist
from emakit.training.distributed import init_distributed, shutdown_distributed
dist = init_distributed("cpu")
assert dist.world_size == 2
exec(os.environ["CHECK"])
result = check(dist)
if dist.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
shutdown_distributed(dist, synchronize=True)
'''


@pytest.mark.slow
def test_one_pass_under_torchrun_two_processes_counts_every_sample_once_and_equals_separate_passes(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, REPO=str(REPO), CHECK=CHECK, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*cmd, "--standalone", "--nproc_per_node=2", str(script), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    _check(result["one_pass"], result["separate"], result["reference"])
