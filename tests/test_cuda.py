"""The checks that need CUDA (``pytest -m cuda``; bench/gpu_check.sh runs them first). Every
test here skips where CUDA is absent, so they never run on the CPU-only CI; they are written
to pass on one GPU in about a minute all together (tiny timm models, 32-px images).

- the device side of DeviceLoader (normalisation, photometric ops, erasing) equals the CPU;
- --amp float16 with the fused optimizer and the GradScaler skips exactly the steps timm's
  train.py skips (its foreach SGD + NativeScaler) and never diverges;
- bf16 autocast with float32 master EMA weights moves the EMA;
- ModelEMA.swapped_into restores a CUDA model bit-exactly;
- train.py under torchrun on one process with NCCL: a plain run and an --fsdp run, each with a
  DCP save and a resume from it; an in-process DDP step over a 1-process NCCL group;
- train.py --torchcompile with the EMA.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs these)")]
CUDA = torch.device("cuda")


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _tiny_dataset(n: int = 16):
    import numpy as np
    from PIL import Image

    from emakit.training.data import ImageListDataset

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize((40, 48), Image.BICUBIC)
              for _ in range(n)]
    return ImageListDataset(images, [i % 2 for i in range(n)])


def test_device_loader_cuda_equals_cpu():
    """The same uint8 batches (and drawn photometric parameters) prepared on CUDA and on the CPU."""
    from timm.data import create_transform
    from timm.data.random_erasing import RandomErasing

    from emakit.training.data import DeviceLoader, build_train_loader, set_epoch
    from emakit.training.distributed import DistInfo
    from emakit.training.photometric import split_photometric

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ds = _tiny_dataset()
    ds.transform = split_photometric(create_transform(32, is_training=True, color_jitter=(0.4, 0.4, 0.4, 0.1),
                                                      grayscale_prob=0.3, use_prefetcher=True))
    outs = {}
    for key, dev in (("cpu", "cpu"), ("device", CUDA.type)):
        loader = build_train_loader(ds, 8, DistInfo(), seed=1, workers=0, pin_memory=dev == "cuda")
        erasing = RandomErasing(0.5, mode="const", device=dev)
        wrapped = DeviceLoader(loader, torch.device(dev), mean, std, random_erasing=erasing)
        set_epoch(wrapped, 0, 1)
        random.seed(0)  # the erased boxes come from python's random
        outs[key] = [x.cpu() for x, _ in wrapped]
    for a, b in zip(outs["cpu"], outs["device"]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=0)
    assert len(outs["cpu"]) == 2


def _models(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    a = timm.create_model("test_resnet", num_classes=4).to(CUDA)
    b = timm.create_model("test_resnet", num_classes=4).to(CUDA)
    b.load_state_dict(a.state_dict())
    return a, b


def test_fp16_scaler_skips_the_steps_timm_skips():
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler

    from emakit.training.build import build_amp, build_optimizer
    from emakit.training.engine import TrainOptions, _forward_backward, optimizer_step
    from emakit.training.settings import OptimSettings, RunSettings

    ours, theirs = _models()
    opt_ours = build_optimizer(OptimSettings(), ours, 0.05)
    assert any(g.get("fused") for g in opt_ours.param_groups), "the fused kernel was not used"
    opts = TrainOptions(amp=build_amp(RunSettings(amp=True, amp_dtype="float16"), CUDA))
    assert opts.amp.scaler is not None
    opt_theirs = create_optimizer_v2(theirs, opt="sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)
    scaler = NativeScaler("cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator(device="cuda").manual_seed(0)
    skipped_ours, skipped_theirs = [], []
    for step in range(12):
        x = torch.randn(8, 3, 32, 32, device=CUDA, generator=g)
        if step in (3, 4, 9):
            x = x * 6e4  # overflows float16 activations: inf/nan gradients
        y = torch.randint(0, 4, (8,), device=CUDA, generator=g)
        _forward_backward(ours, x, y, loss_fn, opts, CUDA, 1, True)
        if not optimizer_step(ours, opt_ours, opts):
            skipped_ours.append(step)
        opt_ours.zero_grad(set_to_none=True)
        before = scaler._scaler.get_scale()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(theirs(x), y)
        scaler(loss, opt_theirs)
        if scaler._scaler.get_scale() < before:
            skipped_theirs.append(step)
        opt_theirs.zero_grad(set_to_none=True)
    assert skipped_ours == skipped_theirs and skipped_ours, (skipped_ours, skipped_theirs)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3, msg=name)


def test_bf16_autocast_moves_fp32_ema():
    from emakit import ModelEMA

    model, _ = _models()
    model = model.to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5, dtype=torch.float32)
    start = {k: v.clone() for k, v in ema.state_dict_ema().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(torch.randn(4, 3, 32, 32, device=CUDA, dtype=torch.bfloat16)).float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    moved = [k for k, v in ema.state_dict_ema().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved, "the float32 EMA did not move"
    assert all(v.dtype == torch.float32 for v in ema.state_dict_ema().values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in ema.state_dict_ema().values() if v.is_floating_point())


def test_swapped_into_is_bit_exact_on_cuda():
    from emakit import ModelEMA

    for dtype in (torch.float32, torch.bfloat16):
        model, _ = _models()
        model = model.to(dtype)
        ema = ModelEMA(model, decay=0.9, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with ema.swapped_into(model) as m:
            m(torch.randn(2, 3, 32, 32, device=CUDA, dtype=dtype))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (dtype, k)


def test_ddp_step_over_one_process_nccl_group():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from emakit import ModelEMA

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model, _ = _models()
        ddp = DistributedDataParallel(model, device_ids=[CUDA.index or 0])
        ema = ModelEMA(ddp, decay=0.5)
        ddp(torch.randn(4, 3, 32, 32, device=CUDA)).sum().backward()
        with torch.no_grad():
            for p in ddp.parameters():
                p.sub_(0.1 * p.grad)
        ema.update(ddp)
        assert list(ema.state_dict_ema()) == list(model.state_dict())  # unprefixed keys
    finally:
        dist.destroy_process_group()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(cwd))


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_torchrun_one_process_dcp_save_and_resume(tmp_path, image_folder, fsdp):
    out = tmp_path / "out"
    base = [*_torchrun(), "--standalone", "--nproc_per_node=1", str(REPO / "train.py"), str(image_folder),
            *FAST_ARGS, "--device", "cuda", "--checkpoint-format", "dcp", "--output", str(out),
            *(["--fsdp"] if fsdp else [])]
    first = _run([*base, "--epochs", "1", "--experiment", "a"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    if fsdp:
        assert "backend nccl" in first.stdout + first.stderr
    last = out / "a" / "last.dcp"
    assert last.is_dir()
    again = _run([*base, "--epochs", "2", "--experiment", "b", "--resume", str(last)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "b" / "last.dcp").is_dir()


def test_torch_compile_with_ema(tmp_path, image_folder):
    out = tmp_path / "out"
    run = _run([sys.executable, str(REPO / "train.py"), str(image_folder), *FAST_ARGS, "--device", "cuda",
                "--torchcompile", "inductor", "--epochs", "1", "--output", str(out), "--experiment", "c"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = torch.load(out / "c" / "last.pth.tar", map_location="cpu", weights_only=False)
    ema_keys = [k for k in ckpt if "ema" in k]
    assert ema_keys, list(ckpt)
