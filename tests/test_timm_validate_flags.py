"""timm's validate.py flags in emakit's validate.py: each one's default is timm's, and each
changes the numbers as timm's validate.py does.

The expected numbers come from loops written here (fresh timm model, PIL -> tensor by hand),
timm's own ``RealLabelsImagenet`` and scikit-learn, never from the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLASSES, MEAN, STD, load_images, make_image_folder, plain_eval, topk_percent

timm = pytest.importorskip("timm")

import validate  # noqa: E402  (the CLI at the repository root; conftest puts it on sys.path)
from emakit.checkpoint import save_checkpoint  # noqa: E402

DATA_FLAGS = ["--img-size", "32", "--crop-pct", "1.0", "--mean", *map(str, MEAN), "--std", *map(str, STD),
              "--no-progress"]
TRAIN_ARGS = {"model": "test_resnet", "img_size": 32, "crop_pct": 1.0, "mean": list(MEAN), "std": list(STD),
              "interpolation": "bilinear"}


def _weights(seed: int, num_classes: int = 3, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=num_classes, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else t + 0.3 * torch.randn(t.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _checkpoint(path: Path, weights: dict, num_classes: int = 3, **args) -> Path:
    save_checkpoint({"epoch": 1, "arch": "test_resnet", "state_dict": weights,
                     "args": {**TRAIN_ARGS, "num_classes": num_classes, **args}}, path)
    return path


def _run(capsys, argv: list) -> tuple[int, list[dict], str]:
    capsys.readouterr()
    code = validate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _logits(weights: dict, images: torch.Tensor, num_classes: int = 3, **kwargs) -> torch.Tensor:
    model = timm.create_model("test_resnet", num_classes=num_classes, **kwargs)
    model.load_state_dict(weights)
    with torch.no_grad():
        return model.eval()(images).double()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("vflags"), train_per_class=1, val_per_class=6)


@pytest.fixture(scope="module")
def val_batch(data):
    return load_images(data / "val")


# --------------------------------------------------------------------------- parsing
# timm's validate.py (main branch) defaults of the flags emakit added, as timm declares them.
TIMM_DEFAULTS = {
    "num_samples": None, "input_img_mode": None, "crop_mode": None, "crop_border_pixels": None,
    "use_train_size": False, "pin_mem": False, "no_prefetcher": False, "real_labels": "", "valid_labels": "",
    "seed": 42, "log_freq": 10, "tf_preprocessing": False, "naflex_loader": False, "naflex_max_seq_len": 576,
    "model": "dpn92", "pretrained": False, "gp": None, "in_chans": None, "input_size": None, "model_kwargs": {},
    "model_dtype": None, "fast_norm": False, "reparam": False, "test_pool": False, "torchcompile": None,
    "torchcompile_mode": None, "torchscript": False, "aot_autograd": False, "fuser": "", "num_gpu": 1,
    "retry": False, "metrics_avg": None,
}
# Where emakit's default differs on purpose (docs/TIMM_DIFFERENCES.md): the model comes from the
# checkpoint; a file name given as '' in timm is None here (both: off).
DIFFERS = {"model": None, "real_labels": None, "valid_labels": None}


def test_every_added_flag_parses_with_timms_default():
    from emakit.training.validate_config import build_parser

    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for dest, timm_default in TIMM_DEFAULTS.items():  # the dests are timm's (args.yaml keys)
        assert by_dest[dest].default == DIFFERS.get(dest, timm_default), dest
    assert {"-m", "--model"} <= set(by_dest["model"].option_strings)


def test_timm_flag_values_reach_the_settings():
    from emakit.training.validate_config import parse_args

    s = parse_args(["-m", "test_resnet", "--model-kwargs", "drop_rate=0.25", "act_layer=relu", "--gp", "max",
                    "--input-size", "1", "40", "40", "--model-dtype", "bfloat16", "--num-samples", "5", "--seed", "3",
                    "--crop-mode", "squash", "--crop-border-pixels", "2", "--use-train-size", "--pin-mem",
                    "--no-prefetcher", "--log-freq", "2", "--retry", "--metrics-avg", "macro", "--reparam",
                    "--test-pool", "--torchcompile", "--torchcompile-mode", "reduce-overhead", "--checkpoint", "c"])
    w, d, r = s.weights, s.data, s.runtime
    assert w.model == "test_resnet" and dict(w.model_kwargs) == {"drop_rate": 0.25, "act_layer": "relu"}
    assert (w.gp, w.input_size, w.model_dtype, w.reparam, w.test_pool) == ("max", (1, 40, 40), "bfloat16", True, True)
    assert (d.num_samples, d.seed, d.crop_mode, d.crop_border_pixels) == (5, 3, "squash", 2)
    assert (d.use_train_size, d.pin_memory, d.prefetcher, d.log_freq) == (True, True, False, 2)
    assert (r.retry, r.compile_backend, r.compile_mode, s.outputs.metrics_avg) == (
        True, "inductor", "reduce-overhead", "macro")


@pytest.mark.parametrize("argv, flag", [
    (["--tf-preprocessing"], "--tf-preprocessing"), (["--torchscript"], "--torchscript"),
    (["--fuser", "te"], "--fuser"), (["--aot-autograd"], "--aot-autograd"), (["--num-gpu", "2"], "--num-gpu"),
    (["--naflex-loader"], "--naflex-loader"),
])
def test_refused_flags_are_one_line_exit_2_naming_the_flag_and_accepted_at_timms_default(capsys, data, argv, flag):
    code, records, err = _run(capsys, [data, "--checkpoint", "nope.pth", *argv])
    lines = err.strip().splitlines()
    assert code == 2 and not records and len(lines) == 1 and flag in lines[0] and "not supported" in lines[0]
    from emakit.training.validate_config import parse_args

    parse_args(["--checkpoint", "c", "--num-gpu", "1", "--fuser", "", "--naflex-max-seq-len", "256"])


def test_bad_model_kwargs_item_is_a_usage_error(capsys, data):
    code, _, err = _run(capsys, [data, "--checkpoint", "c", "--model-kwargs", "img_size"])
    assert code == 2 and "--model-kwargs" in err and "KEY=VALUE" in err


# --------------------------------------------------------------------------- model flags
def test_dash_m_and_model_kwargs_build_the_model_timm_builds(tmp_path, capsys, data, val_batch):
    images, labels = val_batch
    weights = _weights(1)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights, model="resnet18")  # -m overrides the stored name
    want = _logits(weights, images, act_layer="gelu")
    assert not torch.allclose(want, _logits(weights, images))  # the kwarg changes the numbers
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "-m", "test_resnet", "--model-kwargs",
                                      "act_layer=gelu", *DATA_FLAGS])
    assert code == 0, err
    assert rec["model"] == "test_resnet"
    assert rec["loss"] == pytest.approx(torch.nn.functional.cross_entropy(want, labels).item(), rel=1e-5)
    assert rec["top1"] == pytest.approx(topk_percent(want, labels, 1))


def test_gp_is_timms_global_pool(tmp_path, capsys, data, monkeypatch):
    ckpt = _checkpoint(tmp_path / "c.pth.tar", _weights(1))
    built = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: built.append(real_create(name, **kw)) or built[-1])
    code, _, err = _run(capsys, [data, "--checkpoint", ckpt, "--gp", "max", "--model-kwargs", "drop_rate=0.5",
                                 *DATA_FLAGS])
    assert code == 0, err
    model = built[-1]
    assert model.global_pool.pool_type == "max" and model.drop_rate == 0.5


def test_pretrained_without_checkpoint_asks_timm_for_the_pretrained_weights(tmp_path, capsys, data, val_batch,
                                                                              monkeypatch):
    images, labels = val_batch
    weights = _weights(4)
    local = tmp_path / "hub.pth"
    torch.save(weights, local)
    asked = []
    real_create = timm.create_model

    def create_model(name, **kwargs):  # the hub is out of reach: point pretrained=True at a local file
        asked.append(dict(kwargs))
        if kwargs.get("pretrained"):
            kwargs["pretrained_cfg_overlay"] = {"file": str(local), "num_classes": 3}
        return real_create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    code, (rec,), err = _run(capsys, [data, "--model", "test_resnet", "--num-classes", "3", "--pretrained",
                                      *DATA_FLAGS])
    assert code == 0, err
    assert any(a.get("pretrained") for a in asked)
    assert rec["weights"] == "pretrained"
    assert rec["top1"] == pytest.approx(plain_eval(weights, images, labels)["top1"])
    assert rec["loss"] == pytest.approx(plain_eval(weights, images, labels)["loss"], rel=1e-5)
    asked.clear()  # timm: no --checkpoint means the pretrained weights, --pretrained or not
    code, (implied,), err = _run(capsys, [data, "-m", "test_resnet", "--num-classes", "3", *DATA_FLAGS])
    assert code == 0 and any(a.get("pretrained") for a in asked) and implied["top1"] == rec["top1"]


def test_in_chans_1_reads_the_images_in_mode_L(tmp_path, capsys, data):
    weights = _weights(5, in_chans=1)
    ckpt = _checkpoint(tmp_path / "gray.pth.tar", weights)
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--in-chans", "1", "--img-size", "32",
                                      "--crop-pct", "1.0", "--mean", "0.5", "--std", "0.5", "--no-progress"])
    assert code == 0, err
    from PIL import Image

    xs, ys = [], []
    for label, name in enumerate(sorted(CLASSES)):
        for path in sorted((data / "val" / name).iterdir()):
            with Image.open(path) as im:
                px = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            xs.append((torch.from_numpy(px)[None] - 0.5) / 0.5)
            ys.append(label)
    logits = _logits(weights, torch.stack(xs), in_chans=1)
    labels = torch.tensor(ys)
    assert rec["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


# --------------------------------------------------------------------------- scoring flags
def test_valid_labels_scores_only_those_outputs(tmp_path, capsys, data, val_batch):
    images, labels = val_batch
    weights = _weights(2, num_classes=10)
    ckpt = _checkpoint(tmp_path / "ten.pth.tar", weights, num_classes=10)
    keep = [7, 2, 5]
    (tmp_path / "valid.txt").write_text("".join(f"{i}\n" for i in keep))
    logits = _logits(weights, images, num_classes=10)[:, keep]
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--valid-labels", tmp_path / "valid.txt",
                                      *DATA_FLAGS])
    assert code == 0, err
    assert rec["top1"] == pytest.approx(topk_percent(logits, labels, 1))
    assert rec["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    # without the file, 10 outputs and 3 labels: another number
    code, (full,), _ = _run(capsys, [data, "--checkpoint", ckpt, *DATA_FLAGS])
    assert code == 0 and full["loss"] != pytest.approx(rec["loss"], rel=1e-3)


def _imagenet_named_folder(root: Path, data: Path) -> Path:
    """The val images copied under ImageNet's validation names, class folders kept."""
    import shutil

    n = 0
    for name in sorted(CLASSES):
        folder = root / "val" / name
        folder.mkdir(parents=True)
        for path in sorted((data / "val" / name).iterdir()):
            n += 1
            shutil.copy(path, folder / f"ILSVRC2012_val_{n:08d}.JPEG")
    (root / "train").mkdir()
    shutil.copytree(data / "train", root / "train", dirs_exist_ok=True)
    return root


