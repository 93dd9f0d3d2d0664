"""One pretraining job as one process (world size 1) or as several ranks, started by the job itself.

On one node the job starts its ranks as child processes (`python -m ctssl.train.launch SPEC`, one per GPU, or per
CPU share with gloo); on several nodes it starts them with srun (the SLURM executor's `mpi` resource): every
task is one rank, and the ranks meet through a file:// rendezvous in the run's output folder.

Why not torchrun or torch.multiprocessing.spawn: SLURM's pre-timeout warning (SIGUSR1) reaches every process of the
job step, and torchrun's agent dies of it (it handles SIGTERM/SIGINT/SIGHUP/SIGQUIT only) before its ranks have
checkpointed, and reports a rank's "checkpointed, rerun me" exit (75) as a generic failure; spawn re-imports the
job's __main__, which for a Snakemake `script:` is the whole job. The supervision here is what a job needs: pass
signals on, tell apart "all ranks checkpointed" (75) from "a rank died" (named, the others stopped at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ctssl.train.interrupt import EXIT_INTERRUPTED, run_interruptible

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class Layout:
    """How many ranks a pretraining job runs, on how many nodes."""

    world_size: int = 1
    nodes: int = 1
    launcher: str = "srun"  # the program that starts one rank per task on several nodes (SLURM's `mpi` resource)
    timeout_s: float = 300.0  # a collective waiting longer than this fails; a dead rank ends the job within it

    @property
    def per_node(self) -> int:
        return self.world_size // self.nodes

    @classmethod
    def of_job(cls, resources: Mapping, timeout_s: float) -> Layout:
        """A Snakemake pretraining job's layout, from the resources `ctssl.config.job_resources` gave it (a mapping
        of name to value; `mpi` only on several nodes)."""
        launcher = {"launcher": resources["mpi"]} if "mpi" in resources else {}
        return cls(world_size=resources["ranks"], nodes=resources["nodes"], timeout_s=timeout_s, **launcher)


def pretrain_job(*, pool_csv: str | Path, method: str, pool: str, cfg: dict, out_dir: str | Path, threads: int,
                 layout: Layout, log_file: str | Path | None) -> int:
    """Run one pretraining job; its exit status: 0, 75 (checkpointed on a signal: rerun to resume), or non-zero."""
    kwargs = {"pool_csv": str(Path(pool_csv).resolve()), "method": method, "pool": pool, "cfg": cfg,
              "out_dir": str(Path(out_dir).resolve())}
    if layout.world_size == 1:
        # Imported here only: a launcher of ranks needs neither torch nor MONAI (seconds of CPU per process).
        from ctssl.train.pretrain import run_pretrain

        return run_interruptible(lambda: run_pretrain(**kwargs, threads=threads), log)
    problem = gpu_shortage(cfg["device"], layout)
    if problem:
        log.error("%s", problem)
        return 2
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # Unique per launch (a fresh rendezvous), and absolute: file:// takes no relative path.
    workdir = Path(tempfile.mkdtemp(prefix=".ranks-", dir=out_dir)).resolve()
    try:
        spec = {"run": kwargs, "threads": max(1, threads // layout.per_node), "log": str(log_file or ""),
                "rendezvous": str(workdir / "rendezvous"), "timeout_s": layout.timeout_s}
        (workdir / "spec.json").write_text(json.dumps(spec))
        log.info("pretraining %s/%s as %d ranks on %d node(s)", method, pool, layout.world_size, layout.nodes)
        if layout.nodes == 1:
            procs = {f"rank {r}": _start(rank_command(workdir / "spec.json"), rank_env(r, layout))
                     for r in range(layout.world_size)}
        else:
            procs = {"srun": _start(srun_command(layout, workdir / "spec.json", threads, cfg["device"]), python_env())}
        return supervise(procs, layout.timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def gpu_shortage(device: str, layout: Layout) -> str | None:
    """Why this node cannot run its ranks on GPUs (None if it can, or if the run is on CPU)."""
    if device == "cpu":
        return None
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return None
    visible = torch.cuda.device_count()
    if visible >= layout.per_node:
        return None
    return (f"pretraining asks for {layout.per_node} ranks on this node, one per GPU, but {visible} CUDA GPU(s) are "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): lower "
            "pretrain.world_size / resources.pretrain.gpu, or set device: cpu to run the ranks on CPU with gloo")


def rank_command(spec: Path) -> list[str]:
    return [sys.executable, "-m", "ctssl.train.launch", str(spec)]


def python_env() -> dict[str, str]:
    """This environment, with this checkout's ctssl first on the path: the ranks run the job's code, installed or
    not (a Snakemake job imports it from the checkout)."""
    src = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def rank_env(rank: int, layout: Layout) -> dict[str, str]:
    return {**python_env(), "RANK": str(rank), "WORLD_SIZE": str(layout.world_size),
            "LOCAL_RANK": str(rank % layout.per_node), "LOCAL_WORLD_SIZE": str(layout.per_node)}


def srun_command(layout: Layout, spec: Path, threads: int, device: str) -> list[str]:
    """One srun step with every rank as a task. Inside a Snakemake SLURM job the job-step plugin has removed the
    step's SLURM_* settings from the environment, so the geometry is given explicitly; a task that fails ends the
    whole step (--kill-on-bad-exit)."""
    cmd = [*shlex.split(layout.launcher), f"--nodes={layout.nodes}", f"--ntasks={layout.world_size}",
           f"--ntasks-per-node={layout.per_node}", f"--cpus-per-task={max(1, threads // layout.per_node)}",
           "--kill-on-bad-exit=1"]
    if device != "cpu":
        cmd.append("--gpus-per-task=1")
    return [*cmd, *rank_command(spec)]


def die_with_parent() -> None:
    """Be killed (SIGKILL) when the parent process dies (Linux): called in a child before exec, or first thing
    after it, so no rank or nnU-Net cell outlives a killed job."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads started yet


