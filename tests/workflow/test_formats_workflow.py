"""The demo's DAG on the formats users bring: the same synthetic cases as a folder of MetaImage images with NRRD
labels, and as an nnU-Net raw dataset folder, end to end (raw -> preprocessing -> fine-tuning -> report)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from ctssl.data.synthetic import write_msd_dataset

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def _itk_copy(nifti: Path, target: Path) -> None:
    """A NIfTI file rewritten by SimpleITK in another format (its geometry converted to ITK's LPS by SimpleITK)."""
    import SimpleITK as sitk

    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(target), useCompression=True)


def test_mha_nrrd_folder_and_nnunet_raw_folder_run_through_the_dag(tmp_path, run_snakemake):
    source = write_msd_dataset(tmp_path / "synthetic", "liver", "liver", n_cases=4, seed=1)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (source / "imagesTr").glob("*.nii.gz"))
    itk, nnunet = tmp_path / "itk", tmp_path / "Dataset002_Liver"
    for case in cases:
        _itk_copy(source / "imagesTr" / f"{case}.nii.gz", itk / "images" / f"{case}.mha")
        _itk_copy(source / "labelsTr" / f"{case}.nii.gz", itk / "labels" / f"{case}.nrrd")
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (nnunet / sub).mkdir(parents=True, exist_ok=True)
            (nnunet / sub / name).symlink_to(source / sub / f"{case}.nii.gz")
    (nnunet / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))

    config = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config.update(results="results", fractions=[100], inits=["scratch"], downstream=["liver_itk", "liver_nnunet"],
                  datasets={"liver_itk": {"kind": "folder", "group": "abdomen", "images_dir": str(itk / "images"),
                                          "labels_dir": str(itk / "labels"),
                                          "labels": {"0": "background", "1": "liver", "2": "tumour"}},
                            "liver_nnunet": {"kind": "folder", "group": "abdomen", "nnunet_raw": str(nnunet)}})
    config.pop("dataset_inits")
    config["pretrain"]["pool_datasets"] = ["liver_itk"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = run_snakemake(tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    res = tmp_path / "results"

    # Both folders hold the same scans: their preprocessed arrays and geometry agree (to float precision, the
    # MetaImage copy having gone through ITK's LPS and back).
    for case in cases:
        itk_image = np.load(res / "preprocessed" / "liver_itk" / f"{case}.npy")
        assert np.allclose(itk_image, np.load(res / "preprocessed" / "liver_nnunet" / f"{case}.npy"), atol=1e-5)
        assert np.array_equal(np.load(res / "preprocessed" / "liver_itk" / f"{case}_seg.npy"),
                              np.load(res / "preprocessed" / "liver_nnunet" / f"{case}_seg.npy"))
    manifest = json.loads((res / "preprocessed" / "liver_nnunet" / "manifest.json").read_text())
    assert manifest["labels"] == {"0": "background", "1": "liver", "2": "tumour"}  # from nnU-Net's dataset.json

    long = pd.read_csv(res / "report" / "dice_per_case.csv")
    assert set(long["dataset"]) == {"liver_itk", "liver_nnunet"}
    for dataset in ("liver_itk", "liver_nnunet"):
        cell = res / "finetune" / dataset / "scratch" / "frac100" / "seed0"
        (test_case,) = json.loads((cell / "metrics.json").read_text())["test_cases"]
        prediction = nib.load(cell / "predictions" / f"{test_case}.nii.gz")
        raw = nib.load(source / "imagesTr" / f"{test_case}.nii.gz")
        assert prediction.shape == raw.shape and np.allclose(prediction.affine, raw.affine, atol=1e-4)
        assert (res / "report" / f"overlays_{dataset}.png").stat().st_size > 10_000
