#!/usr/bin/env python3
"""Does the EMA length matter, and can it be chosen after training? On the noisy-digits
preset (``configs/digits-noisy.yaml``: 40% flipped training labels, constant learning rate),
per seed:

* **grid**: one ``train.py`` run per EMA decay (``--model-ema-decay d``, post-hoc off),
  the decays being the classic EMAs of the same width as ``--sigma-rels`` at the run's last
  step (``emakit.posthoc.sigma_rel_to_decay``); the grid's pick is its best final EMA top-1.
* **post-hoc**: one ``train.py`` run with ``--model-ema-posthoc`` (the preset, default
  ``--posthoc-budget``), then one ``validate.py --posthoc-sigma-rel`` sweep over the same
  sigma_rels; its pick is the best reconstructed EMA (``pick_best``).

Both picks use the same validation set, as a user choosing a length would. Reported over the
seeds (mean, std and min-max): (a) raw vs EMA top-1 at the end (the raw trajectory is the
same in every run of a seed: the EMA does not touch training, which the script checks);
(b) the grid's best vs the post-hoc pick; (c) wall time (train, plus the sweep for
post-hoc) and disk of both approaches. It also reports must-show 1 of issue 12 for the
post-hoc run: the snapshot folder vs its budget and the model's float32 bytes, checkpoint
sizes with and without post-hoc, and the epoch time overhead (median epoch seconds of the
post-hoc run over those of the grid runs of the same seed).

Runs are subprocesses with OMP_NUM_THREADS=1, one at a time. The machine is shared: the
load average before and after is recorded.

    python bench/ema_outcomes.py                       # 3 seeds x (4 grid + 1 post-hoc) runs
    python bench/ema_outcomes.py --seeds 1 --epochs 2  # smoke test

Prints a table and writes bench/results/ema_outcomes.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emakit.posthoc import sigma_rel_to_decay  # noqa: E402

PRESET = REPO / "configs" / "digits-noisy.yaml"
STEPS_PER_EPOCH = 22  # 1437 training images // batch 64


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (default: 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: None = the preset's)")
    p.add_argument("--sigma-rels", default="0.03,0.06,0.10,0.17",
                   help="EMA lengths of the grid and of the sweep (default: 0.03,0.06,0.10,0.17)")
    p.add_argument("--workdir", default=None, help="where runs go (default: a temporary folder, deleted)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ema_outcomes.json"),
                   help="JSON output (default: bench/results/ema_outcomes.json)")
    return p.parse_args()


def run(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def last_row(folder: Path) -> dict[str, str]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def folder_bytes(folder: Path) -> int:
    """Bytes of the distinct files under ``folder`` (hard links counted once)."""
    seen, total = set(), 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def epoch_seconds(log: str) -> list[float]:
    return [float(s) for s in re.findall(r"\| lr [\d.e+-]+ \| ([\d.]+)s, ", log)]


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def fmt(s: dict[str, float], spec: str = ".2f") -> str:
    return f"{s['mean']:{spec}} ± {s['std']:{spec}} ({s['min']:{spec}}–{s['max']:{spec}})"


def main() -> None:
    args = parse()
    sigmas = [float(s) for s in args.sigma_rels.split(",")]
    epochs = args.epochs
    if epochs is None:
        import yaml
        epochs = int(yaml.safe_load(PRESET.read_text())["epochs"])
    total_steps = STEPS_PER_EPOCH * epochs
    decays = [sigma_rel_to_decay(s, total_steps) for s in sigmas]
    load_before = os.getloadavg()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    base = ["train.py", "--config", str(PRESET), "--epochs", str(epochs), "--no-progress", "--output", str(work)]
    seeds = []
    for seed in range(args.seeds):
        rec: dict = {"seed": seed, "grid": []}
        grid_epoch_times = []
        for sigma, decay in zip(sigmas, decays):
            name = f"grid-s{seed}-{sigma:g}"
            seconds, log = run(base + ["--seed", str(seed), "--no-model-ema-posthoc", "--model-ema-decay",
                                       f"{decay:.8f}", "--experiment", name])
            row = last_row(work / name)
            grid_epoch_times += epoch_seconds(log)
            rec["grid"].append({"sigma_rel": sigma, "decay": decay, "seconds": seconds,
                                "raw_top1": float(row["raw_eval_top1"]), "ema_top1": float(row["ema_eval_top1"]),
                                "disk_bytes": folder_bytes(work / name),
                                "last_ckpt_bytes": (work / name / "last.pth.tar").stat().st_size})
            print(f"seed {seed} grid sigma_rel {sigma:g} (decay {decay:.5f}): raw {row['raw_eval_top1']} "
                  f"EMA {row['ema_eval_top1']} in {seconds:.0f}s", flush=True)
        name = f"posthoc-s{seed}"
        train_s, log = run(base + ["--seed", str(seed), "--experiment", name])
        folder = work / name
        row = last_row(folder)
        sweep_s, out = run(["validate.py", "--checkpoint", str(folder / "last.pth.tar"), "--posthoc-sigma-rel",
                            ",".join(f"{s:g}" for s in sigmas), "--no-progress"])
        swept = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        with open(folder / "posthoc_sweep.csv", newline="") as f:
            best = next(r for r in csv.DictReader(f) if r["best"] == "True")
        used = int(re.search(r"MiB on disk \((\d+) bytes", log).group(1))
        budget = re.search(r"budget ([\d.]+ \w+) \(([\d.]+)x the model's ([\d.]+ \w+) float32 bytes, at most (\d+)", log)
        ratio = float(re.search(r"bytes, ([\d.]+)x the model's float32 bytes", log).group(1))
        ph_epoch = epoch_seconds(log)
        rec["posthoc"] = {
            "train_seconds": train_s, "sweep_seconds": sweep_s, "raw_top1": float(row["raw_eval_top1"]),
            "ema_top1": float(row["ema_eval_top1"]), "pick_sigma_rel": float(best["sigma_rel"]),
            "pick_top1": float(best["top1"]), "sweep": [{"sigma_rel": r["sigma_rel"], "top1": r["top1"]} for r in swept],
            "snapshot_bytes": used, "snapshot_x_model": ratio, "snapshot_steps": len({p.name.split("-")[1]
                                                                                      for p in (folder / "posthoc").glob("posthoc-*.pt")}),
            "budget": budget.group(1), "budget_x": float(budget.group(2)), "model_fp32": budget.group(3),
            "budget_steps": int(budget.group(4)), "disk_bytes": folder_bytes(folder),
            "last_ckpt_bytes": (folder / "last.pth.tar").stat().st_size,
            "epoch_s_median": statistics.median(ph_epoch), "grid_epoch_s_median": statistics.median(grid_epoch_times)}
        raws = {g["raw_top1"] for g in rec["grid"]} | {rec["posthoc"]["raw_top1"]}
        rec["raw_identical"] = len(raws) == 1
        print(f"seed {seed} post-hoc: raw {row['raw_eval_top1']} EMA {row['ema_eval_top1']}, pick sigma_rel "
              f"{best['sigma_rel']} top1 {best['top1']}; train {train_s:.0f}s + sweep {sweep_s:.0f}s; "
              f"snapshots {used / 2**20:.1f} MiB = {ratio}x model (budget {budget.group(1)})", flush=True)
        seeds.append(rec)
    load_after = os.getloadavg()

    raw = stats([s["posthoc"]["raw_top1"] for s in seeds])
    ema = stats([s["posthoc"]["ema_top1"] for s in seeds])
    grid_best = stats([max(g["ema_top1"] for g in s["grid"]) for s in seeds])
    per_sigma = {sig: stats([s["grid"][i]["ema_top1"] for s in seeds]) for i, sig in enumerate(sigmas)}
    sweep_sigma = {sig: stats([float(s["posthoc"]["sweep"][i]["top1"]) for s in seeds]) for i, sig in enumerate(sigmas)}
    pick = stats([s["posthoc"]["pick_top1"] for s in seeds])
    grid_time = stats([sum(g["seconds"] for g in s["grid"]) for s in seeds])
    ph_time = stats([s["posthoc"]["train_seconds"] + s["posthoc"]["sweep_seconds"] for s in seeds])
    grid_disk = stats([sum(g["disk_bytes"] for g in s["grid"]) / 2**20 for s in seeds])
    ph_disk = stats([s["posthoc"]["disk_bytes"] / 2**20 for s in seeds])
    overhead = stats([100 * (s["posthoc"]["epoch_s_median"] / s["posthoc"]["grid_epoch_s_median"] - 1) for s in seeds])
    summary = {
        "raw_top1": raw, "ema_top1": ema, "grid_best_top1": grid_best, "posthoc_pick_top1": pick,
        "grid_ema_top1_by_sigma_rel": per_sigma, "posthoc_top1_by_sigma_rel": sweep_sigma,
        "grid_seconds": grid_time, "posthoc_seconds": ph_time, "grid_disk_mib": grid_disk, "posthoc_disk_mib": ph_disk,
        "epoch_overhead_pct": overhead,
        "targets": {
            "posthoc_pick_within_grid_spread": abs(pick["mean"] - grid_best["mean"]) <= grid_best["std"],
            "posthoc_time_le_third_of_grid": ph_time["mean"] <= grid_time["mean"] / 3,
            "ema_beats_raw_by_more_than_spread": ema["mean"] - raw["mean"] > max(raw["std"], ema["std"]),
        },
    }
    print(f"\nnoisy digits ({PRESET.name}), {epochs} epochs = {total_steps} steps, {args.seeds} seeds; "
          f"mean ± std (min–max); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"(a) raw top-1 {fmt(raw)}; EMA (preset, half-life 1ep) top-1 {fmt(ema)}")
    print(f"{'sigma_rel':>10} {'decay':>9} {'grid EMA top-1':>28} {'post-hoc top-1':>28}")
    for sig, dec in zip(sigmas, decays):
        print(f"{sig:>10g} {dec:>9.5f} {fmt(per_sigma[sig]):>28} {fmt(sweep_sigma[sig]):>28}")
    print(f"(b) grid best {fmt(grid_best)}; post-hoc pick {fmt(pick)}")
    print(f"(c) wall time: grid {fmt(grid_time, '.0f')} s; post-hoc train + sweep {fmt(ph_time, '.0f')} s "
          f"(ratio {ph_time['mean'] / grid_time['mean']:.2f}); disk: grid {fmt(grid_disk, '.0f')} MiB, "
          f"post-hoc {fmt(ph_disk, '.0f')} MiB")
    p0 = seeds[0]["posthoc"]
    print(f"must-show 1: snapshots {p0['snapshot_bytes']} bytes = {p0['snapshot_x_model']}x the model's "
          f"{p0['model_fp32']} float32 bytes, {p0['snapshot_steps']} snapshot steps, budget {p0['budget']} "
          f"({p0['budget_x']:g}x, {p0['budget_steps']} steps); last.pth.tar {p0['last_ckpt_bytes']} bytes with "
          f"post-hoc vs {seeds[0]['grid'][0]['last_ckpt_bytes']} without; epoch time overhead {fmt(overhead, '.1f')} %")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in summary["targets"].items()))
    print("raw trajectory identical in every run of a seed: " + str(all(s["raw_identical"] for s in seeds)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpu(s), {platform.platform()}",
            "python": platform.python_version(), "epochs": epochs, "steps": total_steps, "seeds": args.seeds,
            "sigma_rels": sigmas, "decays": decays, "load_avg_before": load_before, "load_avg_after": load_after}
    out.write_text(json.dumps({"meta": meta, "summary": summary, "seeds": seeds}, indent=1))
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
