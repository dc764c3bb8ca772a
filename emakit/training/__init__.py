"""emakit.training: the image-classification trainer behind ``train.py``.

Needs timm, torchvision, yaml and tqdm (``pip install emakit[train]``); ``import emakit``
alone never imports this package. Modules:

- ``config``       argparse groups, ``--config`` YAML as defaults, the resolved-args dump
- ``data``         ImageFolder and the embedded digits dataset, transforms, loaders, samplers
- ``distributed``  ``DistInfo`` (rank, world size, device, ``is_main``), init, reductions
- ``engine``       ``train_one_epoch`` and ``evaluate``
- ``run``          the fit loop: build -> resume -> epochs -> checkpoints -> summary
- ``lifecycle``    how a run ends early: stop signals, exit statuses, RNG states, the resume command
- ``averages``     several EMAs, the post-hoc EMA tracker (snapshots), BN recalibration at evaluation
- ``bn``, ``plots``, ``validation``: BN recalibration, PNG plots, the work behind ``validate.py``

Importing this package imports nothing heavy; the submodules import timm when loaded.
"""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A problem the user can fix (bad flag, data, checkpoint, output dir): the CLI prints
    ``str(error)`` as one line on stderr and exits with status 2."""
