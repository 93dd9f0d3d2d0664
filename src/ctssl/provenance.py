"""Code version and run environment recorded beside every result, so a number can be traced to its code."""

from __future__ import annotations

import platform
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
