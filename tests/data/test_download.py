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


def test_interrupted_download_resumes_with_a_range_request(server, realct, tmp_path):
    base, handler = server
    data = _task_tar(realct)
    handler.files["/a.tar"] = data
    handler.cut_first_response_at = len(data) // 3
    dest = tmp_path / "a.tar"
    with pytest.raises(DownloadError, match="interrupted after .* rerun to resume"):
        fetch(f"{base}/a.tar", dest, md5=_md5(data))
    assert not dest.exists() and (tmp_path / "a.tar.part").stat().st_size == len(data) // 3
    fetch(f"{base}/a.tar", dest, md5=_md5(data))
    assert dest.read_bytes() == data
    assert handler.requests[-1]["range"] == f"bytes={len(data) // 3}-"


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
