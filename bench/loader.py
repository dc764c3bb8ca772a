#!/usr/bin/env python3
"""Per-core images/s of timm's and emakit's host input pipelines (train and eval), on the same
generated JPEGs, in one process, measured in CPU time (``time.process_time``), interleaved.

What one "image" costs on the host, file to the uint8 tensor the GPU receives:

- ``timm train``: ``Image.open(path).convert("RGB")`` (timm's reader), then
  ``create_transform(224, is_training=True, color_jitter=0.4, interpolation="random",
  use_prefetcher=True)``: RandomResizedCrop, flip, ColorJitter on the PIL image, uint8 tensor;
- ``emakit train``: train.py's path on a GPU (``build_transforms(..., uint8=True)`` through
  ``SeededDataset``'s batch fetch: per-sample seeding, one RNG save/restore per batch of 32);
  ColorJitter's factors are drawn here and applied on the device (not counted: GPU time);
- ``emakit train --decoder X``: the same with the opt-in decoders (pil-draft, simplejpeg);
- ``timm eval`` / ``emakit eval``: ``create_transform(224, crop_pct=0.875, bicubic)`` against
  emakit's one-resample eval transform, and with the decoders.

Two image sets: 320-px shorter side (imagenette2-320-like) and 1024x768. Every round runs
each pipeline over the whole set once, the order rotated per round, so machine-load drift
hits all alike; figures are medians over rounds, ratios the median of per-round ratios to
timm's, and "cores per 3,000 img/s" = 3000 / (img/s per core).

    python bench/loader.py                      # 5 rounds, 200 + 60 images
    python bench/loader.py --rounds 3 --n320 100 --n1024 30

Writes bench/results/loader.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
BATCH = 32


def make_images(root: Path, n: int, size: tuple[int, int], seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = size if i % 4 else (size[1], size[0])  # a quarter portrait
        coarse = rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels += rng.normal(0, 10, size=pixels.shape)
        path = root / f"{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def timm_pipeline(train: bool):
    from PIL import Image
    from timm.data import create_transform

    if train:
        tf = create_transform(224, is_training=True, color_jitter=0.4, interpolation="random",
                              mean=CFG["mean"], std=CFG["std"], use_prefetcher=True)
    else:
        tf = create_transform(224, is_training=False, crop_pct=CFG["crop_pct"], interpolation="bicubic",
                              mean=CFG["mean"], std=CFG["std"], use_prefetcher=True)

    def run(paths: list[str]) -> None:
        for p in paths:
            with Image.open(p) as im:
                tf(im.convert("RGB"))
    return run


def emakit_pipeline(train: bool, decoder: str = "pil"):
    from emakit.training.data import AugmentConfig, ImageListDataset, SeededDataset, build_transforms

    train_tf, eval_tf = build_transforms(CFG, AugmentConfig(decoder=decoder), uint8=True)

    def run(paths: list[str]) -> None:
        ds = ImageListDataset(paths, [0] * len(paths), train_tf if train else eval_tf)
        if train:
            seeded = SeededDataset(ds)
            keys = [(i, 1_000_003 * i + 7) for i in range(len(paths))]
            for k in range(0, len(keys), BATCH):
                seeded.__getitems__(keys[k:k + BATCH])
        else:
            for i in range(len(paths)):
                ds[i]
    return run


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--n320", type=int, default=200, help="images with a 320-px shorter side (default: 200)")
    p.add_argument("--n1024", type=int, default=60, help="1024x768 images (default: 60)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "loader.json"))
    args = p.parse_args()
    import torch
    from importlib.metadata import version

    torch.set_num_threads(1)
    decoders = ["pil-draft"]
    try:
        import simplejpeg  # noqa: F401
        decoders.append("simplejpeg")
    except ImportError:
        pass
    pipes = {"timm train": timm_pipeline(True), "emakit train": emakit_pipeline(True),
             **{f"emakit train --decoder {d}": emakit_pipeline(True, d) for d in decoders},
             "timm eval": timm_pipeline(False), "emakit eval": emakit_pipeline(False),
             **{f"emakit eval --decoder {d}": emakit_pipeline(False, d) for d in decoders}}
    tmp = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    try:
        sets = {"320px": make_images(tmp / "320", args.n320, (427, 320), 0),
                "1024x768": make_images(tmp / "1024", args.n1024, (1024, 768), 1)}
        rates: dict[str, dict[str, list[float]]] = {s: {n: [] for n in pipes} for s in sets}
        names = list(pipes)
        for paths in sets.values():  # warm-up: plugins, page cache, first-call costs
            for run in pipes.values():
                run(paths[:8])
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for set_name, paths in sets.items():
                for name in order:
                    random.seed(r)
                    torch.manual_seed(r)
                    start = time.process_time()
                    pipes[name](paths)
                    rates[set_name][name].append(len(paths) / (time.process_time() - start))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary: dict = {}
    for set_name, per in rates.items():
        summary[set_name] = {}
        for name, values in per.items():
            base = per["timm train" if "train" in name else "timm eval"]
            ratios = [a / b for a, b in zip(values, base)]
            med = statistics.median(values)
            summary[set_name][name] = {"img_per_s_per_core": med, "ratio_to_timm": statistics.median(ratios),
                                       "ratio_min": min(ratios), "ratio_max": max(ratios),
                                       "cores_per_3000": 3000.0 / med}
    report = {"bench": "loader", "rounds": args.rounds, "images": {"320px": args.n320, "1024x768": args.n1024},
              "config": CFG, "batch_for_seeding": BATCH, "machine": machine(),
              "versions": {k: version(k) for k in ("torch", "timm", "torchvision", "pillow")}
              | {"simplejpeg": version("simplejpeg") if "simplejpeg" in decoders else None},
              "summary": summary, "rates": rates}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for set_name, per in summary.items():
        print(f"\n{set_name}: {'pipeline':34} {'img/s/core':>10} {'x timm':>7} {'(min-max)':>12} {'cores/3000':>10}")
        for name, s in per.items():
            print(f"{'':10} {name:34} {s['img_per_s_per_core']:10.0f} {s['ratio_to_timm']:7.2f} "
                  f"{s['ratio_min']:5.2f}-{s['ratio_max']:<5.2f} {s['cores_per_3000']:10.1f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
