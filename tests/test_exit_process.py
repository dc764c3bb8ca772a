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
