"""Code version and run environment recorded beside every result, so a number can be traced to its code."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path

import ctssl


def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when running from a checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"{ctssl.__version__}+{commit}"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, str]:
    """Versions, platform and the CPU facts that can change the last bits of a CPU run (the CPU, torch's vector
    path `cpu_capability`: AVX2, AVX512, ..., and the threads). The same config repeats exactly on one host; on
    two hosts it did not, and over thousands of steps cells ended points apart (docs/science.md, "Same config,
    another host"), so a result says which CPU made it."""
    import monai
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": str(torch.get_num_threads()),
    }


SCHEDULER_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION",
                  "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES")


def scheduler_info() -> dict[str, str]:
    """Where the job ran: host, SLURM job/array ids and the GPUs it was given (only the variables that are set)."""
    info = {"host": socket.gethostname()}
    info.update({k: os.environ[k] for k in SCHEDULER_VARS if k in os.environ})
    return info
