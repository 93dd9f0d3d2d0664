"""Paper-shaped tables, figures and provenance from the per-cell `metrics.json` files.

Numbers: a cell's score is its mean foreground Dice (class means over test cases, NaN skipped, as nnU-Net). Tables
show mean ± sd over seeds, the difference to `scratch` in Dice points, and a paired Wilcoxon signed-rank test of
each init against scratch over (seed, test case) pairs, where a pair's values are the case's mean foreground Dice
under the two inits. The best mean of each column is marked. Cells fine-tuned by nnU-Net (init suffix '@nnunet',
column `engine`) are compared with the same engine's scratch.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # report jobs run headless (cluster nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from ctssl.figures import (  # noqa: E402
    finetuning_curves,
    message_figure,
    overlay_cells,
    overlay_figure,
    pretraining_curves,
    save_figure,
)
from ctssl.io import atomic_path, json_digest, read_json  # noqa: E402
from ctssl.splits import fraction_key  # noqa: E402

LONG_COLUMNS = ["dataset", "init", "fraction", "seed", "case", "class", "dice"]
REFERENCE = "scratch"


def collect(metrics_files: Iterable[str | Path], names: Mapping[str, str] | None = None
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long per case x class table, one row per cell with its mean foreground Dice, provenance per cell).
    `names` (str(path) -> name) overrides a cell's init name: experiments name their variants themselves."""
    rows, cells, provenance = [], [], []
    for path in metrics_files:
        m = read_json(path)
        init = (names or {}).get(str(path), m["init"])
        key = {"dataset": m["dataset"], "init": init, "fraction": float(m["fraction"]), "seed": int(m["seed"])}
        for case, scores in m["per_case"].items():
            for cls, dice in scores.items():
                rows.append({**key, "case": case, "class": cls, "dice": np.nan if dice is None else float(dice)})
        mfd, mfd_pre = m["mean_foreground_dice"], m.get("mean_foreground_dice_preprocessed")
        cells.append({**key, "mean_fg_dice": np.nan if mfd is None else float(mfd),
                      "mean_fg_dice_preprocessed": np.nan if mfd_pre is None else float(mfd_pre),
                      "n_test": len(m["test_cases"]), "n_train": len(m["train_cases"])})
        weights = m.get("init_weights") or {}
        sched = m.get("scheduler") or {}
        provenance.append({
            **key, "metrics": str(path), "code_version": m.get("code_version"),
            "config_sha256": json_digest(m.get("config"))[:16],
            "weights_sha256": weights.get("sha256"), "weights_path": weights.get("path"),
            "train_cases": " ".join(m["train_cases"]), "test_cases": " ".join(m["test_cases"]),
            "steps": m.get("steps"), "resumed_from_step": m.get("resumed_from_step"), "device": m.get("device"),
            "slurm_job": sched.get("SLURM_JOB_ID"), "host": sched.get("host"),
        })
    if not cells:
        raise ValueError("no metrics.json files given to the report")
    return (pd.DataFrame(rows, columns=LONG_COLUMNS), pd.DataFrame(cells),
            pd.DataFrame(provenance).sort_values(["dataset", "init", "fraction", "seed"]))


def engine_of(init: str) -> str:
    """The fine-tuning engine named by a cell's init: 'pgl-all@nnunet' -> 'nnunet', 'pgl-all' -> 'ctssl'."""
    return init.partition("@")[2] or "ctssl"


def reference_for(init: str) -> str:
    """The scratch row an init is compared with: the same engine's (scratch@nnunet for pgl-all@nnunet)."""
    engine = engine_of(init)
    return REFERENCE if engine == "ctssl" else f"{REFERENCE}@{engine}"


def init_order(inits: Iterable[str]) -> list[str]:
    """Per engine (ctssl first): scratch first (the reference row), the rest alphabetically."""
    inits = sorted(set(inits))
    ordered = []
    for engine in sorted({engine_of(i) for i in inits}, key=lambda e: (e != "ctssl", e)):
        mine = [i for i in inits if engine_of(i) == engine]
        ref = reference_for(mine[0])
        ordered += ([ref] if ref in mine else []) + [i for i in mine if i != ref]
    return ordered


def case_scores(long: pd.DataFrame) -> pd.Series:
    """Mean foreground Dice of each (dataset, init, fraction, seed, case): the unit of the paired test."""
    return long.groupby(["dataset", "init", "fraction", "seed", "case"])["dice"].mean()  # NaN skipped


def paired_wilcoxon(a: pd.Series, b: pd.Series) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p of a vs b over their shared index (pairs with a NaN dropped), and n pairs.
    All pairs equal -> p = 1; no pairs -> NaN."""
    pairs = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(pairs)
    if n == 0:
        return float("nan"), 0
    diff = pairs["a"] - pairs["b"]
    if np.allclose(diff, 0):
        return 1.0, n
    return float(wilcoxon(pairs["a"], pairs["b"], zero_method="wilcox", alternative="two-sided").pvalue), n


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same cells always give the same interval


def _delta(mine: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Δ of stacks of resampled pair sets (..., pairs, classes): the mean over classes of each class's mean (NaN
    skipped), as the table computes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which a class is NaN throughout
        return np.nanmean(np.nanmean(mine, axis=-2), axis=-1) - np.nanmean(np.nanmean(reference, axis=-2), axis=-1)


def bootstrap_ci(mine: np.ndarray, reference: np.ndarray, level: float = 0.95,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of Δ, the difference in mean foreground Dice, treating every paired unit as
    independent: `mine` and `reference` are (pairs, classes) Dice arrays (NaN: class absent from both prediction
    and reference, skipped as in the table); each resample draws pairs with replacement and computes Δ as the table
    does, the mean over classes of each class's mean. (NaN, NaN) without pairs. For (seed, case) pairs use
    `run_bootstrap_ci`: seeds are not independent of each other's cases."""
    mine, reference = np.asarray(mine, dtype=float), np.asarray(reference, dtype=float)
    if len(mine) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks: a paper grid has thousands of pairs
        stop = min(resamples, start + 1000)
        idx = rng.integers(0, len(mine), size=(stop - start, len(mine)))
        deltas[start:stop] = _delta(mine[idx], reference[idx])
    return _percentiles(deltas, level)


