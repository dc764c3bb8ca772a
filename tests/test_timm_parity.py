"""timm's commands where emakit differed (issue 21, first part): ``--data-dir``, ``--amp`` on
the CPU, and RandAugment's 0-bit posterize under Pillow 13."""
from __future__ import annotations

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps

from conftest import FAST_ARGS, IDENTITY_EVAL_FLAGS

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


# --------------------------------------------------------------------------- --data-dir
def test_data_dir_is_the_positional_path_for_train_and_validate(tmp_path):
    from emakit.training import UsageError
    from emakit.training.config import parse_settings
    from emakit.training.validate_config import parse_args

    assert parse_settings(["--data-dir", str(tmp_path)]).data.path == str(tmp_path)
    assert parse_settings(["--data-dir", str(tmp_path)]).model.name == "resnet50"  # timm's defaults, not the preset
    assert parse_settings([str(tmp_path), "--data-dir", str(tmp_path)]).data.path == str(tmp_path)
    assert parse_args(["--data-dir", str(tmp_path), "--checkpoint", "c.pth"]).data.root == str(tmp_path)
    with pytest.raises(UsageError, match="two data roots"):
        parse_settings([str(tmp_path / "a"), "--data-dir", str(tmp_path / "b")])


@pytest.mark.slow
def test_a_timm_command_with_data_dir_trains_and_validates(run_train, tmp_path, image_folder, capsys):
    import validate

    out = tmp_path / "out"
    code, _, err = run_train(["--data-dir", str(image_folder), *FAST_ARGS, "--epochs", "1", "--output", str(out),
                              "--experiment", "run", *IDENTITY_EVAL_FLAGS])
    assert code == 0, err
    capsys.readouterr()
    assert validate.main(["--data-dir", str(image_folder), "--checkpoint", str(out / "run" / "last.pth.tar"),
                          "--use-ema", "--no-progress", *IDENTITY_EVAL_FLAGS]) == 0
    assert '"weights": "ema"' in capsys.readouterr().out


# --------------------------------------------------------------------------- --amp on the CPU
def test_float16_on_the_cpu_has_no_gradient_scaler_as_in_timm():
    from emakit.training.build import build_amp
    from emakit.training.settings import RunSettings

    cpu = build_amp(RunSettings(amp=True, amp_dtype="float16"), torch.device("cpu"))
    assert cpu.enabled and cpu.dtype == torch.float16 and cpu.scaler is None
    assert build_amp(RunSettings(amp=True, amp_dtype="bfloat16"), torch.device("cpu")).scaler is None


@pytest.mark.slow
def test_amp_float16_on_the_cpu_trains_with_the_fused_optimizer(run_train, tmp_path, image_folder):
    """Before: torch's fused CPU SGD with a GradScaler made the weights non-finite one step
    after the scaler's first skipped step, and the run stopped as diverged (exit 3)."""
    out = tmp_path / "out"
    code, _, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "2", "--amp", "--lr", "1e-5",
                              "--output", str(out), "--experiment", "run"])
    assert code == 0, err
    log = (out / "run" / "train.log").read_text()
    assert "AMP: autocast float16 on cpu" in log and "gradient scaler" not in log
    ckpt = torch.load(out / "run" / "last.pth.tar", weights_only=True)
    assert ckpt["amp_scaler"] is None
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())


# --------------------------------------------------------------------------- RandAugment under Pillow 13
def test_zero_bit_posterize_is_a_black_image():
    from emakit.training.data import posterize

    img = Image.fromarray(np.random.default_rng(0).integers(1, 255, (8, 8, 3), dtype=np.uint8))
    black = posterize(img, 0)
    assert black.mode == img.mode and black.size == img.size and not np.asarray(black).any()
    assert np.array_equal(np.asarray(posterize(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    assert posterize(img, 8) is img
    if PILLOW_MAJOR >= 13:  # what timm's own op meets: Pillow 13 refuses 0 bits
        with pytest.raises(ValueError, match="bits must be"):
            ImageOps.posterize(img, 0)


def test_rand_augment_inc1_meets_zero_bit_posterize_without_error(monkeypatch):
    """timm's rand-m9-mstd0.5-inc1 draws a 0-bit posterize in about 0.2% of its op calls;
    enough images with a fixed seed reach it (counted), and every image comes out."""
    import random

    from emakit.training import data
    from emakit.training.settings import AugmentConfig

    calls = []
    real = data.posterize
    monkeypatch.setattr(data, "posterize", lambda img, bits, **kw: (calls.append(bits), real(img, bits, **kw))[1])
    config = {"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0}
    train_tf, _ = data.build_transforms(config, AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.0))
    random.seed(0)
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    for _ in range(6000):
        out = train_tf(img)
        assert out.shape == (3, 16, 16)
    assert 0 in calls, f"no 0-bit posterize in {len(calls)} posterize calls"


# --------------------------------------------------------------------------- --pretrained
def test_pretrained_asks_timm_for_the_models_weights(run_train, tmp_path, image_folder, monkeypatch):
    """``--pretrained`` alone loads the model's pretrained weights as timm does: timm's
    ``load_pretrained`` is called with the model's hub config (here recorded and answered
    with the freshly initialised weights, since tests never reach the hub)."""
    from timm.models import _builder

    asked = []
    monkeypatch.setattr(_builder, "load_pretrained", lambda model, pretrained_cfg=None, **kw: asked.append(
        (type(model).__name__, dict(pretrained_cfg or {}))))
    code, _, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "1", "--pretrained",
                              "--output", str(tmp_path / "out"), "--experiment", "run"])
    assert code == 0, err
    assert len(asked) == 1 and asked[0][1].get("hf_hub_id", "").startswith("timm/test_resnet")


@pytest.mark.slow
def test_pretrained_weights_out_of_reach_are_one_line(train_subprocess, tmp_path, image_folder):
    """Offline with an empty hub cache: the hub is asked, and its failure is one line naming
    the model and the way out (--pretrained-path), exit 2, no run folder."""
    proc = train_subprocess([str(image_folder), *FAST_ARGS, "--epochs", "1", "--pretrained", "--output",
                             str(tmp_path / "out"), "--experiment", "run"], HF_HUB_OFFLINE="1",
                            HF_HOME=str(tmp_path / "hf"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "pretrained weights of test_resnet" in lines[0] and "--pretrained-path" in lines[0]
    assert not (tmp_path / "out" / "run").exists()
