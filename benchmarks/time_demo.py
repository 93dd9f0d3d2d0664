"""Time the embedded demo DAG end to end and print wall time and peak memory.

Usage: python benchmarks/time_demo.py [--cores 2] [--configfile config.yaml] [--keep DIR]

Runs the real `snakemake` in a fresh scratch directory (so nothing is cached), then prints the wall time, the peak
resident memory of the largest single job (ru_maxrss of children) and, from Snakemake's per-job benchmark files,
the time and peak RSS of every rule. Target for the default config: <= 10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temp dir)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="ctssl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(args.configfile.read_text())
    config["results"] = str(work / "results")
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", str(args.cores)]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
        print(f"snakemake failed with exit code {run.returncode}")
        return run.returncode
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = []
    for tsv in sorted((work / "results" / "benchmarks").rglob("*.tsv")):
        bench = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": tsv.relative_to(work / "results" / "benchmarks").parts[0],
                     "s": float(bench["s"].iloc[0]), "max_rss_mb": float(bench["max_rss"].iloc[0])})
    per_rule = pd.DataFrame(rows).groupby("rule").agg(jobs=("s", "size"), total_s=("s", "sum"),
                                                      max_job_s=("s", "max"), peak_rss_mb=("max_rss_mb", "max"))
    print(f"demo DAG ({args.configfile.name}) on {args.cores} cores")
    print(f"wall time: {wall:.1f} s ({wall / 60:.2f} min)")
    print(f"peak RSS of the largest job: {peak_mb:.0f} MB")
    print(per_rule.round(1).to_string())
    print((work / "results" / "report" / "dice_table.md").read_text())
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
