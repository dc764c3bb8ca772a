"""A diverged run never looks like a success: a non-finite loss or gradient never reaches
the optimizer or the EMA, ``--on-nonfinite stop`` ends the run with exit 3 and one line
naming the step and the last good checkpoint, ``skip`` skips such steps and stops after
``--max-nonfinite-skips`` in a row, no checkpoint ever holds a non-finite tensor, and the
final "best" line never reports nan. Under DDP every rank takes the same decision."""
from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import FAST_ARGS, REPO, subprocess_env
from emakit import ModelEMA
from emakit.checkpoint import find_nonfinite
from emakit.training.averages import Averages
from emakit.training.distributed import DistInfo
from emakit.training.engine import NonfiniteGuard, TrainingDiverged, TrainOptions, train_one_epoch

CPU = torch.device("cpu")


def linear_net(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4), *([nn.BatchNorm1d(4)] if bn else []))


def data(n: int, bad: tuple[int, ...] = (), seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(2, 3, 2, 2, generator=gen)
        if i in bad:
            x[0, 0, 0, 0] = float("nan")  # -> a nan loss and nan gradients
        out.append((x, torch.randint(0, 4, (2,), generator=gen)))
    return out


def train(model, batches, guard=None, ema=None, dist=DistInfo()):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return train_one_epoch(0, model, batches, opt, nn.CrossEntropyLoss(), device=CPU, opts=TrainOptions(),
                           averages=Averages(ema) if ema is not None else None, guard=guard, dist=dist)


# --------------------------------------------------------------------------- the engine
def test_skip_leaves_weights_and_ema_exactly_as_if_the_bad_batch_were_absent():
    batches = data(4, bad=(1,))
    model = linear_net(bn=True)  # the bad forward pass also fed NaN into the BatchNorm statistics
    ema = ModelEMA(model, decay=0.5)
    out = train(model, batches, NonfiniteGuard("skip"), ema)
    reference = linear_net(bn=True)
    reference_ema = ModelEMA(reference, decay=0.5)
    train(reference, [b for i, b in enumerate(batches) if i != 1], None, reference_ema)
    assert out["optimizer_steps"] == 3 and out["skipped_steps"] == 1 and out["nonfinite_steps"] == 1
    assert ema.num_updates == 3
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.state_dict().values(), reference_ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert math.isfinite(out["loss"])  # the mean is over the finite steps


def test_stop_raises_before_the_bad_step_reaches_the_optimizer_or_the_ema():
    model = linear_net()
    ema = ModelEMA(model, decay=0.5)
    seen = []
    original = ema.update
    ema.update = lambda m: (seen.append(copy.deepcopy(m[1].weight.detach())), original(m))
    with pytest.raises(TrainingDiverged) as info:
        train(model, data(4, bad=(2,)), None, ema)  # default policy: stop
    assert str(info.value) == "training diverged at epoch 0, step 3/4: the loss is nan (--on-nonfinite stop)"
    assert ema.num_updates == 2 and len(seen) == 2
    assert not find_nonfinite(model.state_dict()) and not find_nonfinite(ema.module.state_dict())


class SqrtAtZero(nn.Module):
    """Finite output and loss, but d/dp sqrt(p) at p = 0 is inf: a non-finite gradient alone."""

    def __init__(self) -> None:
        super().__init__()
        self.body = linear_net()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.body(x) + torch.sqrt(self.p)


def test_a_non_finite_gradient_with_a_finite_loss_is_caught():
    with pytest.raises(TrainingDiverged, match=r"step 1/2: the gradients hold non-finite values"):
        train(SqrtAtZero(), data(2))


def test_consecutive_skips_stop_the_run_and_a_good_step_resets_the_count():
    out = train(linear_net(), data(5, bad=(0, 2, 4)), NonfiniteGuard("skip", max_consecutive=2))
    assert out["nonfinite_steps"] == 3 and out["optimizer_steps"] == 2
    guard = NonfiniteGuard("skip", max_consecutive=2)
    with pytest.raises(TrainingDiverged) as info:
        train(linear_net(), data(5, bad=(2, 3)), guard)
    assert str(info.value) == ("training diverged at epoch 0, step 4/5: the loss is nan; 2 non-finite steps in a row "
                               "(--on-nonfinite skip, --max-nonfinite-skips 2)")


def _ddp_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = nn.parallel.DistributedDataParallel(linear_net())
        # Only rank 1's third batch is bad: both ranks must stop at step 3, none may hang.
        batches = data(4, bad=(2,) if rank == 1 else (), seed=rank)
        try:
            train(model, batches, dist=DistInfo(rank=rank, world_size=2))
            queue.put((rank, "finished"))
        except TrainingDiverged as e:
            queue.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step():
    from test_train_distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = dict(queue.get(timeout=5) for _ in procs)
    assert results[1] == "training diverged at epoch 0, step 3/4: the loss is nan (--on-nonfinite stop)"
    assert results[0] == ("training diverged at epoch 0, step 3/4: the loss is not finite on another process "
                          "(--on-nonfinite stop)")


def test_the_best_line_never_reports_nan():
    from emakit.training.outputs import best_in_column as _best  # kept out of the spawned DDP workers' imports

    rows = [{"epoch": "0", "eval_top1": "40.0"}, {"epoch": "1", "eval_top1": "nan"}, {"epoch": "2", "eval_top1": "inf"}]
    assert _best(rows, "eval_top1", lower_is_better=False) == (40.0, 0)
    assert _best(rows[1:], "eval_top1", lower_is_better=False) is None


# --------------------------------------------------------------------------- the CLI
def _nonfinite_in_checkpoints(folder: Path) -> dict[str, list[str]]:
    found = {}
    for path in sorted(folder.rglob("*.pth.tar")):
        bad = find_nonfinite(torch.load(path, map_location="cpu", weights_only=True))
        if bad:
            found[path.name] = bad
    return found


@pytest.mark.slow
def test_lr_1e6_exits_3_with_one_line_and_no_checkpoint_holds_a_non_finite_tensor(tmp_path, image_folder):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(image_folder), *FAST_ARGS, "--epochs", "4",
                           "--lr", "1e6", "--output", str(tmp_path), "--experiment", "run"],
                          cwd=str(REPO), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == ""  # no "best ..." line
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    # Epoch 0 warms up from a tiny lr (finite); the full lr blows up in epoch 1.
    last = run / "last.pth.tar"
    assert re.fullmatch(rf"train\.py: error: training diverged at epoch 1, step \d/3: the loss is nan "
                        rf"\(--on-nonfinite stop\); the last good checkpoint is {re.escape(str(last))} \(epoch 0\); "
                        rf"lower --lr or add --clip-grad in this command, then resume with: python \S*train\.py .* "
                        rf"--resume {re.escape(str(last))}", errors[0]), errors[0]
    assert sorted(p.name for p in run.glob("*.pth.tar")) == ["checkpoint-0.pth.tar", "last.pth.tar",
                                                            "model_best.pth.tar"]
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert _nonfinite_in_checkpoints(run) == {}


