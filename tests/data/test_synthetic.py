import json

import nibabel as nib
import numpy as np
import pytest

from ctssl.data.synthetic import MAX_SHAPE, PROFILES, synthesize_case


# Every profile draws from the same seeded streams: one unlabelled and one labelled profile cover both paths
# (each case costs seconds to synthesize, and the suite runs on two cores).
@pytest.mark.parametrize("profile", ["chest", "kidney"])
def test_deterministic_per_seed(profile):
    a_img, a_seg = synthesize_case(profile, seed=3, case_index=1)
    b_img, b_seg = synthesize_case(profile, seed=3, case_index=1)
    c_img, _ = synthesize_case(profile, seed=4, case_index=1)
    assert np.array_equal(a_img.get_fdata(), b_img.get_fdata())
    assert np.array_equal(a_img.affine, b_img.affine)
    if a_seg is not None:
        assert np.array_equal(a_seg.get_fdata(), b_seg.get_fdata())
    assert not np.array_equal(a_img.affine, c_img.affine) or not np.array_equal(a_img.get_fdata(), c_img.get_fdata())


def _tissue_median(image, mask):
    return float(np.median(image[mask]))


def test_hu_values_look_like_ct():
    img, seg = synthesize_case("liver", seed=0, case_index=0)
    hu = np.asanyarray(img.dataobj)
    assert hu.dtype == np.int16
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert abs(_tissue_median(hu, hu < -900) - (-1000)) < 30  # air
    liver = np.asanyarray(seg.dataobj) == 1
    assert 80 < _tissue_median(hu, liver) < 130  # portal-venous enhanced liver parenchyma
    assert hu.max() > 700  # cortical bone is present
    fat = (hu > -130) & (hu < -70)
    assert fat.sum() > 1000  # a subcutaneous fat layer exists


def test_chest_has_lungs_and_no_labels():
    img, seg = synthesize_case("chest", seed=0, case_index=0)
    hu = np.asanyarray(img.dataobj)
    assert seg is None
    lungs = (hu > -900) & (hu < -700)
    assert lungs.mean() > 0.05


@pytest.mark.parametrize("profile", ["liver", "kidney"])  # the geometry draw is shared by every profile
def test_geometry_is_anisotropic_and_mixed(profile):
    codes, spacings = set(), []
    for i in range(4):
        img, seg = synthesize_case(profile, seed=0, case_index=i)
        assert all(n <= m for n, m in zip(img.shape, MAX_SHAPE, strict=True))
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
        codes.add("".join(nib.aff2axcodes(img.affine)))
        zooms = img.header.get_zooms()
        assert 0.6 <= zooms[0] <= 1.0 and zooms[0] == pytest.approx(zooms[1])
        assert 1.5 <= zooms[2] <= 5.0
        spacings.append(zooms)
        labels = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert labels <= set(PROFILES[profile].labels.values()) and len(labels) >= 2
    assert codes == {"RAS", "LPS"}
    assert len({s[2] for s in spacings}) == 4


def test_msd_layout(liver_raw):
    meta = json.loads((liver_raw / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert meta["numTraining"] == 4 == len(list((liver_raw / "imagesTr").glob("*.nii.gz")))
    for entry in meta["training"]:
        assert (liver_raw / entry["image"]).exists() and (liver_raw / entry["label"]).exists()
