#!/usr/bin/env python3
"""One training step of emakit against the same step as timm's train.py takes it, in one process.

bench/vs_timm.py times whole processes, whose pair-to-pair spread on a shared 2-core VM
(+-10%) is larger than the per-step difference. This script holds everything else fixed:
the same model weights, the same in-memory batch, the same loss (timm's
LabelSmoothingCrossEntropy(0.1), the issue command's default), one process, the variants'
steps interleaved (the order rotated every round), so a drift in machine load hits all
alike. A step is forward, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``
and the EMA update:

- ``timm``: ``timm.optim.create_optimizer_v2(opt="sgd")`` (torch's per-tensor loop on CPU) and
  ``timm.utils.ModelEmaV3.update(model, step=n)``, as timm's train.py does with ``--model-ema``;
- ``emakit``: ``emakit.training.build.build_optimizer`` (torch's fused SGD kernel, the default)
  and ``emakit.ModelEMA.update`` (``copy_first=True``, as train.py builds it);
- ``emakit --no-opt-fused``: the same with the loop, to show where the difference comes from.

    python bench/step_vs_timm.py                       # resnet18, 64 px, batch 32 (the issue's command)
    python bench/step_vs_timm.py --model resnet50 --img-size 128 --steps 20

Prints a table (median step time, ratio to timm's) and writes bench/results/step_vs_timm.json.
Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emakit import ModelEMA  # noqa: E402
from emakit.training.build import build_optimizer  # noqa: E402
from emakit.training.settings import OptimSettings  # noqa: E402

VARIANTS = ("timm", "emakit", "emakit --no-opt-fused")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model (default: resnet18)")
    p.add_argument("--img-size", type=int, default=64, help="input size in pixels (default: 64)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (default: 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default: 3)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_vs_timm.json"),
                   help="JSON output (default: bench/results/step_vs_timm.json)")
    return p.parse_args()


def build(variant: str, args: argparse.Namespace, weights: dict) -> tuple:
    """(model, optimizer, step function) of one variant, from the shared initial ``weights``."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    model = timm.create_model(args.model, num_classes=10)
    model.load_state_dict(weights)
    if variant == "timm":
        optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)
        ema = ModelEmaV3(model, decay=0.9998)
        update = ema.update
    else:
        optimizer = build_optimizer(OptimSettings(fused=variant == "emakit"), model, 0.05)
        ema = ModelEMA(model, decay=0.9998, copy_first=True)
        update = lambda m, step: ema.update(m)  # noqa: E731
    return model, optimizer, update


def main() -> int:
    args = parse()
    import timm
    from timm.loss import LabelSmoothingCrossEntropy

    torch.manual_seed(0)
    inputs = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(0, 10, (args.batch_size,))
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    weights = timm.create_model(args.model, num_classes=10).state_dict()
    built = {v: build(v, args, weights) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for n in range(args.warmup + args.steps):
        order = VARIANTS[n % len(VARIANTS):] + VARIANTS[:n % len(VARIANTS)]
        for v in order:
            model, optimizer, update = built[v]
            start = time.perf_counter()
            loss_fn(model(inputs), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update(model, step=n + 1)
            if n >= args.warmup:
                times[v].append(time.perf_counter() - start)
    medians = {v: statistics.median(t) for v, t in times.items()}
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {args.steps} interleaved steps each, "
          f"torch {torch.__version__}, timm {timm.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'variant':24} {'median step ms':>15} {'vs timm':>8}")
    for v in VARIANTS:
        print(f"{v:24} {medians[v] * 1e3:15.1f} {medians[v] / medians['timm']:8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "bench": "step_vs_timm", "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
        "steps": args.steps, "torch_version": torch.__version__, "timm_version": timm.__version__,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "platform": platform.platform()},
        "median_step_seconds": medians, "ratio_to_timm": {v: medians[v] / medians["timm"] for v in VARIANTS},
        "step_seconds": times}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
