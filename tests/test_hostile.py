"""Hostile input through the real CLIs (issue 8, sections 4 and 5).

Every case runs ``train.py``, ``validate.py`` or ``python -m emakit`` as its own process
and checks what a user sees: exit status 2, exactly one line on stderr (spelled out here,
naming the flag or file, the value and the fix) and nothing left behind (no run folder, no
output file). Most cases run as forks of one warm interpreter (``tests/cli_batch.py``:
the script runs as ``__main__`` with its own argv, stderr and exit status; torch is
imported once instead of ~80 times); a few run as plain ``python train.py`` processes and
one under torchrun, to show that nothing differs there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env

timm = pytest.importorskip("timm")

E = "train.py: error: "
V = "validate.py: error: "
M = "emakit: error: "
DEVICE_FIX = "give cpu, cuda, cuda:N or mps where available, or leave --device out (cuda if available, else cpu)"

# --------------------------------------------------------------------------- §4: train.py flags
# (flags, the exact stderr line). The issue's list first, then the silently accepted values.
TRAIN_FLAG_CASES = {
    "vb_negative": (["-vb", "-1"], E + "argument -vb/--validation-batch-size: invalid value '-1' (too small); "
                                       "give an integer >= 1"),
    "crop_pct_negative": (["--crop-pct", "-1"], E + "argument --crop-pct: invalid value '-1' (too small); "
                                                    "give a fraction in (0, 1]"),
    "scale_one_value": (["--scale", "0.5"], E + "argument --scale: invalid value 0.5 (one value); give two numbers "
                                                "MIN MAX with 0 < MIN <= MAX <= 1"),
    "ratio_zero": (["--ratio", "0", "0"], E + "argument --ratio: invalid value '0' (too small); give two numbers "
                                              "MIN MAX with 0 < MIN <= MAX"),
    "ratio_reversed": (["--ratio", "2", "1"], E + "argument --ratio: invalid value 2 1 (out of order); give two "
                                                  "numbers MIN MAX with 0 < MIN <= MAX"),
    "mean_two_values": (["--mean", "1", "2"], E + "argument --mean: invalid value 1 2 (2 values); give 3 numbers "
                                                  "(one per RGB channel) or 1 for all"),
    "std_zero": (["--std", "0", "0", "0"], E + "argument --std: invalid value '0' (too small); give 3 numbers > 0 "
                                               "(one per RGB channel) or 1 for all"),
    "seed_huge": (["--seed", str(2**64)], E + f"argument --seed: invalid value '{2**64}' (too large); give a seed "
                                              "in [0, 4294967295]"),
    "seed_negative": (["--seed", "-1"], E + "argument --seed: invalid value '-1' (too small); give a seed "
                                            "in [0, 4294967295]"),
    "device_meta": (["--device", "meta"], E + "argument --device: invalid value 'meta' (meta devices cannot train "
                                              f"or evaluate); {DEVICE_FIX}"),
    "device_garbage": (["--device", "gpu0"], E + f"argument --device: invalid value 'gpu0' (not a torch device); "
                                                 f"{DEVICE_FIX}"),
    "aa_bogus": (["--aa", "bogus"], E + "argument --aa: invalid value 'bogus' (timm: Unknown AA policy bogus); "
                                        "give a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                                        "original or v0"),
    "train_interpolation_bogus": (["--train-interpolation", "bogus"],
                                  E + "argument --train-interpolation: invalid value 'bogus' (unknown); give one of "
                                      "'', random, nearest, bilinear, bicubic, box, hamming, lanczos"),
    "interpolation_bogus": (["--interpolation", "bogus"],
                            E + "argument --interpolation: invalid value 'bogus' (unknown); give one of '', "
                                "nearest, bilinear, bicubic, box, hamming, lanczos"),
    "interpolation_random_is_training_only": (
        ["--interpolation", "random"],
        E + "argument --interpolation: invalid value 'random' (unknown); give one of '', nearest, bilinear, "
            "bicubic, box, hamming, lanczos"),
    "smoothing_above_one": (["--smoothing", "1.5"], E + "argument --smoothing: invalid value '1.5' (too large); "
                                                        "give a rate in [0, 1)"),
    "drop_two": (["--drop", "2"], E + "argument --drop: invalid value '2' (too large); give a rate in [0, 1)"),
    "lr_zero": (["--lr", "0"], E + "argument --lr: invalid value '0' (too small); give a number > 0"),
    "vb_zero": (["-vb", "0"], E + "argument -vb/--validation-batch-size: invalid value '0' (too small); "
                                  "give an integer >= 1"),
    "num_classes_zero": (["--num-classes", "0"], E + "argument --num-classes: invalid value '0' (too small); "
                                                     "give an integer >= 1"),
    "weight_decay_negative": (["--weight-decay", "-1"], E + "argument --weight-decay: invalid value '-1' "
                                                            "(too small); give a number >= 0"),
    "hflip_two": (["--hflip", "2"], E + "argument --hflip: invalid value '2' (too large); give a probability "
                                        "in [0, 1]"),
    "clip_grad_negative": (["--clip-grad", "-1"], E + "argument --clip-grad: invalid value '-1' (too small); "
                                                      "give a number > 0"),
    "half_life_empty": (["--model-ema-half-life", ""], E + "argument --model-ema-half-life: invalid value '' "
                                                           "(empty); give one or more half-life values separated "
                                                           "by commas, or leave the flag out"),
    "lr_nan": (["--lr", "nan"], E + "argument --lr: invalid value 'nan' (not finite); give a number > 0"),
    "lr_inf": (["--lr", "inf"], E + "argument --lr: invalid value 'inf' (not finite); give a number > 0"),
    "lr_overflow": (["--lr", "1e400"], E + "argument --lr: invalid value '1e400' (not finite); give a number > 0"),
    "epochs_not_an_int": (["--epochs", "2.5"], E + "argument --epochs: invalid value '2.5' (not an integer); "
                                                   "give an integer >= 1"),
    "milestones_unordered": (["--decay-milestones", "30", "10"],
                             E + "argument --decay-milestones: invalid value 30 10 (out of order); give increasing "
                                 "epochs >= 0"),
    "remode_bogus": (["--remode", "blur"], E + "argument --remode: invalid value 'blur' (unknown); give one of "
                                               "pixel, rand, const"),
    # issue 10: --fsdp and the checkpoint format (no torchrun environment in these processes)
    "fsdp_without_torchrun": (["--fsdp"], E + "--fsdp needs a process group: launch with torchrun, e.g. torchrun "
                                              "--nproc_per_node=2 train.py --fsdp ... (--nproc_per_node=1 is fine)"),
    "fsdp_torchcompile": (["--fsdp", "--torchcompile"], E + "--torchcompile with --fsdp is not supported "
                          "(torch.compile of the sharded model fails in inductor while compiling the backward): "
                          "drop --torchcompile"),
    "reshard_without_fsdp": (["--no-fsdp-reshard-after-forward"],
                             E + "--no-fsdp-reshard-after-forward applies to --fsdp: add --fsdp or drop it"),
    # a value given to an on/off flag: argparse's "ignored explicit argument", reworded
    "on_off_with_value": (["--model-ema=1"], E + "argument --model-ema/--no-model-ema: invalid value '1' (an on/off "
                                                 "flag takes no value); give --model-ema or --no-model-ema alone"),
    "store_true_with_value": (["--no-opt-fused=yes"], E + "argument --no-opt-fused: invalid value 'yes' (an on/off "
                                                          "flag takes no value); give --no-opt-fused alone"),
    "checkpoint_format_bogus": (["--checkpoint-format", "zip"],
                                E + "argument --checkpoint-format: invalid choice: 'zip' (choose from 'file', 'dcp')"),
}


def _float_flags() -> list[str]:
    """Every train.py flag whose values are floats (read from the parser, so a new float flag
    is covered without editing this test)."""
    from emakit.training.config import build_parser
    from emakit.training.kinds import CommaList, Items, Number

    flags = []
    for action in build_parser()._actions:
        kind = action.type.item if isinstance(action.type, Items) else action.type
        if (isinstance(kind, Number) and not kind.integer) or (isinstance(kind, CommaList) and kind.item is float):
            flags.append(action.option_strings[-1])
    return flags


FLOAT_FLAGS = _float_flags()


# --------------------------------------------------------------------------- fixtures
def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid PNG header claiming width x height RGB pixels, with a tiny payload."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def training_checkpoint(path: Path) -> Path:
    """A timm-style training checkpoint of test_resnet (weights, optimizer, epoch, args)."""
    model = timm.create_model("test_resnet", num_classes=3)
    torch.save({"epoch": 3, "arch": "test_resnet", "state_dict": model.state_dict(),
                "state_dict_ema": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "args": {"model": "test_resnet", "num_classes": 3, "img_size": 32}}, path)
    return path


def _unlistable_data(image_folder: Path) -> Path:
    """A data folder any user can read, except train/bee (mode 000), in a fresh /tmp folder
    (pytest's folders are 0700, closed to the 'nobody' the case runs as under root)."""
    root = Path(tempfile.mkdtemp(prefix="emakit-perm-"))
    os.chmod(root, 0o755)
    shutil.copytree(image_folder, root / "data")
    for dirpath, _, filenames in os.walk(root / "data"):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(root / "data" / "train" / "bee", 0)
    return root


@pytest.fixture(scope="module")
def world(image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """The files the cases point at: data folders (clean and damaged), a checkpoint, a
    snapshot folder with a corrupt snapshot, a folder posing as an output file."""
    root = tmp_path_factory.mktemp("hostile")
    w = {"root": root, "data": image_folder, "perm": _unlistable_data(image_folder)}
    one_class = root / "one_class"
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "ant", one_class / split / "ant")
    w["one_class"] = one_class
    bomb = root / "bomb"
    shutil.copytree(image_folder, bomb)
    w["bomb_file"] = bomb_png(bomb / "train" / "bee" / "huge.png")
    w["bomb"] = bomb
    bad_name = root / "bad_name"
    shutil.copytree(image_folder, bad_name)
    raw = os.fsencode(str(bad_name / "train" / "cat")) + b"/caf\xe9-\xff.jpg"  # Latin-1 bytes, not UTF-8
    with open(raw, "wb") as f:
        f.write(b"not a jpeg at all")
    w["bad_name"] = bad_name
    w["ckpt"] = training_checkpoint(root / "last.pth.tar")
    snaps = root / "posthoc"
    snaps.mkdir()
    (snaps / "posthoc-000000010-s0.050000.pt").write_bytes(b"PK\x03\x04 truncated zip")
    w["snaps"] = snaps
    (root / "a_folder.csv").mkdir()
    (root / "a_folder.safetensors").mkdir()
    (root / "a_file").write_text("not a folder")
    yield w
    os.chmod(w["perm"] / "data" / "train" / "bee", 0o755)
    shutil.rmtree(w["perm"])


def _train_argv(w: dict[str, Path], case: str, flags: list[str], data: Path | None = None) -> list[str]:
    out = w["root"] / f"out-{case}"
    return ["train.py", str(data or w["data"]), *FAST_ARGS, "--epochs", "1", "--output", str(out),
            "--experiment", "run", *flags]


def _cases(w: dict[str, Path]) -> dict[str, dict]:
    """Every batch case by id: {"argv": [...], optional "user"}."""
    cases = {k: {"argv": _train_argv(w, k, flags)} for k, (flags, _) in TRAIN_FLAG_CASES.items()}
    for flag in FLOAT_FLAGS:
        cases[f"nan{flag}"] = {"argv": _train_argv(w, f"nan{flag}", [flag, "nan"])}
    yaml_nan = w["root"] / "nan.yaml"
    yaml_nan.write_text("lr: .nan\n")
    cases["yaml_nan"] = {"argv": _train_argv(w, "yaml_nan", ["--config", str(yaml_nan)])}
    yaml_scale = w["root"] / "scale.yaml"
    yaml_scale.write_text("scale: [0.5]\nhflip: 2\n")
    cases["yaml_hflip"] = {"argv": _train_argv(w, "yaml_hflip", ["--config", str(yaml_scale)])}
    # §5 data cases that must stop the run
    cases["one_class"] = {"argv": _train_argv(w, "one_class", [], w["one_class"])}
    cases["bomb"] = {"argv": _train_argv(w, "bomb", [], w["bomb"])}
    cases["bad_name"] = {"argv": _train_argv(w, "bad_name", [], w["bad_name"])}
    cases["resume_plain_folder"] = {"argv": _train_argv(w, "resume_plain_folder",
                                                        ["--resume", str(w["root"] / "a_folder.csv")])}
    cases["unlistable"] = {"argv": ["train.py", str(w["perm"] / "data"), *FAST_ARGS, "--output",
                                    str(w["perm"] / "out")], "user": "nobody"}
    # validate.py: the same kinds, and output files checked before anything is evaluated
    ckpt, data, root = str(w["ckpt"]), str(w["data"]), w["root"]
    for k, flags in {
        "crop_pct": ["--crop-pct", "-1"], "mean": ["--mean", "1", "2"], "std": ["--std", "0", "0", "0"],
        "interpolation": ["--interpolation", "bogus"], "device": ["--device", "meta"], "batch": ["-b", "0"],
        "num_classes": ["--num-classes", "0"], "use_ema_value": ["--use-ema=1"],
        "results_dir": ["--results-file", str(root / "a_folder.csv")],
        "results_unwritable": ["--results-file", "/proc/emakit-results.csv"],
        "results_under_a_file": ["--results-file", str(root / "a_file" / "r.csv")],
        "results_over_checkpoint": ["--results-file", ckpt],
        "export_dir": ["--export-ema", str(root / "a_folder.safetensors")],
        "export_unwritable": ["--export-ema", "/proc/emakit-ema.safetensors"],
        "posthoc_corrupt": ["--posthoc-sigma-rel", "0.05", "--posthoc-dir", str(w["snaps"]), "--model",
                            "test_resnet"],
    }.items():
        argv = ["validate.py", data, *flags] + ([] if k == "posthoc_corrupt" else ["--checkpoint", ckpt])
        cases[f"validate_{k}"] = {"argv": argv}
    m = ["-m", "emakit"]
    cases["export_onto_itself"] = {"argv": [*m, "export", ckpt, "-o", ckpt]}
    cases["export_dir"] = {"argv": [*m, "export", ckpt, "-o", str(root / "a_folder.safetensors")]}
    cases["export_unwritable"] = {"argv": [*m, "export", ckpt, "-o", "/proc/emakit.safetensors"]}
    cases["posthoc_corrupt"] = {"argv": [*m, "posthoc", str(w["snaps"]), "--sigma-rel", "0.05", "--model",
                                         "test_resnet", "--num-classes", "3", "-o", str(root / "ph.safetensors")]}
    cases["equivalent_nan"] = {"argv": [*m, "posthoc", "--equivalent", "--decay", "nan", "--step", "10"]}
    return cases


@pytest.fixture(scope="module")
def batch(world: dict[str, Path]) -> dict[str, dict]:
    """Run every case once (see tests/cli_batch.py); results by case id."""
    cases = _cases(world)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")],
                          input=json.dumps(list(cases.values())), capture_output=True, text=True,
                          env=subprocess_env(), cwd=str(world["root"]), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(cases, json.loads(proc.stdout)))