def test_real_labels_replace_top1_top5_as_timms_real_labels_imagenet(tmp_path, capsys, data, val_batch):
    from timm.data import RealLabelsImagenet

    images, labels = val_batch
    weights = _weights(3, num_classes=10)  # ReaL scores a top 5
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights, num_classes=10)
    root = _imagenet_named_folder(tmp_path / "imnet", data)
    logits = _logits(weights, images, num_classes=10)
    pred = logits.argmax(1).tolist()
    # odd images: their prediction and another class; even ones: another class, or none (left out)
    real = [[p, (p + 1) % 10] if i % 2 else ([] if i % 3 == 0 else [(p + 1) % 10]) for i, p in enumerate(pred)]
    (tmp_path / "real.json").write_text(json.dumps(real))
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(real))]
    ref = RealLabelsImagenet(names, real_json=str(tmp_path / "real.json"))
    ref.add_result(logits.float())
    code, (rec,), err = _run(capsys, [root, "--checkpoint", ckpt, "--real-labels", tmp_path / "real.json",
                                      *DATA_FLAGS])
    assert code == 0, err
    assert rec["top1"] == pytest.approx(ref.get_accuracy(k=1))
    assert rec["top1"] != pytest.approx(topk_percent(logits, labels, 1))  # the real labels changed it
    assert rec["top5"] == pytest.approx(ref.get_accuracy(k=5))


