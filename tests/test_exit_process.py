"""How the scripts end: ``sys.exit(main())`` and the interpreter's normal teardown (no
``os._exit`` shortcut), with every output delivered.

Whether the teardown ran is seen from outside: an object referenced only by a module global
writes a marker file from ``__del__``, which only the interpreter's finalization calls."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import FAST_ARGS, REPO, subprocess_env

# Runs SCRIPT ARGS as `python SCRIPT ARGS` would, with a Teardown object collected only by the
# interpreter's finalization, and an atexit handler; each writes its marker into MARKS.
RUN_SCRIPT = r'''
import atexit, os, runpy, sys
MARKS = sys.argv[1]

def mark(name, _open=open, _join=os.path.join):
    with _open(_join(MARKS, name), "w") as f:
        f.write(name)

class Teardown:
    def __del__(self, _mark=mark):
        _mark("teardown")

keep = Teardown()
atexit.register(mark, "atexit")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _run(*args: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)  # stdout is a pipe: block-buffered, as in a job's log
    return subprocess.run([sys.executable, "-c", RUN_SCRIPT, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_train_py_and_validate_py_exit_through_the_normal_teardown_with_everything_delivered(tmp_path, image_folder):
    marks, out = tmp_path / "marks", tmp_path / "out"
    marks.mkdir()
    proc = _run(str(marks), str(REPO / "train.py"), str(image_folder), *map(str, FAST_ARGS), "--epochs", "1",
                "--workers", "1", "--output", str(out), "--experiment", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = proc.stdout.strip().splitlines()[-1]
    assert result.startswith("best raw top1 ") and result.endswith(f"outputs in {out / 'run'}")
    assert (out / "run" / "train.log").read_text().strip().splitlines()[-1].endswith(result)
    assert {"last.pth.tar", "model_best.pth.tar", "summary.csv", "args.yaml"} <= {p.name for p in (out / "run").iterdir()}
    assert {p.name for p in marks.iterdir()} == {"atexit", "teardown"}

    for p in marks.iterdir():
        p.unlink()
    proc = _run(str(marks), str(REPO / "validate.py"), str(image_folder), "--model", "test_resnet", "--img-size", "32",
                "--checkpoint", str(out / "run" / "last.pth.tar"), "--use-ema", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"weights": "ema"' in proc.stdout
    assert {p.name for p in marks.iterdir()} == {"atexit", "teardown"}


@pytest.mark.parametrize("torchrun_rank", [False, True])
def test_end_process_skips_the_teardown_only_in_a_torchrun_rank(tmp_path, torchrun_rank):
    """A torchrun rank (RANK and WORLD_SIZE set) leaves with os._exit after flushing its
    outputs and log handlers: gloo's threads can abort the interpreter's teardown there. Any
    other process ends with sys.exit and the normal teardown."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "end.py"
    script.write_text("import logging, sys\n"
                      f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
                      "logging.getLogger('x').info('a logged line')\n"
                      "print('a line still in stdout\\'s buffer'); sys.stderr.write('and one on stderr\\n')\n"
                      "import tempfile\n"  # as wandb makes at import (timm imports wandb when installed)
                      f"held = tempfile.TemporaryDirectory(dir={str(tmp_path)!r}, suffix='-library')\n"
                      "from emakit.training.lifecycle import end_process\n"
                      "end_process(7)\n")
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    for key in ("RANK", "WORLD_SIZE"):
        env.pop(key, None)
    if torchrun_rank:
        env.update(RANK="0", WORLD_SIZE="2")
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(marks), str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 7
    assert "a line still in stdout's buffer" in proc.stdout and "and one on stderr" in proc.stderr
    assert "a logged line" in (tmp_path / "log.txt").read_text()
    ran = {p.name for p in marks.iterdir()}
    assert ran == (set() if torchrun_rank else {"atexit", "teardown"})
    assert not list(tmp_path.glob("*-library"))  # a library's temporary folder is removed either way
