"""The real `snakemake` on a tiny config, end to end: outputs, idempotence, single-cell reruns, bad inputs.

These tests share one workspace and run in file order (the later ones reuse the first run's results).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ctssl.config import complete_config
from ctssl.models.backbone import build_backbone

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile")]
pytestmark = pytest.mark.workflow

# The tiny config (a file a user can run too), in a workspace of its own, plus a "bring your own weights" init.
TINY = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
TINY["results"] = "results"
TINY["inits"] = ["scratch", "custom-all", "pgl-all"]
TINY["comparisons"] = ["hssl-all vs hssl-liver"]  # multi- against single-domain HSSL, a head-to-head report row
CELL = "results/finetune/liver/scratch/frac50/seed0/metrics.json"


def snakemake(workdir: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(config or workdir / "config.yaml"),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("workflow")
    (work / "config.yaml").write_text(yaml.safe_dump(TINY))
    # "Bring your own weights": a backbone file where init custom-all expects it.
    weights = work / "results" / "pretrain" / "custom" / "all" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_backbone(complete_config({"model": TINY["model"]})["model"]).state_dict(), weights)
    return work


def test_end_to_end(workspace):
    run = snakemake(workspace)
    assert run.returncode == 0, run.stderr[-3000:]
    res = workspace / "results"
    md = (res / "report" / "dice_table.md").read_text()
    assert "| scratch" in md and "| custom-all" in md and "50% Dice" in md and "100% p" in md and "## liver" in md
    long = pd.read_csv(res / "report" / "dice_per_case.csv")
    assert set(long["init"]) == {"scratch", "custom-all", "pgl-all", "hssl-all", "hssl-liver", "mae-all"}
    assert set(long["class"]) == {"liver", "tumour"}
    summary = pd.read_csv(res / "report" / "dice_table.csv")
    for init in ("hssl-all", "hssl-liver"):  # single- vs multi-domain HSSL, side by side for the same dataset
        rows = summary[summary["init"] == init]
        assert sorted(rows["fraction"]) == [50, 100] and rows["delta_vs_scratch"].notna().all(), summary
        assert (rows["n_pairs"] == 1).all()  # 1 test case x 1 seed
    versus = pd.read_csv(res / "report" / "comparisons.csv")
    assert versus[["init", "reference"]].drop_duplicates().values.tolist() == [["hssl-all", "hssl-liver"]]
    assert sorted(versus["fraction"]) == [50, 100] and (versus["n_pairs"] == 1).all()
    assert "# Head-to-head comparisons" in md and "| hssl-all vs hssl-liver |" in md
    multi = json.loads((res / "pretrain/hssl/all/model.json").read_text())
    single = json.loads((res / "pretrain/hssl/liver/model.json").read_text())
    assert multi["pool_datasets"] == ["chest", "liver"] and single["pool_datasets"] == ["liver"]
    assert len(pd.read_csv(res / "pools" / "liver.csv")) == 3  # liver's training cases only
    pgl = json.loads((res / "pretrain/pgl/all/model.json").read_text())
    assert pgl["steps"] == 3 and pgl["pool_datasets"] == ["chest", "liver"]
    cell = json.loads((res / "finetune/liver/pgl-all/frac50/seed0/metrics.json").read_text())
    assert cell["init_weights"]["sha256"] == pgl["model_sha256"]  # the cell used exactly these weights
    mae = json.loads((res / "pretrain/mae/all/model.json").read_text())  # masked image modelling, issue 37
    assert mae["method"] == "mae" and mae["config"]["mae"]["mask_block"] == 4
    assert all("masked_l2" in json.loads(parts) for parts in pd.read_csv(res / "pretrain/mae/all/train_log.csv")["parts"])
    assert (res / "report" / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    splits = json.loads((res / "splits" / "liver.json").read_text())
    pool = pd.read_csv(res / "pools" / "all.csv")
    assert set(pool["dataset"]) == {"liver", "chest"} and len(pool) == 3 + 2
    assert not set(splits["test"]) & set(pool["case"])
    metrics = json.loads((res / "finetune/liver/custom-all/frac100/seed0/metrics.json").read_text())
    assert metrics["init_weights"]["path"].endswith("pretrain/custom/all/model.pt")
    for sub in ("logs/finetune/liver/scratch/frac50/seed0.log", "benchmarks/finetune/liver/scratch/frac50/seed0.tsv",
                "finetune/liver/scratch/frac50/seed0/train_log.csv", "preprocessed/liver/manifest.json"):
        assert (res / sub).exists(), sub


def test_html_report_has_tables_figures_and_captions(workspace):
    run = snakemake(workspace, "--report", "report.html")
    assert run.returncode == 0, run.stderr[-3000:]
    html = (workspace / "report.html").read_text()
    for name in ("dice_table.html", "label_efficiency.png", "per_class.png", "effects.png"):
        assert name in html, name
    assert "Wilcoxon signed-rank" in html and "Label efficiency" in html  # captions from report/*.rst
    assert "each init minus its engine" in html  # the effects figure's caption


def test_second_run_has_nothing_to_do(workspace):
    run = snakemake(workspace, "-n")
    assert run.returncode == 0
    assert "Nothing to be done" in run.stdout + run.stderr


def test_a_monai_bundle_is_exported_on_request_only(workspace):
    run = snakemake(workspace, "results/export/monai_bundle/pgl-all")
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = workspace / "results" / "export" / "monai_bundle" / "pgl-all"
    assert (bundle / "models" / "model.pt").read_bytes() == \
        (workspace / "results" / "pretrain" / "pgl" / "all" / "model.pt").read_bytes()
    assert (bundle / "configs" / "inference.json").exists()
    dry = snakemake(workspace, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr  # not part of the default targets
    nnunet = snakemake(workspace, "-n", "results/export/nnunet/pgl-all")  # the MONAI UNet: refused at -n
    assert nnunet.returncode != 0 and "pgl-all: nnU-Net takes model.arch 'resenc' only" in nnunet.stdout


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: rule -> number of jobs."""
    table = output[output.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {line.split()[0]: int(line.split()[1]) for line in table}


def test_touching_code_reruns_nothing_but_a_config_change_reruns_what_it_affects(workspace, tmp_path):
    """The rerun triggers of profiles/default (loaded for every run): a git checkout (new mtimes on rules and
    scripts) or another `device` retrains nothing; a changed `finetune:` value reruns the cells and the report, not
    pretraining."""
    code = [*ROOT.glob("rules/*.smk"), *ROOT.glob("workflow_scripts/*.py"), ROOT / "Snakefile"]
    times = {path: path.stat() for path in code}
    try:
        for path in code:
            path.touch()
        run = snakemake(workspace, "-n")
        assert run.returncode == 0 and "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    finally:
        for path, st in times.items():  # leave the checkout's mtimes as they were
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    moved = {**TINY, "device": "auto" if TINY["device"] == "cpu" else "cpu"}  # hardware, not an experiment
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(moved))
    run = snakemake(workspace, "-n", config=tmp_path / "moved.yaml")
    assert run.returncode == 0 and "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    changed = json.loads(json.dumps(TINY))
    changed["finetune"]["lr"] = 0.02
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    run = snakemake(workspace, "-n", config=path)
    cells = (len(TINY["inits"]) + len(TINY["dataset_inits"]["liver"])) * len(TINY["fractions"])
    assert job_counts(run.stdout + run.stderr) == {"all": 1, "finetune": cells, "report": 1, "total": cells + 2}
    # Settings added later (ctssl.config.LATER_SETTINGS) are no job parameter at their default, so results made
    # before they existed stay current; a changed value reruns what it changes. (Written here as keys of sections
    # the config already has: Snakemake compares params in their key order, and a new `views:` section would move.)
    later = json.loads(json.dumps(TINY))
    later["finetune"]["compile"] = False
    later["pretrain"]["compile"] = False
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(later))
    run = snakemake(workspace, "-n", config=tmp_path / "later.yaml")
    assert run.returncode == 0 and "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    later["finetune"]["compile"] = True
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(later))
    run = snakemake(workspace, "-n", config=tmp_path / "later.yaml")
    assert job_counts(run.stdout + run.stderr) == {"all": 1, "finetune": cells, "report": 1, "total": cells + 2}


