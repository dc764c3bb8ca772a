#!/usr/bin/env python3
"""Start-up of train.py in two checkouts, side by side: ``train.py --help`` wall time and
launch to the first optimizer step (issue 20: the option machinery must not slow either).

    python bench/startup.py --base /path/to/other/checkout [--rounds 7]

Each round runs, in alternating order, this checkout's and the base checkout's
``train.py --help`` and a one-epoch run on a seeded 32-px ImageFolder (resnet18, 64 px, batch
32, 2 workers) whose first ``train 0 [1/N]`` log line is time-stamped as it arrives on the
pipe. Both use this interpreter. Prints medians and the median of per-round ratios (this /
base: below 1 is faster) and writes bench/results/startup.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--model", "resnet18", "--img-size", "64", "-b", "32", "--epochs", "1", "--workers", "2",
             "--device", "cpu", "--seed", "0", "--log-interval", "1000", "--no-progress", "--model-ema"]


def _images(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 64), ("val", 16)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                pixels[..., c % 3] = 230
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}


def time_help(repo: Path) -> float:
    """Seconds from launch to exit of ``train.py --help``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(repo / "train.py"), "--help"], cwd=repo, env=_env(repo), check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_first_step(repo: Path, data: Path, out: Path) -> float:
    """Seconds from launch to the first optimizer step's log line."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(repo / "train.py"), str(data), *RUN_FLAGS, "--output", str(out)],
                            cwd=repo, env=_env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and "train 0 [1/" in line:
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"startup.py: the run in {repo} failed or logged no first step")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the other checkout (required)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    args = parser.parse_args()
    checkouts = {"this": REPO, "base": Path(args.base).resolve()}
    results: dict[str, dict[str, list[float]]] = {k: {"help": [], "first_step": []} for k in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _images(data)
        for r in range(args.rounds):
            order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
            for name in order:
                results[name]["help"].append(time_help(checkouts[name]))
                results[name]["first_step"].append(time_first_step(checkouts[name], data, Path(tmp) / f"o{r}{name}"))
    summary = {}
    for metric in ("help", "first_step"):
        ratios = [a / b for a, b in zip(results["this"][metric], results["base"][metric])]
        summary[metric] = {"this_median_s": statistics.median(results["this"][metric]),
                           "base_median_s": statistics.median(results["base"][metric]),
                           "median_ratio": statistics.median(ratios)}
        print(f"{metric:11s} this {summary[metric]['this_median_s']:.2f} s  base {summary[metric]['base_median_s']:.2f} s"
              f"  ratio {summary[metric]['median_ratio']:.3f}")
    out = REPO / "bench" / "results" / "startup.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "rounds": args.rounds, "base": str(checkouts["base"]), "summary": summary,
                               "runs": results}, indent=1))


if __name__ == "__main__":
    main()