def only_line(result: dict) -> str:
    """Exit status 2 and exactly one line on stderr; that line."""
    assert result["rc"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, result["stderr"]
    return lines[0]


def assert_no_run_folder(world: dict[str, Path], case: str) -> None:
    assert not (world["root"] / f"out-{case}").exists()


# --------------------------------------------------------------------------- §4 flags
@pytest.mark.parametrize("case", list(TRAIN_FLAG_CASES))
def test_bad_train_flag_is_one_line_exit_2_and_no_run_folder(batch, world, case):
    assert only_line(batch[case]) == TRAIN_FLAG_CASES[case][1]
    assert batch[case]["stdout"] == ""
    assert_no_run_folder(world, case)


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_refuses_nan(batch, world, flag):
    line = only_line(batch[f"nan{flag}"])
    assert line.startswith(f"{E}argument {flag}") or line.startswith(f"{E}argument -"), line
    assert "(not finite)" in line or "'nan' in 'nan' is not a" in line, line
    assert_no_run_folder(world, f"nan{flag}")


def test_float_flags_found_include_the_issues_numeric_flags():
    # the parametrization above is read from the parser: make sure it is not empty or partial
    assert {"--lr", "--weight-decay", "--clip-grad", "--smoothing", "--drop", "--hflip", "--crop-pct", "--mean",
            "--std", "--scale", "--ratio", "--model-ema-decay", "--momentum"} <= set(FLOAT_FLAGS)


def test_yaml_nan_is_refused_like_the_command_line(batch, world):
    assert only_line(batch["yaml_nan"]) == E + "config key 'lr': invalid value 'nan' (not finite); give a number > 0"
    assert_no_run_folder(world, "yaml_nan")


def test_yaml_values_go_through_the_flag_rules(batch, world):
    assert only_line(batch["yaml_hflip"]) == (E + "config key 'hflip': invalid value '2' (too large); "
                                                  "give a probability in [0, 1]")
    assert_no_run_folder(world, "yaml_hflip")


def test_yaml_nan_in_a_real_process(train_subprocess, tmp_path, image_folder):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: test_resnet\nlr: .nan\n")
    proc = train_subprocess([image_folder, "--config", cfg, "--output", tmp_path / "out"], timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == [E + "config key 'lr': invalid value 'nan' (not finite); give a number > 0"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_under_torchrun_an_input_error_is_printed_once_and_every_rank_exits_2(tmp_path, image_folder):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
                           str(image_folder), *FAST_ARGS, "--drop", "2", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=str(tmp_path))
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(E)]
    assert ours == [E + "argument --drop: invalid value '2' (too large); give a rate in [0, 1)"], proc.stderr
    # torchrun itself always exits 1 when a worker fails, and reports each failed worker's status:
    # 2 (ours), or, for a rank it stopped with SIGTERM once the first one had failed, -15 (killed
    # while waiting for rank 0 to print) or 143 (the signal came before that rank reached the error:
    # our handler's 128 + SIGTERM; a rank other than 0 prints no line of its own for it).
    assert proc.returncode == 1
    reported = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", proc.stderr))
    assert reported and set(reported.values()) <= {"2", "-15", "143"} and "2" in reported.values(), proc.stderr
    assert "stopped by SIGTERM" not in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- §4 validate.py / emakit
VALIDATE_LINES = {
    "crop_pct": "argument --crop-pct: invalid value '-1' (too small); give a fraction in (0, 1]",
    "mean": "argument --mean: invalid value 1 2 (2 values); give 3 numbers (one per RGB channel) or 1 for all",
    "std": "argument --std: invalid value '0' (too small); give 3 numbers > 0 (one per RGB channel) or 1 for all",
    "interpolation": "argument --interpolation: invalid value 'bogus' (unknown); give one of '', nearest, bilinear, "
                     "bicubic, box, hamming, lanczos",
    "device": f"argument --device: invalid value 'meta' (meta devices cannot train or evaluate); {DEVICE_FIX}",
    "batch": "argument -b/--batch-size: invalid value '0' (too small); give an integer >= 1",
    "num_classes": "argument --num-classes: invalid value '0' (too small); give an integer >= 1",
    "use_ema_value": "argument --use-ema: invalid value '1' (an on/off flag takes no value); give --use-ema alone",
}
OUT_FIX = "give a file path in a writable folder, not a training checkpoint"
ST_FIX = "give a file path ending in .safetensors in a writable folder, not a training checkpoint"


@pytest.mark.parametrize("case", list(VALIDATE_LINES))
def test_validate_py_uses_the_same_rules(batch, case):
    assert only_line(batch[f"validate_{case}"]) == V + VALIDATE_LINES[case]


@pytest.mark.parametrize("case, line", [
    ("results_dir", "argument --results-file: invalid value '{root}/a_folder.csv' (a folder); " + OUT_FIX),
    ("results_unwritable", "argument --results-file: invalid value '/proc/emakit-results.csv' (cannot write in "
                           "/proc: No such file or directory); " + OUT_FIX),
    ("results_under_a_file", "argument --results-file: invalid value '{root}/a_file/r.csv' ({root}/a_file is not "
                             "a folder); " + OUT_FIX),
    ("results_over_checkpoint", "argument --results-file: invalid value '{ckpt}' (an existing training checkpoint; "
                                "write to another file); " + OUT_FIX),
    ("export_dir", "argument --export-ema: invalid value '{root}/a_folder.safetensors' (a folder); " + ST_FIX),
    ("export_unwritable", "argument --export-ema: invalid value '/proc/emakit-ema.safetensors' (cannot write in "
                          "/proc: No such file or directory); " + ST_FIX),
])
def test_validate_py_output_files_are_checked_before_evaluating(batch, world, case, line):
    expected = V + line.format(root=world["root"], ckpt=world["ckpt"])
    assert only_line(batch[f"validate_{case}"]) == expected
    assert batch[f"validate_{case}"]["stdout"] == ""  # nothing was evaluated


def test_a_corrupt_posthoc_snapshot_is_one_line_in_validate_py(batch, world):
    snap = world["snaps"] / "posthoc-000000010-s0.050000.pt"
    assert only_line(batch["validate_posthoc_corrupt"]) == (
        f"{V}post-hoc EMA: cannot read snapshot {snap}: the file is damaged or not a torch file; move it out of the "
        "folder to reconstruct from the others")


def test_a_corrupt_posthoc_snapshot_is_one_line_in_emakit_posthoc(batch, world):
    snap = world["snaps"] / "posthoc-000000010-s0.050000.pt"
    assert only_line(batch["posthoc_corrupt"]) == (
        f"{M}post-hoc EMA: cannot read snapshot {snap}: the file is damaged or not a torch file; move it out of the "
        "folder to reconstruct from the others")
    assert not (world["root"] / "ph.safetensors").exists()


def test_export_never_overwrites_the_training_checkpoint(batch, world):
    before = world["ckpt"].read_bytes()
    line = only_line(batch["export_onto_itself"])
    assert line == (f"{M}argument -o/--output: invalid value '{world['ckpt']}' (an existing training checkpoint; "
                    f"write to another file); {OUT_FIX} (see emakit export --help)")
    assert world["ckpt"].read_bytes() == before


@pytest.mark.parametrize("case, why", [
    ("export_dir", "{root}/a_folder.safetensors' (a folder)"),
    ("export_unwritable", "/proc/emakit.safetensors' (cannot write in /proc: No such file or directory)"),
])
def test_export_output_must_be_a_writable_file(batch, world, case, why):
    line = only_line(batch[case])
    assert line == f"{M}argument -o/--output: invalid value '{why.format(root=world['root'])}; {OUT_FIX} " \
                   "(see emakit export --help)"


def test_emakit_numbers_use_the_same_rules(batch):
    assert only_line(batch["equivalent_nan"]) == (f"{M}argument --decay: invalid value 'nan' (not finite); give a "
                                                  "number in (0, 1) (see emakit posthoc --help)")


def test_export_refuses_its_own_source_even_when_it_is_a_bare_state_dict(tmp_path):
    from emakit.training.cli import main

    bare = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), bare)
    before = bare.read_bytes()
    assert main(["export", str(bare), "--weights", "raw", "--model", "test_resnet", "-o", str(bare)]) == 2
    assert bare.read_bytes() == before


