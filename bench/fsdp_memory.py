"""Per-rank EMA memory and update time: DDP (a full replica per rank) vs FSDP2 (shards).

Launches itself under ``torch.distributed.run`` with 2 gloo ranks on the CPU, once per
(model, engine), so each measurement is a fresh process:

- ``ddp``: the model replicated on every rank (what DDP holds), a plain ``ModelEMA``;
- ``fsdp``: ``fully_shard`` on each repeated block, then the root; a sharded ``ModelEMA``
  (this rank's shards only, no collective per update).

Per rank it reports the bytes of model parameters, EMA, and AdamW state (after one step
with zero gradients, so the state exists) and the process's peak RSS, each engine in a
fresh process; then the median time of one EMA update, both engines built in one process
and timed interleaved round by round, both ranks updating at once (a barrier before each).

    python bench/fsdp_memory.py                          # vit_base_patch16_224 + resnet50
    python bench/fsdp_memory.py --models resnet50 --rounds 10

Writes bench/results/fsdp_memory.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tensor_bytes(tensors) -> int:
    """Bytes of the given (local) tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def build(model_name: str, engine: str):
    """The model as DDP holds it (a full replica) or FSDP2-sharded, its AdamW state created
    by one step with zero gradients, and an EMA of it."""
    import timm
    import torch

    from emakit import ModelEMA

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000)
    if engine == "fsdp":
        from emakit.training.fsdp import apply_fsdp

        apply_fsdp(model)  # each repeated block (ViT blocks, ResNet residual blocks), then the root
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates exp_avg / exp_avg_sq of this rank's (shards of the) parameters
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, ModelEMA(model, decay=0.9998)


def worker(model_name: str, mode: str, rounds: int, out: str) -> None:
    """One rank of one measurement (run under torch.distributed.run). ``mode`` ``ddp`` or
    ``fsdp``: memory of that engine alone (a fresh process each, so peak RSS is its own);
    ``time``: both engines in this process, their EMA updates timed interleaved round by
    round (this machine is noisy), both ranks updating at once after a barrier."""
    import torch
    import torch.distributed as dist

    from emakit.ema import _local

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"model": model_name, "mode": mode, "rank": rank, "world_size": dist.get_world_size()}
    if mode == "time":
        emas = {engine: build(model_name, engine) for engine in ("ddp", "fsdp")}
        times = {engine: [] for engine in emas}
        with torch.no_grad():
            for _ in range(rounds + 2):
                for engine, (model, _, ema) in emas.items():
                    dist.barrier()
                    start = time.perf_counter()
                    ema.update(model)
                    times[engine].append(time.perf_counter() - start)
        result.update({f"{engine}_update_s": statistics.median(t[2:]) for engine, t in times.items()})
    else:
        model, optimizer, ema = build(model_name, mode)
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        result.update({
            "param_bytes": tensor_bytes(_local(p) for p in model.parameters()),
            "ema_bytes": tensor_bytes(t for group in ema._ema_tensors() for t in group),
            "optimizer_bytes": tensor_bytes(_local(t) for t in state),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
    with open(os.path.join(out, f"{mode}-{model_name}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def run_one(model_name: str, mode: str, rounds: int, out: str) -> list[dict]:
    """Launch 2 ranks for one (model, mode) and read back their results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", model_name, mode, str(rounds), out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fsdp_memory: {mode} {model_name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(out, f"{mode}-{model_name}-rank{r}.json").read_text()) for r in range(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_base_patch16_224,resnet50",
                        help="comma-separated timm model names (default: vit_base_patch16_224,resnet50)")
    parser.add_argument("--rounds", type=int, default=20, help="timed EMA updates per rank (default: 20)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_memory.json"),
                        help="JSON results file (default: bench/results/fsdp_memory.json)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ddp, fsdp = run_one(name, "ddp", args.rounds, tmp), run_one(name, "fsdp", args.rounds, tmp)
            timed = run_one(name, "time", args.rounds, tmp)
            for engine, ranks in (("ddp", ddp), ("fsdp", fsdp)):
                for r, t in zip(ranks, timed):
                    r["update_s"] = t[f"{engine}_update_s"]
            rows.append({"model": name, "ddp": ddp, "fsdp": fsdp,
                         "ema_bytes_ratio": max(r["ema_bytes"] for r in fsdp) / max(r["ema_bytes"] for r in ddp),
                         "update_time_ratio": statistics.median(t["fsdp_update_s"] / t["ddp_update_s"] for t in timed)})
    print(f"{'model':24s} {'engine':6s} {'params MiB':>10s} {'EMA MiB':>8s} {'AdamW MiB':>9s} "
          f"{'peak RSS MiB':>12s} {'update ms':>9s}   (per rank: the larger of 2 ranks; time: median)")
    for row in rows:
        for engine in ("ddp", "fsdp"):
            rs = row[engine]
            print(f"{row['model']:24s} {engine:6s} {max(r['param_bytes'] for r in rs) / 2**20:10.1f} "
                  f"{max(r['ema_bytes'] for r in rs) / 2**20:8.1f} {max(r['optimizer_bytes'] for r in rs) / 2**20:9.1f} "
                  f"{max(r['peak_rss_bytes'] for r in rs) / 2**20:12.0f} "
                  f"{statistics.median(r['update_s'] for r in rs) * 1e3:9.2f}")
        print(f"{'':24s} FSDP/DDP: EMA bytes per rank {row['ema_bytes_ratio']:.3f}x, "
              f"update time {row['update_time_ratio']:.3f}x")
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": __import__("torch").__version__, "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(main())
