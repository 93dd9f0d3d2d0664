"""A pretraining pool of thousands of CT-like volumes: generation + preprocessing time, disk footprint, and the
peak resident memory of a pretraining job that samples from it.

Usage: python benchmarks/pool_scale.py [--cases 2000] [--shards 8] [--cores 2] [--steps 300] [--method pgl]
                                       [--keep DIR]

Builds a config from configs/science_cpu.yaml (its network, patch and pretraining settings) whose pool is
`--shards` datasets of profile ct_pool (cases split evenly: each shard is one synthesize and one preprocess job,
so Snakemake, or a cluster, runs them in parallel) plus a small ct_liver downstream dataset, preprocessed to
3 x 3 x 3 mm. Runs the real `snakemake` in a scratch folder twice: up to the pool manifest (timed), then one
pretraining run of `--steps` steps (its peak RSS from Snakemake's benchmark file). Prints the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from ctssl.provenance import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def snakemake(work: Path, cores: int, target: str) -> float:
    """Wall seconds of one real `snakemake` run (its output appended to snakemake.log in the work folder)."""
    start = time.perf_counter()
    with open(work / "snakemake.log", "a") as log:
        run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                              str(work), "--configfile", str(work / "config.yaml"), "--cores", str(cores), "--", target],
                             stdout=log, stderr=subprocess.STDOUT)
    if run.returncode:
        raise SystemExit(f"snakemake failed for {target}: see {work / 'snakemake.log'} (run with --keep to keep it)")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", default="pgl")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    config = yaml.safe_load((ROOT / "configs" / "science_cpu.yaml").read_text())
    shards = {f"pool_{k}": {"kind": "synthetic", "profile": "ct_pool", "group": "abdomen",
                            "n_cases": args.cases // args.shards + (k < args.cases % args.shards)}
              for k in range(args.shards)}
    config.update(results="results", datasets={"liver": {"kind": "synthetic", "profile": "ct_liver", "n_cases": 8,
                                                         "group": "abdomen"}, **shards},
                  downstream=["liver"], inits=["scratch", f"{args.method}-all"], dataset_inits={}, comparisons=[])
    config["pretrain"].update(pool_datasets=list(shards), pools=["all"], steps=args.steps, log_every=50)
    config["pretrain"].pop("variants", None)
    config["preprocess"]["target_spacing"] = [3.0, 3.0, 3.0]
    work = args.keep or Path(tempfile.mkdtemp(prefix="ctssl-pool-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    print(f"{args.cases} ct_pool volumes in {args.shards} shards, {args.cores} cores, {cpu_model()}, "
          f"{os.cpu_count()} CPUs visible; work folder {work}")
    try:
        pool_s = snakemake(work, args.cores, "results/pools/all.csv")
        res = work / "results"
        raw = sum(du_mb(res / "raw" / s) for s in shards)
        pre = sum(du_mb(res / "preprocessed" / s) for s in shards)
        n_pool = len(pd.read_csv(res / "pools" / "all.csv"))
        print(f"pool of {n_pool} volumes generated + preprocessed in {pool_s / 60:.1f} min "
              f"(wall, {args.cores} cores); disk: raw {raw / 1024:.2f} GB, preprocessed {pre / 1024:.2f} GB "
              f"({pre / n_pool:.1f} MB per volume)")
        bench = res / "benchmarks"
        for rule in ("synthesize", "preprocess"):
            rows = pd.concat([pd.read_csv(p, sep="\t") for p in (bench / rule).rglob("*.tsv")])
            print(f"  {rule}: {len(rows)} jobs, {rows['s'].sum():.0f} s of job time, longest {rows['s'].max():.0f} s, "
                  f"peak RSS {rows['max_rss'].max():.0f} MB")
        train_s = snakemake(work, args.cores, f"results/pretrain/{args.method}/all/model.pt")
        row = pd.read_csv(next((bench / "pretrain" / args.method).rglob("*.tsv")), sep="\t").iloc[0]
        print(f"pretraining {args.method} on the pool, {args.steps} steps: {train_s:.0f} s wall, "
              f"peak RSS {row['max_rss']:.0f} MB (Snakemake's benchmark of the job)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
