#!/usr/bin/env python3
"""The steps of bench/gpu_check.sh after the CUDA tests (see ../shared/GPU.md); run by it, one
step per call, each adding its figures to one JSON file:

    python bench/gpu_check.py env        --json OUT/gpu_check.json [--dry-run]
    python bench/gpu_check.py pytest     --json ... --log OUT/pytest_cuda.log --rc N
    python bench/gpu_check.py data       --json ... --dir DATA [--dry-run]
    python bench/gpu_check.py throughput --json ... --dir DATA --logs OUT [--timm-train PATH] [--dry-run]
    python bench/gpu_check.py synthetic  --json ... [--dry-run]
    python bench/gpu_check.py ema        --json ... [--dry-run]

``--dry-run`` runs the same step on the CPU at toy sizes (tiny timm ``test_*`` models, 32-px
crops, a few dozen images), so tests/test_gpu_check.py keeps every step working. A step that
fails records its error (and its log's tail) in the JSON and exits 1; the shell script goes on
with the next step.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = {"train_images": 8000, "val_images": 500, "short_side": 320, "classes": 10, "model": "resnet50",
        "vit": "vit_base_patch16_224", "img_size": 224, "batch": 128, "workers": 14, "device": "cuda",
        "epochs": 2, "synthetic_steps": 30, "ema_rounds": 50}
DRY = {"train_images": 32, "val_images": 8, "short_side": 40, "classes": 4, "model": "test_resnet",
       "vit": "test_vit", "img_size": 32, "batch": 8, "workers": 1, "device": "cpu",
       "epochs": 2, "synthetic_steps": 3, "ema_rounds": 3}
_TIMM_STEP = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)")
_OURS_STEP = re.compile(r"train (\d+) \[(\d+)/(\d+)\]")


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, key: str, value: object) -> None:
    report = load(path)
    report[key] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. environment
def step_env(args: argparse.Namespace, sizes: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out: dict = {"dry_run": args.dry_run, "sizes": sizes, "python": sys.version.split()[0],
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    for dist in ("torch", "timm", "torchvision", "pillow", "simplejpeg", "nvidia-dali-cuda120", "nvidia-dali-cuda130"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_count=torch.cuda.device_count(), cuda_runtime=torch.version.cuda)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            out["nvidia_smi"] = smi.stdout.strip()
            out["driver"] = smi.stdout.strip().split(",")[-1].strip() if smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError) as e:
            out["nvidia_smi"] = f"unavailable: {e}"
    return out


# ----------------------------------------------------------------------------- 2. pytest -m cuda
def step_pytest(args: argparse.Namespace, sizes: dict) -> dict:
    text = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).exists() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    return {"exit_status": args.rc, "counts": counts, "log_tail": text[-2000:]}


# ----------------------------------------------------------------------------- 3. data
def _write_images(job: tuple) -> int:
    import numpy as np
    from PIL import Image

    folder, start, count, short, seed, classes = job
    rng = np.random.default_rng(seed + start)
    for i in range(start, start + count):
        c = i % classes
        w, h = (short * 4 // 3, short) if i % 3 else (short, short * 4 // 3)
        coarse = rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = 0.7 * img + 0.3 * (255.0 * (np.arange(3) == c % 3)) + rng.normal(0, 8, size=img.shape)
        target = Path(folder) / f"class_{c:02d}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(target / f"{i:06d}.jpg", quality=90)
    return count


def make_data(root: Path, sizes: dict, processes: int) -> dict:
    from multiprocessing import Pool

    start = time.perf_counter()
    jobs = []
    for split, total in (("train", sizes["train_images"]), ("val", sizes["val_images"])):
        chunk = max(1, total // (processes * 4))
        jobs += [(str(root / split), s, min(chunk, total - s), sizes["short_side"], 0 if split == "train" else 99,
                  sizes["classes"]) for s in range(0, total, chunk)]
    with Pool(processes) as pool:
        written = sum(pool.map(_write_images, jobs))
    return {"images": written, "seconds": round(time.perf_counter() - start, 2), "dir": str(root),
            "short_side": sizes["short_side"], "processes": processes}


def step_data(args: argparse.Namespace, sizes: dict) -> dict:
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    return make_data(root, sizes, max(1, os.cpu_count() or 1))


# ----------------------------------------------------------------------------- 4. throughput
def _common(sizes: dict, model: str) -> list[str]:
    flags = ["--model", model, "--img-size", str(sizes["img_size"]), "-b", str(sizes["batch"]),
             "--channels-last", "--model-ema", "-j", str(sizes["workers"]), "--epochs", str(sizes["epochs"]),
             "--log-interval", "100000", "--val-split", "val", "--device", sizes["device"]]
    if sizes["device"] == "cuda":
        flags += ["--amp", "--amp-dtype", "bfloat16"]  # the GPU.md command; the dry run leaves AMP off (CPU)
    return flags


def run_logged(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run ``cmd``, every output line time-stamped into ``log``; wall time and exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(log.parent), bufsize=1)
    except OSError as e:
        return {"rc": None, "error": str(e), "lines": []}
    import threading

    watchdog = threading.Timer(timeout, proc.kill)  # a silent hang ends too
    watchdog.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
    rc = proc.wait()
    watchdog.cancel()
    log.write_text("".join(f"{t:9.3f} {s}\n" for t, s in lines))
    return {"rc": rc, "wall": time.perf_counter() - start, "lines": lines,
            "tail": "\n".join(s for _, s in lines[-15:])}


def epoch_rate(lines: list[tuple[float, str]], pattern: re.Pattern, zero_based: bool, batch: int) -> dict:
    """img/s of the last epoch (the earlier ones are warm-up), from its first and last step lines."""
    steps: dict[int, dict[int, float]] = {}
    total = 0
    for t, text in lines:
        m = pattern.search(text)
        if m:
            step = int(m.group(2)) + (1 if zero_based else 0)
            total = int(m.group(3))
            steps.setdefault(int(m.group(1)), {}).setdefault(step, t)
    if not steps:
        return {"error": "no step lines in the log"}
    last = max(steps)
    seen = steps[last]
    first_step, last_step = min(seen), max(seen)
    if last_step <= first_step:
        return {"error": f"epoch {last}: only step {first_step} logged"}
    return {"epoch": last, "steps_per_epoch": total, "img_per_s": (last_step - first_step) * batch
            / (seen[last_step] - seen[first_step])}


def step_throughput(args: argparse.Namespace, sizes: dict) -> dict:
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.dir).resolve())
    py = sys.executable
    out: dict = {"command": _common(sizes, sizes["model"]), "data": data}
    runs = {"emakit": [py, str(REPO / "train.py"), "--data-dir", data]}
    if args.timm_train and Path(args.timm_train).is_file():
        runs["timm"] = [py, str(Path(args.timm_train).resolve()), "--data-dir", data]
    else:
        out["timm"] = {"skipped": f"no timm train.py given or found ({args.timm_train!r}): see bench/README.md"}
    for name, head in runs.items():
        work = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_", dir=logs))
        cmd = [*head, *_common(sizes, sizes["model"]), "--output", str(work)]
        res = run_logged(cmd, logs / f"train_{name}.log", args.timeout)
        pattern, zero = (_TIMM_STEP, True) if name == "timm" else (_OURS_STEP, False)
        out[name] = {"rc": res["rc"], "wall_s": round(res.get("wall", 0), 2), "tail": res.get("tail", ""),
                     **(epoch_rate(res["lines"], pattern, zero, sizes["batch"]) if res["rc"] == 0 else {})}
        shutil.rmtree(work, ignore_errors=True)
    if "img_per_s" in out.get("emakit", {}) and "img_per_s" in out.get("timm", {}):
        out["emakit_over_timm"] = out["emakit"]["img_per_s"] / out["timm"]["img_per_s"]
    # ViT-B/16 with --fsdp on one process (torchrun: FSDP needs a process group)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_fsdp_", dir=logs))
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    # without --channels-last: FSDP2 refuses the channels-last conv weight of the patch embedding
    # ("FSDP does not support non-contiguous parameters yet"; a ViT gains nothing from it)
    vit = [f for f in _common(sizes, sizes["vit"]) if f != "--channels-last"]
    out["vit_fsdp_note"] = "ViT-B/16 --fsdp runs without --channels-last (FSDP2 refuses non-contiguous parameters)"
    cmd = [*torchrun, str(REPO / "train.py"), "--data-dir", data, *vit, "--fsdp", "--output", str(work)]
    res = run_logged(cmd, logs / "train_emakit_vit_fsdp.log", args.timeout)
    out["emakit_vit_fsdp"] = {"rc": res["rc"], "wall_s": round(res.get("wall", 0), 2), "tail": res.get("tail", ""),
                              **(epoch_rate(res["lines"], _OURS_STEP, False, sizes["batch"])
                                 if res["rc"] == 0 else {})}
    shutil.rmtree(work, ignore_errors=True)
    for v in out.values():
        if isinstance(v, dict):
            v.pop("lines", None)
    return out


# ----------------------------------------------------------------------------- 4b. synthetic input
def _step_timer(model_name: str, sizes: dict, variant: str) -> dict:
    """Median ms of one training step on an in-memory batch (compute-bound): emakit's (fused SGD,
    ModelEMA) or timm's train.py way (timm's SGD, ModelEmaV3)."""
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    from emakit import ModelEMA

    dev = torch.device(sizes["device"])
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000 if dev.type == "cuda" else 10).to(dev)
    model = model.to(memory_format=torch.channels_last)
    if variant == "emakit":
        opt = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=2e-5, momentum=0.9,
                                  **({"fused": True} if dev.type == "cuda" else {}))
        ema = ModelEMA(model, decay=0.9998, copy_first=True)
        update = ema.update
    else:
        from timm.utils import ModelEmaV3

        opt = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=2e-5, momentum=0.9)
        ema3 = ModelEmaV3(model, decay=0.9998)
        counter = [0]

        def update(m):  # noqa: ANN001
            counter[0] += 1
            ema3.update(m, step=counter[0])
    n = sizes["batch"]
    x = torch.randn(n, 3, sizes["img_size"], sizes["img_size"], device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = dev.type == "cuda"
    times = []
    for i in range(sizes["synthetic_steps"] + 3):
        sync(sizes["device"])
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update(model)
        sync(sizes["device"])
        if i >= 3:
            times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1e3
    return {"step_ms": ms, "img_per_s": n / ms * 1e3}


def step_synthetic(args: argparse.Namespace, sizes: dict) -> dict:
    out = {}
    for model in (sizes["model"], sizes["vit"]):
        out[model] = {v: _step_timer(model, sizes, v) for v in ("emakit", "timm")}
        out[model]["emakit_over_timm"] = out[model]["emakit"]["img_per_s"] / out[model]["timm"]["img_per_s"]
    return out


# ----------------------------------------------------------------------------- 5. the EMA update
def step_ema(args: argparse.Namespace, sizes: dict) -> dict:
    import timm
    import torch

    from emakit import ModelEMA

    dev = torch.device(sizes["device"])
    report = load(Path(args.json)).get("synthetic", {})
    out = {}
    for name in (sizes["model"], sizes["vit"]):
        model = timm.create_model(name).to(dev)
        ema = ModelEMA(model, decay=0.9998)
        state = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        nbytes = sum(t.numel() * t.element_size() for t in state)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)
        copies, updates = [], []
        for _ in range(sizes["ema_rounds"]):
            sync(sizes["device"])
            t = time.perf_counter()
            dst.copy_(src)
            sync(sizes["device"])
            copies.append(time.perf_counter() - t)
            t = time.perf_counter()
            ema.update(model)
            sync(sizes["device"])
            updates.append(time.perf_counter() - t)
        copy_s = statistics.median(copies)
        bandwidth = 2 * nbytes / copy_s  # a copy reads and writes
        floor_ms = 3 * nbytes / bandwidth * 1e3
        update_ms = statistics.median(updates) * 1e3
        step_ms = report.get(name, {}).get("emakit", {}).get("step_ms")
        out[name] = {"state_mib": nbytes / 2**20, "update_ms": update_ms, "copy_gb_per_s": bandwidth / 1e9,
                     "floor_ms": floor_ms, "update_over_floor": update_ms / floor_ms, "step_ms": step_ms,
                     "update_share_of_step": (update_ms / step_ms) if step_ms else None,
                     "goal_share": 0.005}
        del model, ema, src, dst
    return out


STEPS = {"env": step_env, "pytest": step_pytest, "data": step_data, "throughput": step_throughput,
         "synthetic": step_synthetic, "ema": step_ema}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=list(STEPS))
    p.add_argument("--json", required=True, help="the report to add this step's figures to")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes")
    p.add_argument("--dir", default=None, help="data folder (data, throughput)")
    p.add_argument("--logs", default=None, help="folder for the trainers' logs (throughput)")
    p.add_argument("--timm-train", default=None, help="timm's train.py (throughput)")
    p.add_argument("--log", default=None, help="pytest's log (pytest)")
    p.add_argument("--rc", type=int, default=None, help="pytest's exit status (pytest)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per trainer run (default: 150)")
    args = p.parse_args()
    sizes = DRY if args.dry_run else FULL
    start = time.perf_counter()
    try:
        result = STEPS[args.step](args, sizes)
        ok = True
    except Exception as e:  # noqa: BLE001 - a failed step is recorded, the script goes on
        import traceback

        result = {"error": f"{type(e).__name__}: {e}", "traceback_tail": traceback.format_exc()[-2000:]}
        ok = False
    if isinstance(result, dict):
        result["step_seconds"] = round(time.perf_counter() - start, 2)
    record(Path(args.json), args.step, result)
    print(f"gpu_check.py {args.step}: {'ok' if ok else 'FAILED: ' + result['error']} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
