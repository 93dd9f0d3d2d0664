"""Pieces every training loop shares: seeding, device, threads, LR schedule, a CSV log."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from ctssl.config import FINETUNE_BOOKKEEPING, NNUNET_BOOKKEEPING, requested_gpus, restore_later_defaults

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and MONAI so that, on CPU, the same config gives the same numbers."""
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


class NoGPUError(RuntimeError):
    """A job asked for a GPU and none is usable: it must stop, not train for weeks on the CPU."""


def gpu_report() -> str:
    """What this process can see of CUDA, for the one line a job without its GPU stops with."""
    found = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}, " \
            f"torch.cuda.is_available()={torch.cuda.is_available()}"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return found + ", torch is a CPU build"
        try:
            torch.cuda.init()
        except Exception as exc:  # the driver's own words (no driver, too old, no device)
            return found + f", driver: {str(exc).splitlines()[0]}"
    return found


def pick_device(requested: str = "auto", job: str = "this job", gpus_requested: int = 0) -> torch.device:
    """`auto`: CUDA if usable, else the CPU (a laptop). `cuda`, or `auto` in a job that asked its scheduler for GPUs
    (`gpus_requested` > 0 inside a SLURM job): CUDA or NoGPUError, never a silent fall-back to the CPU. `cpu` is
    the CPU, whatever the job asked for (training on the CPU on purpose, e.g. the tests' fake-GPU cluster)."""
    asked = [f"device: {requested}"] if requested.startswith("cuda") else []
    if gpus_requested and os.environ.get("SLURM_JOB_ID") and requested != "cpu":
        asked.append(f"{gpus_requested} GPU(s) from SLURM (job {os.environ['SLURM_JOB_ID']})")
    if asked and not torch.cuda.is_available():
        raise NoGPUError(f"{job}: asked for a GPU ({'; '.join(asked)}) but found none ({gpu_report()}); "
                         "refusing to train on the CPU. Check the job's GPU request (resources.*.gpu, the "
                         "profile's partition) and the node's driver, or set device: cpu to train on the CPU.")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def check_job_device(device: str, job: str, resources: dict, log) -> None:
    """First thing a training job does: stop with one logged line (exit 1, nothing written) when it asked for a
    GPU and has none; otherwise log the device it will train on."""
    try:
        chosen = pick_device(device, job, requested_gpus(resources))
    except NoGPUError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    log.info("%s: device %s (%s)", job, chosen, gpu_report())


def start_training_job(smk) -> tuple[logging.Logger, dict]:
    """What every training job's entry point does first: log to the job's log, take GPUs of its own on a local
    multi-GPU machine (ctssl.train.gpu_slots), stop with one line if it asked for a GPU and has none, log the device.
    Returns the logger and the training settings with `device` (and fine-tuning's log/checkpoint intervals) added:
    read from the config, not the rule's params, because they name hardware or bookkeeping, not an experiment
    (changing them reruns nothing)."""
    from ctssl.logutil import setup_logging
    from ctssl.train.gpu_slots import assign_job_gpus

    log = setup_logging(smk.log[0])
    device, resources = smk.config["device"], dict(smk.resources.items())
    job = f"{smk.rule} {dict(smk.wildcards.items())}"
    assign_job_gpus(device, requested_gpus(resources), job, log)
    check_job_device(device, job, resources, log)
    cfg = restore_later_defaults({**smk.params.cfg, "device": device})
    if "finetune" in cfg:  # how a cell logs and checkpoints: read from the config too, not a parameter
        given = smk.config["finetune"]
        cfg["finetune"] = {**{k: given[k] for k in FINETUNE_BOOKKEEPING}, **cfg["finetune"]}
        if "nnunet" in cfg["finetune"]:
            cfg["finetune"]["nnunet"] = {**{k: given["nnunet"][k] for k in NNUNET_BOOKKEEPING},
                                         **cfg["finetune"]["nnunet"]}
    return log, cfg


def loop_precision(amp: bool | str, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on, its dtype) for the config's `amp` on `device`: mixed precision on CUDA only (a CPU trains in
    float32). bf16 on a GPU that only emulates it is slow, not wrong: a warning names the fp16 setting."""
    if device.type != "cuda" or amp is False:
        return False, torch.bfloat16
    if amp == "fp16":
        return True, torch.float16
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("%s has no native bfloat16: amp %s runs emulated and slowly; set amp: fp16 (float16 with loss "
                    "scaling) for this GPU", torch.cuda.get_device_name(device), amp)
    return True, torch.bfloat16


def set_threads(threads: int | None) -> None:
    """Respect the cores Snakemake gave the job instead of letting torch grab every core of the node."""
    n = int(threads or os.environ.get("OMP_NUM_THREADS", 0) or 1)
    torch.set_num_threads(max(1, n))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float = 0.01) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `final_fraction`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class CsvLog:
    """Training log as CSV, flushed every row so a killed run still shows its curve.

    A resumed run passes the rows its checkpoint kept (`rows`, steps 1..k): they are rewritten and new rows appended,
    so no step appears twice and the curve survives Snakemake deleting a failed job's declared outputs.
    `path` None keeps the rows in memory only (the ranks other than 0 of a multi-process run).
    """

    def __init__(self, path: str | Path | None, fields: list[str], rows: list[dict] | None = None):
        self.rows = list(rows or [])
        if path is None:
            self._fh = open(os.devnull, "w", newline="")  # noqa: SIM115 - lives as long as the run
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "w", newline="")  # noqa: SIM115 - lives as long as the run
        self._writer = csv.DictWriter(self._fh, fieldnames=fields)
        self._writer.writeheader()
        self._writer.writerows(self.rows)
        self._fh.flush()

    def write(self, **row) -> None:
        row = {k: str(v) for k, v in row.items()}
        self.rows.append(row)
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
