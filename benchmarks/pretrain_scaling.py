"""Scaling of pretraining over ranks: steps/s and samples/s at 1 and at G ranks, and the scaling efficiency
(samples/s at G ranks / (G x samples/s at 1 rank)), measured by real runs of `ctssl pretrain --world-size`.

Usage: python benchmarks/pretrain_scaling.py [--configfile config.yaml] [--method pgl] [--ranks 1 2]
       [--device auto|cpu|cuda] [--steps 30] [--batch 4] [--patch 48 48 32] [--threads 2] [--cases 6]
       [--spacing 1.5 1.5 2]

On CPU the ranks share the machine's cores (`--threads` in all, split over the ranks, as a Snakemake job's threads
are), so the figure says what splitting one CPU job into gloo ranks costs or buys, not what more hardware buys.
On CUDA each rank has its own GPU (NCCL). The model and method settings are the config's; the pool is the demo's
synthetic liver. steps/s and samples/s (= steps/s x global batch) are wall-clock rates over the steps after the
first 5 (start-up excluded), data loading included; "compute" is the median of rank 0's logged rate, which times
the step alone (forward, backward, all-reduce, optimizer, EMA), without waiting for the batch.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from ctssl.config import complete_config, load_config, pretrain_section_for

ROOT = Path(__file__).resolve().parents[1]


def synthetic_pool(root: Path, cases: int, spacing: list[float]) -> Path:
    from ctssl.data.synthetic import write_msd_dataset
    from ctssl.preprocess.pipeline import preprocess_dataset

    raw = write_msd_dataset(root / "raw", "liver", "liver", n_cases=cases, seed=0)
    cfg = complete_config({"preprocess": {"target_spacing": spacing,
                                          "normalization": {"scheme": "window", "window": [-175, 250]}}})
    pre = preprocess_dataset(raw, root / "pre", "liver", cfg["preprocess"], "abdomen")
    cases = sorted(p.stem for p in pre.glob("liver_*.npy"))
    pd.DataFrame([{"case": c, "dataset": "liver", "group": "abdomen", "image": str(pre / f"{c}.npy")}
                   for c in cases]).to_csv(root / "all.csv", index=False)
    return root / "all.csv"


def rates(out: Path, skip: int = 5) -> tuple[float, float]:
    """(wall-clock steps/s over the steps after `skip`, median logged compute samples/s)."""
    with open(out / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))[skip:]
    compute = statistics.median(float(r["samples_per_s"]) for r in rows)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    steps_per_s = (len(elapsed) - 1) / (elapsed[-1] - elapsed[0]) if len(elapsed) > 1 else float("nan")
    return steps_per_s, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default=str(ROOT / "config.yaml"))
    parser.add_argument("--method", default="pgl")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    parser.add_argument("--patch", type=int, nargs=3, default=None)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the whole job, split over its ranks")
    parser.add_argument("--cases", type=int, default=6, help="synthetic liver volumes in the pool")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.0], help="their voxel size (mm)")
    args = parser.parse_args()

    config = load_config(args.configfile)
    section = pretrain_section_for(config["pretrain"], args.method)
    section.update(steps=args.steps, batch_size=args.batch, log_every=10**6, checkpoint_every=10**6, warmup_steps=1)
    section["methods"][args.method].update(steps=args.steps, batch_size=args.batch)  # over a method's own values
    if args.patch:
        section["patch_size"] = section["methods"][args.method]["patch_size"] = args.patch
    patch = section["methods"][args.method].get("patch_size", section["patch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool = synthetic_pool(work, args.cases, args.spacing)
        cfg = {"model": config["model"], "pretrain": section, "device": args.device, "amp": config["amp"]}
        (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        measured = {}
        for ranks in args.ranks:
            out = work / f"ranks{ranks}"
            run = subprocess.run([sys.executable, "-m", "ctssl.cli", "pretrain", "--config", str(work / "cfg.yaml"),
                                  "--pool-csv", str(pool), "--method", args.method, "--out", str(out),
                                  "--threads", str(args.threads), "--world-size", str(ranks)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{ranks} rank(s) failed:\n{run.stderr[-3000:]}")
            measured[ranks] = rates(out)
            devices = sorted({r["device"] for r in pd.read_json(out / "model.json", typ="series")["ranks"]})
        print(f"{args.method}, global batch {args.batch}, patch {patch}, {args.steps} steps, "
              f"device {', '.join(devices)}, {args.threads} CPU threads in all")
        print(f"{'ranks':>5} {'steps/s':>8} {'samples/s':>10} {'efficiency':>10} {'compute samples/s':>18}")
        base = measured[min(measured)][0] * args.batch / min(measured)  # samples/s per rank at the fewest ranks
        for ranks, (steps_per_s, compute) in measured.items():
            samples = steps_per_s * args.batch
            print(f"{ranks:>5} {steps_per_s:>8.2f} {samples:>10.2f} {samples / (ranks * base):>10.2f} "
                  f"{compute:>18.2f}")


if __name__ == "__main__":
    main()