@pytest.mark.slow
def test_skip_policy_stops_after_the_allowed_run_of_skipped_steps(run_train, tmp_path, image_folder):
    code, out, err = run_train([image_folder, *FAST_ARGS, "--epochs", "4", "--lr", "1e6", "--warmup-epochs", "0",
                                "--on-nonfinite", "skip", "--max-nonfinite-skips", "2",
                                "--output", tmp_path, "--experiment", "run"])
    assert code == 3 and out == ""
    message = err.strip().splitlines()[-1]
    assert re.search(r"the loss is nan; 2 non-finite steps in a row \(--on-nonfinite skip, --max-nonfinite-skips 2\)",
                     message), message
    assert "step skipped, EMA not updated (1 in a row" in err
    assert _nonfinite_in_checkpoints(tmp_path / "run") == {}


def test_huge_but_finite_gradients_are_not_mistaken_for_non_finite_ones():
    # Inputs ~1e25 give weight gradients ~1e25: their float32 2-norm overflows to inf, yet
    # every element is finite, so the step is taken.
    batches = [(x * 1e25, y) for x, y in data(1)]
    probe = linear_net()
    nn.CrossEntropyLoss()(probe(batches[0][0]), batches[0][1]).backward()
    assert not torch.isfinite(torch._foreach_norm([probe[1].weight.grad], 2)[0])  # the overflow is real
    assert torch.isfinite(probe[1].weight.grad).all()
    model = linear_net()
    out = train(model, batches)
    assert out["nonfinite_steps"] == 0 and out["optimizer_steps"] == 1
    assert torch.isfinite(model[1].weight).all() and not torch.equal(model[1].weight, linear_net()[1].weight)
