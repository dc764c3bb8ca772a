#!/usr/bin/env python3
"""How many post-hoc snapshots, in which dtype, does an accurate reconstruction need?

Post-hoc EMA (EDM2, ``emakit.posthoc``) stores the two tracked power-EMA profiles
(sigma_rel 0.05 and 0.10) every few steps and rebuilds any other EMA length afterwards by a
least-squares combination of the snapshots. Fewer snapshots = less disk; this benchmark
measures what that costs in accuracy, to choose train.py's default ``--posthoc-budget``.

Trajectory: a small CNN trained with SGD (momentum 0.9, constant learning rate) for
``--steps`` steps on scikit-learn's digits with 40% of the training labels flipped -- the
regime of ``configs/digits-noisy.yaml``, where the weights keep diffusing around a drifting
mean. That is the hard case for reconstruction (a smooth trajectory is reconstructed almost
exactly from any handful of snapshots), and a real one, unlike a synthetic random walk
whose noise/drift ratio would be a free parameter. The error of the least-squares fit
does not depend on the run length itself (the response functions only depend on step
ratios), only on the number of snapshots and on how rough the trajectory is.

For every step of that run, the tracked profiles and, as the references, power EMAs of each
requested sigma_rel are updated directly (``PowerEMA``, float32). For each snapshot count
N, the snapshot steps are those train.py would store (``auto_posthoc_every``: every
ceil(T / N) steps plus the last step); each snapshot is rounded to the storage dtype and the
profile is rebuilt at the last step with ``solve_posthoc_coefficients``, accumulating in
float32 exactly as ``reconstruct`` does. Reported per (N, dtype, sigma_rel):

* ``rel_l2`` = ||rebuilt - direct|| / ||direct|| over every float tensor of the model
  (the issue's measure);
* ``rel_move`` = ||rebuilt - direct|| / ||direct - theta_0||: the error relative to how far
  training moved that EMA from the initial weights, a far stricter measure (the weights'
  norm is mostly their initialisation);
* ``gap`` = ||nearest tracked profile - direct|| / ||direct - theta_0||: what one would get
  by taking the closer tracked profile instead of reconstructing (the error must be well
  below it for the reconstruction to be worth anything).

sigma_rel 0.05..0.10 lies inside the tracked pair; 0.02, 0.035, 0.15, 0.20 lie outside.

    python bench/posthoc_budget.py                 # 500 steps, 2 seeds, about a minute on 2 cores

Prints a table and writes bench/results/posthoc_budget.json. Not part of the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emakit.posthoc import PowerEMA, solve_posthoc_coefficients  # noqa: E402
from emakit.training.averages import auto_posthoc_every  # noqa: E402

COUNTS = (4, 8, 16, 32, 64)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TRACKED = (0.05, 0.10)
TARGETS = (0.02, 0.035, 0.05, 0.065, 0.08, 0.10, 0.15, 0.20)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="SGD steps of the trajectory (default: 500)")
    p.add_argument("--seeds", type=int, default=2, help="trajectories (seeds 0..n-1) (default: 2)")
    p.add_argument("--lr", type=float, default=0.05, help="constant SGD learning rate (default: 0.05)")
    p.add_argument("--label-noise", type=float, default=0.4,
                   help="fraction of training labels flipped (default: 0.4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "posthoc_budget.json"),
                   help="JSON output (default: bench/results/posthoc_budget.json)")
    return p.parse_args()


def small_cnn() -> nn.Module:
    """A 3-conv CNN with BatchNorm for 8x8 digits: ~25k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))


def noisy_digits(seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + seed)
    flip = torch.rand(len(y), generator=g) < noise
    y = torch.where(flip, (y + torch.randint(1, 10, y.shape, generator=g)) % 10, y)  # a different class
    return x, y


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])


def snapshot_steps(total: int, count: int) -> list[int]:
    every = auto_posthoc_every(total, count)
    steps = list(range(every, total + 1, every))
    return steps + ([total] if total % every else [])


def trajectory(seed: int, steps: int, lr: float, noise: float, keep: set[int]):
    """Train; return (theta_0, {step: [flat tracked profiles]}, {sigma_rel: flat direct EMA})."""
    torch.manual_seed(seed)
    x, y = noisy_digits(seed, noise)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    tracked, direct = PowerEMA(model, TRACKED), PowerEMA(model, TARGETS)
    float_idx = [i for i, (_, t) in enumerate(zip(tracked.keys, tracked.profiles[0])) if t.is_floating_point()]
    pick = lambda profile: flat(profile[i] for i in float_idx)  # noqa: E731
    theta0 = pick(tracked.profiles[0])
    g = torch.Generator().manual_seed(seed)
    stored = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tracked.update(model)
        direct.update(model)
        if step in keep:
            stored[step] = [pick(p).clone() for p in tracked.profiles]
    refs = {s: pick(direct.profiles[k]) for k, s in enumerate(TARGETS)}
    return theta0, stored, refs


