"""Bad inputs stop with a message naming the file, and leave no partial output."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from ctssl.config import complete_config
from ctssl.errors import InputDataError
from ctssl.preprocess.pipeline import preprocess_dataset

CFG = complete_config({"preprocess": {"target_spacing": [2.0, 2.0, 4.0],
                                      "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]


@pytest.fixture
def raw(tmp_path, liver_raw):
    target = tmp_path / "raw"
    shutil.copytree(liver_raw, target)
    return target


def _expect_failure(raw, tmp_path, match):
    out = tmp_path / "pre"
    with pytest.raises(InputDataError, match=match):
        preprocess_dataset(raw, out, "liver", CFG, "abdomen")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pre")]  # no temp left behind


def test_truncated_nifti(raw, tmp_path):
    path = raw / "imagesTr" / "liver_002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_failure(raw, tmp_path, r"liver_002\.nii\.gz: cannot read NIfTI \(truncated")


def test_label_grid_differs_from_image(raw, tmp_path):
    path = raw / "labelsTr" / "liver_001.nii.gz"
    seg = nib.load(path)
    shifted = seg.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(seg.dataobj), shifted), path)
    _expect_failure(raw, tmp_path, r"labelsTr/liver_001\.nii\.gz: label origin is shifted by \[2\.0, 0\.0, 0\.0\] mm \(2 mm\) from image ")


def test_label_shape_differs_from_image(raw, tmp_path):
    path = raw / "labelsTr" / "liver_001.nii.gz"
    seg = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(seg.dataobj)[:-1], seg.affine), path)
    _expect_failure(raw, tmp_path, r"liver_001\.nii\.gz: label shape \(114, 110, 25\) does not match the shape \(115, 110, 25\) of image")


def test_undeclared_label_value(raw, tmp_path):
    path = raw / "labelsTr" / "liver_003.nii.gz"
    seg = nib.load(path)
    data = np.asanyarray(seg.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, seg.affine), path)
    _expect_failure(raw, tmp_path, r"liver_003\.nii\.gz: label values \[7\] are not declared")


def test_missing_file_listed_in_dataset_json(raw, tmp_path):
    (raw / "imagesTr" / "liver_000.nii.gz").unlink()
    _expect_failure(raw, tmp_path, r"dataset\.json: lists .*liver_000\.nii\.gz, which does not exist")


def test_existing_output_is_never_overwritten(raw, tmp_path):
    out = tmp_path / "pre"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        preprocess_dataset(raw, out, "liver", CFG, "abdomen")
    assert (out / "mine.txt").read_text() == "user data"


def test_good_dataset_preprocesses(raw, tmp_path):
    out = preprocess_dataset(raw, tmp_path / "pre", "liver", CFG, "abdomen")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["case"] for c in manifest["cases"]] == [f"liver_{i:03d}" for i in range(4)]
    for case in manifest["cases"]:
        image = np.load(out / f"{case['case']}.npy")
        seg = np.load(out / f"{case['case']}_seg.npy")
        geometry = json.loads((out / f"{case['case']}.json").read_text())
        assert image.shape == seg.shape == tuple(geometry["shape"])
        assert image.dtype == np.float32 and image.min() >= -1e-5 and image.max() <= 1.0 + 1e-5
        assert geometry["orientation"] == "RAS" and geometry["original"]["orientation"] in {"RAS", "LPS"}
        assert np.allclose(np.diag(np.array(geometry["affine"]))[:3], [2.0, 2.0, 4.0])
