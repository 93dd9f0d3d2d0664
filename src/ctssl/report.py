"""Paper-shaped tables and figures from the per-cell `metrics.json` files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # report jobs run headless (cluster nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctssl.io import atomic_path, read_json  # noqa: E402
from ctssl.splits import fraction_key  # noqa: E402

LONG_COLUMNS = ["dataset", "init", "fraction", "seed", "case", "class", "dice"]


def collect(metrics_files: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(long per case x class table, one row per cell with its mean foreground Dice)."""
    rows, cells = [], []
    for path in metrics_files:
        m = read_json(path)
        for case, scores in m["per_case"].items():
            for cls, dice in scores.items():
                rows.append({"dataset": m["dataset"], "init": m["init"], "fraction": float(m["fraction"]),
                             "seed": int(m["seed"]), "case": case, "class": cls,
                             "dice": np.nan if dice is None else float(dice)})
        mfd = m["mean_foreground_dice"]
        cells.append({"dataset": m["dataset"], "init": m["init"], "fraction": float(m["fraction"]),
                      "seed": int(m["seed"]), "mean_fg_dice": np.nan if mfd is None else float(mfd),
                      "n_test": len(m["test_cases"]), "n_train": len(m["train_cases"])})
    if not cells:
        raise ValueError("no metrics.json files given to the report")
    return pd.DataFrame(rows, columns=LONG_COLUMNS), pd.DataFrame(cells)


def _init_order(inits: Iterable[str]) -> list[str]:
    """scratch first (the reference row), the rest alphabetically."""
    inits = sorted(set(inits))
    return (["scratch"] if "scratch" in inits else []) + [i for i in inits if i != "scratch"]


def dice_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Rows: init; columns: (dataset, fraction%); cells: 'mean ± sd' over seeds of mean foreground Dice (%)."""
    agg = cells.groupby(["init", "dataset", "fraction"])["mean_fg_dice"].agg(["mean", "std", "count"])

    def fmt(row: pd.Series) -> str:
        if np.isnan(row["mean"]):
            return "n/a"
        sd = 0.0 if np.isnan(row["std"]) else row["std"]
        return f"{100 * row['mean']:.1f} ± {100 * sd:.1f}"

    table = agg.apply(fmt, axis=1).unstack(["dataset", "fraction"])
    table = table.reindex(index=_init_order(table.index), columns=sorted(table.columns))
    table.columns = [f"{d} {fraction_key(f)}%" for d, f in table.columns]
    table.index.name = "init"
    return table.fillna("–")


def markdown_report(cells: pd.DataFrame) -> str:
    table = dice_table(cells)
    seeds = sorted(cells["seed"].unique())
    n_test = cells.groupby("dataset")["n_test"].max().to_dict()
    lines = [
        "# Mean foreground Dice (%) by initialization and label fraction",
        "",
        f"Cells: mean ± sd over seeds {[int(s) for s in seeds]} of each run's mean foreground Dice (class means over test cases, "
        "NaN skipped, as nnU-Net). Test cases per dataset: "
        + ", ".join(f"{d}: {n}" for d, n in sorted(n_test.items())) + ".",
        "",
        table.to_markdown(),
        "",
    ]
    return "\n".join(lines)


def label_efficiency_plot(cells: pd.DataFrame, path: str | Path) -> None:
    """Dice vs labelled fraction: one panel per dataset, one line per init, error bars = sd over seeds."""
    datasets = sorted(cells["dataset"].unique())
    colours = {init: f"C{i % 10}" for i, init in enumerate(_init_order(cells["init"]))}  # same init, same colour
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = cells[cells["dataset"] == dataset]
        for init in _init_order(sub["init"]):
            agg = sub[sub["init"] == init].groupby("fraction")["mean_fg_dice"].agg(["mean", "std"]).fillna(0.0)
            ax.errorbar(agg.index, 100 * agg["mean"], yerr=100 * agg["std"], marker="o", capsize=3, label=init,
                        color=colours[init])
        ax.set_xscale("log")
        fractions = sorted(sub["fraction"].unique())
        ax.set_xticks(fractions, [f"{fraction_key(f)}%" for f in fractions])
        ax.minorticks_off()
        ax.set_title(dataset)
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("mean foreground Dice (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_report(metrics_files: Iterable[str | Path], out_csv: str | Path, out_md: str | Path,
                 out_png: str | Path) -> None:
    long, cells = collect(metrics_files)
    with atomic_path(out_csv) as tmp:
        long.sort_values(LONG_COLUMNS[:6]).to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown_report(cells))
    label_efficiency_plot(cells, out_png)
