"""The pipeline on a real one-node SLURM cluster (munge + slurmdbd + slurmctld + slurmd, two fake GPUs) through
`snakemake --profile profiles/slurm`: jobs really go through SLURM (sbatch ids, sacct records), fine-tune cells run
as one job array per batch of ready cells, GPU rules get CUDA_VISIBLE_DEVICES, the pretraining job asks for both
GPUs and runs as ONE task that sees both and starts 2 ranks (gloo on CPU: the GPUs are fake), and, preempted with a
real SLURM signal, checkpoints, fails, is resubmitted by Snakemake and resumes, to the result of a local 2-rank run;
forcing one cell submits one job.

Needs root on Debian/Ubuntu (it apt-installs and starts the daemons, then stops them by PID); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CELLS = [f"results/finetune/liver/{init}/frac{pct}/seed0/metrics.json" for init in ("scratch", "pgl-all")
         for pct in (50, 100)]
PRETRAIN_STEPS = 100
# The tiny config (tests/configs/tiny.yaml) with one domain, PGL only, a pretraining long enough to be preempted,
# and per-stage resources for the SLURM profile.
CONFIG = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
CONFIG.update(results="results", inits=["scratch", "pgl-all"], dataset_inits={},
              datasets={"liver": CONFIG["datasets"]["liver"]},
              resources={"pretrain": {"gpu": 2, "cpus_per_gpu": 1, "mem_mb": 1000, "runtime": 10},
                         "finetune": {"gpu": 1, "cpus_per_gpu": 1, "mem_mb": 1000, "runtime": 10},
                         "cpu": {"mem_mb": 1000, "runtime": 10}})
CONFIG["pretrain"].update(pool_datasets=["liver"], steps=PRETRAIN_STEPS, checkpoint_every=100, log_every=100,
                          methods={"pgl": CONFIG["pretrain"]["methods"]["pgl"]})


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the harness installs and starts munge, slurmdbd, slurmctld and slurmd"
    if not shutil.which("apt-get"):
        return "needs a Debian/Ubuntu machine (apt-get) to install SLURM"
    if Path("/etc/slurm/slurm.conf").exists() and not Path("/etc/slurm/slurm.conf").is_symlink():
        return "this machine has its own /etc/slurm/slurm.conf; the harness will not replace a real installation"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    return None


pytestmark = [pytest.mark.workflow, pytest.mark.slurm,
              pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm") / "ctssl-slurm"
    env = {**os.environ, "BASE": str(base), "WITH_DBD": "1", "FAKE_GPUS": "2"}
    setup = subprocess.run(["bash", str(HERE / "setup_slurm.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    try:
        if setup.returncode != 0:
            pytest.fail(f"SLURM did not start:\n{setup.stdout[-3000:]}\n{setup.stderr[-3000:]}")
        yield base
    finally:
        subprocess.run(["bash", str(HERE / "teardown_slurm.sh")], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("slurm_work")
    (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return work


def snakemake_cmd(work: Path, *args: str) -> list[str]:
    # CI overrides: a small job limit, and the first status check after 2 s instead of 40 s.
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "config.yaml"), "--profile", str(ROOT / "profiles" / "slurm"),
            "--jobs", "4", "--slurm-init-seconds-before-status-checks", "2", *args]


def sacct(*job_ids: str) -> dict[str, dict[str, str]]:
    """JobID -> {state, partition, tres} for these jobs (array tasks appear as ID_TASK)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Partition,AllocTRES", "-j",
                          ",".join(job_ids)], capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: {"state": r[1], "partition": r[2], "tres": r[3]} for r in rows}


def submitted_ids(log: str) -> list[str]:
    return re.findall(r"SLURM jobid (\d+)", log) + re.findall(r"SLURM job ID (\d+)", log)


def preempt_pretraining(work: Path, proc: subprocess.Popen) -> tuple[str, int]:
    """Wait until the pretraining job is well into its run, then send it SIGUSR1 through SLURM (scancel), as
    SLURM does `--signal=USR1@...` before a time limit. Returns (job id, training rows seen)."""
    logs = work / ".snakemake" / "slurm_logs" / "rule_pretrain" / "pgl_all"
    train_log = work / "results" / "pretrain" / "pgl" / "all" / "train_log.csv"
    deadline = time.time() + 400
    while time.time() < deadline:
        assert proc.poll() is None, "snakemake ended before pretraining started"
        jobs = sorted(logs.glob("*.log")) if logs.is_dir() else []
        rows = len(train_log.read_text().splitlines()) - 1 if train_log.exists() else 0
        if jobs and rows >= 20:
            job_id = jobs[0].stem
            subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
            return job_id, rows
        time.sleep(0.2)
    raise AssertionError("pretraining never got going on the cluster")


