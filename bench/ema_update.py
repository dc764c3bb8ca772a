"""Benchmark one EMA update: emakit vs timm ModelEmaV2/V3 vs torch AveragedModel vs roofline.

An EMA update must read the EMA and the model and write the EMA, so its floor is
``3 x float-state bytes / copy bandwidth``; copy bandwidth is measured here with a
``dst.copy_(src)`` of a buffer as large as the state (2 x bytes moved per copy).
Implementations are timed in one process, interleaved round by round (this machine is
noisy), and the median is reported.

    python bench/ema_update.py                  # resnet18 + resnet50, prints a table
    python bench/ema_update.py --rounds 30 --models resnet50 --multi 3

``--multi N`` adds N EMAs (N separate ModelEMA vs one MultiEMA) and, with ``--posthoc K``
(default 2), N EMAs plus K EDM2 power profiles (float32): the old way, a MultiEMA and a
PowerEMA updated one after the other, against one MultiEMA holding all N + K members
(``emakit.posthoc.power_profile``), one fused pass. ``--baseline DIR`` times the emakit
package found in ``DIR/emakit`` (an earlier commit: ``git archive <commit> emakit | tar -x -C DIR``)
in the same rounds, so before/after figures come from one run on one machine load.

Writes bench/results/ema_update.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from emakit import ModelEMA
import emakit.posthoc  # noqa: F401  (multi_updaters reads it from sys.modules)


COPY = "copy probe"


def float_state_bytes(model: nn.Module) -> int:
    """Bytes of the floating-point parameters and buffers (what an EMA averages)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())


