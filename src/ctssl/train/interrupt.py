"""Stopping on a signal and the exit status that says "rerun to resume", without torch.

A separate module from `checkpoint` so that what only launches or supervises a run (the multi-rank launcher, the
workflow scripts before they train) starts without importing torch and MONAI: each import costs seconds of CPU
per process, and a pipeline starts many processes.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from ctssl.errors import InputDataError

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again later"


class TrainingInterrupted(RuntimeError):
    """A signal asked the run to stop; a checkpoint was written and a rerun resumes from it."""


class SignalFlag:
    """SIGTERM/SIGUSR1 -> remember it; the loop checks `received` after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> SignalFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def interrupted(self, step: int, total: int, ckpt_path: Path) -> TrainingInterrupted:
        why = f"{signal.Signals(self.received).name} received" if self.received is not None else \
            "another rank received a stop signal"
        return TrainingInterrupted(f"{why}: checkpoint at step {step}/{total} written to {ckpt_path}; rerun the "
                                   "same command to resume")


def run_interruptible(run, log: logging.Logger) -> int:
    """Exit status of `run()`: 0, EXIT_INTERRUPTED after a checkpoint-on-signal, or 1 for bad or damaged input
    (each logged as its one-line message, not a traceback: the message names the file and the remedy)."""
    try:
        run()
    except TrainingInterrupted as exc:
        log.error("%s", exc)
        return EXIT_INTERRUPTED
    except InputDataError as exc:
        log.error("%s", exc)
        return 1
    return 0
