"""Report numbers on hand-made cells: means, sd, Δ, the paired Wilcoxon p, best marks, per-class tables, LaTeX."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from ctssl.report import (
    bootstrap_ci,
    calibration,
    collect,
    comparisons_table,
    dataset_block,
    effects_plot,
    holm,
    paired_wilcoxon,
    per_class_table,
    summary_table,
    verdicts,
    write_report,
)


def _cell(tmp_path, dataset, init, fraction, seed, liver, tumour, weights=None):
    """Case c2 has no tumour in prediction or reference (Dice null -> NaN, skipped)."""
    m = {"dataset": dataset, "init": init, "fraction": fraction, "seed": seed,
         "per_case": {"c1": {"liver": liver, "tumour": tumour}, "c2": {"liver": liver - 0.1, "tumour": None}},
         "mean_foreground_dice": ((liver + liver - 0.1) / 2 + tumour) / 2, "train_cases": ["a", "b"],
         "mean_foreground_dice_preprocessed": ((liver + liver - 0.1) / 2 + tumour) / 2 + 0.01,
         "test_cases": ["c1", "c2"], "code_version": "0.1.0+abc", "config": {"x": 1},
         "init_weights": {"init": init, "path": weights, "sha256": "f" * 64 if weights else None},
         "scheduler": {"host": "node1", "SLURM_JOB_ID": "42"}}
    path = tmp_path / f"{dataset}_{init}_{fraction}_{seed}.json"
    path.write_text(json.dumps(m))
    return path


@pytest.fixture
def files(tmp_path):
    # pgl-all beats scratch by 0.2 on liver in every (seed, case) pair; byol-all equals scratch exactly.
    out = []
    for init, gain in (("scratch", 0.0), ("pgl-all", 0.2), ("byol-all", 0.0)):
        weights = None if init == "scratch" else f"pretrain/{init}/model.pt"
        for f in (10, 100):
            for s in (0, 1):
                out.append(_cell(tmp_path, "liver", init, f, s, 0.5 + 0.1 * s + gain, 0.2, weights))
    return out


def test_collect_keeps_nan_and_provenance(files):
    long, cells, prov = collect(files)
    assert list(long.columns) == ["dataset", "init", "fraction", "seed", "case", "class", "dice"]
    assert len(long) == 12 * 4 and long["dice"].isna().sum() == 12  # the null tumour Dice stays NaN
    assert len(cells) == 12
    row = prov[(prov["init"] == "pgl-all") & (prov["fraction"] == 10) & (prov["seed"] == 0)].iloc[0]
    assert row["weights_sha256"] == "f" * 64 and row["test_cases"] == "c1 c2" and row["slurm_job"] == "42"
    assert row["code_version"] == "0.1.0+abc" and len(row["config_sha256"]) == 16


def test_summary_numbers_delta_wilcoxon_and_best(files):
    long, cells, _ = collect(files)
    table = summary_table(cells, long).set_index(["fraction", "init"])
    scratch = table.loc[(10, "scratch")]
    # seed 0: ((0.5+0.4)/2 + 0.2)/2 = 0.325; seed 1: 0.375 -> 35.0 ± 3.54
    assert scratch["dice_mean"] == pytest.approx(35.0) and scratch["dice_sd"] == pytest.approx(100 * np.std(
        [0.325, 0.375], ddof=1))
    assert np.isnan(scratch["delta_vs_scratch"]) and np.isnan(scratch["p_wilcoxon"])
    pgl = table.loc[(10, "pgl-all")]
    assert pgl["delta_vs_scratch"] == pytest.approx(10.0)  # +0.2 liver -> +0.1 mean foreground
    # 4 pairs (2 seeds x 2 cases), all in favour of pgl-all: exact two-sided p = 2 / 2**4
    assert pgl["n_pairs"] == 4 and pgl["p_wilcoxon"] == pytest.approx(0.125)
    assert scratch["verdict"] == "" and pgl["verdict"] == "no difference"  # 4 pairs cannot reach Holm p < 0.05
    byol = table.loc[(10, "byol-all")]
    assert byol["delta_vs_scratch"] == pytest.approx(0.0) and byol["p_wilcoxon"] == 1.0
    assert table["best"].sum() == 2 and table.loc[(10, "pgl-all"), "best"] and table.loc[(100, "pgl-all"), "best"]
    assert (table["n_seeds"] == 2).all() and (table["n_test_cases"] == 2).all()


def test_the_share_of_the_label_gap_an_init_closes(tmp_path):
    # scratch: 35.0 at 10 %, 55.0 at 100 % (liver 0.5 / 0.9 + 0.1 x seed; see test_summary_numbers...) -> gap 20;
    # pgl-all +0.2 liver at 10 % -> Δ +10 -> 50 % of the gap; byol-all below scratch by 0.1 liver -> -25 %.
    files = []
    for init, low, high in (("scratch", 0.5, 0.9), ("pgl-all", 0.7, 0.9), ("byol-all", 0.4, 0.9)):
        for s in (0, 1):
            files.append(_cell(tmp_path, "liver", init, 10, s, low + 0.1 * s, 0.2))
            files.append(_cell(tmp_path, "liver", init, 100, s, high + 0.1 * s, 0.2))
    long, cells, _ = collect(files)
    table = summary_table(cells, long).set_index(["fraction", "init"])
    assert table.loc[(100, "scratch"), "dice_mean"] - table.loc[(10, "scratch"), "dice_mean"] == pytest.approx(20.0)
    assert table.loc[(10, "pgl-all"), "gap_closed"] == pytest.approx(50.0)
    assert table.loc[(10, "byol-all"), "gap_closed"] == pytest.approx(-25.0)
    assert table.loc[[(10, "scratch"), (100, "pgl-all"), (100, "byol-all")], "gap_closed"].isna().all()
    block = dataset_block(summary_table(cells, long), "liver", lambda text: text)
    assert block["10% gap closed"].to_dict() == {"scratch": "–", "pgl-all": "+50 %", "byol-all": "-25 %"} and "100% gap closed" not in block
    # no label gap (every fraction alike): no share
    flat = [path for path in files if "_100_" not in path.name]
    flat += [_cell(tmp_path, "liver", "scratch", 100, s, 0.5 + 0.1 * s, 0.2) for s in (0, 1)]
    long, cells, _ = collect(flat)
    assert summary_table(cells, long)["gap_closed"].isna().all()


def test_paired_wilcoxon_uses_only_shared_pairs():
    a = pd.Series([0.9, 0.8, 0.7, np.nan, 0.6], index=list("abcde"))
    b = pd.Series([0.5, 0.5, 0.5, 0.5], index=list("abcd"))
    p, n = paired_wilcoxon(a, b)
    assert n == 3 and p == pytest.approx(0.25)  # d has a NaN, e no partner
    assert paired_wilcoxon(a.iloc[:0], b.iloc[:0])[1] == 0


def test_per_class_table(files):
    long, _, _ = collect(files)
    pc = per_class_table(long).set_index(["class", "fraction", "init"])
    # liver, scratch, 10%: seed 0 mean over cases (0.5, 0.4) = 0.45, seed 1 = 0.55 -> 50.0
    assert pc.loc[("liver", 10, "scratch"), "dice_mean"] == pytest.approx(50.0)
    assert pc.loc[("tumour", 10, "scratch"), "dice_mean"] == pytest.approx(20.0)  # NaN case skipped
    assert pc.loc[("liver", 10, "pgl-all"), "best"] and not pc.loc[("liver", 10, "scratch"), "best"]


def test_write_report_files(files, tmp_path):
    out = {k: tmp_path / "report" / name for k, name in (
        ("table_csv", "t.csv"), ("table_md", "t.md"), ("table_tex", "t.tex"), ("table_html", "t.html"), ("per_case_csv", "case.csv"),
        ("per_class_csv", "class.csv"), ("provenance_csv", "prov.csv"), ("comparisons_csv", "versus.csv"), ("per_seed_csv", "per_seed.csv"),
        ("efficiency_png", "eff.png"), ("per_class_png", "cls.png"), ("effects_png", "effects.png"))}
    write_report(files, out, note="Demo: too short to show an effect.", comparisons=[("pgl-all", "byol-all")])
    assert pd.read_csv(out["per_case_csv"]).shape == (48, 7)
    assert "**Note.** Demo: too short to show an effect." in out["table_md"].read_text()
    assert "<b>Note.</b> Demo: too short to show an effect." in out["table_html"].read_text()
    summary = pd.read_csv(out["table_csv"])
    assert {"delta_vs_scratch", "p_wilcoxon", "n_pairs", "best", "n_seeds", "n_test_cases"} <= set(summary.columns)
    md = re.sub(r" +", " ", out["table_md"].read_text())
    # original-grid Dice is the main column; the preprocessed-grid mean (here 1 point higher) sits beside it
    assert "| pgl-all | **45.0 ± 3.5** | +10.0 | [+10.0, +20.0] | 0.125 | 0.250 | no difference | 46.0 | **45.0 ± 3.5** |" in md
    assert summary.loc[summary["init"] == "pgl-all", "dice_preprocessed_mean"].round(3).tolist() == [46.0, 46.0]
    assert "| scratch | 35.0 ± 3.5 | – | – | – | – | – |" in md
    assert "| byol-all | 35.0 ± 3.5 | +0.0 | [+0.0, +0.0] | 1.000 | 1.000 | no difference |" in md
    assert "p Holm: p corrected by Holm's step-down method across the inits of the same table" in md
    assert "n = 2 test cases × 2 seeds (4 pairs per test)" in md
    assert "# Dice per class" in md and "# Provenance" in md and "ffffffffffffffff" in md
    assert "# Head-to-head comparisons" in md
    assert "| pgl-all vs byol-all | +10.0 | [+10.0, +20.0] | 0.125 | 0.125 | no difference | +10.0 | [+10.0, +20.0] |" in md
    assert len(pd.read_csv(out["comparisons_csv"])) == 2
    tex = out["table_tex"].read_text()
    assert tex.count(r"\begin{tabular}") == 3 and r"\textbf{45.0 $\pm$ 3.5}" in tex
    assert r"\label{tab:comparisons-liver}" in tex
    assert r"10\% Dice" in tex and r"\label{tab:dice-liver}" in tex and "**" not in tex
    page = out["table_html"].read_text()
    assert "<b>45.0 ± 3.5</b>" in page and page.count("<table") == 5 and "Wilcoxon" in page
    for png in ("efficiency_png", "per_class_png", "effects_png"):
        assert out[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(out["provenance_csv"])) == 12


def test_head_to_head_comparisons_on_hand_computed_cells(files):
    """pgl-all is 0.2 above byol-all on the liver in every (seed, case) pair: the mean foreground Dice is 10 points
    higher, the pairs differ by 0.1 (case c1: liver and tumour averaged) or 0.2 (c2: liver only), so the bootstrap
    CI is [+10, +20] and the exact two-sided Wilcoxon p of 4 positive pairs is 2/16. byol-all equals scratch: p 1.
    Holm over the two comparisons of a fraction: 2 x 0.125 = 0.25 and max(0.25, 1 x 1) = 1."""
    long, cells, _ = collect(files)
    table = comparisons_table(cells, long, [("pgl-all", "byol-all"), ("byol-all", "scratch"),
                                            ("pgl-all", "genesis-all")])  # no genesis cells: no row
    assert len(table) == 4  # 2 comparisons x 2 fractions
    row = table[(table["fraction"] == 10) & (table["init"] == "pgl-all")].iloc[0]
    assert row["reference"] == "byol-all" and row["delta"] == pytest.approx(10.0)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(10.0), pytest.approx(20.0))
    assert row["p_wilcoxon"] == pytest.approx(0.125) and row["n_pairs"] == 4 and row["p_holm"] == pytest.approx(0.25)
    assert (row["dice_init"], row["dice_reference"]) == (pytest.approx(45.0), pytest.approx(35.0))
    same = table[(table["fraction"] == 10) & (table["init"] == "byol-all")].iloc[0]
    assert same["delta"] == pytest.approx(0.0) and same["p_wilcoxon"] == 1.0 and same["p_holm"] == 1.0
    reverse = comparisons_table(cells, long, [("byol-all", "pgl-all")]).iloc[0]
    assert reverse["delta"] == pytest.approx(-10.0) and reverse["ci_high"] == pytest.approx(-10.0)
    assert comparisons_table(cells, long, []).empty
    # CI above 0 but Holm p 0.25 (4 pairs can't reach 0.05): no verdict either way
    assert row["verdict"] == "no difference" and same["verdict"] == "no difference"


def test_a_verdict_needs_both_the_holm_p_and_the_run_level_ci():
    """The pre-registered rule on hand-made rows: Holm p < 0.05 and the whole CI on one side of 0."""
    rows = pd.DataFrame({"p_holm": [0.01, 0.01, 0.01, 0.2, 0.049, np.nan],
                         "ci_low": [0.5, -3.0, -1.0, 1.0, -0.2, np.nan],
                         "ci_high": [4.0, -0.1, 2.0, 5.0, -0.1, np.nan], "n_runs": [10, 2, 10, 10, 10, 0]})
    assert verdicts(rows).tolist() == ["above", "below", "no difference", "no difference", "below", ""]
    one_seed = rows.assign(n_runs=1)  # a CI over test cases alone: no claim, whatever p and the interval say
    assert verdicts(one_seed).tolist() == ["one run"] * 5 + [""]
    assert verdicts(rows.iloc[:0]).empty


def test_the_effects_figure_draws_the_tables_numbers(files, tmp_path):
    """Every Δ of the summary (against scratch) and of the comparisons, with its CI and Holm p, per panel."""
    long, cells, _ = collect(files)
    summary = summary_table(cells, long)
    versus = comparisons_table(cells, long, [("pgl-all", "byol-all")])
    drawn = effects_plot(summary, versus, tmp_path / "effects.png").set_index(["fraction", "label"])
    assert (tmp_path / "effects.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn.index.get_level_values("label").unique()) == [
        "byol-all − scratch", "pgl-all − byol-all", "pgl-all − scratch"]
    pgl = drawn.loc[(10, "pgl-all − scratch")]
    assert (pgl["delta"], pgl["ci_low"], pgl["ci_high"], pgl["p_holm"]) == (
        pytest.approx(10.0), pytest.approx(10.0), pytest.approx(20.0), pytest.approx(0.25))
    assert pgl["verdict"] == "no difference"  # drawn hollow: Holm p 0.25
    head = drawn.loc[(100, "pgl-all − byol-all")]
    assert head["family"] == "head to head" and head["p_holm"] == pytest.approx(0.125)  # a family of one
    only_scratch = summary[summary["init"] == "scratch"]
    assert effects_plot(only_scratch, versus.iloc[0:0], tmp_path / "none.png").empty
    assert (tmp_path / "none.png").exists()  # a figure that says why it is empty, not a missing file


def test_no_cells_is_an_error():
    with pytest.raises(ValueError, match="no metrics.json"):
        collect([])


def test_nnunet_rows_are_compared_with_nnunets_scratch(files, tmp_path):
    """Cells of finetune.engine nnunet (init suffix @nnunet) form their own block, referenced to scratch@nnunet:
    an nnU-Net init is never measured against ctssl's scratch."""
    extra = [_cell(tmp_path, "liver", init, 10, s, 0.3 + 0.1 * s + gain, 0.2)
             for init, gain in (("scratch@nnunet", 0.0), ("pgl-all@nnunet", -0.2)) for s in (0, 1)]
    long, cells, _ = collect(files + extra)
    table = summary_table(cells, long)
    rows = table[table["fraction"] == 10]
    assert list(rows["init"]) == ["scratch", "byol-all", "pgl-all", "scratch@nnunet", "pgl-all@nnunet"]
    assert list(rows["engine"]) == ["ctssl"] * 3 + ["nnunet"] * 2
    nnunet = rows.set_index("init").loc["pgl-all@nnunet"]
    assert nnunet["delta_vs_scratch"] == pytest.approx(-10.0) and nnunet["n_pairs"] == 4  # vs scratch@nnunet
    assert np.isnan(rows.set_index("init").loc["scratch@nnunet", "delta_vs_scratch"])


