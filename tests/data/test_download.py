"""Downloads against a local HTTP server on 127.0.0.1 (never the internet): resume, checksums, unsafe and
truncated archives, offline message."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import pytest

from ctssl.data.download import MSD_TASKS, DownloadError, extract_tar, fetch, install_msd_task


def _task_tar(realct: Path, task: str = "Task99_Test", evil: str | None = None) -> bytes:
    """An MSD-shaped tar built from real files (the dcmqi DICOM slices stand in for images)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        meta = json.dumps({"name": task, "labels": {"0": "background"}, "training": []}).encode()
        info = tarfile.TarInfo(f"{task}/dataset.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for path in sorted((realct / "dcmqi_ct3slice" / "dicom").iterdir()):
            tar.add(path, arcname=f"{task}/imagesTr/{path.name}")
        if evil:
            info = tarfile.TarInfo(evil)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """Transient failures are retried inside the job after a delay; the tests do not wait."""
    import ctssl.data.download as download

    monkeypatch.setattr(download, "NETWORK_DELAYS", (0.0, 0.0))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_registry_has_the_msd_ct_tasks():
    assert set(MSD_TASKS) == {"Task03_Liver", "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel",
                              "Task09_Spleen", "Task10_Colon"}
    assert MSD_TASKS["Task09_Spleen"].md5 == "410d4a301da4e5b2f6f86ec3ddba524e"


def test_download_verify_and_install(server, realct, tmp_path):
    base, handler = server
    data = _task_tar(realct)
    handler.files["/Task99_Test.tar"] = data
    raw = install_msd_task("Task99_Test", tmp_path / "raw" / "test", tmp_path / "downloads",
                           url=f"{base}/Task99_Test.tar", md5=_md5(data))
    assert (raw / "dataset.json").exists() and len(list((raw / "imagesTr").iterdir())) == 3
    assert not list((tmp_path / "downloads").glob(".*"))  # no staging left
    # a second install reuses the verified archive without touching the network
    handler.files.clear()
    install_msd_task("Task99_Test", tmp_path / "raw" / "again", tmp_path / "downloads",
                     url=f"{base}/Task99_Test.tar", md5=_md5(data))


def test_interrupted_download_is_retried_in_the_job_and_resumes_with_a_range_request(server, realct, tmp_path):
    base, handler = server
    data = _task_tar(realct)
    handler.files["/a.tar"] = data
    handler.cut_first_response_at = len(data) // 3
    dest = tmp_path / "a.tar"
    fetch(f"{base}/a.tar", dest, md5=_md5(data))
    assert dest.read_bytes() == data
    assert [r["range"] for r in handler.requests] == [None, f"bytes={len(data) // 3}-"]


def test_a_lasting_network_failure_keeps_the_part_for_a_rerun(server, realct, tmp_path, monkeypatch):
    import ctssl.data.download as download

    base, handler = server
    data = _task_tar(realct)
    handler.files["/a.tar"] = data
    handler.cut_first_response_at = len(data) // 3
    monkeypatch.setattr(download, "NETWORK_DELAYS", ())  # no second attempt inside the job
    dest = tmp_path / "a.tar"
    with pytest.raises(DownloadError, match="interrupted after .* rerun to resume"):
        fetch(f"{base}/a.tar", dest, md5=_md5(data))
    assert not dest.exists() and (tmp_path / "a.tar.part").stat().st_size == len(data) // 3
    fetch(f"{base}/a.tar", dest, md5=_md5(data))
    assert dest.read_bytes() == data and handler.requests[-1]["range"] == f"bytes={len(data) // 3}-"


def test_a_missing_file_is_not_retried(server, tmp_path):
    base, handler = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{base}/nope.tar", tmp_path / "nope.tar")
    assert len(handler.requests) == 1


def test_checksum_mismatch_is_refused_and_kept_aside(server, tmp_path):
    base, handler = server
    handler.files["/b.tar"] = b"x" * 1000
    with pytest.raises(DownloadError, match="MD5 .* != expected"):
        fetch(f"{base}/b.tar", tmp_path / "b.tar", md5="0" * 32)
    assert not (tmp_path / "b.tar").exists() and (tmp_path / "b.tar.bad").exists()


def test_tar_with_parent_member_is_refused(realct, tmp_path):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_task_tar(realct, evil="../escape.txt"))
    with pytest.raises(DownloadError, match="unsafe member"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()
    assert not list(tmp_path.glob(".out*"))


def test_truncated_archive_is_refused(realct, tmp_path):
    data = _task_tar(realct)
    archive = tmp_path / "cut.tar"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match="truncated or corrupt archive"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_offline_message_says_where_to_put_the_archive(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"Offline\? Download it by hand and put it at .*c\.tar \(MD5 abc\)"):
        fetch(f"http://127.0.0.1:{port}/c.tar", tmp_path / "c.tar", md5="abc", timeout=5)


def _nifti_gz(realct: Path) -> bytes:
    return (realct / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()


def test_no_content_length_and_a_cut_transfer_end_with_the_full_verified_file(server, realct, tmp_path):
    """The KiTS19 route: no checksum, no Content-Length; a dropped connection looks like a complete file."""
    base, handler = server
    data = _nifti_gz(realct)
    handler.files["/case.nii.gz"] = data
    handler.send_length = False
    handler.cut_first_response_at = len(data) // 2
    dest = fetch(f"{base}/case.nii.gz", tmp_path / "dl" / "case.nii.gz")
    assert dest.read_bytes() == data
    bad = tmp_path / "dl" / "case.nii.gz.bad"
    assert bad.exists() and len(bad.read_bytes()) == len(data) // 2  # the short one, set aside
    assert (tmp_path / "dl" / "case.nii.gz.sha256").read_text().split()[0] == hashlib.sha256(data).hexdigest()
    assert [r["range"] for r in handler.requests] == [None, None]  # fetched again from the start


def test_a_short_file_left_by_an_earlier_run_is_set_aside_and_fetched_again(server, realct, tmp_path):
    base, handler = server
    data = _nifti_gz(realct)
    handler.files["/case.nii.gz"] = data
    dest = tmp_path / "case.nii.gz"
    dest.write_bytes(data[: len(data) // 3])  # accepted by an older ctssl
    assert fetch(f"{base}/case.nii.gz", dest).read_bytes() == data
    assert (tmp_path / "case.nii.gz.bad").exists()
    requests = len(handler.requests)
    fetch(f"{base}/case.nii.gz", dest)  # now verified: no second transfer
    assert len(handler.requests) == requests


def test_format_checks_name_what_is_wrong(realct, tmp_path):
    from ctssl.data.download import format_problem

    data = _nifti_gz(realct)
    cases = {"empty.nii.gz": b"", "short.nii.gz": data[:1000], "plain.nii.gz": b"not gzip at all",
             "short.tar": _task_tar(realct)[:700], "good.nii.gz": data}
    found = {}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        found[name] = format_problem(tmp_path / name)
    assert found["empty.nii.gz"] == "empty (0 bytes)"
    assert "truncated or corrupt" in found["short.nii.gz"] and "truncated or corrupt" in found["plain.nii.gz"]
    assert "truncated or corrupt" in found["short.tar"] and found["good.nii.gz"] is None
    gz = tmp_path / "headeronly.nii.gz"
    import gzip

    gz.write_bytes(gzip.compress(gzip.decompress(data)[:5000]))  # a clean gzip of too little image data
    assert "its header announces" in format_problem(gz)


def test_a_tar_with_an_absolute_member_is_refused(realct, tmp_path):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_task_tar(realct, evil="/tmp/ctssl_evil.txt"))
    with pytest.raises(DownloadError, match="unsafe member refused.*absolute or parent path"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
