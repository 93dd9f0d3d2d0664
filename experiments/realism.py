"""How CT-like are the synthetic domains? The HU-only probe on the real scans of ../shared/realct and on generated
cases of every labelled CT-like profile, the generated per-organ HU per phase beside published values, and a figure
of each domain beside the real scan.

Usage: python experiments/realism.py [--cases 20] [--seed 0] [--out experiments/results/realism]
                                    [--realct ../shared/realct]
--seed: the synthetic seed of the generated cases (the generator was tuned looking at seed 0's cases; another seed
gives cases it never saw).
Writes probe_cases.csv (every case and structure), probe.csv, phase_hu.csv, realism.md (the tables of
docs/science.md) and domains.png. The logic is ctssl.realism.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from ctssl.data.ctlike import LITERATURE_HU, PHASES
from ctssl.figures import domain_figure
from ctssl.realism import generated_probe, hu_probe, phase_hu, real_scans

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("ct_btcv", "ct_liver", "ct_spleen", "ct_kidney")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "realism")
    parser.add_argument("--realct", type=Path, default=ROOT.parent / "shared" / "realct")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scans = real_scans(args.realct)
    real = pd.concat([hu_probe(hu, labels, organs).assign(scan=name) for name, (hu, labels, organs) in scans.items()])
    generated = pd.concat([generated_probe(p, args.cases, args.seed) for p in PROFILES], ignore_index=True)
    generated.to_csv(args.out / "probe_cases.csv", index=False)
    summary = (generated.groupby(["profile", "organ"], sort=False)
               .agg(dice_raw=("dice_raw", "mean"), dice_raw_sd=("dice_raw", "std"), dice_raw_max=("dice_raw", "max"),
                    dice_median=("dice_median", "mean"), hu_mean=("hu_mean", "mean"), cases=("case", "count"))
               .reset_index())
    summary.to_csv(args.out / "probe.csv", index=False)
    real.to_csv(args.out / "probe_real.csv", index=False)
    phases = phase_hu(max(4, args.cases // 4), args.seed)
    phases.to_csv(args.out / "phase_hu.csv", index=False)

    lines = [f"HU-only probe (best single HU interval inside the body, Dice %, raw / 3-voxel median), "
             f"{args.cases} generated cases per profile (synthetic seed {args.seed}):", "",
             "| structure | real: TotalSegmentator | real: dcmqi 3 slices | generated (profile): raw mean ± sd "
             "[max] | generated: median filter |", "|---|---|---|---|---|"]
    ts_name, dcmqi_name = list(scans)
    for _, row in summary.iterrows():
        cells = []
        for scan in (ts_name, dcmqi_name):
            hit = real[(real["scan"] == scan) & (real["organ"] == row["organ"])]
            cells.append(f"{hit['dice_raw'].iloc[0]:.1f} / {hit['dice_median'].iloc[0]:.1f}" if len(hit) else "–")
        lines.append(f"| {row['organ']} ({row['profile']}) | {cells[0]} | {cells[1]} | {row['dice_raw']:.1f} ± "
                     f"{row['dice_raw_sd']:.1f} [{row['dice_raw_max']:.1f}] | {row['dice_median']:.1f} |")
    lines += ["", "Per-organ HU per phase, generated (mean over cases ± sd across cases) beside published ranges:", "",
              "| organ | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for organ, literature in LITERATURE_HU.items():
        cells = []
        for phase, lit in zip(PHASES, literature, strict=True):
            hit = phases[(phases["organ"] == organ) & (phases["phase"] == phase)]
            cells.append(f"{hit['mean'].iloc[0]:.0f} ± {hit['std'].iloc[0]:.0f} ({lit})" if len(hit) else f"– ({lit})")
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    ts_real = real[real["scan"] == ts_name].set_index("organ")["hu_mean"]
    lines += ["", "The real TotalSegmentator scan (non-contrast; 3 mm voxels, so partial volume lowers small organs): "
              + ", ".join(f"{organ} {hu:.0f}" for organ, hu in ts_real.items()) + " HU."]
    (args.out / "realism.md").write_text("\n".join(lines) + "\n")
    domain_figure(args.out / "domains.png", scans[ts_name][0], PROFILES + ("ct_chest", "ct_pool"), seed=args.seed)
    print("\n".join(lines))
    print(f"\n{args.out}: written in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
