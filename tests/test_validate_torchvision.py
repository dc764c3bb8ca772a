"""validate.py on a torchvision-references checkpoint evaluates as torchvision does (issue 8, §7).

torchvision's ``references/classification/train.py`` saves its ``argparse.Namespace`` as
``args`` and evaluates with ``presets.ClassificationPresetEval``: Resize(val_resize_size,
interpolation) -> CenterCrop(val_crop_size) -> PILToTensor -> ConvertImageDtype(float) ->
Normalize(ImageNet mean/std). That pipeline is rebuilt here from torchvision's transforms
and compared pixel for pixel with the transform validate.py resolves.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
T = pytest.importorskip("torchvision.transforms")

import validate  # noqa: E402
from emakit.training.data import AugmentConfig, build_transforms  # noqa: E402
from emakit.training.validation import _train_args, eval_data_config  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_namespace(crop: int, resize: int, interpolation: str = "bilinear", **extra) -> argparse.Namespace:
    """The fields of torchvision's get_args_parser() that matter here, as it pickles them."""
    return argparse.Namespace(model="test_resnet", val_crop_size=crop, val_resize_size=resize,
                              train_crop_size=crop, interpolation=interpolation, lr=0.5, epochs=600,
                              model_ema=True, model_ema_decay=0.99998, **extra)


def torchvision_eval(crop: int, resize: int, interpolation: str) -> T.Compose:
    """presets.ClassificationPresetEval (PIL backend), rebuilt from torchvision's own transforms."""
    mode = T.InterpolationMode(interpolation)
    return T.Compose([T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(crop), T.PILToTensor(),
                      T.ConvertImageDtype(torch.float), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("crop, resize, interpolation", [
    (224, 232, "bilinear"),   # torchvision's current recipe (resnet50 V2 weights)
    (224, 256, "bilinear"),   # the classic 0.875 crop
    (176, 232, "bicubic"),
    (14, 25, "bilinear"),     # floor(14 / (14 / 25)) == 24 in floating point: needs the nudge
    (64, 64, "nearest"),
])
def test_the_resolved_transform_is_torchvisions(crop, resize, interpolation):
    model = timm.create_model("test_resnet", num_classes=3)
    ckpt = {"model": model.state_dict(), "epoch": 599, "args": torchvision_namespace(crop, resize, interpolation)}
    config = eval_data_config(model, _train_args(ckpt), {})
    assert config["input_size"] == (3, crop, crop)
    assert config["interpolation"] == interpolation
    assert tuple(config["mean"]) == IMAGENET_MEAN and tuple(config["std"]) == IMAGENET_STD
    _, ours = build_transforms(config, AugmentConfig())
    resize_step = next(t for t in ours.transforms if isinstance(t, T.Resize))
    assert resize_step.size == resize  # the shorter side, as torchvision
    rng = np.random.default_rng(crop + resize)
    from PIL import Image

    for w, h in ((300, 251), (97, 160)):
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")
        expected = torchvision_eval(crop, resize, interpolation)(img)
        got = ours(img)
        assert got.shape == expected.shape == (3, crop, crop)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_flags_still_override_a_torchvision_checkpoint():
    model = timm.create_model("test_resnet", num_classes=3)
    ckpt = {"model": model.state_dict(), "args": torchvision_namespace(224, 256)}
    config = eval_data_config(model, _train_args(ckpt), {"img_size": 160, "interpolation": "bicubic"})
    assert config["input_size"] == (3, 160, 160) and config["interpolation"] == "bicubic"


def test_a_timm_checkpoint_is_not_read_as_torchvisions():
    model = timm.create_model("test_resnet", num_classes=3)
    ckpt = {"state_dict": model.state_dict(),
            "args": argparse.Namespace(model="test_resnet", img_size=48, crop_pct=0.9, interpolation="bicubic")}
    config = eval_data_config(model, _train_args(ckpt), {})
    assert config["input_size"] == (3, 48, 48) and config["crop_pct"] == 0.9
    assert tuple(config["mean"]) == tuple(model.pretrained_cfg["mean"])  # the model's, not forced to ImageNet


@pytest.mark.slow
def test_validate_py_reports_torchvisions_eval_settings(tmp_path, image_folder, capsys):
    model = timm.create_model("test_resnet", num_classes=3)
    ema = {"module." + k: v for k, v in model.state_dict().items()}
    ema["n_averaged"] = torch.tensor(100)
    path = tmp_path / "model_599.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "lr_scheduler": {}, "epoch": 599,
                "args": torchvision_namespace(28, 32, "bicubic")}, path)
    code = validate.main([str(image_folder), "--checkpoint", str(path), "--weights", "both", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [r["weights"] for r in records] == ["raw", "ema"]
    for r in records:
        assert (r["img_size"], r["interpolation"]) == (28, "bicubic")
        assert r["crop_pct"] == pytest.approx(28 / 32)
        assert r["samples"] == 15
