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


def environment() -> dict[str, str]:
    import monai
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }


SCHEDULER_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION",
                  "SLURM_RESTART_COUNT", "CUDA_VISIBLE_DEVICES")


def scheduler_info() -> dict[str, str]:
    """Where the job ran: host, SLURM job/array ids and the GPUs it was given (only the variables that are set)."""
    info = {"host": socket.gethostname()}
    info.update({k: os.environ[k] for k in SCHEDULER_VARS if k in os.environ})
    return info
