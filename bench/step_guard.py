"""Cost of the per-step non-finite / stop check in ``train_one_epoch``.

Every optimizer step, before it is taken, the loop checks the step's loss and the
gradients (max |g| per dtype group, one read of the gradients) and polls the stop flag, with
one host sync (``engine._check_step``). This runs the same epoch of a timm model with the
check (A) and with ``_check_step`` replaced by a no-op (B, the loop before the check
existed), interleaved A B A B in one process, and reports the median step time of each and
their ratio, plus the check alone timed on the model's gradients.

    python bench/step_guard.py                          # resnet18, 64 px, batch 32, CPU
    python bench/step_guard.py --model resnet50 --img-size 224 --batch-size 64 --device cuda

Writes bench/results/step_guard.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from emakit import ModelEMA
from emakit.training import engine
from emakit.training.averages import Averages
from emakit.training.engine import TrainOptions, train_one_epoch
from emakit.training.settings import RunSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed epoch (default: 8)")
    parser.add_argument("--rounds", type=int, default=5, help="A/B pairs (default: 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_guard.json"))
    args = parser.parse_args()

    import timm

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(device)
    ema = ModelEMA(model, decay=0.9998)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(args.steps)]
    loss_fn = nn.CrossEntropyLoss()
    real_check = engine._check_step

    def epoch(check_on: bool) -> float:
        engine._check_step = real_check if check_on else (lambda *a, **k: (0, 0, False))
        try:
            _sync(device)
            start = time.perf_counter()
            train_one_epoch(0, model, batches, opt, loss_fn, device=device,
                            opts=TrainOptions(run=RunSettings(log_interval=10**9)), averages=Averages(ema))
            _sync(device)
            return (time.perf_counter() - start) / args.steps
        finally:
            engine._check_step = real_check

    epoch(True), epoch(False)  # warm-up
    with_check, without = [], []
    for _ in range(args.rounds):
        with_check.append(epoch(True))
        without.append(epoch(False))
    ratios = [a / b for a, b in zip(with_check, without)]

    # The check alone, on the gradients of one backward pass.
    x, y = batches[0]
    opt.zero_grad()
    loss = loss_fn(model(x.to(device)), y.to(device))
    loss.backward()
    group_loss = loss.detach().to(torch.float64) * x.shape[0]
    times = []
    for _ in range(30):
        _sync(device)
        start = time.perf_counter()
        real_check(model, group_loss, TrainOptions(), engine.DistInfo(device=device), None)
        times.append(time.perf_counter() - start)
    check_alone = statistics.median(times)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
        "rounds": args.rounds,
        "step_s_with_check": statistics.median(with_check), "step_s_without_check": statistics.median(without),
        "ratio_median_of_pairs": statistics.median(ratios), "ratios": ratios, "check_alone_s": check_alone,
        "check_share_of_step": check_alone / statistics.median(without),
    }
    print(f"{args.model} {args.img_size}px b{args.batch_size} on {device}, {args.rounds} A/B pairs x {args.steps} steps")
    print(f"{'':24}{'median step (ms)':>18}")
    print(f"{'with the check':24}{1e3 * result['step_s_with_check']:18.2f}")
    print(f"{'without (no-op)':24}{1e3 * result['step_s_without_check']:18.2f}")
    print(f"ratio with/without (median of pairs): {result['ratio_median_of_pairs']:.4f}")
    print(f"the check alone: {1e3 * check_alone:.3f} ms = {100 * result['check_share_of_step']:.2f}% of a step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
