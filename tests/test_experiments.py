"""The diagnosis harness on a tiny dataset: runs are cached, named per experiment, and tabulated with dev columns."""

import json

import pandas as pd
import pytest
import torch
import yaml

from ctssl.experiments import (
    Run,
    Study,
    chosen_steps,
    convergence_lr_runs,
    convergence_runs,
    convergence_table,
    curve_choice,
    curve_runs,
    curve_table,
    lowest_fraction_runs,
    lowest_fraction_table,
    nested_pool_order,
    supervised_length_runs,
    tail_change,
    write_outputs,
)
from ctssl.splits import make_splits

ROOT_CONFIG = "config.yaml"


def _study(tmp_path, liver_preprocessed):
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / ROOT_CONFIG).read_text())
    cfg["results"] = str(tmp_path / "res")
    cfg["model"] = {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4, "num_res_units": 1}
    cfg["finetune"].update(patch_size=[16, 16, 16], steps=4, warmup_steps=1, log_every=2)
    cfg["device"] = "cpu"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = tmp_path / "res"
    (res / "preprocessed").mkdir(parents=True)
    (res / "preprocessed" / "liver").symlink_to(liver_preprocessed)
    (res / "splits").mkdir()
    splits = make_splits([f"liver_{i:03d}" for i in range(4)], test_fraction=0.25, min_test=1, split_seed=0)
    (res / "splits" / "liver.json").write_text(json.dumps({"dataset": "liver", **splits}))
    study = Study(tmp_path / "cfg.yaml", fraction=34)  # 1 of 3 training cases labelled, 2 for development
    study.curve_every = 2
    return study


def test_runs_are_cached_and_tabulated_under_their_experiment_names(tmp_path, liver_preprocessed):
    study = _study(tmp_path, liver_preprocessed)
    first = study.finetune(Run("scratch", "scratch", 0))
    mtime = first.stat().st_mtime_ns
    assert study.finetune(Run("renamed", "scratch", 0)) == first and first.stat().st_mtime_ns == mtime  # cached
    curve = pd.read_csv(first.parent / "curve.csv")
    assert list(curve["step"]) == [2, 4] and {"dev_dice", "dev_liver", "dev_tumour"} <= set(curve.columns)
    run = json.loads((first.parent / "run.json").read_text())
    assert len(run["dev_cases"]) == 2 and not set(run["dev_cases"]) & set(json.loads(first.read_text())["test_cases"])
    # pgl@0: the untrained start of a pretraining run, saved once and loaded strictly
    runs = [Run("scratch", "scratch", 0), Run("init-only", "pgl@0", 0)]
    table = write_outputs("smoke", study, runs, tmp_path / "out", "smoke test")
    assert list(table.index) == ["scratch", "init-only"]
    assert {"dev_dice_mean", "dev_liver", "test_dice_mean", "test_liver", "delta_vs_scratch"} <= set(table.columns)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0 and (tmp_path / "out" / "table.md").exists()
    [cached] = (study.cache / "pretrain").glob("pgl-0-*/model.pt")
    # The pretraining cache is keyed by what the weights depend on: another network is another run, not these
    study.cfg["model"] = {**study.cfg["model"], "channels": [4, 8, 32]}
    other = study.pretrained("pgl@0")
    assert other != cached and other.parent.name.startswith("pgl-0-")


