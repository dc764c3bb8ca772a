#!/usr/bin/env python3
"""Evaluate the raw and EMA weights of checkpoints (timm's validate.py flags).

    python validate.py --checkpoint output/<run>/last.pth.tar --use-ema      # embedded digits val split
    python validate.py ../imagenette2-320 --checkpoint output/<run>/model_best.pth.tar --weights both
    python validate.py DATA --checkpoint output/<run>/ --results-file results.csv   # every checkpoint in it
    python validate.py --checkpoint output/<run>/last.pth.tar --export-ema model_ema.safetensors
    python validate.py --checkpoint output/<run>/last.pth.tar --posthoc-sigma-rel 0.02,0.05,0.08,0.15 \\
        --posthoc-save best_ema.safetensors                                 # post-hoc EMA sweep
    torchrun --standalone --nproc_per_node=2 validate.py DATA --checkpoint CKPT --weights both
    python validate.py --data-dir DATA -m resnet50 --pretrained --amp       # timm's: a model's hub weights
    python validate.py DATA --checkpoint CKPT --valid-labels imagenet_a.txt --metrics-avg macro

Every flag of timm's validate.py is accepted (docs/TIMM_DIFFERENCES.md: the few refused, and why).

Prints a table per checkpoint and one JSON result line per weight set on stdout.
Exit status: 0 done, 2 bad input or checkpoint (one line on stderr), 130 / 143 / 129
stopped by SIGINT / SIGTERM / SIGHUP (files are written whole or not at all).
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; returns the process exit status."""
    # The stop signals first (standard library only): a signal while torch loads, or at any
    # later point, stops at once with one line and 128 + signal (atomic writes leave no half files).
    from emakit.training.lifecycle import StopSignals, report_stop_before_training

    signals = StopSignals().install()
    try:
        return _run(argv)
    except KeyboardInterrupt as e:
        return report_stop_before_training("validate.py", e, "before the results were reported")
    finally:
        signals.restore()


def _run(argv: list[str] | None) -> int:
    """:func:`main` once the stop signals are taken over."""
    from emakit.checkpoint import CheckpointError
    from emakit.training import UsageError, print_error
    from emakit.training.distributed import init_distributed, shutdown_distributed
    from emakit.training.logs import configure_logging
    from emakit.training.validate_config import parse_args
    from emakit.training.validation import report_lines, run

    logs, dist = configure_logging(), None
    try:
        settings = parse_args(argv)
        dist = init_distributed(settings.runtime.device)
        report = run(settings, dist)
        if dist.is_main:
            print("\n".join(report_lines(report)), flush=True)
        shutdown_distributed(dist, synchronize=True)
        dist = None
        return 0
    except (UsageError, CheckpointError) as e:
        print_error("validate.py", e)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    finally:
        if dist is not None:
            shutdown_distributed(dist)
        logs.close()


if __name__ == "__main__":
    from emakit.training.lifecycle import end_process

    end_process(main())