def make_copy_probe(nbytes: int, device: torch.device) -> Callable[[], None]:
    """A ``dst.copy_(src)`` of a buffer as large as the float state: it moves 2 x nbytes, an
    EMA update 3 x nbytes, so the update's floor is 1.5 x the copy's time. Timed inside the
    same interleaved rounds as the EMAs so both see the same machine load."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SIGMA_RELS = (0.05, 0.10, 0.15, 0.2)  # the first --posthoc of them


def import_baseline(folder: str):
    """The emakit package of ``folder/emakit`` imported as ``emakit_base`` (a copy under a temp
    dir, so it does not shadow this one); its modules import each other relatively."""
    src = Path(folder) / "emakit"
    if not (src / "ema.py").is_file():
        raise SystemExit(f"--baseline {folder}: no emakit/ema.py there; make one with "
                         f"`git archive <commit> emakit | tar -x -C {folder}`")
    tmp = Path(tempfile.mkdtemp(prefix="ema-bench-"))
    shutil.copytree(src, tmp / "emakit_base")
    sys.path.insert(0, str(tmp))
    import importlib

    return importlib.import_module("emakit_base"), importlib.import_module("emakit_base.posthoc")


def multi_updaters(model: nn.Module, decays: list[float], posthoc: int, ema_mod, posthoc_mod, tag: str,
                   fused_posthoc: bool) -> dict[str, Callable[[], None]]:
    """N EMAs in one MultiEMA; with ``posthoc`` K > 0 also K power profiles: a MultiEMA plus a
    PowerEMA (two passes), and, where the package can (``fused_posthoc``), one MultiEMA of all."""
    n, sigmas = len(decays), SIGMA_RELS[:posthoc]
    multi = ema_mod.MultiEMA(model, decays=decays)
    out = {f"{tag}MultiEMA x{n}": lambda: multi.update(model)}
    if posthoc:
        multi2, power = ema_mod.MultiEMA(model, decays=decays), posthoc_mod.PowerEMA(model, sigmas)
        out[f"{tag}x{n} + PowerEMA x{posthoc}"] = lambda: (multi2.update(model), power.update(model))
        if fused_posthoc:
            members = [{"decay": d} for d in decays] + [posthoc_mod.power_profile(s) for s in sigmas]
            one = ema_mod.MultiEMA(model, members=members)
            out[f"{tag}x{n}+{posthoc} power, 1 pass"] = lambda: one.update(model)
    return out


def make_updaters(model: nn.Module, decay: float, device: torch.device, multi: int, posthoc: int = 0,
                  baseline=None) -> dict[str, Callable[[], None]]:
    """One zero-argument callable per implementation, each doing one EMA update of ``model``.
    ``baseline``: (package, its posthoc module) of an earlier emakit, timed beside this one."""
    from timm.utils import ModelEmaV2, ModelEmaV3
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ours = ModelEMA(model, decay=decay)
    v2 = ModelEmaV2(model, decay=decay)
    v3 = ModelEmaV3(model, decay=decay)
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    step = {"n": 0}

    def v3_update() -> None:
        step["n"] += 1
        v3.update(model, step=step["n"] + 1)  # step>1 so V3 averages rather than copies

    updaters = {
        "emakit": lambda: ours.update(model),
        "timm ModelEmaV3": v3_update,
        "timm ModelEmaV2": lambda: v2.update(model),
        "AveragedModel (EMA)": lambda: avg.update_parameters(model),
    }
    if baseline is not None:
        old = baseline[0].ModelEMA(model, decay=decay)
        updaters["base emakit"] = lambda: old.update(model)
    if multi > 1:
        decays = [decay ** (1 + i) for i in range(multi)]
        several = [ModelEMA(model, decay=d) for d in decays]
        updaters[f"emakit x{multi} separate"] = lambda: [e.update(model) for e in several]
        this = sys.modules["emakit"], sys.modules["emakit.posthoc"]
        updaters.update(multi_updaters(model, decays, posthoc, *this, "emakit ", True))
        if baseline is not None:
            updaters.update(multi_updaters(model, decays, posthoc, *baseline, "base ",
                                           hasattr(baseline[1], "power_profile")))
    return updaters


def bench_model(name: str, device: torch.device, rounds: int, multi: int, posthoc: int = 0,
                baseline=None, only: list[str] | None = None) -> list[dict]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device)
    nbytes = float_state_bytes(model)
    updaters = make_updaters(model, 0.9998, device, multi, posthoc, baseline)
    if only:  # the reference (timm V3) always runs
        updaters = {k: v for k, v in updaters.items() if k == "timm ModelEmaV3" or any(o in k for o in only)}
    updaters[COPY] = make_copy_probe(nbytes, device)
    for fn in updaters.values():  # warm-up: allocators, first-call caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in updaters}
    for _ in range(rounds):
        for label, fn in updaters.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    copy_s = statistics.median(times.pop(COPY))
    bandwidth = 2 * (nbytes // 4) * 4 / copy_s
    roofline = 1.5 * copy_s
    ref = statistics.median(times["timm ModelEmaV3"])
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        rows.append({
            "model": name, "impl": label, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
            "vs_timm_v3": med / ref, "roofline_ms": roofline * 1e3, "pct_of_roofline": 100 * roofline / med,
            "float_state_MB": nbytes / 1e6, "copy_GBps": bandwidth / 1e9, "rounds": rounds,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<10} {'implementation':<31} {'median ms':>10} {'x timm V3':>10} {'% roofline':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<10} {r['impl']:<31} {r['median_ms']:>10.2f} {r['vs_timm_v3']:>10.2f} {r['pct_of_roofline']:>10.0f}%")
    for model in dict.fromkeys(r["model"] for r in rows):
        r = next(x for x in rows if x["model"] == model)
        print(f"{model}: {r['float_state_MB']:.1f} MB float state, copy bandwidth {r['copy_GBps']:.1f} GB/s, "
              f"roofline {r['roofline_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,resnet50", help="timm model names (default: resnet18,resnet50)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default: 20)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--multi", type=int, default=0, help="also time N EMAs: N separate ModelEMA vs one MultiEMA (default: 0 = off)")
    parser.add_argument("--posthoc", type=int, default=2, choices=range(0, len(SIGMA_RELS) + 1),
                        help="with --multi: also time the N EMAs plus this many EDM2 power profiles, two passes "
                             "vs one (default: 2; 0 = off)")
    parser.add_argument("--baseline", default=None,
                        help="folder holding an earlier emakit/ to time side by side (default: none)")
    parser.add_argument("--only", default="",
                        help="comma list: time only implementations whose label contains one of these "
                             "(plus timm ModelEmaV3, the reference; default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ema_update.json"),
                        help="JSON results path (default: bench/results/ema_update.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    baseline = import_baseline(args.baseline) if args.baseline else None
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, device, args.rounds, args.multi, args.posthoc if args.multi > 1 else 0, baseline,
                            [o for o in args.only.split(",") if o])
    print_table(rows)
    machine = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