def test_metrics_avg_adds_sklearn_precision_recall_f1_after_top5_err(tmp_path, capsys, data, val_batch):
    from sklearn.metrics import f1_score, precision_score, recall_score

    images, labels = val_batch
    weights = _weights(6)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights)
    pred = _logits(weights, images).argmax(1).numpy()
    y = labels.numpy()
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--metrics-avg", "macro", *DATA_FLAGS,
                                      "--results-file", tmp_path / "r.csv"])
    assert code == 0, err
    assert rec["macro_precision"] == pytest.approx(round(100 * precision_score(y, pred, average="macro",
                                                                                zero_division=0), 4))
    assert rec["macro_recall"] == pytest.approx(round(100 * recall_score(y, pred, average="macro"), 4))
    assert rec["macro_f1_score"] == pytest.approx(round(100 * f1_score(y, pred, average="macro"), 4))
    keys = list(rec)
    assert keys.index("macro_precision") == keys.index("top5_err") + 1
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert "macro_f1_score" in header


def test_num_samples_evaluates_a_seeded_subset(tmp_path, capsys, data):
    ckpt = _checkpoint(tmp_path / "c.pth.tar", _weights(7))
    runs = [_run(capsys, [data, "--checkpoint", ckpt, "--num-samples", "7", "--seed", str(s), *DATA_FLAGS])
            for s in (1, 1, 2)]
    assert all(code == 0 and rec["samples"] == 7 for code, (rec,), _ in runs)
    assert runs[0][1][0]["loss"] == runs[1][1][0]["loss"]  # same seed, same subset
    code, (everything,), _ = _run(capsys, [data, "--checkpoint", ckpt, *DATA_FLAGS])
    assert everything["samples"] == 18


