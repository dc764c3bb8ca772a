#!/usr/bin/env python3
"""emakit's train.py against timm's own train.py on the same command, as whole processes.

    python bench/vs_timm.py --timm-train /tmp/timm_train.py            # 5 pairs, 3 epochs
    python bench/vs_timm.py --timm-train /tmp/timm_train.py --pairs 1 --epochs 1   # quick check

A seeded ImageFolder (10 classes, 64 train + 16 val JPEGs of 64 px per class: 640/160 images)
is written to a temporary folder; then both trainers run, interleaved A B A B for ``--pairs``
pairs (the order alternates each pair so neither always runs second), on::

    DATA --model resnet18 --img-size 64 -b 32 --epochs 3 --lr 0.05 --warmup-epochs 0
         --model-ema --model-ema-decay 0.9998 --workers 2 --device cpu --seed 0
         --output <temporary folder>

``--output`` is the only addition: neither trainer writes outside the temporary folder.

Measured per process, from outside:
- wall: launch to exit (``time.perf_counter``);
- cpu: user + sys of the process and its reaped children (data-loader workers), and peak
  RSS (the largest of the process and its children), from ``os.wait4``'s resource usage;
- launch to first optimizer step: both trainers log a line right after their first
  optimizer step of each epoch (timm: ``Train: 0 [   0/20 ...``, emakit: ``train 0 [1/20]``)
  and after the last one; every output line is time-stamped when it arrives on the pipe,
  so the first such line gives launch-to-first-step (within one line's pipe latency);
- train img/s per epoch: images of steps 2..N of the epoch divided by the time between the
  epoch's first-step and last-step lines (the first step is left out, its start is not
  logged by either trainer); epoch seconds: first-step line to the next epoch's first-step
  line (training, evaluation and checkpoints of one epoch);
- last line -> exit: from the last output line to the process's exit (the interpreter's
  teardown, unless skipped);
- steal: CPU time the hypervisor gave to other guests during the run (``/proc/stat``), a
  gauge of how much outside noise a run on a shared VM met.

Prints medians and the median of per-pair ratios (emakit / timm: below 1 is faster), and
writes bench/results/vs_timm.json (after every pair). timm's train.py is not in the timm wheel; bench/README.md
says how to get it. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
TRAIN_PER_CLASS, VAL_PER_CLASS = 64, 16
BATCH = 32
# First-/last-step lines of each trainer: (epoch, step) where step counts from 1 (timm's
# update_idx counts from 0, so 1 is added to it).
_TIMM_STEP = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)")
_OURS_STEP = re.compile(r"train (\d+) \[(\d+)/(\d+)\]")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", required=True, metavar="PATH",
                   help="timm's train.py (from github.com/huggingface/pytorch-image-models; see bench/README.md)")
    p.add_argument("--pairs", type=int, default=5, help="interleaved pairs of runs (default: 5)")
    p.add_argument("--epochs", type=int, default=3, help="--epochs of the command (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="--workers of the command (default: 2)")
    p.add_argument("--model", default="resnet18", help="--model of the command (default: resnet18)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="use this ImageFolder instead of generating one (default: generate)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "vs_timm.json"),
                   help="JSON output (default: bench/results/vs_timm.json)")
    p.add_argument("--keep-logs", action="store_true", help="print each run's output path and keep it")
    return p.parse_args()


def make_data(root: Path, seed: int = 0) -> Path:
    """The 640/160-image ImageFolder: class c is a smooth random image tinted by colour c."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, size=(CLASSES, 3))
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float32)
                img = Image.fromarray(coarse.astype(np.uint8), "RGB").resize((64, 64), Image.BICUBIC)
                pixels = 0.6 * np.asarray(img, dtype=np.float32) + 0.4 * tints[c]
                pixels += rng.normal(0, 12, size=pixels.shape)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(
                    folder / f"{c:02d}_{i:03d}.jpg", quality=90)
    return root