def _percentiles(deltas: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.nanquantile(deltas, [tail, 1 - tail])
    return float(low), float(high)


def run_bootstrap_ci(mine: np.ndarray, reference: np.ndarray, level: float = 0.95,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of Δ over a (seeds, cases, classes) grid of Dice, resampling seeds and test cases
    independently (the crossed, "pigeonhole" bootstrap of Owen 2007): each resample draws S of the S seeds (runs:
    each seed is one labelled subset and one training trajectory, the main source of variance at one labelled case)
    and C of the C test cases with replacement and takes Δ over their S x C sub-grid. So the interval widens with the
    spread between seeds and with the spread between cases, and a result carried by one or two seeds gets the wide
    interval it deserves; treating the S x C pairs as independent (`bootstrap_ci`) does not. Missing cells: NaN."""
    mine, reference = np.asarray(mine, dtype=float), np.asarray(reference, dtype=float)
    if mine.size == 0:
        return float("nan"), float("nan")
    n_seeds, n_cases = mine.shape[:2]
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(1, mine.size))  # resamples per chunk: bounded memory on big grids
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        seeds = rng.integers(0, n_seeds, size=(stop - start, n_seeds, 1))
        cases = rng.integers(0, n_cases, size=(stop - start, 1, n_cases))
        shape = (stop - start, n_seeds * n_cases, mine.shape[2])
        deltas[start:stop] = _delta(mine[seeds, cases].reshape(shape), reference[seeds, cases].reshape(shape))
    return _percentiles(deltas, level)


def holm(pvalues: Iterable[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and is not counted
    in the family. Written here because scipy has no Holm correction and statsmodels is not a dependency."""
    p = np.asarray(list(pvalues), dtype=float)
    adjusted = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, i in enumerate(present[np.argsort(p[present], kind="stable")]):
        running = max(running, min(1.0, (len(present) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


class Pairing:
    """Paired comparisons of two inits' cells of one (dataset, fraction) over their shared (seed, test case) pairs:
    the summary's each-init-against-scratch rows and the head-to-head `comparisons` compute them the same way."""

    def __init__(self, cells: pd.DataFrame, long: pd.DataFrame):
        self.means = cells.groupby(["dataset", "fraction", "init"])["mean_fg_dice"].mean()
        self.scores = case_scores(long)
        self.class_dice = long.set_index(["dataset", "init", "fraction", "seed", "case", "class"])["dice"].unstack(
            "class")

    def has(self, dataset: str, fraction: float, init: str) -> bool:
        return (dataset, fraction, init) in self.means.index

    def versus(self, dataset: str, fraction: float, mine: str, reference: str) -> dict:
        """Δ = mine - reference (difference of the seed means, Dice points), its 95 % bootstrap CI, the Wilcoxon
        p over (seed, test case) pairs, their number and the number of runs (seeds) both inits share."""
        delta = 100 * (self.means[(dataset, fraction, mine)] - self.means[(dataset, fraction, reference)])
        p, n = paired_wilcoxon(self.scores.loc[(dataset, mine, fraction)],
                               self.scores.loc[(dataset, reference, fraction)])
        a, b = self.grid(dataset, fraction, mine, reference)
        low, high = run_bootstrap_ci(a, b)
        return {"delta": delta, "ci_low": 100 * low, "ci_high": 100 * high, "p_wilcoxon": p, "n_pairs": n,
                "n_runs": a.shape[0]}

    def grid(self, dataset: str, fraction: float, mine: str, reference: str) -> tuple[np.ndarray, np.ndarray]:
        """Both inits' class Dice on their shared (seed, test case) pairs as (seeds, cases, classes) arrays."""
        a = self.class_dice.loc[(dataset, mine, fraction)]
        b = self.class_dice.loc[(dataset, reference, fraction)]
        shared = a.index.intersection(b.index)
        seeds = shared.get_level_values("seed").unique()
        cases = shared.get_level_values("case").unique()
        full = pd.MultiIndex.from_product([seeds, cases], names=["seed", "case"])
        shape = (len(seeds), len(cases), a.shape[1])
        return (a.loc[shared].reindex(full).to_numpy().reshape(shape),
                b.loc[shared].reindex(full).to_numpy().reshape(shape))


def _holm_within(table: pd.DataFrame) -> pd.Series:
    """Holm across the rows of one table (dataset x fraction): the family of comparisons a reader scans at once."""
    return table.groupby(["dataset", "fraction"])["p_wilcoxon"].transform(lambda p: holm(p))


def summary_table(cells: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, fraction, init): mean/sd over seeds (Dice %), Δ vs scratch, Wilcoxon p, n, best."""
    pairing = Pairing(cells, long)
    rows = []
    for (dataset, fraction), group in cells.groupby(["dataset", "fraction"]):
        means = group.groupby("init")["mean_fg_dice"].agg(["mean", "std", "count"])
        preprocessed = group.groupby("init")["mean_fg_dice_preprocessed"].mean()
        for init in init_order(group["init"]):
            reference = reference_for(init)
            ref = means["mean"].get(reference, np.nan)
            row = {"dataset": dataset, "fraction": fraction, "init": init,
                   "dice_mean": 100 * means.loc[init, "mean"], "dice_sd": 100 * np.nan_to_num(means.loc[init, "std"]),
                   "n_seeds": int(means.loc[init, "count"]),
                   "n_test_cases": int(group[group["init"] == init]["n_test"].max()),
                   "delta_vs_scratch": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_wilcoxon": np.nan,
                   "p_holm": np.nan, "n_pairs": 0, "n_runs": 0,
                   "dice_preprocessed_mean": 100 * preprocessed.get(init, np.nan)}
            row["engine"] = engine_of(init)
            if init != reference and not np.isnan(ref):
                pair = pairing.versus(dataset, fraction, init, reference)
                row.update(delta_vs_scratch=pair.pop("delta"), **pair)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = _holm_within(table)
    table["verdict"] = verdicts(table)
    table["gap_closed"] = label_gap_closed(table)
    return _mark_best(table, ["dataset", "fraction"])


VERDICT_ALPHA = 0.05  # a verdict needs the Holm-corrected p below this and the run-level CI on one side of 0
SINGLE_RUN = "one run"  # the verdict of a row with one shared seed: its CI resamples test cases only, not runs


def verdicts(table: pd.DataFrame) -> pd.Series:
    """The rule a claim is read by, applied per row: 'above' (Holm p < VERDICT_ALPHA and the whole run-level CI
    above 0), 'below' (the same, below 0), 'no difference' (anything else), '' for a row with no comparison (the
    reference itself), SINGLE_RUN where the inits share one seed (its interval cannot see run-to-run spread, so it
    supports no claim). Both tests must agree, so a Δ carried by one or two seeds (narrow pairs, wide runs) gets no
    verdict: the reader does not have to apply the rule by eye."""
    def one(row: pd.Series) -> str:
        if np.isnan(row["p_holm"]) or np.isnan(row["ci_low"]):
            return ""
        if row["n_runs"] < 2:
            return SINGLE_RUN
        if row["p_holm"] < VERDICT_ALPHA and row["ci_low"] > 0:
            return "above"
        if row["p_holm"] < VERDICT_ALPHA and row["ci_high"] < 0:
            return "below"
        return "no difference"

    return table.apply(one, axis=1) if len(table) else pd.Series(dtype=object)


def label_gap_closed(table: pd.DataFrame) -> pd.Series:
    """The share (%) of the label gap an init closes at its fraction: its Δ against its reference divided by what
    every label adds to that reference (the reference at the dataset's highest fraction minus the reference at this
    fraction). 100 % = as good as training from scratch with every label; NaN at the highest fraction itself and
    wherever the reference has no label gap (a gap <= 0 makes the share meaningless)."""
    dice = table.set_index(["dataset", "fraction", "init"])["dice_mean"]
    top = table.groupby("dataset")["fraction"].max()

    def share(row: pd.Series) -> float:
        reference, highest = reference_for(row["init"]), top[row["dataset"]]
        if row["fraction"] == highest or np.isnan(row["delta_vs_scratch"]):
            return np.nan
        gap = dice.get((row["dataset"], highest, reference), np.nan) - dice[(row["dataset"], row["fraction"],
                                                                             reference)]
        return 100 * row["delta_vs_scratch"] / gap if gap > 0 else np.nan

    return table.apply(share, axis=1) if len(table) else pd.Series(dtype=float)


COMPARISON_COLUMNS = ["dataset", "fraction", "init", "reference", "dice_init", "dice_reference", "delta", "ci_low",
                      "ci_high", "p_wilcoxon", "p_holm", "n_pairs", "n_runs", "verdict"]


def comparisons_table(cells: pd.DataFrame, long: pd.DataFrame, comparisons: Iterable[tuple[str, str]]
                      ) -> pd.DataFrame:
    """One row per (dataset, fraction, 'A vs B') where both inits have cells: the papers' head-to-head claims (PGL
    vs BYOL, HSSL on many domains vs one), Δ = A - B with CI and p, Holm-corrected across the comparisons of one
    dataset and fraction (a family of its own, apart from the against-scratch rows)."""
    pairing = Pairing(cells, long)
    rows = []
    for (dataset, fraction), _ in cells.groupby(["dataset", "fraction"]):
        for mine, reference in comparisons:
            if pairing.has(dataset, fraction, mine) and pairing.has(dataset, fraction, reference):
                rows.append({"dataset": dataset, "fraction": fraction, "init": mine, "reference": reference,
                             "dice_init": 100 * pairing.means[(dataset, fraction, mine)],
                             "dice_reference": 100 * pairing.means[(dataset, fraction, reference)],
                             **pairing.versus(dataset, fraction, mine, reference)})
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if not table.empty:
        table["p_holm"] = _holm_within(table)
        table["verdict"] = verdicts(table)
    return table


CALIBRATION_GAP = 15.0  # issue 24 (a): scratch with every label minus scratch at the lowest fraction, Dice points
CALIBRATION_P = 0.01  # issue 24 (b): the supervised control above scratch at the lowest fraction


def calibration(summary: pd.DataFrame, dataset: str, control: str = "supervised-all") -> pd.DataFrame:
    """Whether the instrument can see transfer, read off a report's summary table (`dice_table.csv`) before any
    SSL row: (a) scratch's label gap, highest minus lowest fraction, at least CALIBRATION_GAP points; (b) the
    `control` init above scratch at the lowest fraction, Wilcoxon p < CALIBRATION_P and the run-level 95 % CI of Δ
    above 0 (one pre-registered comparison: the uncorrected p). One row per criterion, with `passed`."""
    rows = summary[(summary["dataset"] == dataset) & (summary["engine"] == "ctssl")]
    lowest, highest = rows["fraction"].min(), rows["fraction"].max()

    def cell(init: str, fraction: float) -> pd.Series:
        found = rows[(rows["init"] == init) & (rows["fraction"] == fraction)]
        if found.empty:
            raise ValueError(f"calibration: no {init!r} cells for {dataset} at {fraction_key(fraction)} %")
        return found.iloc[0]

    low, high, ctrl = cell("scratch", lowest), cell("scratch", highest), cell(control, lowest)
    gap = high["dice_mean"] - low["dice_mean"]
    return pd.DataFrame([
        {"criterion": f"(a) scratch {fraction_key(highest)} % - scratch {fraction_key(lowest)} % >= "
                      f"{CALIBRATION_GAP:g} points", "value": f"{gap:+.1f}",
         "n": f"{int(high['n_seeds'])} + {int(low['n_seeds'])} seeds x {int(low['n_test_cases'])} test cases",
         "passed": bool(gap >= CALIBRATION_GAP)},
        {"criterion": f"(b) {control} > scratch at {fraction_key(lowest)} %: p < {CALIBRATION_P:g} and CI above 0",
         "value": f"Δ {ctrl['delta_vs_scratch']:+.1f} [{ctrl['ci_low']:+.1f}, {ctrl['ci_high']:+.1f}], "
                  f"p {ctrl['p_wilcoxon']:.2g}",
         "n": f"{int(ctrl['n_pairs'])} (case, seed) pairs, CI by run",
         "passed": bool(ctrl["delta_vs_scratch"] > 0 and ctrl["ci_low"] > 0 and ctrl["p_wilcoxon"] < CALIBRATION_P)},
    ])


def delta_per_seed(cells: pd.DataFrame, versus: Iterable[tuple[str, str]] = ()) -> pd.DataFrame:
    """Δ of every init against its engine's scratch, and of each `versus` pair (A, B: A − B), per seed (one labelled
    subset and one run each), in Dice points: whether a table's Δ is carried by one or two draws is read here."""
    runs = cells.set_index(["dataset", "fraction", "init", "seed"])["mean_fg_dice"]
    pairs = [(i, reference_for(i)) for i in init_order(cells["init"].unique()) if i != reference_for(i)]
    rows = []
    for mine, reference in [*pairs, *versus]:
        for (dataset, fraction, init, seed), value in runs.items():
            if init == mine and (dataset, fraction, reference, seed) in runs.index:
                rows.append({"dataset": dataset, "fraction": fraction, "init": mine, "reference": reference,
                             "seed": seed, "delta": 100 * (value - runs[(dataset, fraction, reference, seed)])})
    columns = ["dataset", "fraction", "init", "reference", "seed", "delta"]
    return pd.DataFrame(rows, columns=columns)


def seed_lines(per_seed: pd.DataFrame) -> list[str]:
    """The Markdown list of Δ per seed: one line per (dataset, fraction, init)."""
    lines = []
    for (dataset, fraction, init), rows in per_seed.groupby(["dataset", "fraction", "init"], sort=False):
        deltas = ", ".join(f"{_signed(d)} (seed {s})" for s, d in zip(rows["seed"], rows["delta"], strict=True))
        lines.append(f"- {dataset}, {fraction_key(fraction)} %, {init}: {deltas}")
    return lines


def per_class_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, class, fraction, init): mean/sd over seeds of the class's mean Dice over test cases."""
    per_seed = long.groupby(["dataset", "class", "fraction", "init", "seed"])["dice"].mean()
    agg = per_seed.groupby(["dataset", "class", "fraction", "init"]).agg(["mean", "std", "count"]).reset_index()
    agg = agg.rename(columns={"mean": "dice_mean", "std": "dice_sd", "count": "n_seeds"})
    agg[["dice_mean", "dice_sd"]] = 100 * agg[["dice_mean", "dice_sd"]].fillna({"dice_sd": 0.0})
    return _mark_best(agg, ["dataset", "class", "fraction"])


def _mark_best(table: pd.DataFrame, column_keys: list[str]) -> pd.DataFrame:
    """`best`: the highest dice_mean of each table column (ties all marked)."""
    best = table.groupby(column_keys)["dice_mean"].transform("max")
    return table.assign(best=np.isclose(table["dice_mean"], best) & table["dice_mean"].notna())


# ---- rendering: one layout, three markups (Markdown, HTML, LaTeX) ----------------------------------------------------

def _p(p: float) -> str:
    if np.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _signed(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:+.1f}"


def _md_bold(text: str) -> str:
    return f"**{text}**"


def _html_bold(text: str) -> str:
    return f"<b>{text}</b>"


def _tex_bold(text: str) -> str:
    """Marked with control characters that survive `_tex_escape`, which turns them into \\textbf{...}."""
    return f"\x01{text}\x02"


def _dice(mean: float, sd: float, best: bool, bold: Callable[[str], str]) -> str:
    if np.isnan(mean):
        return "n/a"
    text = f"{mean:.1f} ± {sd:.1f}"
    return bold(text) if best else text


def dataset_block(summary: pd.DataFrame, dataset: str, bold: Callable[[str], str]) -> pd.DataFrame:
    """Rows: init; columns per fraction: Dice, Δ, p (as displayed strings)."""
    sub = summary[summary["dataset"] == dataset]
    out = pd.DataFrame(index=pd.Index(init_order(sub["init"]), name="init"))
    for fraction in sorted(sub["fraction"].unique()):
        f = sub[sub["fraction"] == fraction].set_index("init")
        label = f"{fraction_key(fraction)}%"
        out[f"{label} Dice"] = [_dice(f.loc[i, "dice_mean"], f.loc[i, "dice_sd"], f.loc[i, "best"], bold)
                                if i in f.index else "–" for i in out.index]
        out = out.assign(**_paired_columns(f, out.index, label, "delta_vs_scratch"))
        if f["gap_closed"].notna().any():
            out[f"{label} gap closed"] = [_percent(f.loc[i, "gap_closed"]) if i in f.index else "–"
                                          for i in out.index]
        out[f"{label} Dice (prep. grid)"] = [_number(f.loc[i, "dice_preprocessed_mean"]) if i in f.index else "–"
                                             for i in out.index]
    return out


def comparison_block(comparisons: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Rows: 'A vs B'; columns per fraction: Δ (A - B), its CI, p, Holm-corrected p (displayed strings)."""
    sub = comparisons[comparisons["dataset"] == dataset]
    sub = sub.assign(comparison=sub["init"] + " vs " + sub["reference"])
    out = pd.DataFrame(index=pd.Index(list(dict.fromkeys(sub["comparison"])), name="comparison"))
    for fraction in sorted(sub["fraction"].unique()):
        f = sub[sub["fraction"] == fraction].set_index("comparison")
        out = out.assign(**_paired_columns(f, out.index, f"{fraction_key(fraction)}%", "delta"))
    return out


def _paired_columns(rows: pd.DataFrame, index: pd.Index, label: str, delta: str) -> dict[str, list[str]]:
    """The displayed Δ, 95 % CI, p and Holm p columns of one fraction, for the rows of `index` ('–' where absent):
    the same four columns in the against-scratch and the head-to-head tables."""
    def shown(render: Callable[[pd.Series], str]) -> list[str]:
        return [render(rows.loc[i]) if i in rows.index else "–" for i in index]

    return {f"{label} Δ": shown(lambda r: _signed(r[delta])),
            f"{label} 95% CI": shown(lambda r: _interval(r["ci_low"], r["ci_high"])),
            f"{label} p": shown(lambda r: _p(r["p_wilcoxon"])),
            f"{label} p Holm": shown(lambda r: _p(r["p_holm"])),
            f"{label} verdict": shown(lambda r: r["verdict"] or "–")}


COMPARISONS_NOTE = ("Head-to-head comparisons named in the config (`comparisons`): Δ = first init minus second, "
                    "in Dice points, with the same bootstrap CI, paired Wilcoxon test and verdict rule as above; p Holm: "
                    "corrected across the comparisons of one dataset and fraction, a family apart from the rows "
                    "against scratch.")


def _interval(low: float, high: float) -> str:
    return "–" if np.isnan(low) else f"[{low:+.1f}, {high:+.1f}]"


def _percent(x: float) -> str:
    return "–" if np.isnan(x) else f"{x:+.0f} %"


def _number(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.1f}"


def class_block(per_class: pd.DataFrame, dataset: str, bold: Callable[[str], str]) -> pd.DataFrame:
    """Rows: init; columns: class × fraction; cells: mean ± sd over seeds."""
    sub = per_class[per_class["dataset"] == dataset]
    out = pd.DataFrame(index=pd.Index(init_order(sub["init"]), name="init"))
    for (cls, fraction), g in sub.groupby(["class", "fraction"]):
        g = g.set_index("init")
        out[f"{cls} {fraction_key(fraction)}%"] = [
            _dice(g.loc[i, "dice_mean"], g.loc[i, "dice_sd"], g.loc[i, "best"], bold) if i in g.index else "–"
            for i in out.index]
    return out


def _counts(summary: pd.DataFrame, dataset: str) -> str:
    sub = summary[summary["dataset"] == dataset]
    seeds = sorted(sub["n_seeds"].unique())
    cases = sorted(sub["n_test_cases"].unique())
    pairs = sorted(sub.loc[sub["init"].map(reference_for) != sub["init"], "n_pairs"].unique())
    return (f"n = {'/'.join(map(str, cases))} test cases × {'/'.join(map(str, seeds))} seeds"
            + (f" ({'/'.join(map(str, pairs))} pairs per test)" if pairs else ""))


NOTE = ("Dice: mean ± sd over seeds of each run's mean foreground Dice (%) on each test case's original image grid "
        "(predicted probabilities resampled back, as nnU-Net exports), classes averaged over test cases with "
        "NaN skipped as in nnU-Net. Dice (prep. grid): the same mean scored on the preprocessed grid (RAS, target "
        "spacing). Rows ending in @nnunet were fine-tuned by nnU-Net's own trainer (finetune.engine nnunet) and "
        "are compared with scratch@nnunet; the others by ctssl's and compared with scratch. "
        "Δ: difference of means to scratch, in Dice points. 95% CI: of Δ by run, a percentile bootstrap that "
        "resamples seeds (runs) and test cases independently and recomputes Δ on each resampled seed x case grid "
        "(10,000 resamples, fixed seed): a Δ carried by one or two seeds gets a wide interval. "
        "p: two-sided Wilcoxon "
        "signed-rank test of the init against scratch, paired over (seed, test case), each pair's values being the "
        "case's mean foreground Dice. p Holm: p corrected by Holm's step-down method across the inits of the same "
        "table (dataset and fraction). verdict: above (or below) scratch only when the Holm p < 0.05 and the whole "
        "95% CI lies above (below) 0, otherwise no difference; 'one run' where a single seed was run (its CI "
        "resamples test cases only, so it supports no claim). gap closed: Δ divided by the label gap of the reference (its Dice at the "
        "highest fraction minus at this one), the share of what every label adds that the init buys with this "
        "fraction's labels. Best mean per column in bold.")


def markdown_report(summary: pd.DataFrame, per_class: pd.DataFrame, provenance: pd.DataFrame, note: str = "",
                    comparisons: pd.DataFrame | None = None, per_seed: pd.DataFrame | None = None) -> str:
    lines = ["# Mean foreground Dice (%) by initialization and label fraction", ""]
    lines += [f"**Note.** {note}", ""] if note else []
    lines += [NOTE, ""]
    for dataset in sorted(summary["dataset"].unique()):
        lines += [f"## {dataset}", "", _counts(summary, dataset) + ".", "",
                  dataset_block(summary, dataset, _md_bold).to_markdown(disable_numparse=True), ""]
    if comparisons is not None and not comparisons.empty:
        lines += ["# Head-to-head comparisons", "", COMPARISONS_NOTE, ""]
        for dataset in sorted(comparisons["dataset"].unique()):
            lines += [f"## {dataset}", "", comparison_block(comparisons, dataset).to_markdown(disable_numparse=True),
                      ""]
    if per_seed is not None and not per_seed.empty:
        lines += ["# Δ per seed", "", "Each init minus its engine's scratch, per seed (one labelled subset and one "
                  "training run each), in Dice points (delta_per_seed.csv).", "", *seed_lines(per_seed), ""]
    lines += ["# Dice per class (%)", "", "Mean ± sd over seeds of each class's mean Dice over test cases.", ""]
    for dataset in sorted(per_class["dataset"].unique()):
        lines += [f"## {dataset}", "", class_block(per_class, dataset, _md_bold).to_markdown(), ""]
    lines += ["# Provenance", "", "Per cell in provenance.csv (config hash, train and test case ids, SLURM job).", "",
              provenance_summary(provenance).to_markdown(index=False), ""]
    return "\n".join(lines)


def html_report(summary: pd.DataFrame, per_class: pd.DataFrame, provenance: pd.DataFrame, note: str = "",
                comparisons: pd.DataFrame | None = None) -> str:
    """The Markdown report's tables as one self-contained HTML page (shown inline by `snakemake --report`)."""
    def table(frame: pd.DataFrame, index: bool = True) -> str:
        return frame.to_html(escape=False, index=index, border=0, classes="t")

    body = ["<h1>Mean foreground Dice (%) by initialization and label fraction</h1>"]
    body += [f"<p><b>Note.</b> {html.escape(note)}</p>"] if note else []
    body += [f"<p>{html.escape(NOTE)}</p>"]
    for dataset in sorted(summary["dataset"].unique()):
        body += [f"<h2>{html.escape(dataset)}</h2><p>{html.escape(_counts(summary, dataset))}.</p>",
                 table(dataset_block(summary, dataset, _html_bold))]
    if comparisons is not None and not comparisons.empty:
        body += ["<h1>Head-to-head comparisons</h1>", f"<p>{html.escape(COMPARISONS_NOTE)}</p>"]
        for dataset in sorted(comparisons["dataset"].unique()):
            body += [f"<h2>{html.escape(dataset)}</h2>", table(comparison_block(comparisons, dataset))]
    body.append("<h1>Dice per class (%)</h1><p>Mean ± sd over seeds of each class's mean Dice over test cases.</p>")
    for dataset in sorted(per_class["dataset"].unique()):
        body += [f"<h2>{html.escape(dataset)}</h2>", table(class_block(per_class, dataset, _html_bold))]
    cells = provenance.drop(columns=["metrics", "weights_path", "train_cases"]).assign(
        weights_sha256=provenance["weights_sha256"].map(_short_sha),
        fraction=provenance["fraction"].map(fraction_key))
    body += ["<h1>Provenance</h1>", table(provenance_summary(provenance), False),
             "<h2>Every cell</h2><p>Train case ids and metrics paths: provenance.csv.</p>",
             table(cells.fillna("–"), False)]
    style = ("body{font-family:sans-serif;font-size:14px;margin:1em}table.t{border-collapse:collapse;margin:.5em 0}"
             "table.t td,table.t th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "table.t th{background:#f3f3f3}")
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _short_sha(digest) -> str:
    """First 16 hex digits of a checksum; '–' for a cell without weights (scratch)."""
    return digest[:16] if isinstance(digest, str) else "–"


def provenance_summary(provenance: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, init): cells, code versions, config hashes and the pretrained weights' checksum."""
    def uniq(values: pd.Series) -> str:
        vals = sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))})
        return ", ".join(vals) if vals else "–"

    rows = []
    for (dataset, init), g in provenance.groupby(["dataset", "init"], sort=False):
        rows.append({"dataset": dataset, "init": init, "cells": len(g), "code version": uniq(g["code_version"]),
                     "config sha256": uniq(g["config_sha256"]),
                     "weights sha256": uniq(g["weights_sha256"].map(_short_sha)),
                     "test cases": uniq(g["test_cases"])})
    frame = pd.DataFrame(rows)
    frame["_order"] = frame["init"].map({i: k for k, i in enumerate(init_order(frame["init"]))})
    return frame.sort_values(["dataset", "_order"]).drop(columns="_order")


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("×", r"$\times$"), ("<", r"$<$"),
                 ("\x01", r"\textbf{"), ("\x02", "}")):
        text = text.replace(a, b)
    return text


