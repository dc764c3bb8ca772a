"""emakit.training: the image-classification trainer behind ``train.py``.

Needs timm, torchvision, yaml and tqdm (``pip install emakit[train]``); ``import emakit``
alone never imports this package. Modules:

- ``config``       train.py's flags, ``--config`` YAML as defaults, ``settings_from_args``
- ``settings``     the frozen settings every module below the CLI reads (``TrainSettings``)
- ``data``         ImageFolder and the embedded digits dataset, transforms, loaders, samplers
- ``distributed``  ``DistInfo`` (rank, world size, device, ``is_main``), init, reductions
- ``build``        the parts of a run from its settings (model, loaders, averages, optimizer, ...)
- ``resume``       ``--resume``: checks, load, LR position
- ``trainer``      ``Trainer`` and ``build_trainer`` / ``close_trainer``
- ``engine``       ``train_one_epoch`` and ``evaluate`` / ``evaluate_many``
- ``fit``          the epoch loop: train -> evaluate -> summary -> checkpoints
- ``evaluation``, ``checkpoints``: an epoch's evaluation and summary row; what it writes
- ``outputs``      run folder files: args.yaml, summary.csv, summary.png, the result line
- ``lifecycle``    how a run ends early: stop signals, exit statuses, RNG states, the resume command
- ``averages``     ``Averages``: the EMAs, the post-hoc EMA tracker (snapshots), BN recalibration
- ``fsdp``, ``dcp``: FSDP2 sharding and gathered state, torch.distributed.checkpoint folders
- ``logs``         console and train.log handlers
- ``bn``, ``plots``: the BatchNorm-statistics walker and recalibration, PNG plots
- ``validate_config``, ``validation``: ``validate.py``'s flags (frozen settings) and its work
- ``cli``          the ``emakit`` command (``python -m emakit``): export, posthoc, plot
- ``kinds``        one rule per kind of flag value; ``Parser``, the CLIs' argparse class

Importing this package imports nothing heavy; the submodules import timm when loaded.
"""
from __future__ import annotations

import os
import sys

__all__ = ["UsageError", "one_line", "print_error"]


class UsageError(Exception):
    """A problem the user can fix (bad flag, data, checkpoint, output dir): the CLI prints
    ``str(error)`` as one line on stderr and exits with status 2."""


def one_line(error: BaseException | str) -> str:
    """The message of an error as one line: the one rule for every error text emakit shows.

    Each line is stripped, empty lines are dropped and the rest are joined with one space
    (a file name's own spaces are kept, so it can still be found). DataLoader re-raises a
    worker's exception with the worker's traceback in the message; the original message is
    then the last line, after ``<ExceptionName>: ``, and that alone is returned.
    """
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if any("Traceback (most recent call last)" in ln for ln in lines):
        last = lines[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return " ".join(lines)


def print_error(prog: str, error: BaseException | str) -> None:
    """Print ``<prog>: error: <one line>`` on stderr, once per job: under torchrun only the
    process with ``RANK`` 0 prints (every rank meets the same input error and exits 2)."""
    if os.environ.get("RANK", "0") not in ("0", ""):
        return
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
