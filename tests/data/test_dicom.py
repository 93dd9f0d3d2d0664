"""DICOM -> NIfTI on the real series in ../shared/realct, and every refusal the converter promises."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctssl.cli import main as cli
from ctssl.data.dicom import DicomError, convert_series, dicom_to_nifti, find_series


def _only(series: dict):
    assert len(series) == 1
    return next(iter(series.values()))


def test_totalsegmentator_jpeg2000_series_overlays_its_labels(realct, tmp_path):
    written = dicom_to_nifti(realct / "totalsegmentator" / "example_ct_dicom", tmp_path)
    image = nib.load(_only(written))
    labels = nib.load(realct / "totalsegmentator" / "example_seg_dicom.nii.gz")  # stored LAS; ours LPS
    canon_image, canon_labels = nib.as_closest_canonical(image), nib.as_closest_canonical(labels)
    assert canon_image.shape == canon_labels.shape == (512, 512, 20)
    assert np.abs(canon_image.affine - canon_labels.affine).max() < 1e-3
    hu = np.asanyarray(canon_image.dataobj)
    seg = np.asanyarray(canon_labels.dataobj)
    assert hu.dtype == np.int16
    assert 40 < np.median(hu[seg == 5]) < 200  # liver label lies on liver-valued voxels: the grids overlay
    assert np.median(hu[seg == 0]) < 0


def test_dcmqi_series_matches_its_nrrd_labels(realct):
    nrrd = pytest.importorskip("nrrd")
    files = _only(find_series(realct / "dcmqi_ct3slice" / "dicom"))
    image = convert_series(files)
    labels, header = nrrd.read(str(realct / "dcmqi_ct3slice" / "liver_spine_seg.nrrd"))
    assert header["space"] == "left-posterior-superior"
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    lps[:3, 3] = header["space origin"]
    assert image.shape == labels.shape
    assert np.abs(image.affine - np.diag([-1, -1, 1, 1]) @ lps).max() < 1e-3
    # spacing comes from positions (1 mm), not SliceThickness (1.25 mm)
    assert np.linalg.norm(image.affine[:3, 2]) == pytest.approx(1.0, abs=1e-4)
    hu = np.asanyarray(image.dataobj)
    assert np.median(hu[labels == 2]) > 150  # spine is bone
    assert 0 < np.median(hu[labels == 1]) < 200  # liver


def test_gantry_tilt_is_refused_naming_the_tilt(realct, tmp_path):
    with pytest.raises(DicomError, match=r"gantry tilt .*18\.5 deg"):
        dicom_to_nifti(realct / "ge_head_tilt" / "dicom", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert cli(["dicom2nifti", str(realct / "ge_head_tilt" / "dicom"), str(tmp_path / "cli")]) == 2


def _copy_series(src, dst):
    dst.mkdir()
    for path in sorted(src.iterdir()):
        shutil.copy(path, dst / path.name)
    return dst


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.fixture
def ts_copy(realct, tmp_path):
    return _copy_series(realct / "totalsegmentator" / "example_ct_dicom", tmp_path / "ts")


def test_instance_numbers_do_not_decide_the_order(realct, ts_copy, tmp_path):
    files = sorted(ts_copy.iterdir())
    for i, path in enumerate(files):
        _edit(path, InstanceNumber=len(files) - i if i % 2 else i + 100)
    reference = convert_series(_only(find_series(realct / "totalsegmentator" / "example_ct_dicom")))
    shuffled = convert_series(sorted(ts_copy.iterdir()))
    assert np.array_equal(reference.affine, shuffled.affine)
    assert np.array_equal(np.asanyarray(reference.dataobj), np.asanyarray(shuffled.dataobj))


def test_missing_slice_is_refused(ts_copy):
    sorted(ts_copy.iterdir())[7].unlink()
    with pytest.raises(DicomError, match=r"uneven slice gaps .*about 1 slice\(s\) missing"):
        convert_series(sorted(ts_copy.iterdir()))


def test_duplicate_slice_is_refused(ts_copy):
    files = sorted(ts_copy.iterdir())
    shutil.copy(files[3], ts_copy / "zz_duplicate")
    with pytest.raises(DicomError, match="duplicate slices"):
        convert_series(sorted(ts_copy.iterdir()))


def test_uneven_gap_is_refused(ts_copy):
    path = sorted(ts_copy.iterdir())[5]
    pos = [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]
    _edit(path, ImagePositionPatient=[pos[0], pos[1], pos[2] + 0.6])
    with pytest.raises(DicomError, match="uneven slice gaps"):
        convert_series(sorted(ts_copy.iterdir()))


def test_mixed_orientations_are_refused(ts_copy):
    _edit(sorted(ts_copy.iterdir())[2], ImageOrientationPatient=[1, 0, 0, 0, 0.98, 0.199])
    with pytest.raises(DicomError, match="mixed orientations"):
        convert_series(sorted(ts_copy.iterdir()))


def test_non_ct_is_refused(ts_copy):
    for path in ts_copy.iterdir():
        _edit(path, Modality="MR")
    with pytest.raises(DicomError, match=r"modality \['MR'\] is not CT"):
        convert_series(sorted(ts_copy.iterdir()))


def test_missing_decoder_names_the_transfer_syntax(ts_copy, monkeypatch):
    def no_decoder(self):
        raise RuntimeError("Unable to decode the pixel data: no plugins available")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    with pytest.raises(DicomError, match=r"JPEG 2000.*pip install pylibjpeg pylibjpeg-openjpeg"):
        convert_series(sorted(ts_copy.iterdir()))


def test_existing_output_is_not_overwritten(realct, tmp_path):
    dicom_to_nifti(realct / "dcmqi_ct3slice" / "dicom", tmp_path)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        dicom_to_nifti(realct / "dcmqi_ct3slice" / "dicom", tmp_path)