def describe_exit(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def supervise(procs: dict[str, subprocess.Popen], timeout_s: float, poll_s: float = 0.1) -> int:
    """Wait for the ranks; pass stop signals on to them. 0 if all finished, 75 if all checkpointed on a signal;
    when one dies, the others are stopped at once (they could only wait for it) and the job fails naming it."""
    def forward(signum, frame):
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    first_exit: float | None = None
    failed: list[str] = []
    try:
        while any(proc.poll() is None for proc in procs.values()):
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None and code not in (0, EXIT_INTERRUPTED) and name not in failed:
                    failed.append(name)
                    log.error("%s %s; stopping the other ranks (the last checkpoint is kept: rerun to resume from "
                              "it)", name, describe_exit(code))
            if first_exit is None and any(proc.poll() is not None for proc in procs.values()):
                first_exit = time.time()
            if failed or (first_exit is not None and time.time() - first_exit > timeout_s):
                for name, proc in procs.items():
                    if proc.poll() is None:
                        if not failed:
                            log.error("%s still running %.0f s after another rank ended; killed", name, timeout_s)
                            failed.append(name)
                        proc.kill()
                        proc.wait()
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = {name: proc.returncode for name, proc in procs.items()}
    if not failed:
        failed = [name for name, code in codes.items() if code not in (0, EXIT_INTERRUPTED)]
    if failed:
        log.error("pretraining failed: %s", ", ".join(f"{n} {describe_exit(c)}" for n, c in codes.items()))
        return 1
    if set(codes.values()) == {EXIT_INTERRUPTED}:
        return EXIT_INTERRUPTED
    if set(codes.values()) == {0}:
        return 0
    log.error("ranks disagree on how the run ended: %s", codes)
    return 1


def rank_main(spec_path: str) -> int:
    """One rank: join the process group, train its share, leave."""
    import torch.distributed as dist

    from ctssl.logutil import setup_logging
    from ctssl.train.distributed import init_process_group, rank_device, world_from_env
    from ctssl.train.pretrain import run_pretrain

    spec = json.loads(Path(spec_path).read_text())
    world = world_from_env()
    rank_log = setup_logging(spec["log"] or None, level=logging.INFO if world.is_main else logging.WARNING,
                             append=True, prefix=f"rank {world.rank}/{world.size} ")
    run = spec["run"]
    try:
        device = rank_device(run["cfg"]["device"], world)
        init_process_group(world, spec["rendezvous"], device, spec["timeout_s"])
        return run_interruptible(lambda: run_pretrain(**run, threads=spec["threads"], world=world, device=device),
                                 rank_log)
    except Exception:
        rank_log.exception("rank %d of %d failed", world.rank, world.size)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))