# --------------------------------------------------------------------------- §4 images, §5 data
def test_resume_of_a_folder_that_is_no_dcp_checkpoint_is_one_line(batch, world):
    assert only_line(batch["resume_plain_folder"]) == (
        f"{E}--resume {world['root'] / 'a_folder.csv'} is a folder but not a checkpoint folder written by train.py "
        "--checkpoint-format dcp (no .metadata and emakit.pt); pass a last.dcp folder or a file")
    assert_no_run_folder(world, "resume_plain_folder")


def test_a_decompression_bomb_is_named(batch, world):
    line = only_line(batch["bomb"])
    assert line.startswith(f"{E}cannot read image {world['bomb_file']}: Image size (400000000 pixels) exceeds limit")
    assert "(a decompression bomb, or raise PIL.Image.MAX_IMAGE_PIXELS if the image is real)" in line
    assert line.endswith("(fix or delete it, or pass --skip-bad-images)")
    assert_no_run_folder(world, "bomb")


def test_a_single_class_training_split_is_an_error(batch, world):
    assert only_line(batch["one_class"]) == (
        f"{E}{world['one_class'] / 'train'} has images of one class only (ant): classification needs at least two "
        "class folders with images")
    assert_no_run_folder(world, "one_class")


def test_a_non_utf8_file_name_is_printed_escaped(batch, world):
    line = only_line(batch["bad_name"])
    assert line.startswith(f"{E}cannot read image {world['bad_name'] / 'train' / 'cat'}/caf\\xe9-\\xff.jpg: ")
    assert_no_run_folder(world, "bad_name")


