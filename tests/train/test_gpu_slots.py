"""The GPU slot pool of a local multi-GPU run (ctssl.train.gpu_slots), on CPU with a fake device list: concurrent
jobs get different GPUs, a killed job frees its GPU, a job waits while every GPU is taken."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctssl.train.gpu_slots import assign_job_gpus, claim_gpus, machine_gpus

# A training job in miniature: claim like a job does, print the GPUs it got, then hold them until killed.
JOB = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from ctssl.train import gpu_slots
gpu_slots.assign_job_gpus("auto", int(sys.argv[1]), "job " + sys.argv[2], logging.getLogger("t"))
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(600)
"""


def _start(tmp_path: Path, name: str, count: int = 1, visible: str = "0,1") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env.update(CUDA_VISIBLE_DEVICES=visible, CTSSL_GPU_LOCK_DIR=str(tmp_path / "locks"))
    return subprocess.Popen([sys.executable, "-c", JOB, str(count), name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _gpus_of(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read() if proc.poll() is not None else "no GPU printed"
    return line


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_concurrent_jobs_get_different_gpus_and_a_killed_job_frees_its_gpu(tmp_path, procs):
    procs.append(_start(tmp_path, "a"))
    first = _gpus_of(procs[0])
    procs.append(_start(tmp_path, "b"))
    second = _gpus_of(procs[1])
    assert {first, second} == {"0", "1"}
    procs.append(_start(tmp_path, "c"))  # both GPUs taken: it waits (polls every 5 s) and prints nothing yet
    time.sleep(2)
    assert procs[2].poll() is None
    os.kill(procs[0].pid, signal.SIGKILL)  # a crashed job: the kernel drops its lock, no clean-up runs
    procs[0].wait()
    assert _gpus_of(procs[2]) == first
    procs[2].kill()
    assert "all 2 GPU(s) busy with other jobs" in procs[2].stderr.read()


def test_a_job_asking_for_two_gpus_gets_two_distinct_ones(tmp_path, procs):
    procs.append(_start(tmp_path, "ddp", count=2, visible="3,5,7"))
    pair = _gpus_of(procs[0]).split(",")
    assert len(set(pair)) == 2 and set(pair) <= {"3", "5", "7"}
    procs.append(_start(tmp_path, "single", count=1, visible="3,5,7"))
    assert _gpus_of(procs[1]) == ({"3", "5", "7"} - set(pair)).pop()


def test_no_pool_for_cpu_runs_slurm_jobs_or_machines_without_gpus(tmp_path, monkeypatch):
    log = logging.getLogger("t")
    monkeypatch.setenv("CTSSL_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert assign_job_gpus("cpu", 1, "j", log) == []
    monkeypatch.setenv("SLURM_JOB_ID", "12")  # SLURM assigns the job's GPUs itself
    assert assign_job_gpus("auto", 1, "j", log) == []
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the user hid every GPU
    assert machine_gpus() == [] and assign_job_gpus("auto", 1, "j", log) == []


def test_asking_for_more_gpus_than_the_machine_has_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="asks for 3 GPU"):
        claim_gpus(3, ["0", "1"], tmp_path, "j", logging.getLogger("t"))