def test_holm_on_hand_computed_examples():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04); back in input order
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([np.nan, 0.02, 0.5]), [np.nan, 0.04, 0.5])  # NaN is not in the family
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.2]), [0.2])


def test_bootstrap_interval_on_hand_computed_examples():
    # Two pairs with differences 0 and 2: resampled means are 0, 1, 2 with probability 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % points are exactly 0 and 2.
    assert bootstrap_ci(np.array([[0.0], [2.0]]), np.zeros((2, 1))) == (0.0, 2.0)
    # Every pair differs by the same amount: the interval is that amount.
    low, high = bootstrap_ci(np.full((5, 2), 0.7), np.full((5, 2), 0.4))
    assert low == pytest.approx(0.3) and high == pytest.approx(0.3)
    # Δ is the mean over classes of the class means, a class absent (NaN) in a pair skipped as in the table:
    # liver +0.2 in both pairs, tumour +0.0 where present -> Δ = 0.1, except in the resamples that hold only the
    # second pair (probability 1/4), which have no tumour: Δ = liver's +0.2. So the interval is [0.1, 0.2].
    mine = np.array([[0.7, 0.2], [0.6, np.nan]])
    ref = np.array([[0.5, 0.2], [0.4, np.nan]])
    assert bootstrap_ci(mine, ref) == pytest.approx((0.1, 0.2))
    assert all(np.isnan(bootstrap_ci(np.empty((0, 1)), np.empty((0, 1)))))
    assert bootstrap_ci(np.array([[0.0], [2.0]]), np.zeros((2, 1)), seed=3) == (0.0, 2.0)  # seed-independent here