def measure(theta0, stored, refs, steps: int) -> list[dict]:
    rows = []
    nearest = {s: min(range(len(TRACKED)), key=lambda k: abs(TRACKED[k] - s)) for s in TARGETS}
    last = stored[steps]
    for count in COUNTS:
        in_steps = snapshot_steps(steps, count)
        ts = [t for t in in_steps for _ in TRACKED]
        ss = [s for _ in in_steps for s in TRACKED]
        coefs = solve_posthoc_coefficients(ts, ss, steps, list(TARGETS))
        for dtype_name, dtype in DTYPES.items():
            snaps = [stored[t][k].to(dtype).to(torch.float32) for t in in_steps for k in range(len(TRACKED))]
            for j, sigma in enumerate(TARGETS):
                rebuilt = torch.zeros_like(theta0)
                for i, snap in enumerate(snaps):
                    rebuilt.add_(snap, alpha=float(coefs[i, j]))
                ref = refs[sigma]
                err = torch.linalg.vector_norm(rebuilt - ref).item()
                move = torch.linalg.vector_norm(ref - theta0).item()
                gap = torch.linalg.vector_norm(last[nearest[sigma]] - ref).item()
                rows.append(dict(n_snapshots=len(in_steps), budget_steps=count, dtype=dtype_name,
                                 sigma_rel=sigma, inside=TRACKED[0] <= sigma <= TRACKED[-1],
                                 rel_l2=err / torch.linalg.vector_norm(ref).item(), rel_move=err / move,
                                 gap=gap / move, sum_abs_coef=float(np.abs(coefs[:, j]).sum())))
    return rows


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    keep = {t for n in COUNTS for t in snapshot_steps(args.steps, n)}
    t0, rows = time.perf_counter(), []
    for seed in range(args.seeds):
        theta0, stored, refs = trajectory(seed, args.steps, args.lr, args.label_noise, keep)
        for r in measure(theta0, stored, refs, args.steps):
            rows.append({"seed": seed, **r})
    params = theta0.numel()

    # Worst case over seeds, per (count, dtype, sigma_rel).
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["budget_steps"], r["dtype"], r["sigma_rel"])
        w = worst.setdefault(key, dict(r))
        for m in ("rel_l2", "rel_move", "gap", "sum_abs_coef"):
            w[m] = max(w[m], r[m])
    print(f"post-hoc reconstruction error at step {args.steps}, worst of {args.seeds} seed(s); "
          f"small CNN ({params} float values), SGD lr {args.lr}, {args.label_noise:.0%} label noise")
    print("rel_l2 = ||rebuilt - direct|| / ||direct||; rel_move = same / ||direct - theta_0||; "
          "gap = nearest tracked profile's rel_move")
    head = f"{'N':>3} {'dtype':>9} " + " ".join(f"{s:>13g}" for s in TARGETS)
    print("\nrel_l2 (%) / rel_move (%) per sigma_rel (inside the tracked pair: 0.05-0.10)")
    print(head)
    for count in COUNTS:
        for dtype in DTYPES:
            cells = [worst[(count, dtype, s)] for s in TARGETS]
            print(f"{cells[0]['n_snapshots']:>3} {dtype:>9} " +
                  " ".join(f"{100 * c['rel_l2']:>6.3f}/{100 * c['rel_move']:<6.2f}" for c in cells))
    print(f"{'gap':>13} " + " ".join(f"{'':>6} {100 * worst[(COUNTS[-1], 'float32', s)]['gap']:<6.2f}"
                                       for s in TARGETS))
    summary = []
    for count in COUNTS:
        for dtype in DTYPES:
            cells = [worst[(count, dtype, s)] for s in TARGETS]
            inside = [c for c in cells if c["inside"]]
            outside = [c for c in cells if not c["inside"]]
            summary.append(dict(budget_steps=count, n_snapshots=cells[0]["n_snapshots"], dtype=dtype,
                                max_rel_l2_inside=max(c["rel_l2"] for c in inside),
                                max_rel_move_inside=max(c["rel_move"] for c in inside),
                                max_rel_l2_outside=max(c["rel_l2"] for c in outside),
                                max_rel_move_outside=max(c["rel_move"] for c in outside)))
    print("\nworst over sigma_rel (%)")
    print(f"{'N':>3} {'dtype':>9} {'rel_l2 in':>10} {'rel_move in':>12} {'rel_l2 out':>11} {'rel_move out':>13}")
    for s in summary:
        print(f"{s['n_snapshots']:>3} {s['dtype']:>9} {100 * s['max_rel_l2_inside']:>10.4f} "
              f"{100 * s['max_rel_move_inside']:>12.3f} {100 * s['max_rel_l2_outside']:>11.4f} "
              f"{100 * s['max_rel_move_outside']:>13.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=f"{platform.machine()} {os.cpu_count()} cpu(s), {platform.platform()}",
                torch=torch.__version__, steps=args.steps, seeds=args.seeds, lr=args.lr,
                label_noise=args.label_noise, params=params, tracked=list(TRACKED), targets=list(TARGETS),
                seconds=round(time.perf_counter() - t0, 1))
    out.write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))
    print(f"\nwrote {out} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
