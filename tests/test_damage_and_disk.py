"""Damaged checkpoint folders and full disks (issue 19, cause 3), through the real CLIs.

A torch.distributed.checkpoint folder (``last.dcp``) with a shard missing, truncated or
overwritten with random bytes, a truncated ``.metadata``, or a code-running pickle in
``emakit.pt``, ``.metadata`` or a shard's pickled values: ``validate.py``, ``train.py --resume``
and torchrun say so in one line naming the folder, the file and the fix, exit 2, write nothing
and run no code. A full disk (``tests/full_disk.py``) while ``emakit export``, ``validate.py
--export-ema`` / ``--results-file``, ``emakit plot`` or ``emakit posthoc -o`` writes its output:
one line naming the file, "no space left on device" and the fix, exit 2, no file left. A full
disk while ``train.py --checkpoint-format dcp`` writes ``last.dcp``: the file format's stop
line naming the intact previous folder, exit 2, no temp folder left.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, subprocess_env

V = "validate.py: error: "
T = "train.py: error: "
FIX = "pass another checkpoint"
DISK_FIX = "free space on that disk or write to another folder"
_EVAL = ["--img-size", "32", "--no-progress"]


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: a planted pickle that must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


def _run(args: list, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` (a script path, ``-m emakit`` or tests/full_disk.py) in a child process."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=str(REPO), env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _our_lines(stderr: str, prefix: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith(prefix)]


# --------------------------------------------------------------------------- damaged folders
@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """``last.dcp`` of a one-epoch one-process run (a pristine copy: tests damage copies)."""
    out = tmp_path_factory.mktemp("dcp_run")
    proc = _run([REPO / "train.py", image_folder, *FAST_ARGS, "--epochs", "1", "--checkpoint-format", "dcp",
                 "--output", out, "--experiment", "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run" / "last.dcp"


def _damage(case: str, folder: Path, marker: Path) -> tuple[str, str]:
    """Damage ``folder`` (a copy of a DCP checkpoint) as ``case`` says; returns (the file named,
    the words that say what happened)."""
    shard = folder / "__0_0.distcp"
    if case == "shard_missing":
        shard.unlink()
        return shard.name, "is missing"
    if case == "shard_truncated":
        os.truncate(shard, shard.stat().st_size // 2)
        return shard.name, "is truncated"
    if case == "shard_random":  # same length: only reading it shows the damage
        shard.write_bytes(os.urandom(shard.stat().st_size))
        return shard.name, "is truncated or corrupt"
    if case == "metadata_truncated":
        os.truncate(folder / ".metadata", 1000)
        return ".metadata", "is truncated or corrupt"
    if case == "metadata_pickle":  # torch's own reader unpickles .metadata with pickle.load
        (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
        return ".metadata", "was refused as unsafe"
    if case == "emakit_pickle":
        torch.save({"plain": _RunsCode(marker)}, folder / "emakit.pt")
        return "emakit.pt", "was refused as unsafe"
    raise AssertionError(case)


DAMAGE = ["shard_missing", "shard_truncated", "shard_random", "metadata_truncated", "metadata_pickle",
          "emakit_pickle"]


def _damaged_copy(case: str, dcp_checkpoint: Path, tmp_path: Path) -> tuple[Path, str, str, Path]:
    folder, marker = tmp_path / "copy" / "last.dcp", tmp_path / "code-ran"
    shutil.copytree(dcp_checkpoint, folder)
    name, what = _damage(case, folder, marker)
    return folder, name, what, marker


def _assert_damage_line(line: str, prefix: str, folder: Path, name: str, what: str) -> None:
    assert line.startswith(f"{prefix}checkpoint folder {folder} cannot be read: {name} {what}"), line
    assert FIX in line, line


@pytest.mark.slow
@pytest.mark.parametrize("case", DAMAGE)
def test_validate_names_the_damaged_file_of_a_folder(case, dcp_checkpoint, tmp_path, image_folder):
    folder, name, what, marker = _damaged_copy(case, dcp_checkpoint, tmp_path)
    results = tmp_path / "results.csv"
    proc = _run([REPO / "validate.py", image_folder, "--checkpoint", folder, *_EVAL, "--results-file", results])
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    _assert_damage_line(lines[0], V, folder, name, what)
    assert not results.exists() and not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shard_missing", "shard_random", "metadata_truncated", "emakit_pickle"])
def test_resume_from_a_damaged_folder_stops_before_writing(case, dcp_checkpoint, tmp_path, image_folder):
    folder, name, what, marker = _damaged_copy(case, dcp_checkpoint, tmp_path)
    out = tmp_path / "out"
    proc = _run([REPO / "train.py", image_folder, *FAST_ARGS, "--epochs", "2", "--checkpoint-format", "dcp",
                 "--output", out, "--experiment", "resumed", "--resume", folder])
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    lines = _our_lines(proc.stderr, "train.py:")
    assert len(lines) == 1 and proc.stderr.strip().splitlines()[-1] == lines[0], proc.stderr
    _assert_damage_line(lines[0], T, folder, name, what)
    assert not out.exists() and not marker.exists()


@pytest.mark.slow
def test_a_damaged_model_best_beside_an_intact_last_is_replaced(dcp_checkpoint, tmp_path, image_folder):
    """Resuming from an intact last.dcp whose model_best.dcp is damaged is not an error: a
    warning names it, and the next epoch's folder replaces it."""
    run = tmp_path / "run"
    shutil.copytree(dcp_checkpoint.parent, run)
    best_meta = run / "model_best.dcp" / "emakit.pt"
    best_meta.unlink()  # a hard link to last.dcp's file: a new file damages model_best alone
    best_meta.write_bytes(b"\0" * 100)
    proc = _run([REPO / "train.py", image_folder, *FAST_ARGS, "--epochs", "2", "--checkpoint-format", "dcp",
                 "--resume", run / "last.dcp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{run / 'model_best.dcp'} is damaged (emakit.pt cannot be read)" in proc.stderr
    from emakit.training.dcp import read_dcp_meta

    assert read_dcp_meta(run / "model_best.dcp")["plain"]["epoch"] == 1


@pytest.mark.slow
def test_a_code_running_value_in_a_shard_is_refused(tmp_path, image_folder):
    """DCP itself loads a shard's non-tensor values with weights_only=False (torch's
    dcp_to_torch_save runs this code); ours refuses them."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    folder, marker = tmp_path / "planted.dcp", tmp_path / "code-ran"
    with warnings.catch_warnings():  # one process without a process group: intended
        warnings.simplefilter("ignore")
        save({"state_dict": {"fc.bias": torch.zeros(3)}, "note": _RunsCode(marker)},
             storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    assert not marker.exists()
    proc = _run([REPO / "validate.py", image_folder, "--checkpoint", folder, *_EVAL])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    _assert_damage_line(proc.stderr.strip(), V, folder, "__0_0.distcp", "was refused as unsafe")
    assert not marker.exists()


@pytest.mark.slow
def test_under_torchrun_a_damaged_folder_is_named_once_and_every_rank_exits_2(dcp_checkpoint, tmp_path,
                                                                              image_folder):
    """Random bytes in the shard pass every cheap check: the two ranks meet the damage in the
    collective read of the folder, and the line is printed once (the pattern of
    test_hostile's input error under torchrun)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    folder, name, what, _ = _damaged_copy("shard_random", dcp_checkpoint, tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
                           str(image_folder), *FAST_ARGS, "--epochs", "2", "--checkpoint-format", "dcp",
                           "--output", str(out), "--experiment", "resumed", "--resume", str(folder)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=str(tmp_path))
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(T)]
    assert len(ours) == 1, proc.stderr[-4000:]
    _assert_damage_line(ours[0], T, folder, name, what)
    assert f'File "{REPO / "emakit"}' not in proc.stderr and f'File "{REPO / "train.py"}' not in proc.stderr
    # torchrun exits 1 and reports each rank: 2 (ours), or -15 / 143 for a rank it stopped
    # with SIGTERM once the first one had failed (see test_hostile)
    assert proc.returncode == 1
    reported = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", proc.stderr))
    assert reported and set(reported.values()) <= {"2", "-15", "143"} and "2" in reported.values(), proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- full disk: outputs
@pytest.fixture(scope="module")
def file_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """A one-epoch run in the file format with post-hoc snapshots."""
    out = tmp_path_factory.mktemp("file_run")
    proc = _run([REPO / "train.py", image_folder, *FAST_ARGS, "--epochs", "1", "--model-ema-posthoc",
                 "--output", out, "--experiment", "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "run"


# case: (output file name, the command line writing it to o)
OUTPUT_COMMANDS = {
    "export_safetensors": ("e.safetensors", lambda run, data, o: ["-m", "emakit", "export", run / "last.pth.tar",
                                                                  "-o", o]),
    "export_pth": ("e.pth", lambda run, data, o: ["-m", "emakit", "export", run / "last.pth.tar", "-o", o]),
    "validate_export_ema": ("v.safetensors", lambda run, data, o: [REPO / "validate.py", data, "--checkpoint",
                                                                   run / "last.pth.tar", *_EVAL, "--export-ema", o]),
    "validate_results_file": ("results.csv", lambda run, data, o: [REPO / "validate.py", data, "--checkpoint",
                                                                   run / "last.pth.tar", *_EVAL, "--results-file", o]),
    "plot": ("summary.png", lambda run, data, o: ["-m", "emakit", "plot", run / "summary.csv", "-o", o]),
    "posthoc": ("p.safetensors", lambda run, data, o: ["-m", "emakit", "posthoc", run / "posthoc", "--sigma-rel",
                                                       "0.1", "-o", o, "--checkpoint", run / "last.pth.tar"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OUTPUT_COMMANDS))
def test_a_full_disk_while_writing_an_output_is_one_line(case, file_run, tmp_path, image_folder):
    dest = tmp_path / "dest"
    dest.mkdir()
    name, command = OUTPUT_COMMANDS[case]
    out = dest / name
    proc = _run([REPO / "tests" / "full_disk.py", "files", *command(file_run, image_folder, out)])
    prog = "validate.py" if case.startswith("validate") else "emakit"
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    lines = _our_lines(proc.stderr, f"{prog}:")
    assert lines == [f"{prog}: error: could not write {out}: no space left on device; {DISK_FIX}, then run the "
                     "command again"], proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == lines[0]
    assert os.listdir(dest) == []  # neither the output nor a temp file


# --------------------------------------------------------------------------- full disk: DCP checkpoints
def _assert_dcp_stop(proc: subprocess.CompletedProcess, run: Path) -> None:
    from emakit.training.dcp import dcp_folder_to_checkpoint

    last = run / "last.dcp"
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    lines = _our_lines(proc.stderr, "train.py:")
    assert len(lines) == 1 and proc.stderr.strip().splitlines()[-1] == lines[0], proc.stderr[-3000:]
    assert re.fullmatch(rf"{T}could not write the outputs of epoch 1 \({re.escape(str(last))}\): No space left on "
                        rf"device; the last good checkpoint is {re.escape(str(last))} \(epoch 0\); free space \(or "
                        rf"fix the folder\), then resume with: (python|torchrun) .*train\.py .* --resume "
                        rf"{re.escape(str(last))}", lines[0]), lines[0]
    assert dcp_folder_to_checkpoint(last)["epoch"] == 0  # intact, and the epoch it says
    assert not [p.name for p in run.iterdir() if ".dcp-" in p.name or p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_full_disk_while_writing_a_dcp_folder_stops_like_the_file_format(tmp_path, image_folder):
    """The second save's shard write meets torch's full-disk RuntimeError ("unexpected pos")."""
    proc = _run([REPO / "tests" / "full_disk.py", "dcp:2", REPO / "train.py", image_folder, *FAST_ARGS,
                 "--epochs", "3", "--checkpoint-format", "dcp", "--output", tmp_path, "--experiment", "run"])
    _assert_dcp_stop(proc, tmp_path / "run")


@pytest.mark.slow
def test_under_torchrun_one_ranks_full_disk_stops_every_rank_with_exit_2(tmp_path, image_folder):
    """Rank 1 alone finds the disk full at the second save: DCP tells every rank, each exits 2,
    the stop line is printed once and the temp folder is gone."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "full_disk.py"),
                           "dcp:2:1", str(REPO / "train.py"), str(image_folder), *FAST_ARGS, "--epochs", "3",
                           "--checkpoint-format", "dcp", "--output", str(tmp_path), "--experiment", "run"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=str(tmp_path))
    reported = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", proc.stderr))
    assert proc.returncode == 1 and set(reported.values()) <= {"2", "-15"} and "2" in reported.values(), \
        proc.stderr[-4000:]
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("train.py: ")]
    assert len(ours) == 1, proc.stderr[-4000:]
    _assert_dcp_stop(subprocess.CompletedProcess([], 2, "", ours[0] + "\n"), tmp_path / "run")


@pytest.mark.slow
def test_a_real_full_disk_under_the_dcp_format(tmp_path, image_folder):
    """A real 8 MiB tmpfs as the output folder (root only): the first folder (about 4.9 MB) fits,
    the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = _run([REPO / "train.py", image_folder, *FAST_ARGS, "--epochs", "4", "--checkpoint-format", "dcp",
                     "--output", disk, "--experiment", "run"])
        _assert_dcp_stop(proc, disk / "run")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --------------------------------------------------------------------------- the detector
def test_is_disk_full_sees_every_writers_words():
    from torch.distributed.checkpoint.api import CheckpointException

    from emakit.checkpoint import is_disk_full

    torch_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert is_disk_full(torch_writer)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_disk_full(CheckpointException("save failed", {1: (torch_writer, None)}))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise ValueError("wrapped") from None
    except ValueError as chained:  # __context__ kept (from None only hides it from tracebacks)
        assert is_disk_full(chained)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("size mismatch for fc.weight"))
