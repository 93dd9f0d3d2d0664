"""The SLURM profile routes every job that asks for a GPU to the GPU partition, for every shipped config: a dry run
(`snakemake -n --profile profiles/slurm`, no cluster needed) lists each job's resources, and a GPU job on the CPU
partition would be queued where no GPU exists (an nnU-Net cell did, before `finetune_nnunet` was listed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml")), ROOT / "tests" / "configs" / "tiny.yaml"]
GPU_PARTITION = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"][
    "pretrain"]["slurm_partition"]


def _jobs(config: Path) -> list[tuple[str, str]]:
    """(rule, resources line) of every job of a dry run under the SLURM profile, from the checkout (where the
    configs' relative paths, e.g. configs/realct.yaml's ../shared/realct, are meant to be read); --forceall: every
    job, whatever results/ already holds."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "-s", str(ROOT / "Snakefile"),
                          "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(config)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", run.stdout, re.M)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_gpu_job_lands_on_the_gpu_partition(config):
    jobs = _jobs(config)
    assert jobs, "the dry run listed no job"
    gpu_jobs = [(rule, res) for rule, res in jobs if re.search(r"\bgpu=[1-9]|gres=gpu", res)]
    asks = any(spec.get("gpu") for spec in (yaml.safe_load(config.read_text()).get("resources") or {}).values())
    assert bool(gpu_jobs) == asks, "the config's resources ask for GPUs, so its training jobs must"
    wrong = {rule for rule, res in gpu_jobs if f"slurm_partition={GPU_PARTITION}" not in res}
    assert not wrong, f"GPU jobs outside the {GPU_PARTITION!r} partition: {sorted(wrong)}"
    assert {rule for rule, _ in gpu_jobs} <= {"pretrain", "finetune", "finetune_nnunet"}


def _dry_run(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "-s", str(ROOT / "Snakefile"),
                           "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", str(config)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_a_training_job_without_a_gpu_request_is_refused_at_dry_run(tmp_path, device):
    """A config with no `resources:` for training (docs/datasets.md's own-data example once had none) would send
    pretraining to SLURM without a GPU: refused at -n, naming the key, unless the config trains on CPUs on purpose."""
    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["resources"] = {"cpu": {"mem_mb": 1000}}
    cfg["device"] = device
    cfg["results"] = str(tmp_path / "results")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = _dry_run(tmp_path / "c.yaml", tmp_path)
    if device == "cpu":
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        assert run.returncode != 0
        assert re.search(r"resources\.(pretrain|finetune)\.gpu = 0: rule (pretrain|finetune) would be submitted to "
                         r"SLURM without a GPU request", run.stdout + run.stderr)
