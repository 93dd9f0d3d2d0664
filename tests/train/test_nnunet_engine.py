"""An nnU-Net cell's own process never outlives the ctssl job that started it (a cancelled or preempted cluster
job must not leave nnU-Net training on the node)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("nnunetv2")

from ctssl.config import complete_config  # noqa: E402
from ctssl.io import write_json  # noqa: E402
from ctssl.splits import make_splits  # noqa: E402

CFG = complete_config({
    "model": {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, 2], "feature_channels": 4},
    "finetune": {"patch_size": [16, 16, 16], "batch_size": 2, "steps": 4, "lr": 0.01, "weight_decay": 0.0,
                 "engine": "nnunet", "nnunet": {"epochs": 1000, "iterations_per_epoch": 250}},
    "device": "cpu",
})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] != "Z"  # a zombie has exited


@pytest.mark.workflow
def test_killing_the_job_kills_its_nnunet_cell(liver_preprocessed, tmp_path):
    ids = [f"liver_{i:03d}" for i in range(4)]
    write_json(tmp_path / "splits.json", {"dataset": "liver", **make_splits(ids, test_fraction=0.25, min_test=1,
                                                                            split_seed=0)})
    args = {"preprocessed_dir": str(liver_preprocessed), "splits_path": str(tmp_path / "splits.json"),
            "fraction": 100, "seed": 0, "init": "scratch", "pretrained_run": None, "cfg": CFG,
            "out_dir": str(tmp_path / "cell")}
    job = subprocess.Popen([sys.executable, "-c", "import json, sys\nfrom ctssl.nnunet.engine import "
                            f"run_nnunet_cell\nrun_nnunet_cell(**json.loads({json.dumps(json.dumps(args))}))"])
    log = tmp_path / "cell" / "nnunet" / "nnunet.log"
    deadline = time.time() + 240
    while not (log.exists() and "Dataset001_liver" in log.read_text()):  # nnU-Net's fingerprinting has begun
        assert job.poll() is None and time.time() < deadline, "the cell never started"
        time.sleep(0.2)
    cell = int(subprocess.run(["pgrep", "-P", str(job.pid), "-f", "ctssl.nnunet.cell"], capture_output=True,
                              text=True, check=True).stdout.split()[0])
    job.send_signal(signal.SIGTERM)  # what SLURM sends a cancelled job
    job.wait(timeout=30)
    deadline = time.time() + 15
    while _alive(cell) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(cell), "the nnU-Net cell outlived its job"
    assert not (tmp_path / "cell" / "metrics.json").exists()
