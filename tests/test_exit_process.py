"""``exit_process``: the scripts end without the interpreter's teardown (1-2 s of wall and CPU
with torch and timm loaded), after the atexit handlers and a flush of stdout and stderr; with
a non-daemon thread or a child process still alive it is a normal ``sys.exit``.

Whether the teardown ran is seen from outside: an object referenced only by a module global
writes a marker file from ``__del__``, which only the interpreter's finalization calls."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_ARGS, REPO, subprocess_env

# Defines mark() and a Teardown object collected only by the interpreter's finalization.
PRELUDE = r'''
import atexit, os, sys
OUT = sys.argv[1]

def mark(name, _open=open, _join=os.path.join, _out=OUT):
    with _open(_join(_out, name), "w") as f:
        f.write(name)

class Teardown:
    def __del__(self, _mark=mark):
        _mark("teardown")

keep = Teardown()
'''

SCRIPT = PRELUDE + r'''
import multiprocessing, threading, time
from emakit.training.lifecycle import exit_process

mode = sys.argv[2]
atexit.register(mark, "atexit")
print("a line still in stdout's buffer")  # stdout is a pipe: block-buffered
sys.stderr.write("and one on stderr\n")
if mode == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), mark("thread"))).start()
elif mode == "child":
    multiprocessing.get_context("fork").Process(target=lambda: (time.sleep(0.3), mark("child"))).start()
if mode == "sys.exit":
    sys.exit(7)
exit_process(7)
'''


def _run(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


def _marks(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_exit_process_skips_the_teardown_after_atexit_handlers_and_flushed_streams(tmp_path):
    proc = _run(SCRIPT, str(tmp_path), "plain")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "a line still in stdout's buffer\n"
    assert proc.stderr == "and one on stderr\n"
    assert _marks(tmp_path) == {"atexit"}  # no "teardown": finalization was skipped


def test_the_marker_sees_a_normal_teardown(tmp_path):
    """The control: the same script ending with sys.exit writes the teardown marker."""
    proc = _run(SCRIPT, str(tmp_path), "sys.exit")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "a line still in stdout's buffer\n"
    assert _marks(tmp_path) == {"atexit", "teardown"}


@pytest.mark.parametrize("mode", ["thread", "child"])
def test_a_live_thread_or_child_process_gets_a_normal_exit(tmp_path, mode):
    """Exiting at once would kill the thread, or orphan the child: the process exits the
    normal way, which waits for both."""
    proc = _run(SCRIPT, str(tmp_path), mode)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "a line still in stdout's buffer\n"
    assert _marks(tmp_path) == {"atexit", "teardown", mode}


RUN_SCRIPT = PRELUDE + r'''
import runpy
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_train_py_and_validate_py_end_with_exit_process(tmp_path, image_folder):
    """Run as scripts, both skip the teardown (the marker stays absent) and still deliver
    everything: exit 0, the result line on stdout, train.log complete, all files written."""
    marks, out = tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    proc = _run(RUN_SCRIPT, str(marks), str(REPO / "train.py"), str(image_folder), *map(str, FAST_ARGS),
                "--epochs", "1", "--workers", "1", "--output", str(out), "--experiment", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert result.startswith("best raw top1 ") and result.endswith(f"outputs in {out / 'run'}")
    assert (out / "run" / "train.log").read_text().strip().splitlines()[-1].endswith(result)
    assert {"last.pth.tar", "model_best.pth.tar", "summary.csv", "args.yaml"} <= _marks(out / "run")
    assert _marks(marks) == set()

    proc = _run(RUN_SCRIPT, str(marks), str(REPO / "validate.py"), str(image_folder), "--model", "test_resnet",
                "--img-size", "32", "--checkpoint", str(out / "run" / "last.pth.tar"), "--use-ema", "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"weights": "ema"' in proc.stdout
    assert _marks(marks) == set()
