"""NRRD and MetaImage input, nnU-Net-style names and nnU-Net raw dataset folders: the same arrays and geometry as the
NIfTI they came from, labels on their DICOM series' grid, and refusals that name the file."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctssl.cli import main
from ctssl.config import complete_config
from ctssl.data.images import case_id, convert_to_nifti, read_image, read_label
from ctssl.data.msd import read_msd_dataset
from ctssl.data.sources import prepare_raw as _prepare_raw
from ctssl.errors import InputDataError
from ctssl.preprocess.pipeline import preprocess_dataset

PREPROCESS = complete_config({"preprocess": {"target_spacing": [4.0, 4.0, 4.0],
                                             "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]


def prepare_raw(name, cfg, out_dir):
    return _prepare_raw(name, complete_config({"datasets": {name: cfg}})["datasets"][name], out_dir, out_dir.parent)


def _itk_copy(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(source)), str(target))
    return target


def test_case_ids():
    assert case_id("a/liver_001.nii.gz") == "liver_001" and case_id("x.MHA") == "x" and case_id("b/c.nhdr") == "c"


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_copies_read_as_the_nifti_and_preprocess_to_the_same_arrays(realct, tmp_path, suffix):
    source = realct / "totalsegmentator" / "example_ct.nii.gz"
    copy = _itk_copy(source, tmp_path / "images" / f"ts{suffix}")
    header = sitk.ReadImage(str(copy))
    assert np.allclose(np.asarray(header.GetDirection()).reshape(3, 3)[:2, :2], -np.eye(2))  # stored in LPS
    expected, expected_affine = read_image(source)
    image, affine = read_image(copy)
    assert np.array_equal(image, expected)
    assert np.allclose(affine, expected_affine, atol=1e-6)

    arrays = {}
    for kind, images_dir in (("nifti", source.parent), ("itk", copy.parent)):
        cfg = ({"kind": "folder", "cases": {"ts": {"image": str(source)}}} if kind == "nifti"
               else {"kind": "folder", "images_dir": str(images_dir)})
        raw = prepare_raw(kind, cfg, tmp_path / "raw" / kind)
        out = preprocess_dataset(raw, tmp_path / "pre" / kind, kind, PREPROCESS, "abdomen")
        arrays[kind] = (np.load(out / "ts.npy"), json.loads((out / "ts.json").read_text()))
    assert np.allclose(arrays["itk"][0], arrays["nifti"][0], atol=1e-6)
    for key in ("affine", "shape"):
        assert np.allclose(arrays["itk"][1][key], arrays["nifti"][1][key], atol=1e-6)
    assert np.allclose(arrays["itk"][1]["original"]["affine"], arrays["nifti"][1]["original"]["affine"], atol=1e-6)


def test_nrrd_label_lands_on_its_dicom_series_grid(realct, tmp_path):
    folder = realct / "dcmqi_ct3slice"
    nrrd = sitk.ReadImage(str(folder / "liver_spine_seg.nrrd"))
    assert np.allclose(np.asarray(nrrd.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6)  # LPS axes, ITK's
    raw = prepare_raw("dcmqi", {"kind": "folder", "labels": {"0": "background", "1": "liver", "2": "spine"},
                                "cases": {"ct3": {"image": str(folder / "dicom"),
                                                  "label": str(folder / "liver_spine_seg.nrrd")}}}, tmp_path / "raw")
    (case,) = read_msd_dataset(raw).cases
    image, label = nib.load(case.image), nib.load(case.label)
    series, series_affine = read_image(folder / "dicom")
    assert image.shape == label.shape == series.shape == (512, 512, 3)
    assert np.allclose(label.affine, series_affine, atol=1e-3)
    values = np.asanyarray(label.dataobj)
    assert set(np.unique(values)) == {0, 1, 2}
    # the liver lies on soft tissue, the spine on bone: the label is not mirrored onto other anatomy
    hu = np.asanyarray(image.dataobj)
    assert 0 < np.median(hu[values == 1]) < 200 and np.median(hu[values == 2]) > 150


def test_4d_and_broken_itk_files_are_refused_by_name(tmp_path):
    four_d = tmp_path / "series.mha"
    # ITK's array order is (t, z, y, x): a series of 2 volumes of 5 x 4 x 3 voxels
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four_d))
    with pytest.raises(InputDataError, match=r"series\.mha: a 4D image \(shape \(5, 4, 3, 2\): 2 volumes\)"):
        read_image(four_d)
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 100)
    with pytest.raises(InputDataError, match=r"broken\.nrrd: cannot read it as NRRD/MetaImage"):
        read_image(broken)
    fractional = tmp_path / "soft.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 3, 3), 0.5, np.float32)), str(fractional))
    with pytest.raises(InputDataError, match=r"soft\.nrrd: label values must be integers, found \[0\.5\]"):
        read_label(fractional)


def _nnunet_raw(root, realct, channels=("0000",), labels=None):
    """A two-case nnU-Net raw dataset cut from the real scan (32 slices each), its label a liver map."""
    ts = realct / "totalsegmentator"
    image, label = nib.load(ts / "example_ct.nii.gz"), nib.load(ts / "example_seg_fast_force_split.nii.gz")
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i, start in enumerate((60, 80)):  # both crops hold liver (slices 69-111)
        crop = (slice(None), slice(None), slice(start, start + 32))
        for channel in channels:
            nib.save(image.slicer[crop], root / "imagesTr" / f"case{i}_{channel}.nii.gz")
        liver = (np.asanyarray(label.slicer[crop].dataobj) == 5).astype(np.uint8)
        nib.save(nib.Nifti1Image(liver, label.slicer[crop].affine), root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): "CT" for i in range(len(channels))},
        "labels": labels or {"background": 0, "liver": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_raw_folder_imports_with_its_labels(realct, tmp_path):
    folder = _nnunet_raw(tmp_path / "Dataset009_Liver", realct)
    raw = prepare_raw("liver_nn", {"kind": "folder", "nnunet_raw": str(folder)}, tmp_path / "raw")
    dataset = read_msd_dataset(raw)
    assert dataset.labels == {0: "background", 1: "liver"}
    assert sorted(c.case_id for c in dataset.cases) == ["case0", "case1"]
    for case in dataset.cases:
        assert set(np.unique(np.asanyarray(nib.load(case.label).dataobj))) == {0, 1}
    # the same pairing from images_dir/labels_dir (nnU-Net names, no dataset.json)
    raw2 = prepare_raw("liver_dirs", {"kind": "folder", "images_dir": str(folder / "imagesTr"),
                                      "labels_dir": str(folder / "labelsTr"),
                                      "labels": {"0": "background", "1": "liver"}}, tmp_path / "raw2")
    assert sorted(c.case_id for c in read_msd_dataset(raw2).cases if c.label) == ["case0", "case1"]


def test_nnunet_raw_folder_refusals(realct, tmp_path):
    two = _nnunet_raw(tmp_path / "two_channels", realct, channels=("0000", "0001"))
    with pytest.raises(InputDataError, match=r"dataset\.json: 2 channels"):
        prepare_raw("x", {"kind": "folder", "nnunet_raw": str(two)}, tmp_path / "raw")
    (two / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                  "file_ending": ".nii.gz"}))
    with pytest.raises(InputDataError, match=r"case0_0001\.nii\.gz: channel 0001 of case 'case0'"):
        prepare_raw("x", {"kind": "folder", "nnunet_raw": str(two)}, tmp_path / "raw")
    regions = _nnunet_raw(tmp_path / "regions", realct, labels={"background": 0, "liver": [1, 2]})
    with pytest.raises(InputDataError, match=r"label 'liver' is \[1, 2\], a region"):
        prepare_raw("x", {"kind": "folder", "nnunet_raw": str(regions)}, tmp_path / "raw")
    good = _nnunet_raw(tmp_path / "good", realct)
    with pytest.raises(InputDataError, match=r"differ from .*dataset\.json's labels"):
        prepare_raw("x", {"kind": "folder", "nnunet_raw": str(good), "labels": {"0": "background", "1": "organ"}},
                    tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_convert_writes_nifti_and_refuses_an_existing_output(realct, tmp_path, capsys):
    source = _itk_copy(realct / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "in" / "small.nrrd")
    assert main(["convert", str(source), str(realct / "dcmqi_ct3slice" / "dicom"), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "small.nii.gz"), str(tmp_path / "out" / "dicom.nii.gz")]
    converted = nib.load(tmp_path / "out" / "small.nii.gz")
    reference = nib.load(realct / "totalsegmentator" / "example_ct_sm.nii.gz")
    assert np.array_equal(np.asanyarray(converted.dataobj), np.asanyarray(reference.dataobj))
    assert np.allclose(converted.affine, reference.affine, atol=1e-6)
    before = (tmp_path / "out" / "small.nii.gz").read_bytes()
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    assert "small.nii.gz already exist(s); refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "small.nii.gz").read_bytes() == before
    with pytest.raises(InputDataError, match="two sources would be written"):
        convert_to_nifti([source, tmp_path / "small.mha"], tmp_path / "out2")