def test_crop_border_pixels_is_timms_eval_transform(tmp_path, capsys, data):
    from PIL import Image
    from timm.data import create_transform

    weights = _weights(8)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights)
    tf = create_transform(32, interpolation="bilinear", mean=MEAN, std=STD, crop_pct=1.0, crop_border_pixels=6)
    xs, ys = [], []
    for label, name in enumerate(sorted(CLASSES)):
        for path in sorted((data / "val" / name).iterdir()):
            with Image.open(path) as im:
                xs.append(tf(im.convert("RGB")))
            ys.append(label)
    logits, labels = _logits(weights, torch.stack(xs)), torch.tensor(ys)
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--crop-border-pixels", "6", *DATA_FLAGS])
    assert code == 0, err
    assert rec["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_use_train_size_picks_the_train_size_over_the_pretrained_test_size():
    from emakit.training.validation import eval_data_config

    model = timm.create_model("test_resnet", num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 48, 48), "test_input_size": (3, 64, 64)}
    assert eval_data_config(model, {}, {})["input_size"] == (3, 64, 64)  # timm's validate.py default
    assert eval_data_config(model, {}, {}, use_test_size=False)["input_size"] == (3, 48, 48)
    assert eval_data_config(model, {}, {"input_size": (3, 40, 40)})["input_size"] == (3, 40, 40)


def test_retry_halves_the_batch_after_out_of_memory_and_scores_the_same(tmp_path, capsys, data, val_batch,
                                                                       monkeypatch):
    from emakit.training import validation

    images, labels = val_batch
    weights = _weights(9)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights)
    real_evaluate, sizes = validation.evaluate_many, []

    def evaluate_many(targets, loader, *args, **kwargs):
        size = loader.batch_size
        sizes.append(size)
        if size > 6:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_evaluate(targets, loader, *args, **kwargs)

    monkeypatch.setattr(validation, "evaluate_many", evaluate_many)
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "-b", "16", "--retry", *DATA_FLAGS])
    assert code == 0, err
    assert sizes == [16, 12, 8, 6]  # timm's decay_batch_step
    assert rec["top1"] == pytest.approx(plain_eval(weights, images, labels)["top1"])
    with pytest.raises(RuntimeError, match="out of memory"):
        validate.main([str(data), "--checkpoint", str(ckpt), "-b", "16", *DATA_FLAGS])