def command(args: argparse.Namespace, script: str, data: Path, output: Path) -> list[str]:
    return [sys.executable, script, str(data), "--model", args.model, "--img-size", "64", "-b", str(BATCH),
            "--epochs", str(args.epochs), "--lr", "0.05", "--warmup-epochs", "0", "--model-ema",
            "--model-ema-decay", "0.9998", "--workers", str(args.workers), "--device", "cpu", "--seed", "0",
            "--output", str(output)]


def run_one(cmd: list[str], cwd: Path, log_path: Path) -> dict:
    """Run ``cmd``; wall, cpu and peak RSS from wait4, and every output line time-stamped."""
    lines: list[tuple[float, str]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1)

    def reader() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    steal = steal_seconds()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    steal = steal_seconds() - steal
    proc.returncode = os.waitstatus_to_exitcode(status)
    thread.join()
    log_path.write_text("".join(f"{t:9.3f} {s}\n" for t, s in lines))
    if proc.returncode != 0:
        tail = "\n".join(s for _, s in lines[-15:])
        raise SystemExit(f"vs_timm.py: {cmd[1]} exited with {proc.returncode}; last output:\n{tail}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "user": usage.ru_utime, "sys": usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024.0, "lines": lines, "steal": steal,
            "exit_after_output": wall - (lines[-1][0] if lines else 0.0)}


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests so far, all CPUs (``/proc/stat``'s steal
    column; 0 where there is none): a noise gauge for a run on a shared VM."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def step_times(lines: list[tuple[float, str]], pattern: re.Pattern, zero_based: bool) -> dict[int, dict[int, float]]:
    """{epoch: {step (from 1): time of its log line}} from a trainer's output."""
    found: dict[int, dict[int, float]] = {}
    for t, text in lines:
        m = pattern.search(text)
        if m:
            epoch, step = int(m.group(1)), int(m.group(2)) + (1 if zero_based else 0)
            found.setdefault(epoch, {}).setdefault(step, t)
    return found


def derive(run: dict, pattern: re.Pattern, zero_based: bool, epochs: int, steps_per_epoch: int) -> dict:
    """Launch-to-first-step, per-epoch train img/s and epoch seconds from the step lines."""
    steps = step_times(run["lines"], pattern, zero_based)
    if sorted(steps) != list(range(epochs)) or any(1 not in steps[e] or steps_per_epoch not in steps[e]
                                                   for e in steps):
        raise SystemExit(f"vs_timm.py: missing first/last step log lines: {steps}")
    train_ips = [(steps_per_epoch - 1) * BATCH / (steps[e][steps_per_epoch] - steps[e][1]) for e in range(epochs)]
    firsts = [steps[e][1] for e in range(epochs)] + [run["wall"]]
    out = {k: run[k] for k in ("wall", "cpu", "user", "sys", "peak_rss_mib", "steal", "exit_after_output")}
    out.update(first_step=steps[0][1], train_img_per_sec=train_ips,
               epoch_seconds=[firsts[e + 1] - firsts[e] for e in range(epochs)])
    return out


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


METRICS = [("wall", "wall s"), ("cpu", "cpu s (user+sys)"), ("user", "user s"), ("sys", "sys s"),
           ("peak_rss_mib", "peak RSS MiB"), ("first_step", "launch -> 1st step s"),
           ("train_img_per_sec", "train img/s (epoch mean)"), ("epoch_seconds", "epoch s (mean)"),
           ("exit_after_output", "last line -> exit s")]


def summarize(results: dict[str, list[dict]]) -> dict:
    """Medians per trainer and the median of per-pair ratios (emakit / timm) per metric."""
    pairs = min(len(results["emakit"]), len(results["timm"]))
    table = {}
    for key, _ in METRICS:
        ours, theirs = ([statistics.mean(r[key]) if isinstance(r[key], list) else r[key] for r in results[n][:pairs]]
                        for n in ("emakit", "timm"))
        ratios = [a / b for a, b in zip(ours, theirs)]
        table[key] = {"emakit": statistics.median(ours), "timm": statistics.median(theirs),
                      "ratio": statistics.median(ratios), "ratios": ratios}
    return table