def test_summary_gives_each_delta_a_bootstrap_interval_and_holm_p(files):
    long, cells, _ = collect(files)
    table = summary_table(cells, long).set_index(["fraction", "init"])
    pgl, byol = table.loc[(10, "pgl-all")], table.loc[(10, "byol-all")]
    # liver +20 points in every (seed, case) pair, tumour equal where present (case c1): Δ = +10, except in the
    # resamples of the 4 pairs that hold c2 only (1/16 > 2.5 %), which have no tumour: Δ = +20.
    assert (pgl["ci_low"], pgl["ci_high"]) == pytest.approx((10.0, 20.0))
    assert (byol["ci_low"], byol["ci_high"]) == pytest.approx((0.0, 0.0))
    # the family at 10 %: pgl 0.125, byol 1.0 -> Holm: 2 x 0.125 = 0.25, max(0.25, 1.0) = 1.0
    assert pgl["p_holm"] == pytest.approx(0.25) and byol["p_holm"] == pytest.approx(1.0)
    assert np.isnan(table.loc[(10, "scratch"), "p_holm"]) and np.isnan(table.loc[(10, "scratch"), "ci_low"])


def _summary_rows(scratch_low: float, scratch_high: float, delta: float, ci: tuple[float, float], p: float):
    base = {"dataset": "liver", "engine": "ctssl", "n_seeds": 5, "n_test_cases": 12, "n_pairs": 0,
            "delta_vs_scratch": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_wilcoxon": np.nan}
    return pd.DataFrame([
        {**base, "init": "scratch", "fraction": 10.0, "dice_mean": scratch_low},
        {**base, "init": "scratch", "fraction": 100.0, "dice_mean": scratch_high, "n_seeds": 3},
        {**base, "init": "supervised-all", "fraction": 10.0, "dice_mean": scratch_low + delta, "n_pairs": 60,
         "delta_vs_scratch": delta, "ci_low": ci[0], "ci_high": ci[1], "p_wilcoxon": p},
    ])


def test_calibration_reads_both_criteria_off_the_summary():
    table = calibration(_summary_rows(48.0, 86.0, 8.1, (3.0, 13.0), 0.004), "liver")
    assert list(table["passed"]) == [True, True]
    assert table["value"].tolist() == ["+38.0", "Δ +8.1 [+3.0, +13.0], p 0.004"]
    assert table["n"].tolist() == ["3 + 5 seeds x 12 test cases", "60 (case, seed) pairs, CI by run"]
    # (a) fails under a 15-point gap; (b) fails on p, on a CI that reaches 0, or on a negative Δ
    assert list(calibration(_summary_rows(70.0, 84.9, 8.1, (3.0, 13.0), 0.004), "liver")["passed"]) == [False, True]
    assert not calibration(_summary_rows(48.0, 86.0, 8.1, (3.0, 13.0), 0.02), "liver")["passed"][1]
    assert not calibration(_summary_rows(48.0, 86.0, 8.1, (-0.5, 13.0), 0.004), "liver")["passed"][1]
    with pytest.raises(ValueError, match="no 'supervised-all' cells for liver at 10 %"):
        calibration(_summary_rows(48.0, 86.0, 8.1, (3.0, 13.0), 0.004).iloc[:2], "liver")


def test_bootstrap_interval_matches_the_known_interval_of_a_mean():
    """1,000 pairs whose Δ are draws from N(2, 3²): the percentile bootstrap of the mean must give the sample mean
    ± 1.96 s/√n (the interval the central limit theorem gives), not e.g. the range of the Δ."""
    import numpy as np

    from ctssl.report import bootstrap_ci

    deltas = np.random.default_rng(7).normal(2.0, 3.0, size=1000)
    mine, reference = (deltas + 50.0)[:, None], np.full((1000, 1), 50.0)
    low, high = bootstrap_ci(mine, reference)
    half = 1.96 * deltas.std(ddof=1) / np.sqrt(len(deltas))  # 0.186
    assert low == pytest.approx(deltas.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(deltas.mean() + half, abs=0.1 * half)


def test_run_level_bootstrap_on_hand_computed_grids():
    """The crossed bootstrap resamples seeds and test cases independently (ctssl.report.run_bootstrap_ci)."""
    import numpy as np

    from ctssl.report import bootstrap_ci, run_bootstrap_ci

    zeros = np.zeros((2, 1, 1))
    # Two seeds, one case, Δ 0 and 2: resampled means 0, 1, 2 with probability 1/4, 1/2, 1/4 -> [0, 2] exactly.
    assert run_bootstrap_ci(np.array([[[0.0]], [[2.0]]]), zeros) == (0.0, 2.0)
    # One seed, two cases, Δ 0 and 2: the cases are resampled the same way.
    assert run_bootstrap_ci(np.array([[[0.0], [2.0]]]), np.zeros((1, 2, 1))) == (0.0, 2.0)
    # A seed effect only (Δ = 0 on every case of seed 0, 2 on every case of seed 1, 10 cases): by run the interval
    # is still [0, 2]: which seed was drawn decides everything. Pairs taken as independent (20 of them) would
    # claim [0.6, 1.4] or so, and a verdict of "> 0" on two runs.
    grid = np.repeat(np.array([[[0.0]], [[2.0]]]), 10, axis=1)
    assert run_bootstrap_ci(grid, np.zeros_like(grid)) == (0.0, 2.0)
    low, high = bootstrap_ci(grid.reshape(20, 1), np.zeros((20, 1)))
    assert 0.4 < low < high < 1.6
    # A known interval: 1,000 seeds x 1 case from N(2, 3^2) -> mean +- 1.96 s / sqrt(n).
    deltas = np.random.default_rng(7).normal(2.0, 3.0, size=1000)
    low, high = run_bootstrap_ci(deltas[:, None, None], np.zeros((1000, 1, 1)))
    half = 1.96 * deltas.std(ddof=1) / np.sqrt(1000)
    assert low == pytest.approx(deltas.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(deltas.mean() + half, abs=0.1 * half)
    # A missing (seed, case) cell is NaN and skipped.
    holed = np.array([[[1.0], [np.nan]], [[1.0], [1.0]]])
    assert run_bootstrap_ci(holed, np.zeros((2, 2, 1))) == (1.0, 1.0)


def test_delta_per_seed_shows_which_draws_carry_a_result():
    import pandas as pd

    from ctssl.report import delta_per_seed, seed_lines

    cells = pd.DataFrame({"dataset": "liver", "fraction": 5.0, "init": ["scratch"] * 3 + ["pgl-all"] * 3 + ["x@nnunet"],
                          "seed": [0, 1, 2, 0, 1, 2, 0], "mean_fg_dice": [0.5, 0.6, 0.4, 0.62, 0.59, 0.41, 0.3]})
    per_seed = delta_per_seed(cells)
    assert per_seed[["init", "reference", "seed"]].values.tolist() == [
        ["pgl-all", "scratch", 0], ["pgl-all", "scratch", 1], ["pgl-all", "scratch", 2]]  # no scratch@nnunet cell
    assert per_seed["delta"].tolist() == pytest.approx([12.0, -1.0, 1.0])
    assert seed_lines(per_seed) == ["- liver, 5 %, pgl-all: +12.0 (seed 0), -1.0 (seed 1), +1.0 (seed 2)"]
