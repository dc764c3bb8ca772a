"""Building the parts of a run from explicit values: one ``build_model`` for train.py,
validate.py and the export command."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from . import UsageError, one_line

__all__ = ["build_model", "check_model_name"]

_log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """``UsageError`` for a name timm does not know, with close matches and how to list names."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown model {name!r}: {hint}list the names with "
                         "python -c \"import timm; print(timm.list_models('*resnet*'))\"")


def build_model(name: str, num_classes: int, device: torch.device, *, drop_rate: float = 0.0,
                drop_path_rate: float | None = None, pretrained_path: str | None = None,
                channels_last: bool = False, in_chans: int | None = None, log: bool = True) -> nn.Module:
    """``timm.create_model`` moved to ``device`` (channels_last if asked), in train mode.

    ``pretrained_path``: start from this local weights file (timm's ``pretrained_cfg_overlay``
    ``file``); nothing is ever downloaded. ``in_chans``: input channels when not 3 (a
    checkpoint's training args). An unknown name is a ``UsageError`` saying how to list the
    models. ``log``: log the parameter count (train.py).
    """
    import timm

    check_model_name(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if in_chans:
        kwargs["in_chans"] = in_chans
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise UsageError(f"--pretrained-path {pretrained_path}: no such file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(pretrained_path)})
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        if pretrained_path:
            raise UsageError(f"cannot load --pretrained-path {pretrained_path} into {name}: "
                             f"{one_line(e)[:300]}") from None
        raise
    model.to(device=device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if log:
        _log.info("model %s: %.2fM parameters, %d classes%s", name,
                  sum(p.numel() for p in model.parameters()) / 1e6, num_classes,
                  f", weights from {pretrained_path}" if pretrained_path else "")
    return model
