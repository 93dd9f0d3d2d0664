"""The listing of a user's source files (ctssl.data.manifest): what it records, and that it is rewritten (its mtime
moved) only when the data changed."""

from __future__ import annotations

import json
import os

from ctssl.data.manifest import refresh_source_manifest, source_listing


def _folder(tmp_path):
    (tmp_path / "images" / "case_003").mkdir(parents=True)  # a DICOM series folder: its files are listed
    (tmp_path / "images" / "case_001.nii.gz").write_bytes(b"x" * 10)
    (tmp_path / "images" / "case_003" / "1.dcm").write_bytes(b"y" * 3)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "case_001.nii.gz").write_bytes(b"z" * 7)
    return {"kind": "folder", "images_dir": str(tmp_path / "images"), "labels_dir": str(tmp_path / "labels")}


def test_listing_names_sizes_and_mtimes(tmp_path):
    spec = _folder(tmp_path)
    listing = source_listing(spec)
    assert {os.path.relpath(p, tmp_path): v[0] for p, v in listing.items()} == {
        "images/case_001.nii.gz": 10, "images/case_003/1.dcm": 3, "labels/case_001.nii.gz": 7}
    label = tmp_path / "labels" / "case_001.nii.gz"
    assert listing[str(label.resolve())][1] == label.stat().st_mtime_ns
    assert source_listing({"kind": "synthetic"}) == {}
    assert source_listing({"kind": "folder", "images_dir": str(tmp_path / "missing")}) == {}


def test_rewritten_only_when_the_data_changed(tmp_path):
    spec, manifest = _folder(tmp_path), tmp_path / "sources" / "mine.json"
    refresh_source_manifest(manifest, spec)
    os.utime(manifest, ns=(1_000_000_000, 1_000_000_000))  # far in the past: a rewrite would move it
    refresh_source_manifest(manifest, spec)
    assert manifest.stat().st_mtime_ns == 1_000_000_000  # same data, same file: nothing reruns
    (tmp_path / "labels" / "case_001.nii.gz").write_bytes(b"fixed label")
    refresh_source_manifest(manifest, spec)
    assert manifest.stat().st_mtime_ns > 1_000_000_000
    assert len(json.loads(manifest.read_text())["files"]) == 3
    (tmp_path / "images" / "case_002.nrrd").write_bytes(b"new")
    refresh_source_manifest(manifest, spec)
    assert len(json.loads(manifest.read_text())["files"]) == 4


def test_first_listing_of_data_already_imported_is_dated_before_the_import(tmp_path):
    """A results folder made before listings existed reruns nothing because the listing appears."""
    spec, raw = _folder(tmp_path), tmp_path / "results" / "raw" / "mine"
    raw.mkdir(parents=True)
    manifest = refresh_source_manifest(tmp_path / "results" / "sources" / "mine.json", spec, imported=raw)
    assert manifest.stat().st_mtime_ns < raw.stat().st_mtime_ns
    fresh = refresh_source_manifest(tmp_path / "other.json", spec, imported=tmp_path / "not_imported_yet")
    assert fresh.stat().st_mtime_ns > raw.stat().st_mtime_ns
