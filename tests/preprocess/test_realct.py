"""Preprocessing on a real CT scan (TotalSegmentator sample): real spacing, orientation and anatomy."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ctssl.config import complete_config
from ctssl.data.msd import read_msd_dataset
from ctssl.preprocess.pipeline import preprocess_case

LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def ts_dataset(realct, tmp_path_factory):
    """An MSD-layout view (symlinks) of the 30-slice TotalSegmentator scan and its labels."""
    root = tmp_path_factory.mktemp("ts")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    src = realct / "totalsegmentator"
    os.symlink(src / "example_ct_sm.nii.gz", root / "imagesTr" / "ts_000.nii.gz")
    os.symlink(src / "example_seg.nii.gz", root / "labelsTr" / "ts_000.nii.gz")
    class_map = json.loads((src / "class_map_total.json").read_text())["total"]
    labels = {"0": "background", **class_map}
    (root / "dataset.json").write_text(json.dumps({
        "name": "ts", "labels": labels,
        "training": [{"image": "./imagesTr/ts_000.nii.gz", "label": "./labelsTr/ts_000.nii.gz"}]}))
    return read_msd_dataset(root)


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), (4.0, 4.0, 5.0)])
def test_label_volumes_in_mm3_survive_resampling(ts_dataset, spacing):
    cfg = complete_config({"preprocess": {"target_spacing": list(spacing),
                                          "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]
    out = preprocess_case(ts_dataset.cases[0], ts_dataset, cfg, None)
    ref = np.asanyarray(nib.load(ts_dataset.cases[0].label).dataobj)
    for value in (LIVER, SPLEEN):
        before = (ref == value).sum() * 27.0  # 3 mm isotropic source
        after = (out["label"] == value).sum() * float(np.prod(spacing))
        assert after == pytest.approx(before, rel=0.04), value
    # physical extent preserved within one target voxel per axis
    extent_in = (np.array(ref.shape) - 1) * 3.0
    extent_out = (np.array(out["image"].shape) - 1) * np.array(spacing)
    assert np.all(np.abs(extent_out - extent_in) <= np.array(spacing) + 1e-6)


def test_liver_intensity_after_window_normalization(ts_dataset):
    cfg = complete_config({"preprocess": {"target_spacing": [3.0, 3.0, 3.0],
                                          "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]
    out = preprocess_case(ts_dataset.cases[0], ts_dataset, cfg, None)
    liver_hu = np.median(out["image"][out["label"] == LIVER]) * 425 - 175
    assert 20 < liver_hu < 200  # liver parenchyma in HU, a sanity check that intensities are not scrambled
    assert out["geometry"]["original"]["orientation"] == "RAS"
