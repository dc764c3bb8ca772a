"""Shared fixtures: a tiny generated ImageFolder (JPEG files on disk) and train.py runners.

The ImageFolder has three classes whose images differ in their dominant colour, 32 px,
so a tiny timm ``test_resnet`` learns something in a few steps. ``image_folder_many`` has
ten classes, so top-5 is not 100% by construction. ``load_images`` / ``plain_eval`` score
weights by a loop written here; ``colour_pixels`` finds plotted lines in a PNG.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:  # the annotations only: torch is imported where a helper needs it
    import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `import train` (the CLI at the repository root)

CLASSES = ("ant", "bee", "cat")
# Ten classes: top-5 of a barely trained model is neither top-1 nor 100%.
MANY_CLASSES = tuple(f"class{i}" for i in range(10))
# The eval transform is the identity for 32 px images with these flags (train.py and validate.py).
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IDENTITY_EVAL_FLAGS = ["--img-size", "32", "--crop-pct", "1.0", "--mean", *map(str, MEAN), "--std", *map(str, STD)]
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 5
# A fast training command: tiny timm model, 32 px, batch 8 -> 3 optimizer steps per epoch.
FAST_ARGS = ["--model", "test_resnet", "--img-size", "32", "-b", "8", "--no-progress",
             "--log-interval", "1000", "--workers", "0", "--model-ema", "--model-ema-half-life", "2ba"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (train.py / validate.py / torchrun)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device, skipped without one (bench/gpu_check.sh runs them)")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core (pytest -n):
        import torch                            # one compute thread each, as every child process has

        torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def image_folder_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ten-class ImageFolder (3 train / 3 val images per class) for top-5 checks."""
    return make_image_folder(tmp_path_factory.mktemp("imagefolder10"), classes=MANY_CLASSES,
                             train_per_class=3, val_per_class=3, seed=1)


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


def load_images(split_dir: Path, classes: tuple[str, ...] = CLASSES) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Every image of ``split_dir`` as a (MEAN, STD)-normalised float batch, labels by sorted
    class name, read with PIL and converted by hand (independent of the code under test)."""
    import torch
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(sorted(classes)):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            xs.append((torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1))
                      / torch.tensor(STD).view(3, 1, 1))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def topk_percent(logits: "torch.Tensor", labels: "torch.Tensor", k: int) -> float:
    """Percentage of rows whose label is among the ``k`` largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).sum().item() / len(labels)


def plain_eval(state_dict: dict, images: "torch.Tensor", labels: "torch.Tensor", arch: str = "test_resnet") -> dict:
    """Top-1/top-5 (%) and mean cross-entropy of ``state_dict`` by a loop written here
    (fresh timm model, float64 logits)."""
    import timm
    import torch

    model = timm.create_model(arch, num_classes=int(state_dict["fc.weight"].shape[0]))
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(images).double()
    return {"top1": topk_percent(logits, labels, 1), "top5": topk_percent(logits, labels, 5),
            "loss": torch.nn.functional.cross_entropy(logits, labels).item(), "samples": len(labels)}


def colour_pixels(png: Path, colour: str, box: tuple[int, int, int, int] | None = None,
                  tol: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel coordinates in ``png`` (inside ``box`` = left, top, right, bottom when
    given) whose RGB is within ``tol`` per channel of the hex ``colour``, e.g. ``"#1f77b4"``."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    hit = (np.abs(rgb - target) <= tol).all(axis=2)
    if box is not None:
        mask = np.zeros_like(hit)
        mask[box[1]:box[3], box[0]:box[2]] = True
        hit &= mask
    ys, xs = np.nonzero(hit)
    return xs, ys


def densest_row(png: Path, colour: str, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """(row, pixel count) of the image row inside ``box`` with the most ``colour`` pixels:
    a horizontal plotted line is a long run there, a legend swatch or text a short one."""
    _, ys = colour_pixels(png, colour, box)
    if len(ys) == 0:
        return -1, 0
    rows, counts = np.unique(ys, return_counts=True)
    return int(rows[counts.argmax()]), int(counts.max())


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