def test_pipeline_through_slurm_with_arrays_gpus_and_preemption(cluster, workspace):
    proc = subprocess.Popen(snakemake_cmd(workspace), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        preempted_job, rows_before = preempt_pretraining(workspace, proc)
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-5000:]
    res = workspace / "results"
    assert (res / "report" / "dice_table.md").exists()

    # Every job went through sbatch and is in SLURM's accounting.
    ids = submitted_ids(output)
    records = sacct(*ids)
    assert len(ids) >= 7 and set(ids) <= {j.split("_")[0] for j in records}, (ids, records)

    # Fine-tune cells: array tasks on the GPU partition with one (fake) GPU each; the job saw its GPU.
    arrays = re.findall(r"Submitted array job with Snakemake IDs [\d,]+ and SLURM job ID (\d+)\. "
                        r"The individual task IDs are 1-(\d+)", output)
    assert arrays and sum(int(n) for _, n in arrays) == len(CELLS), output[-5000:]
    for array_id, n in arrays:
        for task in range(1, int(n) + 1):
            record = records[f"{array_id}_{task}"]
            assert record["state"] == "COMPLETED" and record["partition"] == "gpu", record
            assert "gres/gpu=1" in record["tres"], record
    for cell in CELLS:
        sched = json.loads((workspace / cell).read_text())["scheduler"]
        assert sched["SLURM_ARRAY_JOB_ID"] in {a for a, _ in arrays}, sched
        assert sched["CUDA_VISIBLE_DEVICES"] in {"0", "1"}, sched  # set by SLURM from the gres allocation

    # CPU stages ran on the CPU partition without a GPU.
    preprocess_id = re.search(r"SLURM jobid (\d+) \(log: \S+rule_preprocess", output).group(1)
    assert records[preprocess_id]["partition"] == "cpu" and "gpu" not in records[preprocess_id]["tres"]

    # Preemption: the signalled job checkpointed and failed; Snakemake resubmitted it with more memory and
    # runtime (attempt 2) and the new job resumed from the checkpoint, not from step 0.
    assert records[preempted_job]["state"] == "FAILED", records[preempted_job]
    first_log = (workspace / ".snakemake/slurm_logs/rule_pretrain/pgl_all" / f"{preempted_job}.log").read_text()
    stopped = int(re.search(r"SIGUSR1 received: checkpoint at step (\d+)/", first_log).group(1))
    assert rows_before <= stopped < PRETRAIN_STEPS
    meta = json.loads((res / "pretrain/pgl/all/model.json").read_text())
    assert meta["resumed_from_step"] == stopped and meta["steps"] == PRETRAIN_STEPS
    assert meta["scheduler"]["SLURM_JOB_ID"] != preempted_job and meta["scheduler"]["CUDA_VISIBLE_DEVICES"]
    assert records[meta["scheduler"]["SLURM_JOB_ID"]]["state"] == "COMPLETED"
    assert "mem_mb=2000" in output and "runtime=20" in output  # attempt 2 asked for twice the memory and time
    steps = [int(line.split(",")[0]) for line in (res / "pretrain/pgl/all/train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, PRETRAIN_STEPS + 1))

    # Two GPUs, one task that sees both, two ranks (pretrain.world_size defaults to nodes x gpu).
    finished = meta["scheduler"]["SLURM_JOB_ID"]
    assert "gres/gpu=2" in records[finished]["tres"], records[finished]
    assert job_step_tasks(finished) == [1], job_step_tasks(finished)
    assert meta["world_size"] == 2 and [r["rank"] for r in meta["ranks"]] == [0, 1]
    assert {r["cuda_visible_devices"] for r in meta["ranks"]} == {"0,1"}, meta["ranks"]
    assert "as 2 ranks on 1 node(s)" in first_log and "another rank received" not in first_log  # all got it

    # The same pretraining run locally, 2 ranks, uninterrupted: the cluster's preempted-and-resumed result, exactly.
    local = local_pretraining(workspace, 2)
    assert local["model_sha256"] == meta["model_sha256"], (local["final_loss"], meta["final_loss"])


def job_step_tasks(job_id: str) -> list[int]:
    """Tasks of each job step that ran the workflow (not the batch script or the extern step)."""
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,NTasks", "-j", job_id], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [int(n) for step, n in rows if re.fullmatch(rf"{job_id}\.\d+", step)]


def local_pretraining(work: Path, world_size: int) -> dict:
    from ctssl.config import load_config, pretrain_section_for

    cfg = load_config(work / "config.yaml")
    section = {"model": cfg["model"], "pretrain": pretrain_section_for(cfg["pretrain"], "pgl"), "device": cfg["device"],
               "amp": cfg["amp"]}
    (work / "local.yaml").write_text(yaml.safe_dump(section))
    out = work / "local_pgl"
    run = subprocess.run([sys.executable, "-m", "ctssl.cli", "pretrain", "--config", "local.yaml", "--pool-csv",
                          "results/pools/all.csv", "--method", "pgl", "--out", str(out), "--world-size",
                          str(world_size), "--threads", str(world_size * cfg["threads"]["pretrain"])],
                         cwd=work, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "model.json").read_text())


def test_forcing_one_cell_submits_exactly_one_job(cluster, workspace):
    cell = workspace / CELLS[0]
    others = {c: (workspace / c).read_bytes() for c in CELLS[1:]}
    run = subprocess.run(snakemake_cmd(workspace, "-f", CELLS[0]), capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    ids = submitted_ids(output)
    assert len(ids) == 1, output[-5000:]
    assert sacct(ids[0])[ids[0]]["state"] == "COMPLETED"
    assert json.loads(cell.read_text())["scheduler"]["SLURM_JOB_ID"] == ids[0]
    assert all((workspace / c).read_bytes() == data for c, data in others.items())
