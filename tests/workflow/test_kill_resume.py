"""A fine-tuning cell killed hard (SIGKILL to Snakemake and the job: a node lost, an OOM kill, a closed terminal)
resumes from its last periodic checkpoint under `--rerun-incomplete`, and ends with the same network as a cell that
ran uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow
CELL = "finetune/liver/scratch/frac100/seed0"


def _config(tmp_path: Path, results: str) -> Path:
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.pop("dataset_inits")
    config.update(results=results, inits=["scratch"], fractions=[100])
    config["finetune"].update(steps=400, checkpoint_every=25, log_every=50)
    path = tmp_path / f"{results}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(tmp_path: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
            "--cores", "2", *args, "--configfile", str(config)]


def test_a_sigkilled_cell_resumes_from_its_checkpoint(tmp_path, run_snakemake):
    config = _config(tmp_path, "killed")
    target = f"killed/{CELL}/metrics.json"
    ready = subprocess.run(_snakemake(tmp_path, config, "killed/preprocessed/liver", "killed/splits/liver.json"),
                           capture_output=True, text=True, timeout=600)
    assert ready.returncode == 0, ready.stderr[-3000:]
    job = subprocess.Popen(_snakemake(tmp_path, config, target), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / CELL / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the cell wrote no periodic checkpoint before it ended"
    os.killpg(job.pid, signal.SIGKILL)  # Snakemake and the training job die at once, nothing cleans up
    job.wait()
    assert not (tmp_path / "killed" / CELL / "metrics.json").exists()

    # What a user does next (docs/common_problems.md): release the dead run's lock if Snakemake reports one; a plain
    # rerun then stops at Snakemake's guard against incomplete outputs, and --rerun-incomplete resumes.
    assert subprocess.run(_snakemake(tmp_path, config, "--unlock"), capture_output=True, timeout=600).returncode == 0
    plain = subprocess.run(_snakemake(tmp_path, config, target), capture_output=True, text=True, timeout=600)
    assert plain.returncode != 0 and "--rerun-incomplete" in plain.stdout + plain.stderr
    resumed = subprocess.run(_snakemake(tmp_path, config, target, "--rerun-incomplete"), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "killed" / CELL / "metrics.json").read_text())
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] % 25 == 0, metrics["resumed_from_step"]
    assert not checkpoint.exists()  # a finished cell keeps none

    reference = _config(tmp_path, "uninterrupted")
    ref = subprocess.run(_snakemake(tmp_path, reference, f"uninterrupted/{CELL}/metrics.json"), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = torch.load(tmp_path / "killed" / CELL / "model.pt", weights_only=True)
    whole = torch.load(tmp_path / "uninterrupted" / CELL / "model.pt", weights_only=True)
    assert killed.keys() == whole.keys() and all(torch.equal(killed[k], whole[k]) for k in killed)