def _as_nobody_possible() -> str | None:
    """Why a permission test cannot run here, or None."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return "running as root without a 'nobody' user: chmod cannot make a folder unlistable"
    return None


@pytest.mark.skipif(_as_nobody_possible() is not None, reason=str(_as_nobody_possible()))
def test_a_class_folder_that_cannot_be_listed_is_an_error_naming_it(batch, world):
    """chmod 000 does not stop root: as root this case's process drops to 'nobody' first."""
    locked = world["perm"] / "data" / "train" / "bee"
    assert only_line(batch["unlistable"]) == (f"{E}cannot list {locked}: Permission denied; fix its permissions or "
                                              "move it out of the data folder")
    assert not (world["perm"] / "out").exists()


@pytest.fixture(scope="module")
def odd_data_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real training run on a data folder holding every benign oddity of §5: a symlink
    loop, a second symlinked path to a class folder, a FIFO named *.jpg, an empty class
    folder, a PNG decompression bomb (with --skip-bad-images) and a non-UTF-8 file name."""
    root = tmp_path_factory.mktemp("odd")
    data = root / "data"
    shutil.copytree(image_folder, data)
    train = data / "train"
    os.symlink(".", train / "ant" / "loop")             # ant/loop/loop/... forever
    os.symlink("../ant", train / "bee" / "also_ant")    # ant's images a second time
    os.mkfifo(train / "cat" / "fifo.jpg")               # opening it would block forever
    (train / "dog").mkdir()                              # an empty class folder
    bomb_png(train / "cat" / "bomb.png")
    with open(os.fsencode(str(train / "ant")) + b"/\xff\xfe.jpg", "wb") as f:  # not UTF-8, not an image
        f.write(b"garbage")
    out = root / "out"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(data), *FAST_ARGS, "--epochs", "1",
                           "--skip-bad-images", "--output", str(out), "--experiment", "run"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=str(root),
                          errors="backslashreplace")
    return {"proc": proc, "data": data, "out": out / "run"}


@pytest.mark.slow
def test_odd_data_folder_trains(odd_data_run):
    proc = odd_data_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_symlinked_folders_are_scanned_once(odd_data_run):
    proc, train = odd_data_run["proc"], odd_data_run["data"] / "train"
    # pathlib's rglob does not follow symlinked folders: the files really there
    regular = [p for p in train.rglob("*") if p.is_file() and not p.is_symlink()
               and p.suffix.lower() in (".jpg", ".png")]
    assert len(regular) == 24 + 2  # the fixture's 24, the bomb and the non-UTF-8 garbage file
    assert f"ImageFolder {odd_data_run['data']}: {len(regular)} train images in train/" in proc.stderr
    assert f"not following {train / 'ant' / 'loop'}: it leads to {train / 'ant'}, which is already scanned" \
        in proc.stderr
    assert f"not following {train / 'bee' / 'also_ant'}: it leads to {train / 'ant'}" in proc.stderr
    assert "training epochs 0-0, 3 optimizer steps per epoch" in proc.stderr  # 24 readable images // 8


@pytest.mark.slow
def test_a_fifo_named_jpg_is_skipped_with_a_warning(odd_data_run):
    fifo = odd_data_run["data"] / "train" / "cat" / "fifo.jpg"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert f"skipping {fifo}: not a regular file (a FIFO, socket, device or broken link)" \
        in odd_data_run["proc"].stderr


@pytest.mark.slow
def test_an_empty_class_folder_is_a_warning(odd_data_run):
    dog = odd_data_run["data"] / "train" / "dog"
    assert f"class folder {dog} has no image files" in odd_data_run["proc"].stderr
    assert "4 classes" in odd_data_run["proc"].stderr


@pytest.mark.slow
def test_the_decompression_bomb_is_skipped_and_counted(odd_data_run):
    bomb = odd_data_run["data"] / "train" / "cat" / "bomb.png"
    err = odd_data_run["proc"].stderr
    assert f"skipping unreadable image {bomb}: Image size (400000000 pixels) exceeds limit" in err
    assert "skipped 2 unreadable image(s) of 26" in err


@pytest.mark.slow
def test_a_non_utf8_file_name_does_not_break_the_log_file(odd_data_run):
    log = (odd_data_run["out"] / "train.log").read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    assert "not following" in log
    assert f"skipping unreadable image {odd_data_run['data'] / 'train' / 'ant'}/\\xff\\xfe.jpg" in log
    assert "Logging error" not in odd_data_run["proc"].stderr


def test_what_counts_as_a_training_checkpoint_for_output_files(tmp_path):
    """-o/--posthoc-save/--results-file may replace an export, a post-hoc result or a CSV,
    never a checkpoint that resumes training (ours, timm's, torchvision's, a full pickle)."""
    from emakit.training.kinds import is_training_checkpoint

    model = timm.create_model("test_resnet", num_classes=3)
    sd = model.state_dict()
    files = {
        "timm.pth.tar": ({"epoch": 1, "state_dict": sd, "optimizer": {}}, True),
        "torchvision.pth": ({"model": sd, "optimizer": {}, "lr_scheduler": {}, "epoch": 9}, True),
        "no_optimizer.pth.tar": ({"epoch": 1, "state_dict": sd, "arch": "test_resnet"}, True),
        "posthoc_best.pth.tar": ({"epoch": 1, "state_dict_ema": sd, "args": {}, "posthoc": {"sigma_rel": 0.1}},
                                 False),
        "export.pth": (sd, False),
        "full_pickle.pth": ({"model": model}, True),  # refused by weights_only: someone's whole model
    }
    for name, (obj, expected) in files.items():
        torch.save(obj, tmp_path / name)
        assert is_training_checkpoint(str(tmp_path / name)) is expected, name
    (tmp_path / "results.csv").write_text("model,top1\n")
    assert is_training_checkpoint(str(tmp_path / "results.csv")) is False


def test_two_class_folders_that_are_one_folder_are_an_error(run_train, tmp_path, image_folder_copy):
    os.symlink("ant", image_folder_copy / "train" / "zebra")  # zebra/ -> ant/: every ant image twice, two labels
    code, _, err = run_train([image_folder_copy, *FAST_ARGS, "--output", tmp_path / "out"])
    assert code == 2
    assert err.splitlines() == [f"{E}class folders {image_folder_copy / 'train' / 'ant'} and "
                                f"{image_folder_copy / 'train' / 'zebra'} are the same folder (a symlink): its "
                                "images would carry two labels; remove one of them"]
    assert not (tmp_path / "out").exists()
