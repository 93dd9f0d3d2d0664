"""Every GPU of one machine used: each training job of a local run takes GPUs of its own from a lock-file pool.

Snakemake's local executor counts `--resources gpu=G` but does not say *which* GPU a job gets, so without this every
job with `device: auto` would run on GPU 0. A job claims GPUs by taking an exclusive `flock` on one lock file per
GPU (`gpu-{id}.lock` in a directory every job of the machine sees) and exports them as `CUDA_VISIBLE_DEVICES`
before CUDA starts. The kernel drops a lock when its process ends, however it ends, so a crashed or killed job
frees its GPU with no clean-up step. Why not a library: nothing maintained does this for Snakemake's local
executor (its GPU resource is a counter only).

Under SLURM the scheduler already gives every job its own GPUs (and sets `CUDA_VISIBLE_DEVICES`): no pool there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

LOCK_DIR_ENV = "CTSSL_GPU_LOCK_DIR"
_held: list[IO] = []  # the open lock files of this process: the locks live as long as the job does


def lock_dir() -> Path:
    """Where the machine's jobs keep their GPU locks: $CTSSL_GPU_LOCK_DIR, else one folder per user in /tmp."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"ctssl-gpu-locks-{os.getuid()}"


def machine_gpus() -> list[str]:
    """The GPUs this job may choose from: `CUDA_VISIBLE_DEVICES` if set (a user's own restriction is respected),
    else every GPU `nvidia-smi` lists, else none. Read without starting CUDA, which would fix the visible set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # a broken driver: the device check that follows says so in its one line
    return [line.strip() for line in out.splitlines() if line.strip()]


def _try_lock(path: Path) -> IO | None:
    fh = open(path, "a+")  # noqa: SIM115 - kept open while the lock is held
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def claim_gpus(count: int, gpus: list[str], folder: Path, job: str, log: logging.Logger,
               poll_s: float = 5.0) -> list[str]:
    """Lock `count` of `gpus` for this process (waiting while all are taken) and return their ids. The locks are
    held until the process exits."""
    if count > len(gpus):
        raise RuntimeError(f"{job}: asks for {count} GPU(s) but this machine has {len(gpus)} ({gpus})")
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        taken: list[tuple[str, IO]] = []
        for gpu in gpus:
            fh = _try_lock(folder / f"gpu-{gpu}.lock")
            if fh is not None:
                taken.append((gpu, fh))
                if len(taken) == count:
                    for _, held in taken:
                        held.seek(0)
                        held.truncate()
                        held.write(f"{os.getpid()} {job}\n")
                        held.flush()
                    _held.extend(h for _, h in taken)
                    return [g for g, _ in taken]
        for _, fh in taken:
            fh.close()  # closing drops the lock
        if not waited:
            log.info("%s: all %d GPU(s) busy with other jobs (locks in %s); waiting for one. Run with "
                     "--resources gpu=%d so that Snakemake starts no more GPU jobs than there are GPUs.",
                     job, len(gpus), folder, len(gpus))
            waited = True
        time.sleep(poll_s)


def assign_job_gpus(device: str, count: int, job: str, log: logging.Logger) -> list[str]:
    """Give a local training job GPUs of its own (exported as CUDA_VISIBLE_DEVICES) and return them; nothing for a
    CPU run, a SLURM job (SLURM assigns) or a machine without GPUs."""
    if device == "cpu" or os.environ.get("SLURM_JOB_ID"):
        return []
    gpus = machine_gpus()
    if not gpus:
        return []
    chosen = claim_gpus(max(1, count), gpus, lock_dir(), job, log)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    log.info("%s: GPU(s) %s of this machine's %s (CUDA_VISIBLE_DEVICES=%s)", job, ",".join(chosen), ",".join(gpus),
             os.environ["CUDA_VISIBLE_DEVICES"])
    return chosen
