"""Dataset downloads: resumable (HTTP Range), verified (checksum) before extraction, extracted safely and
atomically, so that a half-downloaded or half-extracted dataset never looks complete.

Only the standard library is used for HTTP (urllib) so that the code runs wherever ctssl does; `tarfile`'s
"data" extraction filter rejects absolute paths, `..` members and links that point outside the target.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ctssl.io import atomic_dir, file_digest

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or an archive failed in a way the user must act on; the message says how."""


@dataclasses.dataclass(frozen=True)
class RemoteArchive:
    task: str
    url: str
    md5: str
    labels: dict[int, str]
    licence: str = "CC-BY-SA 4.0 (Medical Segmentation Decathlon)"
    modality: str = "CT"


_MSD = "https://msd-for-monai.s3-us-west-2.amazonaws.com/{}.tar"
# URLs and MD5s as in MONAI's monai/apps/datasets.py (DecathlonDataset), checked against it.
MSD_TASKS: dict[str, RemoteArchive] = {a.task: a for a in [
    RemoteArchive("Task03_Liver", _MSD.format("Task03_Liver"), "a90ec6c4aa7f6a3d087205e23d4e6397",
                  {0: "background", 1: "liver", 2: "tumour"}),
    RemoteArchive("Task06_Lung", _MSD.format("Task06_Lung"), "8afd997733c7fc0432f71255ba4e52dc",
                  {0: "background", 1: "tumour"}),
    RemoteArchive("Task07_Pancreas", _MSD.format("Task07_Pancreas"), "4f7080cfca169fa8066d17ce6eb061e4",
                  {0: "background", 1: "pancreas", 2: "tumour"}),
    RemoteArchive("Task08_HepaticVessel", _MSD.format("Task08_HepaticVessel"), "641d79e80ec66453921d997fbf12a29c",
                  {0: "background", 1: "vessel", 2: "tumour"}),
    RemoteArchive("Task09_Spleen", _MSD.format("Task09_Spleen"), "410d4a301da4e5b2f6f86ec3ddba524e",
                  {0: "background", 1: "spleen"}),
    RemoteArchive("Task10_Colon", _MSD.format("Task10_Colon"), "bad7a188931dc2f6acf72b08eb6202d0",
                  {0: "background", 1: "tumour"}),
]}

# KiTS19: per-case images from the challenge's image host (pattern of kits19/starter_code/get_imaging.py),
# labels from the kits19 git repository (URLs and case count: defaults in the config schema). Neither publishes
# checksums: the sha256 of what arrived is recorded.
KITS19_LABELS = {0: "background", 1: "kidney", 2: "tumour"}

BTCV_LABELS = {0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder", 5: "esophagus",
               6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava", 10: "portal_splenic_vein",
               11: "pancreas", 12: "right_adrenal_gland", 13: "left_adrenal_gland"}


def fetch(url: str, dest: str | os.PathLike, *, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (`dest.part`), verifying `md5` if given.

    `dest` appears only once complete and verified. A verified `dest` that already exists is not fetched again.
    """
    dest = Path(dest)
    if dest.exists():
        if md5 and file_digest(dest, "md5") != md5:
            raise DownloadError(f"{dest} exists but its MD5 is not {md5}; move it away to download it again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the part is complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}). Offline? Download it by hand and put it at {dest}"
                            + (f" (MD5 {md5})" if md5 else "") + ", then rerun.") from None
    if response is not None:
        with response:
            resumed = offset and response.status == 206
            if offset and not resumed:
                log.warning("%s: server ignored the Range request; downloading from the start", url)
            mode = "ab" if resumed else "wb"
            log.info("%s: %s at byte %d", url, "resuming" if resumed else "downloading", offset if resumed else 0)
            expected = int(response.headers.get("Content-Length") or -1)
            received, problem = 0, None
            with open(part, mode) as fh:
                try:
                    while block := response.read(CHUNK):
                        fh.write(block)
                        received += len(block)
                except (http.client.HTTPException, OSError) as exc:
                    problem = type(exc).__name__
                total = fh.tell()
            if problem or 0 <= expected != received:  # urllib returns a short read silently when a link drops
                raise DownloadError(f"{url}: interrupted after {total} bytes ({problem or 'connection closed'}); "
                                    f"the partial file {part} is kept: rerun to resume")
    if md5:
        actual = file_digest(part, "md5")
        if actual != md5:
            bad = part.with_name(dest.name + ".bad")
            part.replace(bad)
            raise DownloadError(f"{url}: MD5 {actual} != expected {md5}; the download was kept as {bad} for "
                                "inspection and will not be used. Rerun to download again.")
    part.replace(dest)
    return dest


def extract_tar(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a tar archive into `target` atomically, refusing unsafe members (tarfile filter 'data')."""
    archive = Path(archive)
    try:
        with atomic_dir(target) as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except tarfile.FilterError as exc:
        raise DownloadError(f"{archive}: unsafe member refused ({exc}); nothing was extracted") from None
    except (tarfile.ReadError, EOFError, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise DownloadError(f"{archive}: truncated or corrupt archive ({exc}); nothing was extracted. "
                            "Move it away and rerun to download it again.") from None
    return Path(target)


def extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a zip atomically, refusing absolute or `..` member names."""
    archive = Path(archive)
    try:
        with atomic_dir(target) as tmp, zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise DownloadError(f"{archive}: unsafe member {name!r} refused; nothing was extracted")
            zf.extractall(tmp)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive}: truncated or corrupt zip ({exc}); nothing was extracted") from None
    return Path(target)


def install_msd_task(task: str, raw_dir: str | os.PathLike, downloads: str | os.PathLike,
                     url: str | None = None, md5: str | None = None) -> Path:
    """Download (or reuse) an MSD task archive, verify it, and install its folder as `raw_dir` (MSD layout).

    `url`/`md5` override the registry (a mirror, or the tests' local server).
    """
    if task not in MSD_TASKS and not (url and md5):
        raise DownloadError(f"unknown MSD task {task!r}; known: {sorted(MSD_TASKS)}")
    spec = MSD_TASKS.get(task)
    archive = fetch(url or spec.url, Path(downloads) / f"{task}.tar", md5=md5 or spec.md5)
    staging = Path(downloads) / f".{task}.extracting"
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted extraction, never user data
    extract_tar(archive, staging)
    inner = staging / task
    if not (inner / "dataset.json").exists():
        shutil.rmtree(staging)
        raise DownloadError(f"{archive}: expected {task}/dataset.json inside the archive")
    raw_dir = Path(raw_dir)
    if raw_dir.exists():
        shutil.rmtree(staging)
        raise FileExistsError(f"{raw_dir} already exists; refusing to overwrite it")
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(inner, raw_dir)
    shutil.rmtree(staging)
    return raw_dir
