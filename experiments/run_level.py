"""The same Δ with two intervals: pairs taken as independent (the report before issue 38) and by run (seeds and test
cases resampled independently, ctssl.report.run_bootstrap_ci), plus Δ per seed, from a report's dice_per_case.csv;
each init against scratch and the head-to-head comparisons.

Usage: python experiments/run_level.py RESULTS_DIR [RESULTS_DIR ...] [--out CSV]
   e.g. python experiments/run_level.py experiments/results/science experiments/results/science_rerun
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ctssl.report import Pairing, bootstrap_ci, delta_per_seed, init_order, reference_for, run_bootstrap_ci


def cells_of(long: pd.DataFrame) -> pd.DataFrame:
    """One row per run with its mean foreground Dice (class means over test cases, NaN skipped), as metrics.json."""
    keys = ["dataset", "init", "fraction", "seed"]
    per_class = long.groupby([*keys, "class"])["dice"].mean()
    return per_class.groupby(keys).mean().rename("mean_fg_dice").reset_index()


def both_intervals(long: pd.DataFrame, versus: list[tuple[str, str]]) -> pd.DataFrame:
    """Every init against its engine's scratch, and the `versus` pairs (A, B): Δ = A − B."""
    cells = cells_of(long)
    pairing = Pairing(cells, long)
    per_seed = delta_per_seed(cells, versus)
    rows = []
    for (dataset, fraction), group in cells.groupby(["dataset", "fraction"]):
        inits = init_order(group["init"].unique())
        pairs = [(i, reference_for(i)) for i in inits if i != reference_for(i)] + versus
        for mine, reference in pairs:
            if not (pairing.has(dataset, fraction, mine) and pairing.has(dataset, fraction, reference)):
                continue
            a, b = pairing.grid(dataset, fraction, mine, reference)
            pair_low, pair_high = bootstrap_ci(a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2]))
            run_low, run_high = run_bootstrap_ci(a, b)
            seeds = per_seed[(per_seed["dataset"] == dataset) & (per_seed["fraction"] == fraction)
                             & (per_seed["init"] == mine) & (per_seed["reference"] == reference)]["delta"]
            rows.append({"dataset": dataset, "fraction": fraction, "comparison": f"{mine} - {reference}",
                         "delta": pairing.versus(dataset, fraction, mine, reference)["delta"],
                         "pairs_ci": f"[{100 * pair_low:+.1f}, {100 * pair_high:+.1f}]",
                         "run_ci": f"[{100 * run_low:+.1f}, {100 * run_high:+.1f}]",
                         "seeds_x_cases": f"{a.shape[0]} x {a.shape[1]}",
                         "delta_per_seed": " ".join(f"{d:+.1f}" for d in seeds)})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="folders holding a report's dice_per_case.csv")
    parser.add_argument("--versus", nargs="*", default=["pgl-all vs byol-all", "hssl-all vs hssl-liver"],
                        help="head-to-head comparisons, 'A vs B'")
    parser.add_argument("--out", type=Path, default=None, help="write the table as CSV")
    args = parser.parse_args()
    tables = []
    for folder in args.results:
        versus = [tuple(v.split(" vs ")) for v in args.versus]
        table = both_intervals(pd.read_csv(folder / "dice_per_case.csv"), versus).assign(results=folder.name)
        print(f"\n{folder}\n" + table.drop(columns="results").to_string(index=False, float_format=lambda x: f"{x:+.1f}"))
        tables.append(table)
    if args.out:
        pd.concat(tables).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
