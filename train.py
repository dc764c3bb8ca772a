#!/usr/bin/env python3
"""Train a timm image classifier with an EMA of its weights.

    python train.py                                    # embedded digits dataset, CPU-friendly preset
    python train.py ../imagenette2-320 --config configs/imagenette2-320_resnet34.yaml
    python train.py ../imagenette2-320 --model resnet34 --model-ema-decay 0.9998   # timm's flags
    torchrun --standalone --nproc_per_node=2 train.py ../imagenette2-320 --model resnet34
    python train.py --resume output/<run>/last.pth.tar  # continue a run exactly

Exit status: 0 done; 2 bad input, or a checkpoint write failed (a full disk); 3 the run
diverged (--on-nonfinite); 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP (during
training, after writing a resumable last.pth.tar). Each failure is one line on stderr that
names the intact checkpoint and the exact command that resumes from it.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emakit.training.lifecycle import StopSignals


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; returns the process exit status."""
    # The stop signals first: the module is standard library only, so a Ctrl-C or SIGTERM while
    # torch and timm load (1-2 s) ends with the one line and 128 + signal, like any later one.
    from emakit.training.lifecycle import StopSignals, report_stop_before_training

    signals = StopSignals().install()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv), signals)
    except KeyboardInterrupt as e:  # before the run existed (the imports, the logging set-up)
        return report_stop_before_training("train.py", e)
    finally:
        signals.restore()


def _run(argv: list[str], signals: StopSignals) -> int:
    """:func:`main` once the stop signals are taken over."""
    from emakit.training import UsageError, print_error
    from emakit.training.config import parse_settings
    from emakit.training.lifecycle import (RunStopped, interrupt_signal, report_stop_before_training, resume_command,
                                           signal_name)
    from emakit.training.logs import configure_logging

    logs = configure_logging()
    trainer = run = None
    try:
        settings = parse_settings(argv)
        # the trainer (timm, torchvision, the loops) loads once the flags are good: --help and a bad
        # flag answer without it
        from emakit.training.fit import RunState, fit
        from emakit.training.outputs import describe_result
        from emakit.training.trainer import build_trainer, close_trainer

        from emakit.training.trackers import check_trackers, start_trackers

        check_trackers(settings.trackers)  # a missing optional package: one line, nothing written
        trainer = build_trainer(settings, logs)
        run = RunState.start(trainer, signals)
        trackers = start_trackers(settings, trainer.output_dir, trainer.dist.is_main)
        try:
            result = fit(trainer, run)
        except BaseException:
            close_trainer(trainer)
            raise
        finally:
            if trackers is not None:
                trackers.close()
        close_trainer(trainer, synchronize=True)
        if trainer.dist.is_main:
            print(describe_result(result))
        return 0
    except UsageError as e:
        print_error("train.py", e)
        return 2
    except RunStopped as e:
        if trainer is None or trainer.dist.is_main:
            line = e.reason + (f"; {e.resume_hint}: {resume_command(argv, e.checkpoint)}" if e.checkpoint else "")
            print(f"train.py: {'error: ' if e.error else ''}{line}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (SignalInterrupt), outside the training loop
        last = run.last_good if run is not None else None
        if last is None:
            return report_stop_before_training("train.py", e)
        signum = interrupt_signal(e)
        if trainer.dist.is_main:
            print(f"train.py: stopped by {signal_name(signum)}; the last good checkpoint is {last[0]} ({last[1]}); "
                  f"resume with: {resume_command(argv, last[0])}", file=sys.stderr)
        return 128 + signum
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    finally:
        logs.close()


if __name__ == "__main__":
    from emakit.training.lifecycle import end_process

    end_process(main())