def test_forcing_one_cell_schedules_exactly_that_cell(workspace):
    run = snakemake(workspace, "-n", "-f", CELL)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert job_counts(out) == {"finetune": 1, "total": 1}, out[-3000:]


def test_forced_rerun_changes_only_that_cell(workspace):
    res = workspace / "results"
    cells = sorted(res.glob("finetune/**/metrics.json"))
    before = {p: digest(p) for p in cells}
    run = snakemake(workspace, "-f", CELL)
    assert run.returncode == 0, run.stderr[-3000:]
    target = workspace / CELL
    for path in cells:
        if path != target:
            assert digest(path) == before[path], path
    assert json.loads(target.read_text())["per_case"]  # rewritten, complete
    # The report is rebuilt when asked for, from the new cell; nothing else runs.
    report = res / "report" / "dice_table.md"
    assert report.stat().st_mtime < target.stat().st_mtime
    run = snakemake(workspace, str(report.relative_to(workspace)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert job_counts(run.stdout + run.stderr) == {"report": 1, "total": 1}, run.stdout + run.stderr
    assert report.stat().st_mtime > target.stat().st_mtime
    assert all(digest(p) == before[p] for p in cells if p != target)


N_INITS = len(TINY["inits"]) + len(TINY["dataset_inits"]["liver"])


def dry_run_of_changed_tiny(workspace: Path, tmp_path: Path, **changes) -> str:
    """`snakemake -n` in the finished workspace with the tiny config changed at its top level: everything printed."""
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    run = snakemake(workspace, "-n", config=path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    return out


def test_adding_a_fraction_and_a_seed_schedules_only_the_new_cells(workspace, tmp_path):
    out = dry_run_of_changed_tiny(workspace, tmp_path, fractions=[50, 100, 25], seeds=[0, 3])
    new_cells = N_INITS * (3 * 2 - 2 * 1)  # 3 fractions x 2 seeds, minus the 2 x 1 that exist
    assert job_counts(out) == {"all": 1, "finetune": new_cells, "report": 1, "total": new_cells + 2}, out[-3000:]


def test_seeds_per_fraction_runs_fewer_seeds_where_named(workspace, tmp_path):
    # 50 %: seeds 0 and 3 (seed 3 is new); 100 %: seed 0 only (exists)
    out = dry_run_of_changed_tiny(workspace, tmp_path, seeds=[0, 3], seeds_per_fraction={100: 1})
    assert job_counts(out) == {"all": 1, "finetune": N_INITS, "report": 1, "total": N_INITS + 2}, out[-3000:]
    assert "frac50/seed3" in out and "frac100/seed3" not in out


def test_a_variant_of_pgl_adds_one_pretraining_run_and_its_cells_leaving_pgl_alone(workspace, tmp_path):
    """PGL's prior ablation: a variant 'pglcrop' is a pretraining run of its own; pgl's run and cells stay done."""
    pretrain = {**TINY["pretrain"], "variants": {"pglcrop": {"method": "pgl", "priors": ["crop"]}}}
    out = dry_run_of_changed_tiny(workspace, tmp_path, pretrain=pretrain, inits=[*TINY["inits"], "pglcrop-all"])
    assert job_counts(out) == {"all": 1, "pretrain": 1, "finetune": 2, "report": 1, "total": 5}, out[-3000:]
    assert "pretrain/pglcrop/all/model.pt" in out and "pretrain/pgl/all/model.pt" not in out


def dry_run_with(tmp_path: Path, mutations) -> tuple[int, str]:
    """`snakemake -n` in an empty folder with a mutated copy of the tiny config: (exit code, everything printed)."""
    bad = json.loads(json.dumps(TINY))
    bad["inits"] = ["scratch", "pgl-all"]
    for mutate in mutations:
        mutate(bad)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    work = tmp_path / "work"
    work.mkdir()
    run = snakemake(work, "-n", config=path)
    assert not (work / "results").exists() and "Job stats" not in run.stdout  # no job was scheduled or run
    return run.returncode, run.stdout + run.stderr


# Every wrong setting of a group in one config: start-up lists them all (one `snakemake -n` per group; the checks one
# by one are in tests/test_config.py). Schema errors and cross-checks are separate groups: a config that fails the
# schema may be too broken for some cross-checks, which then stay silent until the schema errors are fixed.
WRONG_SETTINGS = {
    "cross-checks": [
        # The four that used to pass start-up and fail only inside a (GPU) job:
        (lambda c: c["pretrain"]["methods"].update(hsl={"temperature": 0.1}),
         ["pretrain.methods.hsl: unknown method 'hsl' (did you mean 'hssl'?); registered methods: byol, genesis, "
          "hssl"]),
        (lambda c: c["pretrain"]["methods"].update(byol={"temperature": 0.1}),
         ["pretrain.methods.byol.temperature: 'temperature' is a setting of hssl, not of byol"]),
        (lambda c: c["pretrain"].update(patch_size=[50, 48, 32]),
         ["pretrain.patch_size = [50, 48, 32]: must be divisible by the network stride 4"]),
        (lambda c: c["pretrain"]["methods"]["pgl"].update(feature_level="decoder7"),
         ["pretrain.methods.pgl.feature_level = 'decoder7': not a decoder level of this model", "decoder0, output"]),
        (lambda c: c.update(downstream=["liver", "pancreas"]), ["downstream: unknown dataset 'pancreas'"]),
        (lambda c: c.update(inits=["scratch", "simclr-all"]),
         ["'simclr-all' names no registered pretraining method", "pretrain/simclr/all/model.pt does not exist"]),
    ],
    "schema": [  # refused before too, now with the key path and every bad value
        (lambda c: c["datasets"]["liver"].update(kind="nifti"),
         ["datasets.liver.kind = 'nifti': 'nifti' is not one of"]),
        (lambda c: c.update(fractions=[0, 10, 150]), ["fractions[0] = 0:", "fractions[2] = 150:"]),
        (lambda c: c["finetune"].update(steps="ten"), ["finetune.steps = 'ten': 'ten' is not of type 'integer'"]),
    ],
}


@pytest.mark.parametrize("group", sorted(WRONG_SETTINGS))
def test_wrong_settings_stop_at_startup_naming_every_key(tmp_path, group):
    rc, out = dry_run_with(tmp_path, [mutate for mutate, _ in WRONG_SETTINGS[group]])
    assert rc != 0 and "invalid configuration" in out
    for _, expected in WRONG_SETTINGS[group]:
        for text in expected:
            assert text in out, out[-3000:]


PGL_CELL = "results/finetune/liver/pgl-all/frac50/seed0/metrics.json"


def cell_log(workspace: Path, init: str) -> str:
    return (workspace / f"results/logs/finetune/liver/{init}/frac50/seed0.log").read_text()


def test_damaged_pretrained_weights_stop_the_cell_naming_both_digests(workspace):
    """Two bytes flipped in a pretraining run's model.pt: the cell that loads it refuses before training, naming
    the file, both digests and the remedies; the weights are left as they are."""
    weights = workspace / "results/pretrain/pgl/all/model.pt"
    recorded = json.loads(weights.with_name("model.json").read_text())["model_sha256"]
    original, stat = weights.read_bytes(), weights.stat()
    damaged = bytearray(original)
    for offset in (len(damaged) // 2, len(damaged) // 2 + 1):
        damaged[offset] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    try:
        run = snakemake(workspace, "-f", PGL_CELL)
        log = cell_log(workspace, "pgl-all")
        assert run.returncode != 0
        assert f"sha256 {hashlib.sha256(damaged).hexdigest()} is not the {recorded}" in log, log
        assert "results/pretrain/pgl/all/model.pt" in log and "ctssl rehash results/pretrain/pgl/all" in log
        assert "backbone tensors" not in log and "Traceback" not in log  # nothing loaded; one clear line
        assert weights.read_bytes() == bytes(damaged)  # the user's file untouched
        assert not (workspace / PGL_CELL).exists()  # no cell scored with other weights
    finally:
        weights.write_bytes(original)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_truncated_checkpoint_is_set_aside_and_the_cell_trains_from_step_zero(workspace):
    """A cell's checkpoints/last.pt cut short (a full disk): the rerun sets it aside, says why in one line, trains
    from step 0 and gives the uninterrupted result; a second rerun has nothing to trip over."""
    metrics = workspace / CELL
    before = json.loads(metrics.read_text())
    ckpt = metrics.parent / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(exist_ok=True)
    torch.save({"step": 2, "fingerprint": "x", "model": torch.zeros(4096)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    run = snakemake(workspace, "-f", CELL)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in cell_log(workspace, "scratch").splitlines() if "set aside" in line]
    assert len(lines) == 1 and "unreadable" in lines[0] and "last.pt.bad-" in lines[0], lines
    aside = list(ckpt.parent.glob("last.pt.bad-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept for the user, never deleted
    after = json.loads(metrics.read_text())
    assert after["resumed_from_step"] is None and after["per_case"] == before["per_case"]
    assert not ckpt.exists()


def test_a_deleted_preprocessed_file_names_the_file_and_the_rebuild_command_that_works(workspace):
    test_case = json.loads((workspace / "results/splits/liver.json").read_text())["test"][0]
    missing = workspace / f"results/preprocessed/liver/{test_case}.npy"
    missing.unlink()
    run = snakemake(workspace, "-f", CELL)
    log = cell_log(workspace, "scratch")
    assert run.returncode != 0 and "Traceback" not in log
    assert f"results/preprocessed/liver/{test_case}.npy: missing from the preprocessed folder" in log, log
    hint = "snakemake --cores N -f results/preprocessed/liver"
    assert hint in log
    rebuild = snakemake(workspace, "-f", "results/preprocessed/liver")  # the command the message gives
    assert rebuild.returncode == 0 and missing.exists(), rebuild.stderr[-3000:]
    assert job_counts(rebuild.stdout + rebuild.stderr) == {"preprocess": 1, "total": 1}


def test_truncated_raw_image_fails_cleanly(workspace):
    """Last: corrupts the workspace. The preprocess job fails, names the file and leaves no output dir."""
    image = workspace / "results/raw/liver/imagesTr/liver_001.nii.gz"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])
    run = snakemake(workspace, "-f", "results/preprocessed/liver")
    assert run.returncode != 0
    assert "liver_001.nii.gz: cannot read NIfTI" in run.stdout + run.stderr
    assert not (workspace / "results/preprocessed/liver").exists()
    assert not list((workspace / "results/preprocessed").glob(".liver*"))


def test_a_downstream_case_without_a_label_is_refused_once_at_import(liver_raw, tmp_path):
    """A fine-tuned `folder` dataset with a label-less case stops at fetch_raw, naming the image, and is not
    retried even when the command line asks for retries (a bad input is reported once)."""
    config = json.loads(json.dumps(TINY))
    config.update(inits=["scratch"], dataset_inits={}, comparisons=[], downstream=["mine"],
                  datasets={"mine": {"kind": "folder", "labels": {"0": "background", "1": "liver", "2": "tumour"},
                                     "cases": {"a": {"image": str(liver_raw / "imagesTr/liver_000.nii.gz"),
                                                     "label": str(liver_raw / "labelsTr/liver_000.nii.gz")},
                                               "b": {"image": str(liver_raw / "imagesTr/liver_001.nii.gz")}}}})
    config["pretrain"].update(pool_datasets=["mine"], methods={})
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(work, "--retries", "2", "results/raw/mine")
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "liver_001.nii.gz: no label file for case 'b'" in out and "mark it unlabelled" in out
    assert out.count("Error in rule fetch_raw") == 1
    assert not (work / "results" / "raw" / "mine").exists()
