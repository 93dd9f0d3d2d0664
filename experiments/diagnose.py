"""Run one kept diagnosis experiment (see docs/science.md): python experiments/diagnose.py EXPERIMENT.

Tables (`table.md`, `table.csv`) and the dev-Dice learning curves (`curves.png`) go to experiments/results/EXPERIMENT/;
every pretraining and fine-tuning run is cached under {results}/experiments/ of the config, so experiments share
runs and a rerun computes only what is missing.
"""
import argparse
import inspect
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctssl.experiments import EXPERIMENTS, VARIANTS, Study  # noqa: E402
from ctssl.ssl import METHODS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/diag.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="default: experiments/results/EXPERIMENT")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (experiments that support it)")
    parser.add_argument("--dataset", default="liver", help="the config's downstream dataset the study fine-tunes")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="pretraining lengths: supervised-length's control (default 1000 3000 10000), curves' "
                             "methods (default 3000 10000 30000)")
    parser.add_argument("--methods", nargs="+", default=None, help="curves: the methods (default pgl hssl mae)")
    parser.add_argument("--pools", type=int, nargs="+", default=None,
                        help="curves: unlabelled pool sizes in volumes (default 100 500 2000)")
    args = parser.parse_args()
    experiment = EXPERIMENTS[args.experiment]
    accepted = inspect.signature(experiment).parameters
    if args.jobs > 1 and "jobs" not in accepted:
        parser.error(f"--jobs: experiment {args.experiment} runs one run at a time")
    options = {"jobs": args.jobs} if args.jobs > 1 else {}
    for option in ("lengths", "methods", "pools"):
        if getattr(args, option):
            if option not in accepted:
                parser.error(f"--{option}: experiment {args.experiment} does not take it")
            options[option] = getattr(args, option)
    unknown = sorted(set(args.methods or ()) - set(METHODS) - set(VARIANTS))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not a pretraining method (known: {', '.join(sorted(METHODS))})")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    study = Study(args.config, dataset=args.dataset, threads=args.threads)
    study.ensure_data()
    out = Path(args.out or ROOT / "experiments" / "results" / args.experiment)
    table = experiment(study, out, args.seeds, **options)
    print(table.round(2).to_string())
    print(f"-> {out}")


if __name__ == "__main__":
    main()
