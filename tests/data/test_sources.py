"""Dataset kinds -> MSD layout: folder (NIfTI + DICOM, relabelled), BTCV manual import, KiTS19 downloads."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from ctssl.config import complete_config
from ctssl.data.download import DownloadError
from ctssl.data.msd import read_msd_dataset
from ctssl.data.sources import prepare_raw as _prepare_raw
from ctssl.errors import InputDataError


def prepare_raw(name, cfg, out_dir, downloads):
    """ctssl.data.sources.prepare_raw with the dataset section completed as the workflow does (schema defaults)."""
    return _prepare_raw(name, complete_config({"datasets": {name: cfg}})["datasets"][name], out_dir, downloads)


def test_folder_kind_with_dicom_relabelling_and_label_reorientation(realct, tmp_path):
    ts = realct / "totalsegmentator"
    cfg = {"kind": "folder", "group": "abdomen", "labels": {"0": "background", "1": "liver"}, "label_map": {"5": 1},
           "cases": {"ts_dicom": {"image": str(ts / "example_ct_dicom"), "label": str(ts / "example_seg_dicom.nii.gz")},
                     "ts_ct": {"image": str(ts / "example_ct.nii.gz"),
                               "label": str(ts / "example_seg_fast_force_split.nii.gz")}}}
    raw = prepare_raw("liver_real", cfg, tmp_path / "raw", tmp_path / "dl")
    dataset = read_msd_dataset(raw)
    assert dataset.labels == {0: "background", 1: "liver"} and len(dataset.cases) == 2
    assert (raw / "imagesTr" / "ts_ct.nii.gz").is_symlink()  # NIfTI sources are linked, never copied
    for case in dataset.cases:
        image, label = nib.load(case.image), nib.load(case.label)
        assert image.shape == label.shape and np.allclose(image.affine, label.affine, atol=1e-3)
        seg = np.asanyarray(label.dataobj)
        assert set(np.unique(seg)) == {0, 1}
        assert 40 < np.median(np.asanyarray(image.dataobj)[seg == 1]) < 200  # liver lies on liver
    original = np.asanyarray(nib.load(ts / "example_seg_fast_force_split.nii.gz").dataobj)
    remapped = np.asanyarray(nib.load(raw / "labelsTr" / "ts_ct.nii.gz").dataobj)
    assert np.array_equal(remapped == 1, original == 5)


def test_folder_kind_refuses_a_label_on_another_grid(realct, tmp_path):
    ts = realct / "totalsegmentator"
    cfg = {"kind": "folder", "labels": {"0": "background", "1": "liver"}, "label_map": {"5": 1},
           "cases": {"x": {"image": str(ts / "example_ct.nii.gz"),
                           "label": str(ts / "example_seg.nii.gz")}}}  # the 30-slice crop's label
    with pytest.raises(InputDataError, match=r"example_seg\.nii\.gz: label shape \(122, 101, 30\) does not match "
                                             r"the shape \(122, 101, 112\) of image .*example_ct\.nii\.gz"):
        prepare_raw("x", cfg, tmp_path / "raw", tmp_path / "dl")
    assert not (tmp_path / "raw").exists()


def _fake_btcv(root, n):
    for sub in ("img", "label"):
        (root / "Training" / sub).mkdir(parents=True)
    for i in range(1, n + 1):
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), root / "Training" / "img" / f"img{i:04d}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.uint8), affine),
                 root / "Training" / "label" / f"label{i:04d}.nii.gz")


def test_btcv_manual_import_checks_the_case_count(tmp_path):
    with pytest.raises(DownloadError, match="Synapse login.*datasets.btcv.path"):
        prepare_raw("btcv", {"kind": "manual"}, tmp_path / "raw", tmp_path / "dl")
    _fake_btcv(tmp_path / "RawData", 3)
    with pytest.raises(InputDataError, match="found 3 training images .*expected 30"):
        prepare_raw("btcv", {"kind": "manual", "path": str(tmp_path / "RawData")}, tmp_path / "raw", tmp_path / "dl")
    raw = prepare_raw("btcv", {"kind": "manual", "path": str(tmp_path / "RawData"), "expected_cases": 3},
                      tmp_path / "raw", tmp_path / "dl")
    dataset = read_msd_dataset(raw)
    assert [c.case_id for c in dataset.cases] == ["btcv_0001", "btcv_0002", "btcv_0003"]
    assert dataset.labels[6] == "liver" and len(dataset.labels) == 14


def test_kits19_downloads_each_case_and_records_checksums(server, tmp_path):
    base, handler = server
    for i in range(2):
        for kind, dtype in (("img", np.int16), ("seg", np.uint8)):
            path = tmp_path / f"{kind}{i}.nii.gz"
            nib.save(nib.Nifti1Image(np.full((6, 6, 3), i, dtype), np.eye(4)), path)
            handler.files[f"/{kind}_{i:05d}.nii.gz"] = path.read_bytes()
    cfg = {"kind": "kits19", "n_cases": 2, "image_url": base + "/img_{case:05d}.nii.gz",
           "label_url": base + "/seg_{case:05d}.nii.gz"}
    raw = prepare_raw("kits", cfg, tmp_path / "raw", tmp_path / "dl")
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "kidney", "2": "tumour"}
    assert [e["image"] for e in meta["training"]] == ["./imagesTr/case_00000.nii.gz", "./imagesTr/case_00001.nii.gz"]
    assert len(meta["ctssl"]["sha256"]["case_00001"]["image_sha256"]) == 64
    assert (tmp_path / "dl" / "kits19" / "case_00001" / "segmentation.nii.gz").exists()


def test_folder_kind_from_an_images_and_a_labels_folder(realct, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    ts = realct / "totalsegmentator"
    (images / "a.nii.gz").symlink_to(ts / "example_ct_sm.nii.gz")
    (labels / "a.nii.gz").symlink_to(ts / "example_seg.nii.gz")
    (images / "b").symlink_to(realct / "dcmqi_ct3slice" / "dicom")  # a DICOM series, unlabelled
    (images / "notes.txt").write_text("ignored")
    cfg = {"kind": "folder", "images_dir": str(images), "labels_dir": str(labels),
           "labels": {"0": "background", "1": "spleen"}, "label_map": {"1": 1}}
    dataset = read_msd_dataset(prepare_raw("mine", cfg, tmp_path / "raw", tmp_path / "dl"))
    assert [(c.case_id, c.label is not None) for c in dataset.cases] == [("a", True), ("b", False)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="needs `cases`, `nnunet_raw` or an `images_dir` with image files"):
        prepare_raw("none", {"kind": "folder", "images_dir": str(tmp_path / "empty")}, tmp_path / "r2", tmp_path / "dl")
    with pytest.raises(InputDataError, match="is not a folder"):
        prepare_raw("none", {"kind": "folder", "images_dir": str(tmp_path / "nope")}, tmp_path / "r3", tmp_path / "dl")
