"""Dataset downloads: resumable (HTTP Range), verified (checksum) before extraction, extracted safely and
atomically, so that a half-downloaded or half-extracted dataset never looks complete.

Only the standard library is used for HTTP (urllib) so that the code runs wherever ctssl does. Archives are listed
before extraction and any absolute or `..` member refuses the whole archive (`tarfile`'s "data" filter would only
strip a leading "/"); the filter still guards links during extraction.

Without a published checksum (KiTS19), a file is accepted only after an integrity check of its own format (a
.nii.gz decompresses to the end and holds the image data its header announces; a tar lists to the end; a zip
tests clean), and its SHA-256 is then recorded beside it (`{file}.sha256`). A short or corrupt file, also one left
by an earlier run, is set aside as `{file}.bad` and downloaded again.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import io
import logging
import math
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ctssl.io import atomic_dir, atomic_path, file_digest

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or an archive failed in a way the user must act on; the message says how."""


class NetworkError(DownloadError):
    """A transient failure (unreachable host, dropped connection, server error): retried inside the job, because
    Snakemake's `retries` cannot tell it from a bad input, which must be reported once."""


NETWORK_DELAYS = (2.0, 10.0)  # seconds before the 2nd and 3rd attempt of a transfer that failed transiently


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


NIFTI1_HEADER = 348
MAX_ATTEMPTS = 2  # a download found short or corrupt by its format check is fetched once more from the start


def _nifti_problem(path: Path, gzipped: bool) -> str | None:
    import nibabel as nib
    import numpy as np

    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
        raw = fh.read(NIFTI1_HEADER)
        if len(raw) < NIFTI1_HEADER:
            return f"{len(raw)} bytes, shorter than a NIfTI-1 header ({NIFTI1_HEADER})"
        try:
            header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
            shape, dtype = header.get_data_shape(), np.dtype(header.get_data_dtype())
        except Exception as exc:  # nibabel raises several types for a header that is not NIfTI
            return f"not a NIfTI-1 header ({type(exc).__name__}: {exc})"
        size = NIFTI1_HEADER
        while block := fh.read(CHUNK):  # to the end: a gzip cut short raises EOFError here
            size += len(block)
    expected = int(header["vox_offset"]) + math.prod(shape) * dtype.itemsize
    if size < expected:
        return f"holds {size} bytes, its header announces {expected} ({'x'.join(map(str, shape))} voxels)"
    return None


def format_problem(path: str | os.PathLike) -> str | None:
    """Why a downloaded file is not complete in its own format (None if it is, or if its format has no check)."""
    path = Path(path)
    name = path.name.removesuffix(".part")
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
        if name.endswith((".nii.gz", ".nii")):
            return _nifti_problem(path, gzipped=name.endswith(".gz"))
        if name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(path) as tar:
                tar.getmembers()  # reads every header to the end
        elif name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad:
                return f"member {bad} fails its CRC"
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        return f"truncated or corrupt ({exc})"
    return None


def _set_aside(path: Path, why: str) -> Path:
    bad = path.with_name(path.name.removesuffix(".part") + ".bad")
    path.replace(bad)
    log.warning("%s: %s; kept as %s, downloading again", path, why, bad)
    return bad


def _verified(dest: Path, md5: str | None) -> bool:
    """Whether an existing `dest` can be used as is; a corrupt one is set aside (a wrong MD5 stays an error)."""
    if md5:
        if file_digest(dest, "md5") != md5:
            raise DownloadError(f"{dest} exists but its MD5 is not {md5}; move it away to download it again")
        return True
    problem = format_problem(dest)
    recorded = dest.with_name(dest.name + ".sha256")
    if problem is None and recorded.exists() and recorded.read_text().split()[0] != file_digest(dest):
        problem = f"its SHA-256 differs from the one recorded at download ({recorded})"
    if problem:
        _set_aside(dest, problem)
        return False
    return True


def fetch(url: str, dest: str | os.PathLike, *, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (`dest.part`), verified before `dest` appears:
    by `md5` if given, else by the file's own format (then its SHA-256 is recorded in `dest.sha256`).

    A verified `dest` that already exists is not fetched again; a corrupt one is set aside and fetched again.
    """
    dest = Path(dest)
    if dest.exists() and _verified(dest, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        _transfer_with_retries(url, part, dest, md5, timeout)
        if md5:
            actual = file_digest(part, "md5")
            if actual != md5:
                bad = part.with_name(dest.name + ".bad")
                part.replace(bad)
                raise DownloadError(f"{url}: MD5 {actual} != expected {md5}; the download was kept as {bad} for "
                                    "inspection and will not be used. Rerun to download again.")
            break
        problem = format_problem(part)
        if problem is None:
            with atomic_path(dest.with_name(dest.name + ".sha256")) as tmp:
                tmp.write_text(f"{file_digest(part)}  {dest.name}\n")
            break
        bad = _set_aside(part, problem)
        if attempt == MAX_ATTEMPTS:
            raise DownloadError(f"{url}: the download is {problem} twice in a row (kept as {bad}); the server may "
                                "be sending a broken file. Download it by hand and put it at " + str(dest))
    part.replace(dest)
    return dest


def _transfer_with_retries(url: str, part: Path, dest: Path, md5: str | None, timeout: float) -> None:
    """`_transfer`, again after a transient failure (resuming where it stopped), at most 1 + len(NETWORK_DELAYS)
    times; anything else (404, a checksum, a format) is not retried."""
    for delay in (*NETWORK_DELAYS, None):
        try:
            return _transfer(url, part, dest, md5, timeout)
        except NetworkError as exc:
            if delay is None:
                raise
            log.warning("%s; retrying in %.0f s", exc, delay)
            time.sleep(delay)


def _transfer(url: str, part: Path, dest: Path, md5: str | None, timeout: float) -> None:
    """Append what the server still has to `part` (an HTTP Range request if `part` exists)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the part is complete
            return
        error = NetworkError if exc.code >= 500 or exc.code == 429 else DownloadError
        raise error(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(f"cannot reach {url} ({reason}). Offline? Download it by hand and put it at {dest}"
                            + (f" (MD5 {md5})" if md5 else "") + ", then rerun.") from None
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
            raise NetworkError(f"{url}: interrupted after {total} bytes ({problem or 'connection closed'}); "
                                f"the partial file {part} is kept: rerun to resume")


def extract_tar(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a tar archive into `target` atomically, refusing unsafe members (tarfile filter 'data')."""
    archive = Path(archive)
    try:
        with atomic_dir(target) as tmp, tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts:
                    raise tarfile.FilterError(f"member {member.name!r} has an absolute or parent path")
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