def _curve(init, labelled, lr, steps, seed, values):
    """A dev curve sampled at 5 equally spaced steps (values in Dice fraction)."""
    return pd.DataFrame({"init": init, "labelled": labelled, "lr": lr, "steps": steps, "seed": seed,
                         "step": [steps * k // 5 for k in range(1, 6)], "dev_dice": values})


def test_tail_change_is_the_range_over_the_last_fifth_of_steps():
    curve = pd.Series([0.1, 0.5, 0.6, 0.62, 0.65], index=[20, 40, 60, 80, 100])
    assert tail_change(curve) == pytest.approx(0.03)  # steps 80 and 100
    assert tail_change(curve, tail=0.5) == pytest.approx(0.05)  # steps 60..100


def test_convergence_rule_on_hand_computed_curves():
    curves = pd.concat([
        # 500 steps still climbing (tail 0.60 -> 0.70: 10 points); 1000 flat; 2000 adds 0.5 point
        _curve("scratch", 2, 1e-3, 500, 0, [0.2, 0.4, 0.5, 0.60, 0.70]),
        _curve("scratch", 2, 1e-3, 1000, 0, [0.3, 0.6, 0.7, 0.795, 0.80]),
        _curve("scratch", 2, 1e-3, 2000, 0, [0.3, 0.6, 0.7, 0.80, 0.805]),
        # two seeds are averaged before the rule: (0.88 + 0.90) / 2 = 0.89 at the end
        _curve("supervised", 2, 1e-3, 500, 0, [0.5, 0.7, 0.8, 0.88, 0.88]),
        _curve("supervised", 2, 1e-3, 500, 1, [0.5, 0.7, 0.8, 0.88, 0.90]),
        _curve("supervised", 2, 1e-3, 1000, 0, [0.5, 0.7, 0.8, 0.90, 0.90]),
        _curve("supervised", 2, 1e-3, 2000, 0, [0.5, 0.7, 0.8, 0.90, 0.905]),
    ])
    table = convergence_table(curves)
    s500 = table.loc[("scratch", 2, 1e-3, 500)]
    assert s500["final"] == pytest.approx(70) and s500["tail_change"] == pytest.approx(10)
    assert s500["gain_if_doubled"] == pytest.approx(10) and not s500["converged"]
    sup500 = table.loc[("supervised", 2, 1e-3, 500)]
    # tail 0.88 -> 0.89 (seed mean): 1 point, not < 1; doubling is paired by seed: seed 0 only, 88 -> 90
    assert sup500["final"] == pytest.approx(89) and sup500["tail_change"] == pytest.approx(1)
    assert sup500["gain_if_doubled"] == pytest.approx(2) and not sup500["converged"]
    s1000 = table.loc[("scratch", 2, 1e-3, 1000)]
    assert s1000["tail_change"] == pytest.approx(0.5) and s1000["gain_if_doubled"] == pytest.approx(0.5)
    assert s1000["converged"] and table.loc[("scratch", 2, 1e-3, 2000)]["converged"]  # no 4000: tail only
    assert chosen_steps(table, 1e-3) == 1000
    # a group that never settles leaves no length chosen
    table.loc[("scratch", 2, 1e-3, 1000), "converged"] = table.loc[("scratch", 2, 1e-3, 2000), "converged"] = False
    assert chosen_steps(table, 1e-3) is None


def test_the_convergence_grid_runs_the_longest_length_for_the_first_seed_only():
    runs = convergence_runs(3, 22, [0, 1])
    assert len(runs) == 3 * 2 * 2 * 2 + 2 * 2  # 500, 1000, 2000: 2 inits x 2 counts x 2 seeds; 4000: seed 0
    assert {r.seed for r in runs if r.finetune["steps"] == 4000} == {0}
    assert {r.seed for r in runs if r.finetune["steps"] == 2000} == {0, 1}
    assert {r.labelled for r in runs} == {3, 22} and {r.finetune["lr"] for r in runs} == {1e-3}



def test_the_lr_recheck_runs_the_longest_length_at_the_lowest_count_around_the_current_lr():
    runs = convergence_lr_runs(3, [0])
    assert [(r.label, r.finetune["lr"]) for r in runs] == [
        ("scratch", 3e-4), ("supervised", 3e-4), ("scratch", 1e-3), ("supervised", 1e-3), ("scratch", 3e-3),
        ("supervised", 3e-3)]
    assert {(r.labelled, r.finetune["steps"], r.seed) for r in runs} == {(3, 2000, 0)}
    # the 1e-3 runs are the convergence grid's own (same settings: cached, not trained again)
    grid = {(r.label, r.labelled, r.seed, tuple(sorted(r.finetune.items()))) for r in convergence_runs(3, 22, [0])}
    assert {(r.label, r.labelled, r.seed, tuple(sorted(r.finetune.items()))) for r in runs
            if r.finetune["lr"] == 1e-3} <= grid

def test_the_lowest_fraction_rule_on_hand_computed_finals():
    rows = [  # (init, labelled, seed, dev Dice in points)
        ("scratch", 22, 0, 86.0), ("scratch", 22, 1, 88.0), ("scratch", 22, 2, 87.0),  # mean 87
        ("scratch", 1, 0, 60.0), ("scratch", 1, 1, 70.0), ("scratch", 1, 2, 65.0),  # mean 65: gap 22
        ("supervised", 1, 0, 66.0), ("supervised", 1, 1, 69.0), ("supervised", 1, 2, 69.0),  # +6, -1, +4: 2/3
        ("scratch", 2, 0, 75.0), ("scratch", 2, 1, 74.0), ("scratch", 2, 2, 76.0),  # mean 75: gap 12
        ("supervised", 2, 0, 80.0), ("supervised", 2, 1, 80.0), ("supervised", 2, 2, 80.0),  # +5 in every seed
    ]
    finals = pd.DataFrame(rows, columns=["init", "labelled", "seed", "dice"])
    table, chosen = lowest_fraction_table(finals, 22)
    assert table.loc[1, "label_gap"] == pytest.approx(22.0) and table.loc[2, "label_gap"] == pytest.approx(12.0)
    assert table.loc[1, "supervised_minus_scratch"] == pytest.approx(3.0) and table.loc[1, "seeds_ahead"] == "2/3"
    assert table.loc[2, "supervised_minus_scratch"] == pytest.approx(5.0) and table.loc[2, "seeds_ahead"] == "3/3"
    assert list(table["a_gap"]) == [True, False] and list(table["b_transfer"]) == [True, True]
    assert chosen == 1  # 2 cases show transfer but too small a label gap
    # ahead in the mean but in one seed only: (b) fails, nothing is chosen
    finals.loc[(finals["init"] == "supervised") & (finals["labelled"] == 1), "dice"] = [80.0, 60.0, 60.0]
    table, chosen = lowest_fraction_table(finals, 22)
    assert table.loc[1, "seeds_ahead"] == "1/3" and not table.loc[1, "b_transfer"] and chosen is None


def test_the_lowest_fraction_grid_pairs_both_inits_per_count_and_scratch_with_every_label():
    runs = lowest_fraction_runs([1, 2], 22, [0, 1, 2], 4000)
    assert len(runs) == 2 * 2 * 3 + 3
    assert {(r.label, r.labelled) for r in runs} == {("scratch", 1), ("supervised", 1), ("scratch", 2),
                                                      ("supervised", 2), ("scratch", 22)}
    assert {tuple(sorted(r.finetune.items())) for r in runs} == {(("lr", 1e-3), ("steps", 4000))}


def test_the_supervised_length_grid_shares_scratch_and_the_label_gap_runs():
    runs = supervised_length_runs([1000, 3000], 1, 22, [0, 1], 4000)
    assert [(r.label, r.init, r.labelled) for r in runs if r.seed == 0] == [
        ("scratch", "scratch", 1), ("supervised@1000", "supervised@1000", 1),
        ("supervised@3000", "supervised@3000", 1), ("scratch", "scratch", 22)]
    assert len(runs) == 8 and {r.finetune["steps"] for r in runs} == {4000}


def test_a_holdout_study_gives_runs_with_every_label_development_cases(tmp_path, liver_preprocessed):
    base = _study(tmp_path, liver_preprocessed)
    study = Study(base.config_path, holdout=1)
    study.curve_every = 2
    held = json.loads(study.splits_path.read_text())
    assert len(held["train"]) == 2 and len(held["development"]) == 1
    metrics = json.loads(study.finetune(Run("scratch", "scratch", 0, labelled=2)).read_text())
    run = json.loads((study.cache / "finetune").glob("*/run.json").__next__().read_text())
    assert sorted(metrics["train_cases"]) == held["train"] and run["dev_cases"] == held["development"]
    with pytest.raises(ValueError, match="3 labelled cases asked, 2 training cases available"):
        study.fraction_of(Run("scratch", "scratch", 0, labelled=3))


def test_finetune_many_runs_uncached_runs_on_worker_processes_to_the_same_result(tmp_path, liver_preprocessed):
    study = _study(tmp_path, liver_preprocessed)
    runs = [Run("scratch", "scratch", 0), Run("scratch", "scratch", 1)]
    serial = study.finetune(runs[0])
    first = json.loads(serial.read_text())["per_case"]
    serial.parent.rename(tmp_path / "serial_run")  # uncached again
    paths = study.finetune_many(runs, jobs=2)
    assert [p.parent.name for p in paths] == [study._run_dir(study._settings(r)).name for r in runs]
    assert json.loads(paths[0].read_text())["per_case"] == first  # a worker process computes what this one does
    assert all((p.parent / "curve.csv").exists() for p in paths)


def test_pretrainings_on_worker_processes_give_the_weights_of_a_serial_run(tmp_path, liver_preprocessed):
    """finetune_many pretrains its distinct inits on the worker processes: the same weights as in this process."""
    from ctssl.pools import write_pool

    study = _study(tmp_path, liver_preprocessed)
    write_pool("all", ["liver"], [str(study.preprocessed)], [str(study.splits_path)],
               study.root / "pools" / "all.csv")
    study.cfg["pretrain"].update(patch_size=[16, 16, 16], batch_size=2)
    serial = torch.load(study.pretrained("pgl@2:2"), weights_only=True)
    study.pretrained("pgl@2:2").parent.rename(tmp_path / "serial_pretrain")  # uncached again
    study._on_workers(study.pretrained, ["pgl@2:2", "mae@2"], jobs=2)
    [pgl] = (study.cache / "pretrain").glob("pgl-2-pool2-*/model.pt")
    parallel = torch.load(pgl, weights_only=True)
    assert serial.keys() == parallel.keys() and all(torch.equal(serial[k], parallel[k]) for k in serial)
    assert len(list((study.cache / "pretrain").glob("mae-2-*/model.pt"))) == 1


def test_the_realism_script_writes_its_tables_and_figure(realct, tmp_path):
    """experiments/realism.py at one case per profile: the probe on both real scans and the generated cases, the HU
    per phase, the markdown of docs/science.md and the figure."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "experiments" / "realism.py"), "--cases", "1", "--out",
                          str(tmp_path), "--realct", str(realct)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    text = (tmp_path / "realism.md").read_text()
    assert "| liver (ct_liver) | 38.6 / 55.9 | 66.9 / 75.4 |" in text  # the real scans' probe, fixed numbers
    assert "| aorta | " in text and "(250-350)" in text
    assert (tmp_path / "domains.png").read_bytes()[:4] == b"\x89PNG"
    cases = pd.read_csv(tmp_path / "probe_cases.csv")
    assert set(cases["profile"]) == {"ct_btcv", "ct_liver", "ct_spleen", "ct_kidney"}
    assert cases["dice_raw"].between(0, 100).all()


def test_the_scratch_gap_grid_and_its_per_class_table():
    """scratch-gap: scratch only, at the lowest count and with every remaining case, each seed; the table is the
    seed mean of each class's final dev Dice in points (NaN classes, absent from the development cases, stay NaN)."""
    from ctssl.experiments import per_class_finals, scratch_gap_runs

    runs = scratch_gap_runs(1, 22, [0, 1], 4000)
    assert [(r.init, r.labelled, r.seed) for r in runs] == [("scratch", 1, 0), ("scratch", 1, 1), ("scratch", 22, 0),
                                                            ("scratch", 22, 1)]
    assert all(r.finetune["steps"] == 4000 for r in runs)
    curves = pd.DataFrame({"step": [2, 4, 4, 4, 4], "steps": [4] * 5, "labelled": [1, 1, 1, 22, 22],
                           "seed": [0, 0, 1, 0, 1], "dev_dice": [0.9, 0.2, 0.4, 0.5, 0.7],
                           "dev_kidney_left": [0.9, 0.0, 0.1, 0.2, 0.4], "dev_aorta": [float("nan")] * 5})
    table = per_class_finals(curves)
    assert list(table.columns) == ["dice", "aorta", "kidney_left"] and list(table.index) == [1, 22]
    assert table.loc[1, "dice"] == pytest.approx(30.0) and table.loc[22, "kidney_left"] == pytest.approx(30.0)
    assert table["aorta"].isna().all()


def test_nested_pools_keep_each_domain_at_its_share_in_every_prefix():
    domains = pd.Series(["btcv"] * 28 + ["spleen"] * 60 + ["chest"] * 12)
    order = nested_pool_order(domains, seed=0)
    assert sorted(order) == list(range(100))  # a permutation: every volume once
    for size in range(1, 101):
        counts = domains.iloc[order[:size]].value_counts()
        for domain, total in domains.value_counts().items():
            assert abs(counts.get(domain, 0) - size * total / 100) <= 1, (size, domain)
    again, other = nested_pool_order(domains, seed=0), nested_pool_order(domains, seed=1)
    assert list(again) == list(order) and list(other) != list(order)
    assert set(order[:20]) != set(other[:20])  # the seed draws which volumes, not only their order


def test_a_study_pool_is_a_prefix_of_the_nested_order_and_refuses_more_than_it_has(tmp_path, liver_preprocessed):
    study = _study(tmp_path, liver_preprocessed)
    pool = pd.DataFrame({"case": [f"c{i}" for i in range(10)], "dataset": ["a"] * 6 + ["b"] * 4,
                         "group": "g", "image": [f"c{i}.npy" for i in range(10)], "label": ""})
    (study.root / "pools").mkdir()
    pool.to_csv(study.root / "pools" / "all.csv", index=False)
    small, large = pd.read_csv(study.pool(5)), pd.read_csv(study.pool(8))
    assert len(small) == 5 and len(large) == 8 and set(small["case"]) <= set(large["case"])
    assert sorted(small["dataset"].value_counts().tolist()) == [2, 3]  # 60 / 40 of 5 volumes
    with pytest.raises(ValueError, match="11 volumes asked, .*all.csv holds 10: raise the n_cases"):
        study.pool(11)
    assert study.pretrained("pgl@0:5").parent.name.startswith("pgl-0-pool5-")


def test_the_curve_grid_sweeps_the_pool_at_the_shortest_length_and_the_length_on_the_largest_pool():
    runs = curve_runs(["pgl", "mae"], [500, 100], [10000, 3000], 1, [0, 1], 4000)
    inits = list(dict.fromkeys(r.init for r in runs))
    assert inits == ["scratch", "pgl@3000:100", "pgl@3000:500", "pgl@10000:500",
                     "mae@3000:100", "mae@3000:500", "mae@10000:500"]
    assert len(runs) == 2 * len(inits) and {r.labelled for r in runs} == {1}
    assert {tuple(sorted(r.finetune.items())) for r in runs} == {(("lr", 1e-3), ("steps", 4000))}


def test_the_curve_table_on_hand_computed_finals():
    scratch = [40.0, 42.0, 44.0, 46.0]
    finals = pd.DataFrame(
        [{"init": "scratch", "seed": s, "dice": d} for s, d in enumerate(scratch)]
        + [{"init": "pgl@3000:100", "seed": s, "dice": d + 2} for s, d in enumerate(scratch)]
        + [{"init": "pgl@3000:500", "seed": s, "dice": d + e}
           for s, (d, e) in enumerate(zip(scratch, [1, 3, 1, 3], strict=True))]
        + [{"init": "pgl@10000:500", "seed": s, "dice": d - 1} for s, d in enumerate(scratch)])
    table = curve_table(finals, [100, 500], [3000, 10000]).set_index(["sweep", "volumes", "pretrain_steps"])
    assert sorted(table.index) == [("length", 500, 3000), ("length", 500, 10000), ("pool", 100, 3000),
                                   ("pool", 500, 3000)]  # the shared point is in both sweeps
    assert table.loc[("pool", 100, 3000), "delta_vs_scratch"] == pytest.approx(2.0)
    assert table.loc[("pool", 100, 3000), ["ci95_low", "ci95_high"]].tolist() == pytest.approx([2.0, 2.0])
    shared = table.loc[("pool", 500, 3000)]
    assert shared["delta_vs_scratch"] == pytest.approx(2.0)
    assert 1.0 <= shared["ci95_low"] < 2.0 < shared["ci95_high"] <= 3.0
    assert table.loc[("length", 500, 3000), "ci95_low"] == shared["ci95_low"]
    longest = table.loc[("length", 500, 10000)]
    assert longest["delta_vs_scratch"] == pytest.approx(-1.0) and longest["seeds_ahead"] == "0/4"
    assert longest["dice"] == pytest.approx(42.0) and longest["scratch"] == pytest.approx(43.0)


def test_the_curves_rule_picks_the_largest_mean_gain_unless_a_cheaper_point_is_within_a_point():
    def table(points):  # (method, volumes, steps, delta, ci_low, ci_high)
        return pd.DataFrame([{"method": m, "sweep": "pool", "volumes": v, "pretrain_steps": n, "delta_vs_scratch": d,
                              "ci95_low": lo, "ci95_high": hi} for m, v, n, d, lo, hi in points])

    # mean over the methods: (100, 3k) 0.5, (500, 3k) 2.5, (500, 10k) 2.8; (500, 3k) is within 1 point and cheaper
    grid = table([("pgl", 100, 3000, 0.5, -1, 2), ("mae", 100, 3000, 0.5, -1, 2),
                  ("pgl", 500, 3000, 3.0, 1, 5), ("mae", 500, 3000, 2.0, -1, 4),
                  ("pgl", 500, 10000, 3.2, 1, 5), ("mae", 500, 10000, 2.4, 0.5, 4)])
    volumes, steps, reason = curve_choice(grid)
    assert (volumes, steps) == (500, 3000) and "within 1 point" in reason
    # the longer run ahead by more than a point: it is taken
    grid.loc[grid["pretrain_steps"] == 10000, "delta_vs_scratch"] += 1.5
    assert curve_choice(grid)[:2] == (500, 10000)
    # every CI includes 0: the cheapest point, whatever the means
    grid[["ci95_low", "ci95_high"]] = [-5, 5]
    assert curve_choice(grid) == (100, 3000, "every Δ's CI includes 0: the cheapest point")
    # a point shared by both sweeps counts once
    both = pd.concat([grid, grid[grid["volumes"] == 500].assign(sweep="length")], ignore_index=True)
    assert curve_choice(both) == curve_choice(grid)


def test_diagnose_refuses_options_an_experiment_does_not_take_before_touching_any_data(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "diagnose.py"
    for argv, message in ((["calibration", "--pools", "5"], "--pools: experiment calibration does not take it"),
                          (["curves", "--methods", "pgl", "bogus"], "--methods: bogus not a pretraining method")):
        run = subprocess.run([sys.executable, str(script), *argv, "--config", str(tmp_path / "absent.yaml")],
                             capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and message in run.stderr, run.stderr
