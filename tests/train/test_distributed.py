"""Pretraining split over ranks (torch.distributed, gloo on CPU) computes what one process computes; a stop signal
to any one rank checkpoints the run, which then resumes at any world size; a dead rank fails the job, named, within
the timeout, and leaves the last checkpoint intact.

Tolerance. The formulas are exact: in float64, global-batch BatchNorm + NT-Xent split over two ranks give the loss
and every gradient of one process to 1e-10 (test below). In float32 two ranks sum a batch in another order than one
process, so results differ by rounding, which training amplifies: HSSL most, because it batch-normalises pooled
features that vary little between views (small variance, large 1/std) and divides by a 0.2 temperature. Measured on
the demo's model and settings after 4 SGD steps: loss within 1.3e-5, weights within 4e-5 (HSSL) and 1e-5 (BYOL,
PGL) on the machine this was first measured on; on an AMD EPYC CI machine (2026-11) the same test gave losses
1.7e-4 apart and weights over 1e-4 apart in some runs and not in others (the two processes' thread timing changes
the rounding). Hence atol 1e-3 on both; an actual error is still far outside it (per-rank instead of global
BatchNorm: the HSSL loss differs by 0.6 within 4 steps). Weights are compared under SGD: under AdamW, which divides each gradient by its
own running size, a parameter whose true gradient is zero (a conv bias in front of instance norm) moves by +-lr on
rounding noise alone, in one process as in two, and weights would differ by up to lr x steps.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ctssl.config import complete_config
from ctssl.train.distributed import World, world_from_env
from ctssl.train.launch import Layout, gpu_shortage, srun_command
from ctssl.train.loop import IndexedSamples
from ctssl.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())
LOSS_ATOL, WEIGHT_ATOL = 1e-3, 1e-3


def test_the_shards_of_a_step_are_exactly_that_steps_samples():
    def draw(rng):
        return {"value": torch.tensor(int(rng.integers(2**62)))}

    batch, steps, start = 4, 5, 1
    whole = IndexedSamples.from_step(draw, 3, batch, steps, start)
    shards = [whole.shard(rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [len(whole) // 2] * 2
    for step in range(steps - start):
        one_process = [int(whole[step * batch + j]["value"]) for j in range(batch)]
        two_ranks = [int(s[step * 2 + j]["value"]) for s in shards for j in range(2)]
        assert two_ranks == one_process
    with pytest.raises(ValueError, match="batch size 4 does not split over 3 ranks"):
        whole.shard(0, 3)


def test_a_rank_learns_who_it_is_from_the_launcher_or_from_srun():
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == \
        World(3, 4, 1, 2)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    world = world_from_env(srun)
    assert world == World(5, 8, 1, 4) and world.nodes == 2 and not world.is_main
    with pytest.raises(ValueError, match="not started as a rank"):
        world_from_env({"RANK": "0"})
    with pytest.raises(ValueError, match="inconsistent rank environment"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})


def test_a_jobs_layout_comes_from_the_resources_the_config_gave_it():
    from ctssl.config import job_resources, load_config

    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml")
    assert Layout.of_job(job_resources(cfg, "pretrain"), 30) == Layout(world_size=1, nodes=1, timeout_s=30)
    cfg["pretrain"]["world_size"], cfg["resources"]["pretrain"]["nodes"] = 4, 2
    assert Layout.of_job(job_resources(cfg, "pretrain"), 30) == Layout(world_size=4, nodes=2, launcher="srun",
                                                                        timeout_s=30)


def test_several_nodes_start_one_srun_task_per_rank_with_explicit_geometry():
    cmd = srun_command(Layout(world_size=8, nodes=2, launcher="srun --mpi=none"), Path("/r/spec.json"), 16, "auto")
    assert cmd[:2] == ["srun", "--mpi=none"]
    for flag in ("--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=4", "--gpus-per-task=1",
                 "--kill-on-bad-exit=1"):
        assert flag in cmd
    assert cmd[-3:] == ["-m", "ctssl.train.launch", "/r/spec.json"]
    assert "--gpus-per-task=1" not in srun_command(Layout(world_size=2, nodes=2), Path("s"), 2, "cpu")


def test_global_batchnorm_and_ntxent_over_two_ranks_are_the_one_process_formulas(tmp_path):
    """Float64, so any difference beyond 1e-10 is a wrong formula (statistics, gather, gradient routing). Also: the
    end-of-run check of identical copies across ranks names a rank whose copy differs by a single bit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "two_ranks_check.py"),
                               str(tmp_path / "rendezvous"), str(tmp_path / "diffs.json")],
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    result = json.loads((tmp_path / "diffs.json").read_text())
    assert result["check_identical"] == "ranks [1] hold weights or EMA targets different from rank 0's after training"
    diffs = result["diffs"]
    assert set(diffs) >= {"loss", "z_a", "volume", "norm.weight", "norm3d.weight", "8.running_var", "3.running_mean"}
    assert max(diffs.values()) < 1e-10, diffs


