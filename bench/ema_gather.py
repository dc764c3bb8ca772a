"""Gathering a sharded EMA for a single-file checkpoint: bucketed all-gathers against one
``DTensor.full_tensor()`` per tensor.

Launches itself under ``torch.distributed.run`` with 2 gloo ranks on the CPU. Each model is
sharded with :func:`emakit.training.fsdp.apply_fsdp` and given a ``ModelEMA``; then, in one
process and interleaved round by round (a barrier before each), it times

- ``emakit``: ``ema.state_dict_ema(full=True, rank0_only=True)``, the row-sharded tensors
  packed into buckets of ``emakit.ema.GATHER_BUCKET_BYTES`` and gathered with one
  ``all_gather_into_tensor`` each;
- ``per tensor``: one ``DTensor.full_tensor()`` per sharded tensor, then ``.cpu()`` on rank 0,
  which is what the EMA did before (and what torch's ``get_model_state_dict`` does for the
  model);

and counts the all-gathers each dispatches. Rank 0 checks that both give the same bytes.

    python bench/ema_gather.py                              # resnet50 + vit_base_patch16_224
    python bench/ema_gather.py --models resnet50 --rounds 5

Writes bench/results/ema_gather.json (or --out).
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

ROOT = Path(__file__).resolve().parents[1]


def worker(models: list[str], rounds: int, out: str) -> None:
    """One rank: every model's EMA gathered both ways, interleaved; rank 0 writes ``out``."""
    import timm
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from emakit import ModelEMA
    from emakit.training.fsdp import apply_fsdp
    from fsdp_ema_worker import count_python_collectives, per_tensor_full_state

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=1000)
        apply_fsdp(model)
        ema = ModelEMA(model, decay=0.999)
        ways = {"emakit": lambda: ema.state_dict_ema(full=True, rank0_only=True),
                "per tensor": lambda: per_tensor_full_state(ema, keep=rank == 0)}
        gathered = {label: fn() for label, fn in ways.items()}  # warm-up, and the bytes to compare
        same = rank != 0 or (list(gathered["emakit"]) == list(gathered["per tensor"]) and all(
            torch.equal(gathered["emakit"][k], v) for k, v in gathered["per tensor"].items()))
        del gathered
        counts = {label: count_python_collectives(fn) for label, fn in ways.items()}
        times = {label: [] for label in ways}
        for _ in range(rounds):
            for label, fn in ways.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
        mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        for label in ways:
            python, ops = counts[label]
            gathers = [o for o in ops if "gather" in o]  # the all-gathers among the dispatched c10d ops
            rows.append({"model": name, "way": label, "median_s": statistics.median(times[label]),
                         "all_gathers": len(gathers), "python_collectives": python, "op_names": sorted(set(ops)),
                         "ema_mb": round(mb, 1), "same_bytes": same})
        model = ema = ways = None  # free this model before the next
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,vit_base_patch16_224",
                        help="timm model names (default: resnet50,vit_base_patch16_224)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ema_gather.json"),
                        help="results file (default: bench/results/ema_gather.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.worker:
        worker(models, args.rounds, args.worker)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--models", args.models, "--rounds", str(args.rounds), "--worker", part]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows = json.loads(Path(part).read_text())
    print(f"{'model':<24}{'gather':<12}{'EMA MB':>8}{'all-gathers':>13}{'median s':>10}{'vs per tensor':>15}"
          "  same bytes")
    base = {r["model"]: r["median_s"] for r in rows if r["way"] == "per tensor"}
    for r in rows:
        print(f"{r['model']:<24}{r['way']:<12}{r['ema_mb']:>8}{r['all_gathers']:>13}{r['median_s']:>10.3f}"
              f"{r['median_s'] / base[r['model']]:>14.2f}x  {r['same_bytes']}")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "ranks": 2, "backend": "gloo", "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["same_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