def write_report(args: argparse.Namespace, results: dict, load: dict, done: bool) -> dict:
    """Write the JSON (after every pair, so an interrupted run keeps its finished pairs)."""
    import timm
    import torch

    table = summarize(results) if min(len(v) for v in results.values()) else {}
    report = {
        "bench": "vs_timm", "command": command(args, "train.py", Path("DATA"), Path("OUT"))[1:],
        "pairs_done": min(len(v) for v in results.values()), "pairs_asked": args.pairs, "complete": done,
        "timm_version": timm.__version__, "torch_version": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        **load, "summary": table, "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return table


def main() -> int:
    args = parse()
    timm_train = Path(args.timm_train).resolve()
    if not timm_train.is_file():
        print(f"vs_timm.py: error: {timm_train} is not a file: pass timm's train.py (see bench/README.md)",
              file=sys.stderr)
        return 2
    if args.pairs < 1 or args.epochs < 1:
        print("vs_timm.py: error: --pairs and --epochs must be >= 1", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vs_timm_"))
    load: dict = {"load_average_before": loadavg()}
    results: dict[str, list[dict]] = {"emakit": [], "timm": []}
    try:
        data = Path(args.data) if args.data else make_data(tmp / "data")
        steps_per_epoch = TRAIN_PER_CLASS * CLASSES // BATCH
        trainers = {"emakit": (str(REPO / "train.py"), _OURS_STEP, False),
                    "timm": (str(timm_train), _TIMM_STEP, True)}
        for pair in range(args.pairs):
            order = ["emakit", "timm"] if pair % 2 == 0 else ["timm", "emakit"]
            for name in order:
                script, pattern, zero_based = trainers[name]
                out_dir = tmp / f"out_{name}_{pair}"
                out_dir.mkdir()
                log = tmp / f"log_{name}_{pair}.txt"
                run = run_one(command(args, script, data, out_dir), REPO, log)
                results[name].append(derive(run, pattern, zero_based, args.epochs, steps_per_epoch))
                r = results[name][-1]
                print(f"pair {pair} {name:>6}: wall {r['wall']:.2f}s cpu {r['cpu']:.2f}s first step "
                      f"{r['first_step']:.2f}s train img/s {' '.join(f'{x:.0f}' for x in r['train_img_per_sec'])}"
                      f" exit {r['exit_after_output']:.2f}s after the last line, steal {r['steal']:.2f}s"
                      f" load {loadavg()}" + (f"  log {log}" if args.keep_logs else ""), flush=True)
                shutil.rmtree(out_dir)
            load["load_average_after"] = loadavg()
            write_report(args, results, load, done=pair == args.pairs - 1)
    finally:
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    table = summarize(results)
    print(f"\n{'':26} {'emakit':>9} {'timm':>9} {'ratio':>7}   (medians of {args.pairs} pairs; "
          "ratio = median of per-pair emakit/timm)")
    for key, label in METRICS:
        print(f"{label:26} {table[key]['emakit']:9.2f} {table[key]['timm']:9.2f} {table[key]['ratio']:7.3f}")
    for name in ("emakit", "timm"):
        per_epoch = [statistics.median(r["train_img_per_sec"][e] for r in results[name]) for e in range(args.epochs)]
        print(f"{name} train img/s per epoch (medians): {' '.join(f'{x:.1f}' for x in per_epoch)}")
    print(f"load average before {load['load_average_before']}, after {load['load_average_after']}")
    stolen = {n: sum(r["steal"] for r in results[n]) for n in results}
    print(f"CPU time stolen by the hypervisor during the runs (all pairs): emakit {stolen['emakit']:.1f} s, "
          f"timm {stolen['timm']:.1f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
