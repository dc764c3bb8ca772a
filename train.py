#!/usr/bin/env python3
"""Train a timm image classifier with an EMA of its weights.

    python train.py                                    # embedded digits dataset, CPU-friendly preset
    python train.py ../imagenette2-320 --config configs/imagenette2-320_resnet34.yaml
    python train.py ../imagenette2-320 --model resnet34 --model-ema-decay 0.9998   # timm's flags
    torchrun --standalone --nproc_per_node=2 train.py ../imagenette2-320 --model resnet34
    python train.py --resume output/<run>/last.pth.tar  # continue a run exactly

Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; returns the process exit status."""
    from emakit.training import UsageError, print_error
    from emakit.training.config import parse_args
    from emakit.training.run import TrainingInterrupted, build_trainer, close_trainer, configure_logging, \
        describe_result, fit

    logs = configure_logging()
    try:
        args = parse_args(argv)
        trainer = build_trainer(args, logs)
        try:
            result = fit(trainer)
        except BaseException:
            close_trainer(trainer)
            raise
        close_trainer(trainer, synchronize=True)
        if trainer.dist.is_main:
            print(describe_result(result))
        return 0
    except UsageError as e:
        print_error("train.py", e)
        return 2
    except TrainingInterrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("train.py: interrupted before training started: no checkpoint was written", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    finally:
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
