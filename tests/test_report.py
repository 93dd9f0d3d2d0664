import json

import pandas as pd
import pytest

from ctssl.report import collect, dice_table, write_report


def _cell(tmp_path, dataset, init, fraction, seed, liver, tumour):
    m = {"dataset": dataset, "init": init, "fraction": fraction, "seed": seed,
         "per_case": {"c1": {"liver": liver, "tumour": tumour}, "c2": {"liver": liver, "tumour": None}},
         "mean_foreground_dice": (liver + tumour) / 2, "train_cases": ["a"], "test_cases": ["c1", "c2"]}
    path = tmp_path / f"{dataset}_{init}_{fraction}_{seed}.json"
    path.write_text(json.dumps(m))
    return path


@pytest.fixture
def files(tmp_path):
    return [_cell(tmp_path, "liver", init, f, s, 0.5 + 0.1 * s + (0.2 if init != "scratch" else 0), 0.2)
            for init in ("scratch", "pgl-all") for f in (10, 100) for s in (0, 1)]


def test_long_table_and_paper_table(files):
    long, cells = collect(files)
    assert list(long.columns) == ["dataset", "init", "fraction", "seed", "case", "class", "dice"]
    assert len(long) == 8 * 4 and long["dice"].isna().sum() == 8  # the null tumour Dice stays NaN
    table = dice_table(cells)
    assert list(table.index) == ["scratch", "pgl-all"]  # scratch is the reference row, first
    assert list(table.columns) == ["liver 10%", "liver 100%"]
    # scratch: mean fg dice = (0.5+0.2)/2=0.35 and (0.6+0.2)/2=0.40 -> 37.5 ± 3.5
    assert table.loc["scratch", "liver 10%"] == "37.5 ± 3.5"
    assert table.loc["pgl-all", "liver 100%"] == "47.5 ± 3.5"


def test_write_report_files(files, tmp_path):
    out = tmp_path / "report"
    write_report(files, out / "t.csv", out / "t.md", out / "fig.png")
    assert pd.read_csv(out / "t.csv").shape == (32, 7)
    md = (out / "t.md").read_text()
    assert "| scratch | 37.5 ± 3.5" in md.replace("  ", " ") or "37.5 ± 3.5" in md
    assert "seeds [0, 1]" in md
    assert (out / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_cells_is_an_error():
    with pytest.raises(ValueError, match="no metrics.json"):
        collect([])
