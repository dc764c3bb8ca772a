"""Run many command lines of the real CLIs, each in its own process, paying for imports once.

Reads a JSON list of cases on stdin, each ``{"argv": ["train.py", ...], "user": "nobody"?}``
(``argv[0]`` is ``train.py``, ``validate.py`` or ``-m emakit``), imports torch/timm once,
then forks one child per case. The child runs the script exactly as ``python train.py ARGS``
would (``runpy`` with ``__name__ == "__main__"``, its own ``sys.argv``, stdout/stderr sent to
files) and leaves with the script's exit status. The parent waits (a case that runs past
``timeout`` is killed and reported as -9) and prints a JSON list of
``{"rc", "stdout", "stderr"}``. With ``"user": "nobody"`` a child started as root drops to
that user first, so file permissions apply to it (root ignores them).

Why forks and not ``subprocess.run`` per case (measured for issue 20, 2-core machine shared
with other jobs): ``pytest tests/test_hostile.py -m "not slow"`` (about 96 cases) took 45 s
with this runner; with one plain ``python train.py ...`` process per case it had spent 7 min
before the ~76th case, i.e. about 9 min in all (each interpreter imports torch and timm,
~1.6 s of CPU). And the ``"user": "nobody"`` case cannot exec a fresh interpreter where
python lives under root's home (``PermissionError``); a fork already has it loaded.
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(case: dict, out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.dup2(f, fd)
        os.close(f)
    if case.get("user") and os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam(case["user"])
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    os.environ.update(case.get("env", {}))
    argv = case["argv"]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [os.path.join(REPO, argv[0]), *argv[1:]]
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # an uncaught error: what python prints, and its exit status 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def main() -> None:
    cases = json.load(sys.stdin)
    timeout = float(os.environ.get("CLI_BATCH_TIMEOUT", "60"))
    sys.path.insert(0, REPO)
    import timm.data  # noqa: F401  (warm: every child inherits the imports)
    import torch  # noqa: F401

    import emakit.training.cli  # noqa: F401
    import emakit.training.fit  # noqa: F401
    import emakit.training.validation  # noqa: F401

    results = []
    # mkdtemp, not TemporaryDirectory: a child must never run its finalizer (which deletes it);
    # the children leave with os._exit.
    tmp = tempfile.mkdtemp()
    try:
        os.chmod(tmp, 0o777)  # a child running as another user writes its output files here
        for i, case in enumerate(cases):
            out_path, err_path = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(case, out_path, err_path)
            rc = _wait(pid, timeout)
            with open(out_path, encoding="utf-8", errors="backslashreplace") as f:
                out = f.read()
            with open(err_path, encoding="utf-8", errors="backslashreplace") as f:
                err = f.read()
            results.append({"rc": rc, "stdout": out, "stderr": err})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
