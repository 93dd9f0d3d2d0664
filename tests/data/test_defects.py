"""The corpus of broken inputs, through every dataset kind that can carry each defect: every one is refused with
the file and the reason and leaves nothing under preprocessed/; the healthy control and an empty-label case pass.

Kinds: `msd` (and `synthetic`, which writes the same MSD layout) reach the checks at preprocessing; `folder` checks
at import and again at preprocessing; `manual` (BTCV layout) and `kits19` (downloaded from a local server, so the
download's own format check comes first) link the files and preprocessing checks them.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctssl.config import complete_config
from ctssl.data.download import DownloadError
from ctssl.data.sources import prepare_raw
from ctssl.errors import InputDataError
from ctssl.preprocess.pipeline import preprocess_dataset

PREPROCESS = complete_config({"preprocess": {"target_spacing": [3.0, 3.0, 4.0],
                                             "normalization": {"scheme": "window", "window": [-175, 250]}}})["preprocess"]
LABELS = {"0": "background", "1": "liver", "2": "tumour"}
CASES = ["liver_000", "liver_001"]
BAD = "liver_001"


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(path)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.unlink()
    nib.save(nib.Nifti1Image(data, affine), path)


def truncated(image: Path, label: Path) -> None:
    data = image.read_bytes()
    image.unlink()
    image.write_bytes(data[: len(data) // 2])


def not_nifti(image: Path, label: Path) -> None:
    image.unlink()
    image.write_bytes(gzip.compress(b"this is a text file, not an image\n" * 20))


def zero_bytes(image: Path, label: Path) -> None:
    image.unlink()
    image.write_bytes(b"")


def two_d(image: Path, label: Path) -> None:
    img = _load(image)
    _save(image, np.asanyarray(img.dataobj)[:, :, 0], img.affine)


def four_d(image: Path, label: Path) -> None:
    img = _load(image)
    data = np.asanyarray(img.dataobj)
    _save(image, np.stack([data, data], axis=-1), img.affine)


def nan_voxel(image: Path, label: Path) -> None:
    img = _load(image)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    _save(image, data, img.affine)


def label_shape(image: Path, label: Path) -> None:
    img = _load(label)
    _save(label, np.asanyarray(img.dataobj)[:-2], img.affine)


def label_affine(image: Path, label: Path) -> None:
    img = _load(label)
    affine = img.affine.copy()
    affine[1, 3] += 10.0
    _save(label, np.asanyarray(img.dataobj), affine)


def label_value_7(image: Path, label: Path) -> None:
    img = _load(label)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    _save(label, data, img.affine)


def float_label(image: Path, label: Path) -> None:
    img = _load(label)
    _save(label, np.asanyarray(img.dataobj).astype(np.float32) * 0.5, img.affine)


def missing_label(image: Path, label: Path) -> None:
    label.unlink()


def no_orientation(image: Path, label: Path) -> None:
    img = _load(image)
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    out.header.set_zooms((0.0, 1.0, 1.0))
    out.header["qform_code"] = out.header["sform_code"] = 0
    image.unlink()
    nib.save(out, image)


# defect -> (message pattern for the file at hand, the file it is about: "image" or "label")
DEFECTS: dict[str, tuple[Callable, str, str]] = {
    "truncated gzip": (truncated, r"(truncated or corrupt|cannot read NIfTI \(truncated)", "image"),
    "not NIfTI": (not_nifti, r"(not a NIfTI|truncated or corrupt)", "image"),
    "zero bytes": (zero_bytes, r"(empty file \(0 bytes\)|empty \(0 bytes\))", "image"),
    "2D": (two_d, r"a 2D image \(shape", "image"),
    "4D": (four_d, r"a 4D image \(shape .*2 volumes\)", "image"),
    "NaN voxel": (nan_voxel, r"1 voxels are NaN or infinite", "image"),
    "label shape": (label_shape, r"label shape \(\d+, \d+, \d+\) does not match the shape", "label"),
    "label affine": (label_affine, r"label origin is shifted by \[0\.0, 10\.0, 0\.0\] mm", "label"),
    "label value 7": (label_value_7, r"label values \[7\] are not declared", "label"),
    "float label": (float_label, r"label values must be integers, found \[0\.5", "label"),
    "missing label": (missing_label, r"(no label|no matching label|HTTP 404)", "image"),
    "no orientation": (no_orientation, r"no orientation \(qform_code and sform_code are 0\) and zero or negative "
                                       r"voxel spacing", "image"),
}


@pytest.fixture(scope="module")
def healthy(liver_raw, tmp_path_factory) -> Path:
    """Two cases of the synthetic liver: flat files {case}.nii.gz and {case}_seg.nii.gz."""
    root = tmp_path_factory.mktemp("healthy")
    for case in CASES:
        shutil.copy(liver_raw / "imagesTr" / f"{case}.nii.gz", root / f"{case}.nii.gz")
        shutil.copy(liver_raw / "labelsTr" / f"{case}.nii.gz", root / f"{case}_seg.nii.gz")
    return root


def _msd(files: Path, work: Path, server) -> Path:
    raw = work / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    entries = []
    for case in CASES:
        shutil.copy(files / f"{case}.nii.gz", raw / "imagesTr" / f"{case}.nii.gz")
        entry = {"image": f"./imagesTr/{case}.nii.gz"}
        if (files / f"{case}_seg.nii.gz").exists():
            shutil.copy(files / f"{case}_seg.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
            entry["label"] = f"./labelsTr/{case}.nii.gz"
        entries.append(entry)
    (raw / "dataset.json").write_text(json.dumps({"name": "liver", "labels": LABELS, "training": entries}))
    return raw


def _folder(files: Path, work: Path, server) -> Path:
    cases = {}
    for case in CASES:
        cases[case] = {"image": str(files / f"{case}.nii.gz")}
        if (files / f"{case}_seg.nii.gz").exists():
            cases[case]["label"] = str(files / f"{case}_seg.nii.gz")
    cfg = complete_config({"datasets": {"liver": {"kind": "folder", "labels": LABELS, "cases": cases}}})
    return prepare_raw("liver", cfg["datasets"]["liver"], work / "raw", work / "dl", require_labels=True)


def _manual(files: Path, work: Path, server) -> Path:
    root = work / "RawData" / "Training"
    (root / "img").mkdir(parents=True)
    (root / "label").mkdir()
    for i, case in enumerate(CASES):
        shutil.copy(files / f"{case}.nii.gz", root / "img" / f"img{i:04d}.nii.gz")
        if (files / f"{case}_seg.nii.gz").exists():
            shutil.copy(files / f"{case}_seg.nii.gz", root / "label" / f"label{i:04d}.nii.gz")
    cfg = complete_config({"datasets": {"btcv": {"kind": "manual", "path": str(work / "RawData"),
                                                 "expected_cases": len(CASES)}}})
    return prepare_raw("btcv", cfg["datasets"]["btcv"], work / "raw", work / "dl", require_labels=True)


def _kits19(files: Path, work: Path, server) -> Path:
    base, handler = server
    handler.send_length = False  # as the KiTS19 image host
    for i, case in enumerate(CASES):
        handler.files[f"/img_{i:05d}.nii.gz"] = (files / f"{case}.nii.gz").read_bytes()
        if (files / f"{case}_seg.nii.gz").exists():
            handler.files[f"/seg_{i:05d}.nii.gz"] = (files / f"{case}_seg.nii.gz").read_bytes()
    cfg = complete_config({"datasets": {"kits": {"kind": "kits19", "n_cases": len(CASES),
                                                 "image_url": base + "/img_{case:05d}.nii.gz",
                                                 "label_url": base + "/seg_{case:05d}.nii.gz"}}})
    return prepare_raw("kits", cfg["datasets"]["kits"], work / "raw", work / "dl", require_labels=True)


NOT_CARRIED = {("manual", "label value 7"): "BTCV declares labels 0-13: 7 (stomach) is a valid value there"}
KINDS = {"msd": _msd, "folder": _folder, "manual": _manual, "kits19": _kits19}
# What each kind calls the bad case's files (in the messages).
NAMES = {"msd": ("liver_001.nii.gz", "liver_001.nii.gz"), "folder": ("liver_001.nii.gz", "liver_001_seg.nii.gz"),
         "manual": ("img0001.nii.gz", "label0001.nii.gz"),  # raw/ links name the user's files they point to
         "kits19": ("img_00001.nii.gz", "seg_00001.nii.gz")}  # the URL, or the download it was saved as:
KITS_SAVED = ("case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz")


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    import ctssl.data.download as download

    monkeypatch.setattr(download, "NETWORK_DELAYS", (0.0, 0.0))


def _run(kind: str, files: Path, work: Path, server) -> Path:
    raw = KINDS[kind](files, work, server)
    return preprocess_dataset(raw, work / "preprocessed" / "liver", "liver", PREPROCESS, "abdomen",
                              require_labels=True)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_every_defect_is_refused_naming_the_file_and_the_reason(kind, defect, healthy, tmp_path, server):
    if (kind, defect) in NOT_CARRIED:
        pytest.skip(NOT_CARRIED[(kind, defect)])
    files = tmp_path / "files"
    shutil.copytree(healthy, files)
    corrupt, reason, about = DEFECTS[defect]
    corrupt(files / f"{BAD}.nii.gz", files / f"{BAD}_seg.nii.gz")
    with pytest.raises((InputDataError, DownloadError)) as info:
        _run(kind, files, tmp_path / "work", server)
    message = str(info.value)
    which = [0, 1] if defect == "missing label" else [0 if about == "image" else 1]  # the image's, or the URL
    assert any(NAMES[kind][w] in message or (kind == "kits19" and KITS_SAVED[w] in message) for w in which), message
    assert re.search(reason, message), message
    assert not (tmp_path / "work" / "preprocessed" / "liver").exists()
    assert not list((tmp_path / "work").glob("preprocessed/.liver*"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_healthy_control_and_an_empty_label_pass(kind, healthy, tmp_path, server):
    files = tmp_path / "files"
    shutil.copytree(healthy, files)
    img = nib.load(files / f"{BAD}_seg.nii.gz")
    _save(files / f"{BAD}_seg.nii.gz", np.zeros(img.shape, np.uint8), img.affine)  # no foreground at all
    out = _run(kind, files, tmp_path / "work", server)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 2 and all(c["labelled"] for c in manifest["cases"])


def test_a_malformed_dataset_json_is_refused_naming_it(healthy, tmp_path, server):
    raw = _msd(healthy, tmp_path, server)
    (raw / "dataset.json").write_text('{"name": "liver", "labels": {')
    with pytest.raises(InputDataError, match=r"raw/dataset\.json: not valid JSON"):
        preprocess_dataset(raw, tmp_path / "pre", "liver", PREPROCESS, "abdomen")
    assert not (tmp_path / "pre").exists()


def test_folder_cases_marked_unlabelled_or_given_a_geometry_are_accepted(healthy, tmp_path):
    files = tmp_path / "files"
    shutil.copytree(healthy, files)
    missing_label(None, files / f"{BAD}_seg.nii.gz")
    no_orientation(files / f"{BAD}.nii.gz", None)
    cfg = complete_config({"datasets": {"liver": {
        "kind": "folder", "labels": LABELS, "unlabelled": [BAD],
        "assume_geometry": {"spacing": [0.8, 0.8, 2.5], "orientation": "LPS"},
        "cases": {case: {"image": str(files / f"{case}.nii.gz"),
                         **({"label": str(files / f"{case}_seg.nii.gz")} if case != BAD else {})}
                  for case in CASES}}}})["datasets"]["liver"]
    raw = prepare_raw("liver", cfg, tmp_path / "raw", tmp_path / "dl", require_labels=True)
    meta = json.loads((raw / "dataset.json").read_text())
    assert [e.get("unlabelled", False) for e in meta["training"]] == [False, True]
    fixed = nib.load(raw / "imagesTr" / f"{BAD}.nii.gz")
    assert nib.aff2axcodes(fixed.affine) == ("L", "P", "S")
    assert np.allclose(np.abs(np.diag(fixed.affine)[:3]), [0.8, 0.8, 2.5])
    out = preprocess_dataset(raw, tmp_path / "pre", "liver", PREPROCESS, "abdomen", require_labels=True)
    assert [c["labelled"] for c in json.loads((out / "manifest.json").read_text())["cases"]] == [True, False]
