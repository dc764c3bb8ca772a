#!/usr/bin/env python3
"""Training img/s per core on the same images read from a folder, ``<split>.tar`` files, and
WebDataset shards (streamed ``wds/`` and indexed ``wids/``) made by ``emakit pack`` (issue 22:
shards must be no slower than the folder).

    python bench/data_sources.py [--images 768] [--size 160] [--rounds 3]

Writes a seeded ImageFolder of ``--size`` px JPEGs (4 classes), packs it, then runs
``train.py`` for 2 epochs per source with ``--workers 0`` and one compute thread, so
everything (reading, decoding, augmenting, the tiny model's steps) runs on one core: the
second epoch's img/s of the epoch line is img/s per core. Sources run in a rotating order
each round; prints the medians and each source's ratio to the folder, writes
bench/results/data_sources.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "test_resnet", "--img-size", "64", "-b", "32", "--epochs", "2", "--workers", "0",
         "--device", "cpu", "--seed", "0", "--log-interval", "1000", "--no-progress", "--warmup-epochs", "0"]


def _images(root: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", max(32, count // 8))):
        for i in range(n):
            c = i % 4
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += np.uint8(120)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def _tars(folder: Path, out: Path) -> None:
    out.mkdir()
    for split in ("train", "val"):
        with tarfile.open(out / f"{split}.tar", "w") as tf:
            for path in sorted((folder / split).rglob("*.jpg")):
                tf.add(path, arcname=str(path.relative_to(folder / split)))


def _img_per_sec(flags: list[str], out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *flags, *FLAGS, "--output", str(out)],
                          env=env, capture_output=True, text=True, check=False)
    rates = re.findall(r"epoch 1/1: .*, (\d+) img/s", proc.stderr)
    if proc.returncode != 0 or not rates:
        raise SystemExit(f"train.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(rates[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=768, help="training images (default: 768)")
    parser.add_argument("--size", type=int, default=160, help="image side in px (default: 160)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emakit-bench-sources-") as tmp:
        tmp_path = Path(tmp)
        folder, tars, shards = tmp_path / "folder", tmp_path / "tars", tmp_path / "shards"
        _images(folder, args.images, args.size)
        _tars(folder, tars)
        subprocess.run([sys.executable, "-m", "emakit", "pack", str(folder), str(shards), "--shard-size", "1MiB"],
                       cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        sources = {"folder": [str(folder)], "tar": ["--data-dir", str(tars)],
                   "wds": ["--data-dir", str(shards), "--dataset", "wds/shards"],
                   "wids": ["--data-dir", str(shards), "--dataset", "wids/shards"]}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        names = list(sources)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rates[name].append(_img_per_sec(sources[name], tmp_path / "out"))
                print(f"round {r}: {name:6s} {rates[name][-1]:.0f} img/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    print(f"\n{'source':8s} {'img/s/core':>10s} {'vs folder':>9s}")
    for name, value in medians.items():
        print(f"{name:8s} {value:10.0f} {value / medians['folder']:9.2f}")
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args),
              "img_per_sec_per_core": rates, "median": medians,
              "ratio_to_folder": {k: v / medians["folder"] for k, v in medians.items()}}
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "data_sources.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