def test_a_machine_with_fewer_gpus_than_ranks_is_refused_naming_what_to_change(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    problem = gpu_shortage("auto", Layout(world_size=4, nodes=2))
    assert "asks for 2 ranks on this node, one per GPU, but 1 CUDA GPU(s) are visible" in problem
    assert "pretrain.world_size / resources.pretrain.gpu" in problem and "device: cpu" in problem
    assert gpu_shortage("cpu", Layout(world_size=4)) is None
    assert gpu_shortage("cuda", Layout(world_size=2, nodes=2)) is None


# ------------------------------------------------------------------------------------------ real runs, 2 gloo ranks
@pytest.fixture(scope="module")
def pool_csv(liver_preprocessed, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    frame = pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(liver_preprocessed / f"{c}.npy")}
                          for c in (f"liver_{i:03d}" for i in range(4))])
    frame.to_csv(root / "all.csv", index=False)
    return root / "all.csv"


def demo_config(tmp_path: Path, **pretrain) -> Path:
    """The demo's model and method settings, SGD (see the module docstring), a patch that fits the test volumes."""
    section = copy.deepcopy(DEMO["pretrain"])
    section.update({"steps": 4, "patch_size": [32, 32, 16], "warmup_steps": 1, "log_every": 1, "checkpoint_every": 1000,
                    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}, **pretrain})
    section["methods"]["hssl"].update(steps=section["steps"])
    cfg = complete_config({"model": DEMO["model"], "pretrain": section, "device": "cpu", "amp": False})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, pool_csv: Path, out: Path, method: str, world_size: int) -> subprocess.Popen:
    """`ctssl pretrain` with `out` given relative to its working directory, as Snakemake gives paths."""
    return subprocess.Popen([sys.executable, "-m", "ctssl.cli", "pretrain", "--config", str(config), "--pool-csv",
                             str(pool_csv), "--method", method, "--out", out.name, "--threads", "2",
                             "--world-size", str(world_size)], cwd=out.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expected: int = 0, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expected, output[-4000:]
    return output


def curve(out: Path) -> list[tuple[int, float]]:
    """The logged (step, loss) rows, complete lines only: a running job may be half-way through writing one."""
    text = (out / "train_log.csv").read_text()
    return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1]))]


def assert_same_run(a: Path, b: Path) -> None:
    (steps_a, loss_a), (steps_b, loss_b) = zip(*curve(a), strict=True), zip(*curve(b), strict=True)
    assert steps_a == steps_b
    np.testing.assert_allclose(loss_a, loss_b, rtol=0, atol=LOSS_ATOL)
    state_a, state_b = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


def one_process(config: Path, pool_csv: Path, out: Path, method: str) -> None:
    """The reference: the same settings in this process (world size 1)."""
    run_pretrain(pool_csv=pool_csv, method=method, pool="all", cfg=yaml.safe_load(config.read_text()), out_dir=out,
                 threads=2)


@pytest.mark.parametrize("method", ["byol", "pgl", "hssl"])  # PGL at decoder0: the srun test below
def test_two_ranks_compute_what_one_process_computes(pool_csv, tmp_path, method):
    config = demo_config(tmp_path)
    one_process(config, pool_csv, tmp_path / "one", method)
    two = start(config, pool_csv, tmp_path / "two", method, 2)
    output = finish(two)
    assert "as 2 ranks on 1 node(s)" in output
    # Step 1 runs the same weights on the same samples: any sample drawn differently would show here at once.
    assert abs(curve(tmp_path / "one")[0][1] - curve(tmp_path / "two")[0][1]) < 1e-5
    assert_same_run(tmp_path / "one", tmp_path / "two")
    meta = json.loads((tmp_path / "two" / "model.json").read_text())
    assert meta["world_size"] == 2 and meta["nodes"] == 1
    assert [r["rank"] for r in meta["ranks"]] == [0, 1] and {r["device"] for r in meta["ranks"]} == {"cpu"}
    assert not list((tmp_path / "two").glob(".ranks-*"))  # the launch folder (spec, rendezvous) is removed


