"""emakit.training: the image-classification trainer behind ``train.py``.

Needs timm, torchvision, yaml and tqdm (``pip install emakit[train]``); ``import emakit``
alone never imports this package. Modules:

- ``options``      one declaration per option: ``Flag`` fields -> argparse flags, YAML keys, settings
- ``settings``     every train.py option declared on the frozen settings the modules read (``TrainSettings``)
- ``config``       train.py's parser (from ``settings``), ``--config`` YAML as defaults, ``parse_settings``
- ``state``        the checkpoint layout: its keys and the entries each part writes
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
import time

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


# How long a rank other than 0 waits for rank 0 to print the same input error (see print_error).
PEER_ERROR_GRACE_S = 30.0


def print_error(prog: str, error: BaseException | str) -> None:
    """Print ``<prog>: error: <one line>`` on stderr, once per job.

    Under torchrun every rank meets the same input error and exits 2, and rank 0 prints it.
    Another rank first waits up to ``PEER_ERROR_GRACE_S`` seconds: torchrun stops it
    (SIGTERM) once rank 0 has exited, so the line is printed once, and rank 0 is not stopped
    before it could print (a rank that exits first has torchrun stop the others at once).
    An error that rank 0 did not meet is printed after the wait, as ``rank N: <line>``.
    """
    rank = os.environ.get("RANK", "0")
    line = one_line(error)
    if rank not in ("0", ""):
        try:
            time.sleep(PEER_ERROR_GRACE_S)
        except KeyboardInterrupt:  # torchrun's SIGTERM (StopSignals raises it): rank 0 has spoken
            return
        line = f"rank {rank}: {line}"
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
