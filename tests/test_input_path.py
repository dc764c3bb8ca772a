"""The input path: persistent loader workers that still make every epoch a pure function of
(seed, epoch), and the GPU input path (uint8 batches normalised on the device), run here on
CPU tensors, which must give the same tensors as the CPU transform."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from emakit.training.data import (AugmentConfig, DeviceLoader, build_eval_loader, build_train_loader,
                                  build_transforms, device_random_erasing, load_image_folder, normalize_uint8,
                                  set_epoch)
from emakit.training.distributed import DistInfo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG = {"input_size": (3, 24, 24), "interpolation": "bilinear", "mean": MEAN, "std": STD, "crop_pct": 0.875}
AUG = AugmentConfig(color_jitter=0.4, hflip=0.5)  # random crop, flip and colour jitter: all RNG-driven


def _splits(image_folder, uint8: bool):
    data = load_image_folder(str(image_folder))
    data.train.transform, data.val.transform = build_transforms(CONFIG, AUG, uint8=uint8)
    return data


def _epoch(loader, epoch: int) -> list[torch.Tensor]:
    set_epoch(loader, epoch, seed=7)
    return [x.clone() for x, _ in loader]


# The GPU path resamples with torch's uint8 antialiased kernel (timm's crop draws): a few levels
# of 255 from Pillow's output where a small crop is upscaled (up to 5 seen on these 32 px images;
# 2 on downscaling crops, tests/test_decode.py). Bitwise equality is the CPU path's (test_validate_torchvision).
LEVELS = 6 / 255 / min(STD) + 1e-6


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (a - b).abs().max().item() <= LEVELS


def test_device_normalisation_of_uint8_gives_the_cpu_transforms_tensors_within_resampling_noise(image_folder):
    data_f, data_u = _splits(image_folder, False), _splits(image_folder, True)
    mean = torch.tensor(MEAN).view(-1, 1, 1)
    std = torch.tensor(STD).view(-1, 1, 1)
    raw, _ = data_u.val[0]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 24, 24)  # the worker stops at uint8
    for i in range(len(data_f.val)):
        expected, _ = data_f.val[i]
        got = normalize_uint8(data_u.val[i][0][None], mean, std)[0]
        assert got.dtype == torch.float32 and _close(got, expected), i


def test_device_loader_on_cpu_yields_the_cpu_loaders_batches_for_train_and_eval_within_resampling_noise(image_folder):
    data_f, data_u = _splits(image_folder, False), _splits(image_folder, True)
    cpu = torch.device("cpu")
    train_f = build_train_loader(data_f.train, 4, DistInfo(), seed=7)
    train_u = DeviceLoader(build_train_loader(data_u.train, 4, DistInfo(), seed=7), cpu, MEAN, STD)
    for epoch in (0, 1):
        a, b = _epoch(train_f, epoch), _epoch(train_u, epoch)
        assert len(a) == len(b) == len(train_u) and all(_close(x, y) for x, y in zip(a, b))
    eval_f = build_eval_loader(data_f.val, 4, DistInfo())
    eval_u = DeviceLoader(build_eval_loader(data_u.val, 4, DistInfo()), cpu, MEAN, STD)
    pairs = list(zip(eval_f, eval_u))
    assert len(pairs) == len(eval_u) > 1
    for (xa, ya), (xb, yb) in pairs:
        assert _close(xa, xb) and torch.equal(ya, yb)


def test_device_random_erasing_erases_on_the_device_loader_only_when_asked(image_folder):
    data_u = _splits(image_folder, True)
    cpu = torch.device("cpu")
    assert device_random_erasing(AugmentConfig(re_prob=0.0), cpu) is None
    plain = DeviceLoader(build_eval_loader(data_u.val, 4, DistInfo()), cpu, MEAN, STD)
    erased = DeviceLoader(build_eval_loader(data_u.val, 4, DistInfo()), cpu, MEAN, STD,
                          random_erasing=device_random_erasing(AugmentConfig(re_prob=1.0, re_mode="const"), cpu))
    for (xa, _), (xb, _) in zip(plain, erased):
        changed = (xa != xb).any(dim=(1, 2, 3))
        assert changed.all()  # probability 1: every image has an erased box...
        assert ((xa == xb).flatten(1).float().mean(dim=1) > 0.5).all()  # ...the rest of it is untouched


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_workers_reseed_every_epoch_as_a_fresh_loader_would(image_folder, workers):
    """What --resume needs: epoch 1 of a loader whose workers lived through epoch 0 equals
    epoch 1 of a new loader (a resumed run), with or without workers; and the batches do not
    depend on the worker count."""
    data = _splits(image_folder, False)
    long_lived = build_train_loader(data.train, 4, DistInfo(), seed=7, workers=workers)
    assert long_lived.persistent_workers == (workers > 0)
    first, second = _epoch(long_lived, 0), _epoch(long_lived, 1)
    resumed = _epoch(build_train_loader(data.train, 4, DistInfo(), seed=7, workers=workers), 1)
    in_process = _epoch(build_train_loader(data.train, 4, DistInfo(), seed=7, workers=0), 1)
    assert all(torch.equal(x, y) for x, y in zip(second, resumed)) and len(second) == len(resumed) > 1
    assert all(torch.equal(x, y) for x, y in zip(second, in_process))
    assert not all(torch.equal(x, y) for x, y in zip(first, second))  # epochs differ


def test_loading_in_the_main_process_leaves_the_callers_random_streams_alone(image_folder):
    data = _splits(image_folder, False)
    loader = build_train_loader(data.train, 4, DistInfo(), seed=7)
    set_epoch(loader, 0, seed=7)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
