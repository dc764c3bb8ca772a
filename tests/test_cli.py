"""The ``emakit`` command: export, posthoc (reconstruction, sweep, equivalents), plot.

Expectations: tensors built here, the closed-form EMA-length formulas written out here,
``emakit.posthoc.reconstruct`` for reconstructed weights, PNG sizes read with Pillow.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, colour_pixels, subprocess_env
from emakit.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from emakit.training.cli import main
from emakit.posthoc import PowerEMA, SnapshotWriter, reconstruct


def _run(capsys, argv: list) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json_line(out: str) -> dict:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(line)


def _resnet_weights(seed: int) -> dict[str, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=4).state_dict().items()}


# --------------------------------------------------------------------------- export
def test_export_writes_the_ema_weights_alone_unprefixed_with_metadata(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    raw, ema = _resnet_weights(0), _resnet_weights(1)
    ckpt = tmp_path / "last.pth.tar"
    save_checkpoint({"epoch": 3, "arch": "test_resnet", "args": {"model": "test_resnet", "num_classes": 4},
                     "state_dict": raw, "state_dict_ema": {"module." + k: v for k, v in ema.items()}}, ckpt)
    out_file = tmp_path / "model_ema.safetensors"
    code, out, err = _run(capsys, ["export", ckpt, "--weights", "ema", "-o", out_file])
    assert code == 0, err
    exported = load_file(str(out_file))
    assert sorted(exported) == sorted(ema)
    for key, value in ema.items():
        assert torch.equal(exported[key], value), key
    with safe_open(str(out_file), framework="pt") as f:
        meta = f.metadata()
    assert (meta["arch"], meta["num_classes"], meta["weights"]) == ("test_resnet", "4", "ema")
    assert "pretrained_cfg_overlay=dict(file=" in out


def test_export_raw_weights_to_a_pth_file_gives_a_plain_state_dict(tmp_path, capsys):
    raw = _resnet_weights(0)
    ckpt = tmp_path / "c.pth.tar"
    save_checkpoint({"arch": "test_resnet", "state_dict": {"_orig_mod." + k: v for k, v in raw.items()}}, ckpt)
    out_file = tmp_path / "raw.pth"
    code, _, err = _run(capsys, ["export", ckpt, "--weights", "raw", "-o", out_file])
    assert code == 0, err
    loaded = torch.load(out_file, weights_only=True)
    assert sorted(loaded) == sorted(raw) and all(torch.equal(loaded[k], raw[k]) for k in raw)


def test_export_of_missing_ema_is_a_one_line_error(tmp_path, capsys):
    ckpt = tmp_path / "c.pth.tar"
    save_checkpoint({"arch": "test_resnet", "state_dict": _resnet_weights(0)}, ckpt)
    code, out, err = _run(capsys, ["export", ckpt, "-o", tmp_path / "x.safetensors"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no EMA weights" in err and not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- posthoc --equivalent
def test_equivalent_of_a_decay_is_the_closed_form_sigma_rel_and_half_life(capsys):
    code, out, _ = _run(capsys, ["posthoc", "--equivalent", "--decay", "0.9998", "--step", "100000"])
    assert code == 0
    eq = _json_line(out)
    d, t = 0.9998, 100000
    assert eq["sigma_rel"] == pytest.approx(math.sqrt(d) / ((1 - d) * t), rel=1e-12)  # std of d^k / t
    assert eq["half_life"] == pytest.approx(math.log(0.5) / math.log(d), rel=1e-12)  # d^h = 1/2
    assert eq["decay"] == d and eq["step"] == t


def test_equivalent_of_a_sigma_rel_inverts_the_formula(capsys):
    code, out, _ = _run(capsys, ["posthoc", "--equivalent", "--sigma-rel", "0.05", "--step", "20000"])
    assert code == 0
    eq = _json_line(out)
    d = eq["decay"]
    assert math.sqrt(d) / ((1 - d) * 20000) == pytest.approx(0.05, rel=1e-10)
    assert d ** eq["half_life"] == pytest.approx(0.5, rel=1e-10)


@pytest.mark.parametrize("half_life", ["3000", "3000ba"])
def test_equivalent_of_a_half_life_in_updates(capsys, half_life):
    code, out, _ = _run(capsys, ["posthoc", "--equivalent", "--half-life", half_life, "--step", "50000"])
    assert code == 0
    eq = _json_line(out)
    assert eq["decay"] == pytest.approx(0.5 ** (1 / 3000), rel=1e-14)
    assert eq["sigma_rel"] == pytest.approx(math.sqrt(eq["decay"]) / ((1 - eq["decay"]) * 50000), rel=1e-12)


def test_equivalent_warns_when_the_ema_is_too_long_for_the_run(capsys):
    code, out, _ = _run(capsys, ["posthoc", "--equivalent", "--decay", "0.9999", "--step", "1000"])
    assert code == 0 and "no power-function EMA is this long" in out and "still remembers its start" in out


@pytest.mark.parametrize("argv, message", [
    (["posthoc", "--equivalent", "--decay", "0.999"], "needs --step"),
    (["posthoc", "--equivalent", "--decay", "0.999", "--sigma-rel", "0.1", "--step", "9"], "exactly one of"),
    (["posthoc", "--equivalent", "--half-life", "0.5ep", "--step", "9"], "in updates"),
    (["posthoc", "--equivalent", "--decay", "1.5", "--step", "9"], "decay"),
    (["posthoc", "--decay", "0.999", "--step", "9"], "add --equivalent"),
])
def test_equivalent_mistakes_are_one_line_errors(capsys, argv, message):
    code, out, err = _run(capsys, argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


# --------------------------------------------------------------------------- posthoc reconstruction
class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def train_with_snapshots(model: nn.Module, folder: Path, x: torch.Tensor, y: torch.Tensor, *,
                         steps: int, every: int, lr: float) -> None:
    """SGD on one fixed batch, tracking two power EMAs (0.05, 0.10) snapshotted every ``every`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ema = PowerEMA(model, (0.05, 0.10))
    writer = SnapshotWriter(folder, every=every)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        writer.maybe_save(ema)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> Path:
    """posthoc/ snapshots (every 3 of 30 steps) of two power EMAs of a toy model's SGD run."""
    folder = tmp_path_factory.mktemp("run") / "posthoc"
    torch.manual_seed(0)
    model = _Toy()
    train_with_snapshots(model, folder, torch.randn(16, 5), torch.randint(0, 4, (16,)), steps=30, every=3, lr=0.1)
    return folder


@pytest.mark.parametrize("name", ["ema_s008.safetensors", "ema_s008.pth.tar"])
def test_posthoc_single_sigma_rel_writes_the_reconstruction(tmp_path, capsys, snapshots, name):
    out_file = tmp_path / name
    code, out, err = _run(capsys, ["posthoc", snapshots, "--sigma-rel", "0.08", "--step", "27", "-o", out_file])
    assert code == 0, err
    saved = load_checkpoint(out_file)
    weights = extract_state_dict(saved, "raw" if name.endswith(".safetensors") else "ema")
    expected = reconstruct(snapshots, 0.08, step=27)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key
    assert "sigma_rel 0.08 at step 27" in out


def test_posthoc_single_sigma_rel_without_output_is_an_error(capsys, snapshots):
    code, _, err = _run(capsys, ["posthoc", snapshots, "--sigma-rel", "0.08"])
    assert code == 2 and "-o FILE" in err


def test_posthoc_sweep_runs_validate_and_saves_the_best(tmp_path, capsys):
    """Several sigma_rel: evaluated by validate.py's sweep on the embedded digits."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    run = tmp_path / "run"
    train_with_snapshots(model, run / "posthoc", torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)),
                         steps=6, every=2, lr=0.05)
    args = {"model": "test_resnet", "num_classes": 10, "img_size": 32, "crop_pct": 1.0}
    save_checkpoint({"epoch": 0, "arch": "test_resnet", "state_dict": model.state_dict(), "args": args},
                    run / "last.pth.tar")
    best = tmp_path / "best.safetensors"
    code, out, err = _run(capsys, ["posthoc", "--checkpoint", run / "last.pth.tar", "--sigma-rel", "0.05,0.2",
                                   "-o", best, "--", "-b", "128"])
    assert code == 0, err
    records = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert [r["sigma_rel"] for r in records] == [0.05, 0.2] and all(r["samples"] == 360 for r in records)
    winner = max(records, key=lambda r: (r["top1"], -r["loss"]))
    saved = load_checkpoint(best)["state_dict"]
    expected = reconstruct(run / "posthoc", winner["sigma_rel"])
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    assert (run / "posthoc_sweep.png").exists() and (run / "posthoc_sweep.csv").exists()


# --------------------------------------------------------------------------- plot
def test_plot_writes_the_summary_png(tmp_path, capsys):
    from PIL import Image

    summary = tmp_path / "summary.csv"
    with open(summary, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "ema_eval_loss",
                    "ema_eval_top1", "ema_eval_top5", "lr"])
        for e in range(3):
            w.writerow([e, 2.0 - e / 3, 1.9 - e / 3, 40 + 10 * e, 80, 1.8 - e / 3, 45 + 10 * e, 85, 0.1])
    code, out, err = _run(capsys, ["plot", summary])
    assert code == 0, err
    with Image.open(tmp_path / "summary.png") as im:
        assert im.format == "PNG" and im.size == (1000, 400)  # plot_summary: 10 x 4 in at 100 dpi
    assert f"wrote {tmp_path / 'summary.png'}" in out
    # the raw (C0 blue) and EMA (C1 orange) curves are drawn across both panels (a legend swatch is ~30 px)
    for colour in ("#1f77b4", "#ff7f0e"):
        for box in ((0, 0, 500, 400), (500, 0, 1000, 400)):
            xs, _ = colour_pixels(tmp_path / "summary.png", colour, box)
            assert len(xs) and xs.max() - xs.min() > 300, (colour, box)


def test_plot_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _run(capsys, ["plot", tmp_path / "summary.csv"])
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1


def test_no_command_and_unknown_flags_are_errors(capsys):
    assert _run(capsys, [])[0] == 2
    code, _, err = _run(capsys, ["plot", "x.csv", "--bogus"])
    assert code == 2 and "--bogus" in err


# --------------------------------------------------------------------------- packaging
def test_python_dash_m_emakit_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "emakit", "posthoc", "--equivalent", "--decay", "0.999",
                           "--step", "5000"], env=subprocess_env(), capture_output=True, text=True,
                          cwd=str(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _json_line(proc.stdout)["sigma_rel"] == pytest.approx(math.sqrt(0.999) / (0.001 * 5000))


_EXTRAS = ('timm', 'torchvision', 'yaml', 'PIL', 'matplotlib', 'safetensors')


def test_importing_emakit_pulls_in_nothing_beyond_torch():
    code = ("import sys, emakit; "
            f"print(','.join(m for m in {_EXTRAS + ('emakit.training',)!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          check=True, timeout=120)
    assert proc.stdout.strip() == ""


def test_the_cli_lives_in_the_trainer_and_its_conversion_runs_with_torch_alone():
    """The core no longer holds the command; ``emakit posthoc --equivalent`` still runs where
    timm, torchvision, yaml, PIL, matplotlib and safetensors cannot be imported."""
    assert not (REPO / "emakit" / "cli.py").exists()
    code = ("import sys; sys.modules.update(dict.fromkeys(" + repr(_EXTRAS) + ")); "
            "from emakit.training.cli import main; "
            "code = main(['posthoc', '--equivalent', '--decay', '0.999', '--step', '5000']); "
            "print('loaded:' + ','.join(m for m in " + repr(_EXTRAS) + " if sys.modules.get(m) is not None)); "
            "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "loaded:"  # every extra is still the None that blocks its import
    assert json.loads(lines[-2])["sigma_rel"] == pytest.approx(math.sqrt(0.999) / (0.001 * 5000))


