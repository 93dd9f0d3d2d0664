"""configs/realct.yaml end to end on the real scans in ../shared/realct (skipped where the folder is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def _absolute(obj, realct: Path):
    """The config's ../shared/realct paths, made absolute so the run can live in a temporary directory."""
    if isinstance(obj, dict):
        return {k: _absolute(v, realct) for k, v in obj.items()}
    if isinstance(obj, str) and obj.startswith("../shared/realct"):
        return str(realct / obj[len("../shared/realct/"):])
    return obj


def test_realct_config_runs_end_to_end(realct, tmp_path, run_snakemake):
    config = _absolute(yaml.safe_load((ROOT / "configs" / "realct.yaml").read_text()), realct)
    config["results"] = "results"
    config["finetune"]["steps"] = 20  # the smoke run's shape, not its length, is under test here
    config["pretrain"]["steps"] = 4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = run_snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    res = tmp_path / "results"
    long = pd.read_csv(res / "report" / "dice_per_case.csv")
    assert set(long["dataset"]) == {"liver_real"} and set(long["class"]) == {"liver"}
    assert set(long["init"]) == {"scratch", "pgl-all", "hssl-all"}
    pool = pd.read_csv(res / "pools" / "all.csv")
    splits = json.loads((res / "splits" / "liver_real.json").read_text())
    assert set(pool["case"]) == {"dcmqi_ct3", *splits["train"]}  # real scans, minus the test scan
    manifest = json.loads((res / "preprocessed" / "liver_real" / "manifest.json").read_text())
    assert {c["case"] for c in manifest["cases"]} == {"ts_ct", "ts_dicom"}
    # scored on the real test scan's own grid (its raw label file), the preprocessed grid kept beside it
    (test_case,) = splits["test"]
    cell = json.loads((res / "finetune" / "liver_real" / "scratch" / "frac100" / "seed0" / "metrics.json").read_text())
    assert set(cell["per_case"]) == set(cell["per_case_preprocessed"]) == {test_case}
    assert cell["evaluation_space"].startswith("original image grid")
    assert 0.0 <= cell["per_case"][test_case]["liver"] <= 1.0
