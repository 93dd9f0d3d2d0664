"""Your own data changes, the results follow: touching one scan or label of a folder dataset reruns exactly the jobs
it feeds (its import, preprocessing, the pool and pretraining it is in, the cells those feed, the report), and
nothing of the other dataset (ctssl.data.manifest, read by rule fetch_raw)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from ctssl.data.synthetic import write_msd_dataset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def _jobs(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule -> number of jobs ({} when there is nothing to do)."""
    if "Job stats:" not in output:
        assert "Nothing to be done" in output, output[-3000:]
        return {}
    table = output[output.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {line.split()[0]: int(line.split()[1]) for line in table if line.split()[0] != "total"}


def _touch(path: Path) -> None:
    later = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(later, later))


def test_touching_one_file_reruns_what_it_feeds_and_nothing_else(tmp_path, run_snakemake):
    organs = write_msd_dataset(tmp_path / "organs_src", "liver", "liver", n_cases=4, seed=1)
    chest = write_msd_dataset(tmp_path / "chest_src", "chest", "chest", n_cases=2, seed=1)
    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.pop("dataset_inits")
    config.update(results="results", fractions=[100], inits=["scratch", "pgl-all"], downstream=["organs"],
                  datasets={"organs": {"kind": "folder", "group": "abdomen", "images_dir": str(organs / "imagesTr"),
                                       "labels_dir": str(organs / "labelsTr"),
                                       "labels": {"0": "background", "1": "liver", "2": "tumour"}},
                            "unlabelled": {"kind": "folder", "group": "chest", "images_dir": str(chest / "imagesTr")}})
    config["pretrain"]["pool_datasets"] = ["organs", "unlabelled"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = run_snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert _jobs(run_snakemake(tmp_path, "-n").stdout) == {}

    # An unlabelled scan edited: its import, the pool and PGL, and only the cell PGL feeds (not scratch's).
    _touch(next((chest / "imagesTr").iterdir()))
    dry = run_snakemake(tmp_path, "-n")
    assert _jobs(dry.stdout) == {"all": 1, "fetch_raw": 1, "preprocess": 1, "aggregate": 1, "pretrain": 1,
                                 "finetune": 1, "report": 1}, dry.stdout[-3000:]
    assert "wildcards: dataset=unlabelled" in dry.stdout and "init=pgl-all" in dry.stdout
    assert "dataset=organs\n" not in dry.stdout and "init=scratch" not in dry.stdout
    run = run_snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # A label of the fine-tuned dataset: its import, splits, preprocessing, the pool, PGL and both cells.
    _touch(next((organs / "labelsTr").iterdir()))
    dry = run_snakemake(tmp_path, "-n")
    assert _jobs(dry.stdout) == {"all": 1, "fetch_raw": 1, "splits": 1, "preprocess": 1, "aggregate": 1,
                                 "pretrain": 1, "finetune": 2, "report": 1}, dry.stdout[-3000:]
    assert "dataset=unlabelled" not in dry.stdout

    # A scan added to (or removed from) a folder is a change too.
    run = run_snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    extra = chest / "imagesTr" / "chest_new.nii.gz"
    shutil.copy(next((chest / "imagesTr").iterdir()), extra)
    assert _jobs(run_snakemake(tmp_path, "-n").stdout)["fetch_raw"] == 1