def _tex_table(block: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table, every cell escaped."""
    cols = "l" + "r" * len(block.columns)
    head = " & ".join([_tex_escape(block.index.name or "")] + [_tex_escape(c) for c in block.columns])
    body = [" & ".join(_tex_escape(str(v)) for v in (i, *row)) + r" \\" for i, row in block.iterrows()]
    return "\n".join([r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex_escape(caption)}}}",
                      rf"\label{{{label}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule", head + r" \\",
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def latex_report(summary: pd.DataFrame, per_class: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> str:
    """LaTeX tables (booktabs) to \\input{} into a paper."""
    parts = [f"% Generated by ctssl. {NOTE}", "% Needs \\usepackage{booktabs}.", ""]
    for dataset in sorted(summary["dataset"].unique()):
        parts.append(_tex_table(dataset_block(summary, dataset, _tex_bold),
                                f"{dataset}: mean foreground Dice (%), Δ vs scratch, 95 % run-level bootstrap CI, Wilcoxon p "
                                f"and Holm-corrected p across the inits; {_counts(summary, dataset)}.",
                                f"tab:dice-{dataset}"))
    for dataset in ([] if comparisons is None else sorted(comparisons["dataset"].unique())):
        parts.append(_tex_table(comparison_block(comparisons, dataset),
                                f"{dataset}: head-to-head comparisons, Δ = first init minus second (Dice points), "
                                "95 % run-level bootstrap CI, Wilcoxon p and Holm-corrected p across the comparisons.",
                                f"tab:comparisons-{dataset}"))
    for dataset in sorted(per_class["dataset"].unique()):
        parts.append(_tex_table(class_block(per_class, dataset, _tex_bold),
                                f"{dataset}: Dice per class (%), mean ± sd over seeds.", f"tab:dice-class-{dataset}"))
    return "\n".join(parts)


# ---- figures ------------------------------------------------------------------------------------------------

def _colours(inits: Iterable[str]) -> dict[str, str]:
    return {init: f"C{i % 10}" for i, init in enumerate(init_order(inits))}  # same init, same colour everywhere


def _curve_panel(ax, frame: pd.DataFrame, colours: dict[str, str], title: str) -> None:
    """Dice (%) vs labelled fraction on a log axis, one line per init (dashed: fine-tuned by nnU-Net), error bars =
    sd over seeds."""
    for init in init_order(frame["init"]):
        sub = frame[frame["init"] == init].sort_values("fraction")
        ax.errorbar(sub["fraction"], sub["dice_mean"], yerr=sub["dice_sd"], marker="o", capsize=3, label=init,
                    color=colours[init], linestyle="-" if engine_of(init) == "ctssl" else "--")  # nnU-Net dashed
    ax.set_xscale("log")
    fractions = sorted(frame["fraction"].unique())
    ax.set_xticks(fractions, [f"{fraction_key(f)}%" for f in fractions])
    ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel("labelled training cases")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def label_efficiency_plot(summary: pd.DataFrame, path: str | Path) -> None:
    """One panel per dataset: mean foreground Dice vs labelled fraction."""
    datasets = sorted(summary["dataset"].unique())
    colours = _colours(summary["init"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        _curve_panel(ax, summary[summary["dataset"] == dataset], colours, dataset)
        ax.set_ylabel("mean foreground Dice (%)")
    save_figure(fig, path)


def per_class_plot(per_class: pd.DataFrame, path: str | Path) -> None:
    """One row per dataset, one panel per class: class Dice vs labelled fraction."""
    datasets = sorted(per_class["dataset"].unique())
    classes = {d: sorted(per_class.loc[per_class["dataset"] == d, "class"].unique()) for d in datasets}
    ncols = max(len(c) for c in classes.values())
    colours = _colours(per_class["init"])
    fig, axes = plt.subplots(len(datasets), ncols, figsize=(4.2 * ncols, 3.4 * len(datasets)), squeeze=False)
    for r, dataset in enumerate(datasets):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(classes[dataset]):
                ax.axis("off")
                continue
            cls = classes[dataset][c]
            sub = per_class[(per_class["dataset"] == dataset) & (per_class["class"] == cls)]
            _curve_panel(ax, sub, colours, f"{dataset}: {cls}")
            ax.set_ylabel("Dice (%)")
    save_figure(fig, path)


def effect_rows(summary: pd.DataFrame, versus: pd.DataFrame) -> pd.DataFrame:
    """What `effects_plot` draws, one row per effect: each init against its engine's scratch, then the head-to-head
    comparisons, per (dataset, fraction), with Δ, its 95 % CI and the Holm p of its own family."""
    against = summary.dropna(subset=["delta_vs_scratch"]).assign(
        label=lambda f: f["init"] + " − " + np.where(f["engine"] == "nnunet", "scratch@nnunet", "scratch"),
        family="against scratch", delta=lambda f: f["delta_vs_scratch"])
    head = versus.assign(label=versus["init"] + " − " + versus["reference"], family="head to head")
    columns = ["dataset", "fraction", "family", "label", "delta", "ci_low", "ci_high", "p_holm", "verdict"]
    return pd.concat([against[columns], head[columns]], ignore_index=True)


def effects_plot(summary: pd.DataFrame, versus: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """One panel per (dataset, fraction): every Δ as a point with its 95 % bootstrap CI, a line at 0, the Holm p
    beside it (filled: a verdict, above or below, by the tables' rule). The table's numbers as a picture; returns the rows it drew."""
    rows = effect_rows(summary, versus)
    panels = list(rows.groupby(["dataset", "fraction"], sort=True))
    if not panels:
        message_figure(path, "No effects to draw: every init is scratch.")
        return rows
    height = max(len(frame) for _, frame in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.75 + 0.32 * height), squeeze=False)
    for ax, ((dataset, fraction), frame) in zip(axes[0], panels, strict=True):
        y = np.arange(len(frame))[::-1]
        for yi, row in zip(y, frame.itertuples(), strict=True):
            significant = row.verdict in ("above", "below")
            colour = "C0" if row.family == "against scratch" else "C1"
            ax.errorbar(row.delta, yi, xerr=[[row.delta - row.ci_low], [row.ci_high - row.delta]], fmt="o",
                        color=colour, mfc=colour if significant else "white", capsize=3)
            ax.annotate(f"Holm p={row.p_holm:.2g}", (row.ci_high, yi), xytext=(4, -3), textcoords="offset points",
                        fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, frame["label"], fontsize=8)
        ax.set_title(f"{dataset}, {fraction_key(fraction)}% labels", fontsize=10)
        ax.set_xlabel("Δ mean foreground Dice (points), 95% CI")
        ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
    return rows


def write_report(metrics_files: Iterable[str | Path], out: dict[str, str | Path], note: str = "",
                 pretrain_logs: Iterable[str | Path] = (), raw_dirs: Mapping[str, str | Path] | None = None,
                 comparisons: Iterable[tuple[str, str]] = ()) -> None:
    """All report files; `out` maps: table_csv, table_md, table_tex, table_html, per_case_csv, per_class_csv,
    provenance_csv, comparisons_csv, per_seed_csv, efficiency_png, per_class_png, effects_png, pretraining_png, finetuning_png, and
    overlays_{dataset} for each dataset of `raw_dirs` (dataset -> its raw MSD folder, where the CT and ground truth
    are read). `note` (config `report_note`) heads the Markdown/HTML tables. `pretrain_logs`: the pretraining runs'
    train_log.csv. `comparisons`: (A, B) pairs of inits for the head-to-head table (config `comparisons`)."""
    metrics_files = [str(p) for p in metrics_files]
    long, cells, provenance = collect(metrics_files)
    summary = summary_table(cells, long)
    per_class = per_class_table(long)
    versus = comparisons_table(cells, long, comparisons)
    per_seed = delta_per_seed(cells)
    tables = {"table_csv": summary, "per_case_csv": long.sort_values(LONG_COLUMNS[:6]),
              "per_class_csv": per_class, "provenance_csv": provenance, "comparisons_csv": versus,
              "per_seed_csv": per_seed}
    for key, frame in tables.items():
        with atomic_path(out[key]) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out["table_md"]) as tmp:
        tmp.write_text(markdown_report(summary, per_class, provenance, note, versus, per_seed))
    with atomic_path(out["table_tex"]) as tmp:
        tmp.write_text(latex_report(summary, per_class, versus))
    with atomic_path(out["table_html"]) as tmp:
        tmp.write_text(html_report(summary, per_class, provenance, note, versus))
    label_efficiency_plot(summary, out["efficiency_png"])
    per_class_plot(per_class, out["per_class_png"])
    if "effects_png" in out:
        effects_plot(summary, versus, out["effects_png"])
    if "pretraining_png" in out:
        pretraining_curves(pretrain_logs, out["pretraining_png"])
    if "finetuning_png" in out:
        finetuning_curves(metrics_files, out["finetuning_png"], _colours(summary["init"]))
    for dataset, raw_dir in (raw_dirs or {}).items():
        from ctssl.data.msd import read_msd_dataset

        case, drawn, classes = overlay_cells(metrics_files, dataset)
        rank = {init: i for i, init in enumerate(init_order(c["init"] for c in drawn))}  # scratch first, as the tables
        drawn = sorted(drawn, key=lambda c: (rank[c["init"]], c["fraction"]))
        source = {c.case_id: c for c in read_msd_dataset(raw_dir).cases}[case]
        overlay_figure(drawn, source.image, source.label, case, classes, out[f"overlays_{dataset}"], dataset)
