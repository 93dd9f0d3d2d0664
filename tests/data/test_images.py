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
from ctssl.data.images import case_id, convert_to_nifti, read_image, read_label, to_nifti
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
    header = (folder / "liver_spine_seg.nrrd").read_bytes()[:1000].decode("latin-1")
    assert "space: left-posterior-superior" in header  # stored in LPS, as DICOM's patient coordinates
    nrrd = sitk.ReadImage(str(folder / "liver_spine_seg.nrrd"))
    assert np.allclose(np.asarray(nrrd.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6)  # LPS axes, ITK's
    # read directly, its RAS affine is already the series' one: no reorientation (which could hide a mirror)
    assert np.allclose(read_label(folder / "liver_spine_seg.nrrd")[1], read_image(folder / "dicom")[1], atol=1e-3)
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
    with pytest.raises(InputDataError, match="two inputs would be written"):
        convert_to_nifti([source, tmp_path / "small.mha"], tmp_path / "out2")


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_detached_headers_read_as_the_nifti_and_keep_their_type(realct, tmp_path, suffix):
    source = realct / "totalsegmentator" / "example_ct_sm.nii.gz"
    copy = _itk_copy(source, tmp_path / f"sm{suffix}")
    assert len(list(tmp_path.iterdir())) == 2  # the header and its separate data file
    expected, expected_affine = read_image(source, dtype=None)
    image = to_nifti(copy)
    assert image.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(image.dataobj), expected)
    assert np.allclose(image.affine, expected_affine, atol=1e-6)
    assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 1)


def test_unreadable_inputs_are_refused_by_name(realct, tmp_path):
    with pytest.raises(InputDataError, match=r"gone\.mha: file not found"):
        read_image(tmp_path / "gone.mha")
    (tmp_path / "empty.nrrd").touch()
    with pytest.raises(InputDataError, match=r"empty\.nrrd: empty file"):
        read_label(tmp_path / "empty.nrrd")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputDataError, match=r"scan\.png: not a supported image"):
        read_image(tmp_path / "scan.png")
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(rgb))
    with pytest.raises(InputDataError, match=r"rgb\.mha: 3 components per voxel"):
        read_image(rgb)
    (tmp_path / "no_dicom").mkdir()
    with pytest.raises(InputDataError, match=r"no_dicom: no DICOM files found"):
        read_image(tmp_path / "no_dicom")
    with pytest.raises(InputDataError, match=r"ge_head_tilt/dicom.*gantry tilt"):  # DicomError as InputDataError
        to_nifti(realct / "ge_head_tilt" / "dicom")


def test_nnunet_raw_in_metaimage_with_v1_labels(realct, tmp_path):
    folder = _nnunet_raw(tmp_path / "Task01", realct, labels={"0": "background", "1": "liver"})
    meta = json.loads((folder / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):  # the same dataset with file_ending .mha
        for nifti in sorted((folder / sub).glob("*.nii.gz")):
            _itk_copy(nifti, folder / sub / f"{case_id(nifti)}.mha")
            nifti.unlink()
    (folder / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mha"}))
    raw = prepare_raw("liver_mha", {"kind": "folder", "nnunet_raw": str(folder)}, tmp_path / "raw")
    dataset = read_msd_dataset(raw)
    assert dataset.labels == {0: "background", 1: "liver"}
    assert [c.case_id for c in dataset.cases] == ["case0", "case1"]
    assert not any(p.is_symlink() for p in (raw / "imagesTr").iterdir())  # .mha written as NIfTI copies
    (folder / "labelsTr" / "case1.mha").unlink()
    with pytest.raises(InputDataError, match=r"labelsTr lacks \['case1\.mha'\]"):
        prepare_raw("liver_mha", {"kind": "folder", "nnunet_raw": str(folder)}, tmp_path / "raw2")
    (folder / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".png"}))
    with pytest.raises(InputDataError, match=r"file_ending '\.png' is not a format ctssl reads"):
        prepare_raw("liver_mha", {"kind": "folder", "nnunet_raw": str(folder)}, tmp_path / "raw2")


def test_four_digit_case_names_with_their_own_labels_are_cases_not_channels(realct, tmp_path):
    source = realct / "totalsegmentator" / "example_ct_sm.nii.gz"
    label = nib.Nifti1Image(np.zeros(nib.load(source).shape, np.uint8), nib.load(source).affine)
    for case in ("ct_0000", "ct_0001"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{case}.nii.gz").symlink_to(source)
        (tmp_path / "lab").mkdir(exist_ok=True)
        nib.save(label, tmp_path / "lab" / f"{case}.nii.gz")
    raw = prepare_raw("cts", {"kind": "folder", "images_dir": str(tmp_path / "img"),
                              "labels_dir": str(tmp_path / "lab")}, tmp_path / "raw")
    assert [(c.case_id, c.label is not None) for c in read_msd_dataset(raw).cases] == [("ct_0000", True),
                                                                                       ("ct_0001", True)]


def test_convert_is_all_or_nothing(realct, tmp_path):
    good = realct / "totalsegmentator" / "example_ct_sm.nii.gz"
    (tmp_path / "bad.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    with pytest.raises(InputDataError, match=r"bad\.mha: cannot read it"):
        convert_to_nifti([good, tmp_path / "bad.mha"], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.nii.gz"))
    (tmp_path / "out" / "example_ct_sm.nii.gz").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"example_ct_sm\.nii\.gz already exist"):
        convert_to_nifti([good], tmp_path / "out")
    assert (tmp_path / "out" / "example_ct_sm.nii.gz").read_bytes() == b"mine"
