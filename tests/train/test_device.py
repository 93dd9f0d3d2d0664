"""A training job that asked for a GPU never trains on the CPU: it stops first, with one line naming the job, what
it asked for and what it found, and writes nothing (CPU-only machine: this one has no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ctssl.train.common import NoGPUError, pick_device, requested_gpus

ROOT = Path(__file__).resolve().parents[2]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@needs_no_gpu
def test_asking_for_a_gpu_without_one_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert pick_device("auto", "job", 1) == torch.device("cpu")  # a laptop: resources.gpu is ignored locally
    with pytest.raises(NoGPUError, match=r"^pretrain x: asked for a GPU \(device: cuda\) but found none "
                                         r"\(CUDA_VISIBLE_DEVICES=.*torch.cuda.is_available\(\)=False"):
        pick_device("cuda", "pretrain x", 0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NoGPUError, match=r"asked for a GPU \(1 GPU\(s\) from SLURM \(job 4242\)\) but found none "
                                         r"\(CUDA_VISIBLE_DEVICES=, "):
        pick_device("auto", "finetune x", 1)
    assert pick_device("auto", "finetune x", 0) == torch.device("cpu")  # asked for none: the CPU is what it asked
    assert pick_device("cpu", "finetune x", 1) == torch.device("cpu")  # the CPU on purpose, GPUs or not


def test_gpus_requested_from_resources():
    assert requested_gpus({"gpu": 2}) == 2 and requested_gpus({}) == 0
    assert requested_gpus({"gres": "gpu:a100:4", "nodes": 2}) == 8 and requested_gpus({"gres": "gpu:1"}) == 1


@needs_no_gpu
@pytest.mark.workflow
def test_a_training_job_without_its_gpu_stops_with_one_line_and_writes_nothing(tmp_path):
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.update(results="results", device="cuda", dataset_inits={}, inits=["scratch", "pgl-all"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    def run(target: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                               str(tmp_path), "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", target],
                              capture_output=True, text=True, timeout=600, env=env)

    out = run("results/pretrain/pgl/all/model.pt")
    assert out.returncode != 0
    log = (tmp_path / "results" / "logs" / "pretrain" / "pgl" / "all.log").read_text()
    assert "pretrain {'method': 'pgl', 'pool': 'all'}: asked for a GPU (device: cuda) but found none" in log
    assert "Traceback" not in log and len(log.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "pretrain" / "pgl" / "all").exists()  # nothing written
    # device auto inside a SLURM job that was given GPUs it cannot see: the trap of a GPU partition without a GPU.
    config.update(device="auto", resources={"finetune": {"gpu": 1, "cpus_per_gpu": 1}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    import os

    cell = "results/finetune/liver/scratch/frac50/seed0/metrics.json"
    out = run(cell, env={**os.environ, "SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0
    log = (tmp_path / "results" / "logs" / "finetune" / "liver" / "scratch" / "frac50" / "seed0.log").read_text()
    assert "asked for a GPU (1 GPU(s) from SLURM (job 7)) but found none (CUDA_VISIBLE_DEVICES=, " in log
    assert "Traceback" not in log and not (tmp_path / "results" / "finetune" / "liver" / "scratch").exists()