def test_test_pool_and_reparam_go_through_timm(tmp_path, capsys, data, monkeypatch):
    import timm.layers
    import timm.utils

    ckpt = _checkpoint(tmp_path / "c.pth.tar", _weights(10))
    calls = []
    real_pool, real_reparam = timm.layers.apply_test_time_pool, timm.utils.reparameterize_model
    monkeypatch.setattr(timm.layers, "apply_test_time_pool",
                        lambda m, c, *a: calls.append(("pool", tuple(c["input_size"]))) or real_pool(m, c, *a))
    monkeypatch.setattr(timm.utils, "reparameterize_model",
                        lambda m, *a, **k: calls.append(("reparam",)) or real_reparam(m, *a, **k))
    flags = ["--crop-pct", "0.875", "--mean", *map(str, MEAN), "--std", *map(str, STD), "--no-progress"]
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--test-pool", "--reparam", "--img-size", "192",
                                      *flags])
    assert code == 0, err
    assert calls == [("reparam",), ("pool", (3, 192, 192))]
    assert rec["crop_pct"] == 1.0 and rec["img_size"] == 192  # timm: the whole image with the pooling head
    # test_resnet's default size is 160: 192 > 160 applies the pooling head, which changes the numbers
    code, (plain,), _ = _run(capsys, [data, "--checkpoint", ckpt, "--img-size", "192", *flags])
    assert plain["loss"] != pytest.approx(rec["loss"], rel=1e-4)


def test_model_dtype_input_size_and_torchcompile(tmp_path, capsys, data, val_batch, monkeypatch):
    images, labels = val_batch
    weights = _weights(11)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights)
    flags = ["--crop-pct", "1.0", "--mean", *map(str, MEAN), "--std", *map(str, STD), "--no-progress"]
    seen = []
    from emakit.training import engine

    real_evaluate = engine.evaluate_many

    def evaluate_many(targets, *args, **kwargs):
        seen.append({p.dtype for p in targets[0].module.parameters()} | {type(targets[0].module.model).__name__})
        return real_evaluate(targets, *args, **kwargs)

    monkeypatch.setattr("emakit.training.validation.evaluate_many", evaluate_many)
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--model-dtype", "bfloat16", "--input-size", "3",
                                      "32", "32", *flags])
    assert code == 0, err
    assert seen[-1] == {torch.bfloat16, "ResNet"} and rec["img_size"] == 32
    want = plain_eval(weights, images, labels)
    assert rec["loss"] == pytest.approx(want["loss"], rel=0.05)  # bfloat16 weights and inputs
    code, (rec,), err = _run(capsys, [data, "--checkpoint", ckpt, "--torchcompile", "eager", "--img-size", "32",
                                      *flags])
    assert code == 0, err
    assert "OptimizedModule" in seen[-1]  # torch.compile's wrapper
    assert rec["loss"] == pytest.approx(want["loss"], rel=1e-5)
    code, _, err = _run(capsys, [data, "--checkpoint", ckpt, "--torchcompile", "nosuch", *flags])
    assert code == 2 and "--torchcompile nosuch" in err
    code, _, err = _run(capsys, [data, "--checkpoint", ckpt, "--amp", "--model-dtype", "float16", *flags])
    assert code == 2 and "--amp needs float32 weights" in err


@pytest.mark.slow
def test_torchrun_scores_real_labels_and_metrics_avg_over_every_rank_in_dataset_order(tmp_path, capsys, data):
    import socket
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    weights = _weights(12, num_classes=10)
    ckpt = _checkpoint(tmp_path / "c.pth.tar", weights, num_classes=10)
    root = _imagenet_named_folder(tmp_path / "imnet", data)
    (root / "val" / CLASSES[0] / "ILSVRC2012_val_00000001.JPEG").unlink()  # 17 images: ragged shares
    real = [[i % 10, (i * 7) % 10] if i % 4 else [] for i in range(18)]
    (tmp_path / "real.json").write_text(json.dumps(real[1:]))  # one list per image left, in name order
    for i, path in enumerate(sorted((root / "val").rglob("*.JPEG"), key=lambda p: p.name)):
        path.rename(path.with_name(f"ILSVRC2012_val_{i + 1:08d}.JPEG"))
    flags = ["--checkpoint", ckpt, "--real-labels", tmp_path / "real.json", "--metrics-avg", "weighted",
             *DATA_FLAGS]
    code, single, err = _run(capsys, [root, *flags])
    assert code == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "validate.py"), str(root),
           *map(str, flags), "-b", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (multi,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for key in ("top1", "top5", "weighted_precision", "weighted_recall", "weighted_f1_score", "samples"):
        assert multi[key] == pytest.approx(single[0][key]), key
