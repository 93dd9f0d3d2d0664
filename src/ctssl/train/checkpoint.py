"""Checkpoint-on-signal and resume, shared by pretraining and fine-tuning.

On a preemptible cluster a job is told to stop (SLURM: SIGUSR1 some minutes before the time limit, SIGTERM at it).
The loops finish the current step, write a checkpoint with everything needed to continue (weights, optimizer,
schedule, RNG states, step), and exit with EX_TEMPFAIL (75); rerunning the same job resumes from that checkpoint.
A checkpoint carries a fingerprint of the run's settings, so a changed config never resumes a stale run.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
from pathlib import Path

import numpy as np
import torch

from ctssl.io import save_torch
from ctssl.train.distributed import SINGLE, World, barrier

log = logging.getLogger(__name__)
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, step: int, fingerprint: str, modules: dict, log_rows: list[dict]) -> None:
    """`modules`: name -> object with state_dict() (network, optimizer, scheduler, scaler); `log_rows`: the
    training log so far (CsvLog.rows)."""
    save_torch(path, {"step": step, "fingerprint": fingerprint, "rng": rng_state(), "log_rows": list(log_rows),
                      **{name: obj.state_dict() for name, obj in modules.items()}})


def load_checkpoint(path: Path, fingerprint: str, modules: dict, device: torch.device,
                    keep_stale_aside: bool = True) -> tuple[int, list[dict]]:
    """Restore `modules` and the RNG states from `path` if it belongs to this run; returns (step to resume from,
    log rows up to it), or (0, []) to start afresh. A checkpoint of other settings is kept aside as stale-*.pt,
    never deleted (by rank 0 only, `keep_stale_aside`: the other ranks just start afresh too)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:  # none, or rank 0 just moved a stale one aside
        return 0, []
    if ckpt.get("fingerprint") != fingerprint:
        if keep_stale_aside:
            stale = path.with_name(f"stale-{str(ckpt.get('fingerprint', 'unknown'))[:12]}.pt")
            path.rename(stale)
            log.warning("checkpoint %s was made with other settings; kept as %s, starting afresh", path, stale)
        return 0, []
    for name, obj in modules.items():
        obj.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    step = int(ckpt["step"])
    log.info("resuming from step %d (%s)", step, path)
    return step, [row for row in ckpt["log_rows"] if int(row["step"]) <= step]


def checkpoint_after_step(flag: SignalFlag, stop: bool, step: int, total: int, every: int, path: Path,
                          fingerprint: str, modules: dict, csv_log, world: World = SINGLE) -> None:
    """Call after completed step `step` (1-based) of `total`: writes the periodic checkpoint (`every` steps, 0 =
    never) and, when a stop was asked (`stop`: a signal reached this rank or, agreed by all-reduce, any rank), a
    checkpoint, then closes the log and raises TrainingInterrupted. Rank 0 writes; the others wait for it, so no
    rank exits before the checkpoint is complete. The last step writes none: the results follow at once."""
    if step >= total:
        return
    if (stop or (every and step % every == 0)) and world.is_main:
        save_checkpoint(path, step, fingerprint, modules, csv_log.rows)
    if stop:
        barrier(world)
        csv_log.close()
        raise flag.interrupted(step, total, path)


def discard_checkpoint(path: Path) -> None:
    """A finished run keeps no checkpoint: a forced rerun (`snakemake -f`, or new code under the same settings) must
    train again, not 'resume' at the last step and rewrite the old weights. Stale checkpoints beside it stay."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def run_interruptible(run, log: logging.Logger) -> int:
    """Exit status of `run()`: 0, or EXIT_INTERRUPTED after a checkpoint-on-signal (logged, not a traceback)."""
    try:
        run()
    except TrainingInterrupted as exc:
        log.error("%s", exc)
        return EXIT_INTERRUPTED
    return 0
