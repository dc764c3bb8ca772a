#!/usr/bin/env python3
"""Evaluation of the raw weights and 3 EMAs: one pass (``engine.evaluate_many``, each image
decoded once) against 4 separate passes (``engine.evaluate`` per weight set, as before).

    python bench/eval_single_pass.py                     # resnet18, 64 px, 160 val JPEGs, 2 workers
    python bench/eval_single_pass.py --repeats 9 --workers 0

The validation split of bench/vs_timm.py's generated ImageFolder (160 JPEGs of 64 px, 10
classes) goes through train.py's eval transform and loader (``build_eval_loader``, its
workers persistent and started before timing, so both modes get the same warm loader).
The two modes alternate for ``--repeats`` rounds (the order flips each round); medians and
the median of per-round ratios are printed, and the ratio of each mode's best round (the
least disturbed on a shared machine, as timeit reports its minimum); both modes' metrics
are checked to be identical. ``--workers 0`` decodes in the timed process itself, so the
decodes saved show in full; with workers they partly overlap the forward passes. Writes bench/results/eval_single_pass.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emakit.training.data import AugmentConfig, build_eval_loader, build_transforms, load_image_folder  # noqa: E402
from emakit.training.data import resolve_data_config_for  # noqa: E402
from emakit.training.distributed import DistInfo  # noqa: E402
from emakit.training.engine import EvalTarget, evaluate, evaluate_many  # noqa: E402
from vs_timm import make_data  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model (default: resnet18)")
    p.add_argument("--emas", type=int, default=3, help="EMAs besides the raw weights (default: 3)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
    p.add_argument("--repeats", type=int, default=7, help="rounds of both modes (default: 7)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_single_pass.json"),
                   help="JSON output (default: bench/results/eval_single_pass.json)")
    return p.parse_args()


def main() -> int:
    args = parse()
    import timm

    with tempfile.TemporaryDirectory(prefix="eval_single_pass_") as tmp:
        data = load_image_folder(str(make_data(Path(tmp) / "data")))
        torch.manual_seed(0)
        raw = timm.create_model(args.model, num_classes=len(data.classes))
        models = [raw]
        for _ in range(args.emas):  # EMAs: other weights of the same architecture
            m = copy.deepcopy(raw)
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1.0 + 0.01 * torch.randn_like(p))
            models.append(m)
        _, data.val.transform = build_transforms(resolve_data_config_for(raw, img_size=64), AugmentConfig())
        loader = build_eval_loader(data.val, args.batch_size, DistInfo(), workers=args.workers)
        cpu, loss_fn = torch.device("cpu"), nn.CrossEntropyLoss()
        labels = [""] + [f" (EMA{i})" for i in range(args.emas)]
        targets = [EvalTarget(m, cpu, label=lab) for m, lab in zip(models, labels)]

        def one_pass() -> list[dict]:
            return evaluate_many(targets, loader, loss_fn)

        def separate() -> list[dict]:
            return [evaluate(m, loader, loss_fn, device=cpu, log_suffix=lab) for m, lab in zip(models, labels)]

        modes = {"one pass": one_pass, "separate passes": separate}
        for fn in modes.values():  # warm-up: starts the persistent workers, first-call costs
            fn()
        times: dict[str, list[float]] = {name: [] for name in modes}
        results = {}
        for r in range(args.repeats):
            for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                start = time.perf_counter()
                results[name] = modes[name]()
                times[name].append(time.perf_counter() - start)
        assert results["one pass"] == results["separate passes"], "the two modes' metrics differ"
    ratios = [a / b for a, b in zip(times["one pass"], times["separate passes"])]
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model}, 64 px, {len(data.val)} val images, batch {args.batch_size}, {args.workers} workers, "
          f"raw + {args.emas} EMAs, {args.repeats} rounds")
    print(f"{'mode':18} {'median s':>9} {'min s':>7}")
    for name, t in times.items():
        print(f"{name:18} {med[name]:9.3f} {min(t):7.3f}")
    best = min(times["one pass"]) / min(times["separate passes"])
    print(f"one pass / separate passes: {statistics.median(ratios):.3f} (median of per-round ratios), "
          f"{best:.3f} (best round of each); metrics identical")
    report = {"bench": "eval_single_pass", "model": args.model, "emas": args.emas, "workers": args.workers,
              "batch_size": args.batch_size, "val_images": len(data.val), "repeats": args.repeats,
              "seconds": times, "median_seconds": med, "ratio_one_pass_over_separate": statistics.median(ratios),
              "ratio_of_best_rounds": best,
              "load_average": list(os.getloadavg()), "torch_version": torch.__version__,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
