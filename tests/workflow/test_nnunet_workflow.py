"""nnU-Net through the DAG (tiny, CPU): the same cells fine-tuned by ctssl and by nnU-Net's own planner,
preprocessor and trainer (a few iterations), side by side in the report; the nnU-Net export on request; what
nnU-Net cannot do refused at `snakemake -n`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("nnunetv2")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(config or workdir / "config.yaml"), "--cores", "2",
                           *args], capture_output=True, text=True, timeout=600)

TINY = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
TINY.update(results="results", fractions=[100], inits=["scratch", "pgl-all"], dataset_inits={})
TINY["datasets"] = {"liver": TINY["datasets"]["liver"]}  # one domain is enough here: fewer jobs in CI
TINY["pretrain"]["pool_datasets"] = ["liver"]
TINY["model"] = {"arch": "resenc", "channels": [4, 8, 16], "strides": [1, 2, 2], "feature_channels": 4}
TINY["finetune"].update(engine=["ctssl", "nnunet"], nnunet={"epochs": 2, "iterations_per_epoch": 2,
                                                             "val_iterations_per_epoch": 1, "mirroring": False})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("nnunet_workflow")
    (work / "config.yaml").write_text(yaml.safe_dump(TINY))
    return work


def test_both_engines_side_by_side_in_the_report(workspace):
    run = snakemake(workspace)
    assert run.returncode == 0, run.stderr[-3000:]
    res = workspace / "results"
    summary = pd.read_csv(res / "report" / "dice_table.csv")
    assert list(summary["init"]) == ["scratch", "pgl-all", "scratch@nnunet", "pgl-all@nnunet"]
    assert list(summary["engine"]) == ["ctssl", "ctssl", "nnunet", "nnunet"]
    assert summary["delta_vs_scratch"].isna().tolist() == [True, False, True, False]  # each vs its engine's scratch
    assert "| pgl-all@nnunet" in (res / "report" / "dice_table.md").read_text()

    cell = res / "finetune" / "liver" / "pgl-all@nnunet" / "frac100" / "seed0"
    metrics = json.loads((cell / "metrics.json").read_text())
    ctssl_cell = json.loads((res / "finetune/liver/pgl-all/frac100/seed0/metrics.json").read_text())
    assert metrics["engine"] == "nnunet" and metrics["steps"] == 4
    curve = metrics["nnunet_training"]  # nnU-Net's own per-epoch record, one value per configured epoch
    assert set(curve["pseudo_dice_per_epoch"]) == {"liver", "tumour"}
    assert all(len(v) == 2 for v in curve["pseudo_dice_per_epoch"].values()) and len(curve["lr_per_epoch"]) == 2
    assert curve["lr_per_epoch"][1] < curve["lr_per_epoch"][0] == pytest.approx(1e-2)  # nnU-Net's poly schedule
    assert metrics["test_cases"] == ctssl_cell["test_cases"] and metrics["train_cases"] == ctssl_cell["train_cases"]
    assert metrics["init_weights"]["sha256"] == ctssl_cell["init_weights"]["sha256"]  # the same pretrained weights
    work = cell / "nnunet"  # nnUNet_raw / _preprocessed / _results of this cell only
    assert sorted(p.name for p in (work / "nnUNet_raw" / "Dataset001_liver" / "imagesTr").iterdir()) == [
        f"{c}_0000.nii.gz" for c in metrics["train_cases"]]
    log = (work / "nnunet.log").read_text()
    assert "Loading pretrained weights from file" in log  # nnU-Net's own load_pretrained_weights
    assert "Epoch 1" in log and "Epoch 2" not in log  # the configured 2 epochs
    plans = json.loads(next(work.glob("nnUNet_preprocessed/*/ctssl.json")).read_text())["configurations"]
    assert plans["3d_fullres"]["patch_size"] == [16, 16, 16] and plans["3d_fullres"]["batch_size"] == 2
    final = torch.load(next(work.glob("nnUNet_results/*/*/fold_all/checkpoint_final.pth")), weights_only=False)
    exported = torch.load(work / "weights" / "checkpoint_nnunet.pth", weights_only=True)["network_weights"]
    assert final["network_weights"].keys() == exported.keys()  # decoder included; seg layers retrained
    assert not (res / "finetune/liver/scratch@nnunet/frac100/seed0/nnunet/weights").exists()


def test_an_nnunet_cell_is_repeatable_on_cpu(workspace):
    """nnU-Net's augmentation runs in the cell's process, seeded by the cell: a rerun gives the same Dice."""
    target = "results/finetune/liver/scratch@nnunet/frac100/seed0/metrics.json"
    before = json.loads((workspace / target).read_text())
    run = snakemake(workspace, target, "--forcerun", target)
    assert run.returncode == 0, run.stderr[-3000:]
    after = json.loads((workspace / target).read_text())
    assert after["per_case"] == before["per_case"] and after["timings_s"] != before["timings_s"]  # really rerun


def test_ctssl_predict_takes_a_folder_for_either_engines_cell(workspace, tmp_path):
    """`ctssl predict CELL imagesTs/ -o OUT` with an nnU-Net cell: ctssl's recorded preprocessing, nnU-Net's predictor
    on the cell's checkpoint, back on the input's grid: the cell's own test predictions, voxel for voxel."""
    import nibabel as nib
    import numpy as np

    res = workspace / "results"
    images = tmp_path / "imagesTs"
    images.mkdir()
    for case in json.loads((res / "splits" / "liver.json").read_text())["test"]:
        (images / f"{case}_0000.nii.gz").symlink_to(res / "raw" / "liver" / "imagesTr" / f"{case}.nii.gz")
    for init in ("pgl-all@nnunet", "pgl-all"):
        cell = res / "finetune" / "liver" / init / "frac100" / "seed0"
        out = tmp_path / init
        run = subprocess.run([sys.executable, "-m", "ctssl.cli", "predict", str(cell), str(images), "-o", str(out),
                              "--device", "cpu"], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        for image in images.iterdir():
            case = image.name.removesuffix("_0000.nii.gz")
            mine, cells = nib.load(out / f"{case}.nii.gz"), nib.load(cell / "predictions" / f"{case}.nii.gz")
            assert np.array_equal(np.asanyarray(mine.dataobj), np.asanyarray(cells.dataobj)), (init, case)
            assert np.allclose(mine.affine, cells.affine, atol=1e-6)
    run = subprocess.run([sys.executable, "-m", "ctssl.cli", "predict", str(res / "finetune/liver/scratch@nnunet/"
                          "frac100/seed0"), str(images), "-o", str(tmp_path / "tta"), "--tta", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and len(list((tmp_path / "tta").glob("*.nii.gz"))) == len(list(images.iterdir()))


def test_nnunet_export_on_request_and_nnunet_refused_for_the_monai_unet(workspace, tmp_path):
    run = snakemake(workspace, "results/export/nnunet/pgl-all")
    assert run.returncode == 0, run.stderr[-3000:]
    out = workspace / "results" / "export" / "nnunet" / "pgl-all"
    assert {p.name for p in out.iterdir()} - {".snakemake_timestamp"} == {"checkpoint_nnunet.pth", "checkpoint_nnssl.pth",
                                                                          "architecture.json", "README.md"}
    wrong = {**TINY, "model": {"channels": [4, 8, 16], "strides": [2, 2], "feature_channels": 4}}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    dry = snakemake(tmp_path, "-n", config=tmp_path / "wrong.yaml")
    assert dry.returncode != 0
    assert """finetune.engine = ["ctssl", "nnunet"]: nnU-Net takes model.arch 'resenc' only""" in dry.stdout + dry.stderr
