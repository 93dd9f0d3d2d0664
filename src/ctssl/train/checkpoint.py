"""Checkpoint-on-signal and resume, shared by pretraining and fine-tuning.

On a preemptible cluster a job is told to stop (SLURM: SIGUSR1 some minutes before the time limit, SIGTERM at it).
The loops finish the current step, write a checkpoint with everything needed to continue (weights, optimizer,
schedule, RNG states, step), and exit with EX_TEMPFAIL (75); rerunning the same job resumes from that checkpoint.
A checkpoint carries a fingerprint of the run's settings, so a changed config never resumes a stale run; a damaged
or foreign one is set aside (`last.pt.bad-<time>`) and the run resumes from the checkpoint before it, or from step 0.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from ctssl.io import save_torch
from ctssl.train.distributed import SINGLE, World, barrier
from ctssl.train.interrupt import SignalFlag

log = logging.getLogger(__name__)
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


PREVIOUS = "previous.pt"  # the checkpoint before last.pt, kept so a damaged last.pt costs one interval, not the run


def save_checkpoint(path: Path, step: int, fingerprint: str, modules: dict, log_rows: list[dict]) -> None:
    """`modules`: name -> object with state_dict() (network, optimizer, scheduler, scaler); `log_rows`: the
    training log so far (CsvLog.rows). The new checkpoint is written and flushed to disk beside `path`; only then
    does the current one become previous.pt and the new one `path`, so at every instant one complete checkpoint
    exists."""
    save_torch(path, {"step": step, "fingerprint": fingerprint, "rng": rng_state(), "log_rows": list(log_rows),
                      **{name: obj.state_dict() for name, obj in modules.items()}}, previous=path.with_name(PREVIOUS))


def _problem(ckpt: object, fingerprint: str, modules: dict) -> str | None:
    """Why a loaded checkpoint cannot resume this run, or None."""
    if not isinstance(ckpt, dict):
        return f"not a ctssl checkpoint (a {type(ckpt).__name__})"
    if ckpt.get("fingerprint") != fingerprint:
        return (f"made with other settings (fingerprint {str(ckpt.get('fingerprint'))[:12]}, this run "
                f"{fingerprint[:12]})")
    missing = [key for key in ("step", "rng", "log_rows", *modules) if key not in ckpt]
    return f"incomplete (no {', '.join(missing)})" if missing else None


def set_aside(path: Path, reason: str) -> Path:
    """Rename a checkpoint that cannot be used to `NAME.bad-<time>` (never deleted: the user may want it)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bad-{stamp}-{n}")
    path.rename(target)
    log.warning("checkpoint %s set aside as %s: %s", path, target.name, reason)
    return target


def load_checkpoint(path: Path, fingerprint: str, modules: dict, device: torch.device,
                    keep_aside: bool = True) -> tuple[int, list[dict]]:
    """Restore `modules` and the RNG states from `path`, or else from previous.pt beside it; returns (step to
    resume from, log rows up to it), or (0, []) to start afresh.

    A checkpoint that is unreadable (truncated by a full disk, damaged), incomplete, or made with other settings is
    set aside as `*.bad-<time>` with a one-line warning saying why, so a rerun never crashes on it again and never
    resumes a different run. Only rank 0 renames (`keep_aside`); the other ranks reach the same verdict."""
    for candidate in (path, path.with_name(PREVIOUS)):
        try:
            ckpt = torch.load(candidate, map_location=device, weights_only=False)
        except FileNotFoundError:  # none, or rank 0 just set it aside
            continue
        except Exception as exc:  # torch raises a zoo of types for a damaged file
            reason = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        else:
            reason = _problem(ckpt, fingerprint, modules)
            if reason is None:
                for name, obj in modules.items():
                    obj.load_state_dict(ckpt[name])
                set_rng_state(ckpt["rng"])
                step = int(ckpt["step"])
                log.info("resuming from step %d (%s)", step, candidate)
                return step, [row for row in ckpt["log_rows"] if int(row["step"]) <= step]
        if keep_aside:
            set_aside(candidate, reason)
    return 0, []


def checkpoint_after_step(flag: SignalFlag, stop: bool, step: int, total: int, every: int, path: Path,
                          fingerprint: str, modules: dict, csv_log, world: World = SINGLE, due: bool = False) -> bool:
    """Call after completed step `step` (1-based) of `total`: writes the periodic checkpoint (`every` steps, 0 =
    never, or `due`: the loop's wall-clock interval has passed) and, when a stop was asked (`stop`: a signal reached
    this rank or, agreed by all-reduce, any rank), a checkpoint, then closes the log and raises TrainingInterrupted.
    Rank 0 writes; the others wait for it, so no rank exits before the checkpoint is complete. The last step writes
    none: the results follow at once. Returns whether this rank wrote one."""
    if step >= total:
        return False
    written = (stop or due or bool(every and step % every == 0)) and world.is_main
    if written:
        save_checkpoint(path, step, fingerprint, modules, csv_log.rows)
    if stop:
        barrier(world)
        csv_log.close()
        raise flag.interrupted(step, total, path)
    return written


def discard_checkpoint(path: Path) -> None:
    """A finished run keeps no checkpoint: a forced rerun (`snakemake -f`, or new code under the same settings) must
    train again, not 'resume' at the last step and rewrite the old weights. Checkpoints set aside stay."""
    path.unlink(missing_ok=True)
    path.with_name(PREVIOUS).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
