"""What the workflow tests share: the real `snakemake` on this checkout's Snakefile, in a folder of the test's own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def run_snakemake() -> Callable[..., subprocess.CompletedProcess]:
    """run(workdir, *args, config=workdir/config.yaml, timeout=900): snakemake with 2 cores, output captured."""

    def run(workdir: Path, *args: str, config: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                               str(workdir), "--configfile", str(config or workdir / "config.yaml"), "--cores", "2",
                               *args], capture_output=True, text=True, timeout=timeout)

    return run
