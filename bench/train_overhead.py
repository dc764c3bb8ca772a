#!/usr/bin/env python3
"""How much does the EMA slow down training? img/s of train.py's loop (engine.train_one_epoch)
with the EMA off, updated every optimizer step, and every 4 steps (--model-ema-every 4).
Overhead % = img/s(off) / img/s(EMA) - 1, from the best repeat of each mode (other
processes only ever slow a repeat down, so the fastest is the least disturbed, as timeit
reports its minimum), from the medians, and paired per repeat.

All three run in one process on the same model and the same in-memory batches, interleaved
(off, every-1, every-4, then rotated) for several repeats, so drifts in machine load hit
all of them alike; the medians are compared. Data loading is left out on purpose: it would
only dilute the overhead. A second figure, the time of one ``ema.update`` alone divided by
the time of one training step, gives the overhead to expect, to check the loop figure.

    python bench/train_overhead.py                        # resnet18, 64 px, batch 32
    python bench/train_overhead.py --model resnet50 --img-size 128 --repeats 7

Prints a table and writes bench/results/train_overhead.json. Not part of the tests.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emakit import ModelEMA  # noqa: E402
from emakit.training.averages import Averages  # noqa: E402
from emakit.training.engine import TrainOptions, train_one_epoch  # noqa: E402
from emakit.training.settings import RunSettings  # noqa: E402

MODES = ("off", "every 1", "every 4")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model (default: resnet18)")
    p.add_argument("--img-size", type=int, default=64, help="image size (default: 64)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per measurement (default: 6)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats per mode (default: 15)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: {torch.get_num_threads()})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_overhead.json"),
                   help="JSON output (default: bench/results/train_overhead.json)")
    return p.parse_args()


def measure(model: nn.Module, batches: list, ema: ModelEMA | None, optimizer: torch.optim.Optimizer) -> float:
    """img/s of one train_one_epoch call over ``batches``."""
    out = train_one_epoch(0, model, batches, optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                          opts=TrainOptions(run=RunSettings(log_interval=10**9)),
                          averages=Averages(ema) if ema is not None else None)
    return out["img_per_sec"]


def update_time(ema: ModelEMA, model: nn.Module, n: int = 20) -> float:
    """Seconds per averaging ``ema.update`` call (update_every=1), median of ``n``."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        ema.update(model)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=100)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, 100, (args.batch_size,), generator=gen)) for _ in range(args.steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    emas = {"off": None, "every 1": ModelEMA(model, decay=0.9998),
            "every 4": ModelEMA(model, decay=0.9998, update_every=4)}
    for mode in MODES:  # warm-up: allocator, kernels, optimizer state
        measure(model, batches[:2], emas[mode], optimizer)
    ips: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            ips[mode].append(measure(model, batches, emas[mode], optimizer))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {ips[m][-1]:.1f} img/s" for m in MODES),
              flush=True)
    step_s = args.batch_size / statistics.median(ips["off"])
    upd_s = update_time(ModelEMA(model, decay=0.9998), model)
    med = {m: statistics.median(v) for m, v in ips.items()}
    best = {m: max(v) for m, v in ips.items()}
    overhead = {m: 100.0 * (med["off"] / med[m] - 1.0) for m in MODES[1:]}
    best_overhead = {m: 100.0 * (best["off"] / best[m] - 1.0) for m in MODES[1:]}
    # paired: each repeat measures the three modes back to back, so their ratio cancels
    # slow drifts in machine load; the median over repeats drops the outliers
    paired = {m: 100.0 * statistics.median(o / e - 1.0 for o, e in zip(ips["off"], ips[m])) for m in MODES[1:]}
    return {
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "timm": timm.__version__,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "img_per_sec": ips, "best_img_per_sec": best, "best_overhead_pct": best_overhead,
        "median_img_per_sec": med, "overhead_pct": overhead, "paired_overhead_pct": paired,
        "ema_update_ms": 1000 * upd_s, "train_step_ms": 1000 * step_s,
        "expected_overhead_pct": {"every 1": 100 * upd_s / step_s, "every 4": 100 * upd_s / step_s / 4},
    }


def main() -> int:
    args = parse()
    result = run(args)
    print(f"\n{result['model']} {result['img_size']}px batch {result['batch_size']}, {result['threads']} threads, "
          f"torch {result['torch']}; train step {result['train_step_ms']:.0f} ms, "
          f"one EMA update {result['ema_update_ms']:.1f} ms")
    print(f"{'EMA':<10}{'best img/s':>11}{'overhead %':>12}{'median img/s':>14}{'overhead %':>12}"
          f"{'paired %':>10}{'expected %':>12}")
    keys = ("best_overhead_pct", "overhead_pct", "paired_overhead_pct", "expected_overhead_pct")
    for mode in MODES:
        c = ["", "", "", ""] if mode == "off" else [f"{result[k][mode]:.2f}" for k in keys]
        print(f"{mode:<10}{result['best_img_per_sec'][mode]:>11.1f}{c[0]:>12}"
              f"{result['median_img_per_sec'][mode]:>14.1f}{c[1]:>12}{c[2]:>10}{c[3]:>12}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