def rank_pids(launcher: subprocess.Popen, world_size: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid of the launcher's rank processes (read from /proc: their RANK variable)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        ranks = {}
        for pid in children:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
            if b"RANK" in env:  # (a child between fork and exec still shows the launcher's environment)
                ranks[int(env[b"RANK"])] = int(pid)
        if len(ranks) == world_size:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "train_log.csv").exists() and len(curve(out)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("training did not progress")


pytestmark_linux = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads rank pids from /proc")


@pytestmark_linux
def test_a_signal_to_one_rank_checkpoints_all_and_the_run_resumes_on_one_rank(pool_csv, tmp_path):
    steps = 10  # rounding differences grow with steps (see the tolerance above): short enough to stay within it
    config = demo_config(tmp_path, steps=steps)
    reference = start(config, pool_csv, tmp_path / "reference", "pgl", 2)
    finish(reference)
    out = tmp_path / "run"
    proc = start(config, pool_csv, out, "pgl", 2)
    ranks = rank_pids(proc, 2)
    wait_for_steps(out, 4, proc)
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 only: it must suffice
    output = finish(proc, expected=75)
    stopped_at = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 4 <= stopped_at < steps
    assert "another rank received a stop signal" in output and "SIGUSR1 received" in output
    assert curve(out)[-1][0] == stopped_at and not (out / "model.pt").exists()

    resumed = start(config, pool_csv, out, "pgl", 1)  # a 2-rank checkpoint, resumed by one process
    output = finish(resumed)
    assert f"resuming from step {stopped_at}" in output
    assert [s for s, _ in curve(out)] == list(range(1, steps + 1))
    assert_same_run(tmp_path / "reference", out)


@pytestmark_linux
def test_a_killed_rank_fails_the_job_within_the_timeout_and_keeps_the_checkpoint(pool_csv, tmp_path):
    config = demo_config(tmp_path, steps=400, checkpoint_every=3, rank_timeout_s=20)
    out = tmp_path / "run"
    proc = start(config, pool_csv, out, "pgl", 2)
    ranks = rank_pids(proc, 2)
    wait_for_steps(out, 7, proc)
    killed_at = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    output = finish(proc, expected=1, timeout=120)
    assert time.time() - killed_at < 20 + 10
    assert "rank 1 was killed by SIGKILL; stopping the other ranks" in output
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["step"] >= 6 and checkpoint["step"] % 3 == 0
    assert not (out / "model.pt").exists()


FAKE_SRUN = """
import os, subprocess, sys
args = sys.argv[1:]
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
cmd = args[next(i for i, a in enumerate(args) if not a.startswith("--")):]
n, per_node = int(opts["ntasks"]), int(opts["ntasks-per-node"])
procs = [subprocess.Popen(cmd, env={**os.environ, "SLURM_PROCID": str(r), "SLURM_NTASKS": str(n),
                                    "SLURM_LOCALID": str(r % per_node), "SLURM_NTASKS_PER_NODE": str(per_node)})
         for r in range(n)]
sys.exit(max(p.wait() for p in procs))
"""


def test_several_nodes_run_through_srun_tasks_that_know_their_rank_from_slurm(pool_csv, tmp_path):
    """The several-node path with a stand-in for srun that starts the tasks as srun does (SLURM_PROCID, ...), on
    this one machine: 2 'nodes' x 1 rank, the same result as one process. PGL at decoder0: the finer decoder stages
    never run, and DDP must leave them as one process does (no gradient, so no weight decay either)."""
    from ctssl.logutil import setup_logging
    from ctssl.train.launch import pretrain_job

    (tmp_path / "srun.py").write_text(FAKE_SRUN)
    config = demo_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["pretrain"]["methods"]["pgl"]["feature_level"] = "decoder0"
    config.write_text(yaml.safe_dump(cfg))
    one_process(config, pool_csv, tmp_path / "one", "pgl")
    setup_logging(tmp_path / "srun.log")
    rc = pretrain_job(pool_csv=pool_csv, method="pgl", pool="all", cfg=cfg, out_dir=tmp_path / "srun", threads=2,
                      layout=Layout(world_size=2, nodes=2, launcher=f"{sys.executable} {tmp_path / 'srun.py'}",
                                    timeout_s=60), log_file=tmp_path / "srun.log")
    assert rc == 0, (tmp_path / "srun.log").read_text()[-3000:]
    assert "as 2 ranks on 2 node(s)" in (tmp_path / "srun.log").read_text()
    assert_same_run(tmp_path / "one", tmp_path / "srun")
    meta = json.loads((tmp_path / "srun" / "model.json").read_text())
    assert meta["world_size"] == 2 and meta["nodes"] == 2
