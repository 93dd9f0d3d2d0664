"""The diagnosis harness on a tiny dataset: runs are cached, named per experiment, and tabulated with dev columns."""

import json

import pandas as pd
import yaml

from ctssl.experiments import Run, Study, write_outputs
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
    assert (study.cache / "pretrain" / "pgl-0" / "model.pt").exists()
