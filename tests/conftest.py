"""Shared fixtures: a tiny generated ImageFolder (JPEG files on disk) and train.py runners.

The ImageFolder has three classes whose images differ in their dominant colour, 32 px,
so a tiny timm ``test_resnet`` learns something in a few steps.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `import train` (the CLI at the repository root)

CLASSES = ("ant", "bee", "cat")
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 5
# A fast training command: tiny timm model, 32 px, batch 8 -> 3 optimizer steps per epoch.
FAST_ARGS = ["--model", "test_resnet", "--img-size", "32", "-b", "8", "--no-progress",
             "--log-interval", "1000", "--workers", "0", "--model-ema", "--model-ema-half-life", "2ba"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (train.py / validate.py / torchrun)")


def make_image_folder(root: Path, classes: tuple[str, ...] = CLASSES, train_per_class: int = TRAIN_PER_CLASS,
                      val_per_class: int = VAL_PER_CLASS, size: int = 32, seed: int = 0,
                      val_name: str = "val") -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/<val_name>/<class>/*.jpg``; class c is
    noise plus a bright channel c."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), (val_name, val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += np.uint8(150)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention ImageFolder shared by the whole session (copy it to modify)."""
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture
def image_folder_copy(image_folder: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`image_folder` that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(image_folder, dst)
    return dst


def count_images(split_dir: Path) -> int:
    """Image files under a split folder, counted independently of the code under test."""
    return sum(1 for p in split_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


@pytest.fixture
def run_train(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """Call ``train.main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    import train

    def _run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = train.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: one thread each, the repository importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture
def train_subprocess() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python train.py argv`` as a child process (for exit codes and signals)."""
    def _run(argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, argv)], cwd=str(REPO),
                              env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)

    return _run
